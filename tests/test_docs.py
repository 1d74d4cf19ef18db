"""The README and docs/ link only inside the repository, and every link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "loadtests" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<(https?://[^>]+)>")
LOCAL_URL = re.compile(r"https?://(localhost|127\.0\.0\.1)(:\d+)?(/|$)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # code is not links
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves_inside_the_repository(doc: Path):
    assert doc.is_file()
    for target in _links(doc):
        if target.startswith(("http://", "https://")):
            assert LOCAL_URL.match(target), f"{doc.name} links outside the repository: {target}"
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        assert resolved.exists(), f"{doc.name}: {target} does not exist"
        assert REPO in resolved.parents or resolved == REPO, f"{doc.name}: {target} leaves the repository"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved.read_text()), f"{doc.name}: no heading #{anchor} in {file_part or doc.name}"


def test_the_readme_is_a_guide_not_a_notebook():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for word in ("session", "earlier run", "attempt"):
        assert word not in text.lower(), f"the README speaks of {word!r}"
