"""Run the README's examples against a real service, check or rewrite the outputs they quote.

A ```console block holds commands (`$ ...`, continued by a trailing backslash) each followed by the
output it prints; a ```pycon block is a doctest session. Both run in one scratch directory, in
order, against a service on ``localhost:3000`` (the port is rewritten to the test server's). Quoted
output matches when its text matches and every number is within a small tolerance (float rounding
differs between CPUs); ``...`` stands for any text, which is how volatile values such as
``latency_ms`` are quoted.

    python tests/readme.py --write     # serve a copy of plans/, run every example, rewrite the quoted outputs
"""

from __future__ import annotations

import contextlib
import doctest
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
ADMIN_TOKEN = "s3cret"  # the token the README's admin examples use
BLOCK = re.compile(r"^```(console|pycon)\n(.*?)^```$", re.S | re.M)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
VOLATILE = [(re.compile(r'("latency_ms":\s*)[-0-9.e]+'), r"\1...")]  # differs on every run


@dataclass
class Example:
    kind: str  # "console" or "pycon"
    start: int  # offset of the block's body in the README
    end: int
    body: str


def examples(text: str) -> list[Example]:
    return [Example(m.group(1), m.start(2), m.end(2), m.group(2)) for m in BLOCK.finditer(text)]


def outputs_match(expected: str, actual: str, rel: float = 1e-3, abs_: float = 2e-4) -> bool:
    """Text equal up to whitespace runs and ``...`` wildcards; numbers equal within tolerance."""
    expected, actual = " ".join(expected.split()), " ".join(actual.split())
    pattern, numbers, pos = [], [], 0
    for token in re.finditer(r"\.\.\.|" + NUMBER.pattern, expected):
        pattern.append(re.escape(expected[pos:token.start()]))
        if token.group() == "...":
            pattern.append(".*?")
        else:
            pattern.append(f"({NUMBER.pattern})")
            numbers.append(float(token.group()))
        pos = token.end()
    pattern.append(re.escape(expected[pos:]))
    found = re.fullmatch("".join(pattern), actual, re.S)
    if found is None:
        return False
    return all(math.isclose(float(got), want, rel_tol=rel, abs_tol=abs_) for got, want in zip(found.groups(), numbers))


def console_commands(body: str) -> list[tuple[str, str]]:
    """(command, quoted output) pairs of a console block."""
    pairs, lines, i = [], body.splitlines(), 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise ValueError(f"console block line {lines[i]!r} is neither a command nor its output")
        command = [lines[i][2:]]
        while command[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i])
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        pairs.append(("\n".join(command), "\n".join(output)))
    return pairs


def _volatile(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text


class Runner:
    """Runs examples in ``workdir`` against the service at ``base_url``."""

    def __init__(self, base_url: str, workdir: Path, env: dict[str, str]) -> None:
        self.base_url, self.workdir, self.env = base_url, workdir, env
        self.globs: dict = {}

    def _url(self, text: str) -> str:
        return text.replace("http://localhost:3000", self.base_url).replace("localhost:3000", self.base_url[len("http://"):])

    def run_command(self, command: str) -> str:
        done = subprocess.run(["bash", "-c", self._url(command)], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"$ {command}\nexited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done.stdout.rstrip("\n")

    def run_console(self, body: str) -> tuple[list[tuple[str, str, str]], str]:
        """[(command, quoted, actual)], and the block's body with the actual outputs."""
        results, rewritten = [], []
        for command, quoted in console_commands(body):
            actual = self.run_command(command)
            results.append((command, quoted, actual))
            rewritten.append("$ " + command + ("\n" + _volatile(actual) if actual else ""))
        return results, "\n".join(rewritten) + "\n"

    def run_pycon(self, body: str) -> tuple[list[tuple[str, str, str]], str]:
        parsed = doctest.DocTestParser().get_examples(self._url(body))
        results, rewritten = [], []
        cwd = os.getcwd()
        os.chdir(self.workdir)
        try:
            for example in parsed:
                source = example.source
                out = StringIO()
                with redirect_stdout(out):
                    code = compile(source, "<README>", "single")
                    exec(code, self.globs)  # noqa: S102 - the README's own examples
                actual = out.getvalue().rstrip("\n")
                results.append((source.rstrip("\n"), example.want.rstrip("\n"), actual))
                lines = source.rstrip("\n").splitlines()
                rewritten.append("\n".join([">>> " + lines[0], *("... " + line for line in lines[1:])]))
                if actual:
                    rewritten.append(actual)
        finally:
            os.chdir(cwd)
        return results, "\n".join(rewritten).replace(self.base_url, "http://localhost:3000") + "\n"

    def run_all(self, text: str) -> tuple[list[tuple[str, str, str]], str]:
        """Every example in order; returns the checks and the README with actual outputs."""
        checks, pieces, pos = [], [], 0
        for example in examples(text):
            results, body = (self.run_console if example.kind == "console" else self.run_pycon)(example.body)
            checks += results
            pieces += [text[pos:example.start], body]
            pos = example.end
        pieces.append(text[pos:])
        return checks, "".join(pieces)


STORE_PARTS = ("backbone", "vqa", "nlvr2", "retrieval", "store.json")  # the embedded default, without the METER


@contextlib.contextmanager
def serve_embedded_copy(scratch: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Serve a copy of the embedded default (admin examples change its store.json) as `make serve`
    does, with the README's admin token; yield the base URL and the environment for the examples."""
    from helpers import serve  # noqa: PLC0415 - tests/ is on sys.path only when run from there

    store = scratch / "plans"
    store.mkdir()
    for part in STORE_PARTS:
        source = REPO / "plans" / part
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, store / part)
    with serve(scratch, DAS_BACKBONE=str(store / "backbone"), DAS_PLANS=str(store), DAS_ADMIN_TOKEN=ADMIN_TOKEN,
               DAS_TORCH_THREADS="1") as client:
        # the examples call `das` as a reader with the venv active would
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        yield str(client.base_url).rstrip("/"), env


def _write() -> None:
    with tempfile.TemporaryDirectory() as scratch, serve_embedded_copy(Path(scratch)) as (base_url, env):
        workdir = Path(scratch) / "work"
        workdir.mkdir()
        _, rewritten = Runner(base_url, workdir, env).run_all(README.read_text())
    README.write_text(rewritten)
    print(f"rewrote the outputs quoted in {README}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    _write()
