"""Uploaded plan archives: unpacked safely into the store, validated, loaded."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

import service.store as store_module
from models.das.plan import AdapterShapes, BackboneRef, PlanSpec, save_plan
from models.backbones.vilt.modeling import ViltBackbone
from service.errors import RegistryError
from service.registry import PlanRegistry
from service.store import PlanStore


@pytest.fixture(scope="module")
def backbone(checkpoints) -> ViltBackbone:
    return ViltBackbone.from_pretrained(checkpoints["vqa"][0])


@pytest.fixture
def plan_dir(backbone, tmp_path) -> Path:
    spec = PlanSpec(task="vqa", name="uploaded", version=2, backbone=BackboneRef("vilt", backbone.fingerprint),
                    skipped_layers=(2,), adapters=AdapterShapes(4, None))
    save_plan(tmp_path / "src" / "uploaded", spec, backbone.build_plan_modules(spec))
    return tmp_path / "src" / "uploaded"


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _plan_files(plan_dir: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + name: (plan_dir / name).read_bytes() for name in ("plan.json", "weights.safetensors")}


def test_tar_and_zip_archives_load_into_the_store(backbone, plan_dir, tmp_path):
    store = PlanStore(tmp_path / "store")
    registry = PlanRegistry(backbone, store)
    plan = registry.load_archive(_tar(tmp_path / "p.tar.gz", _plan_files(plan_dir, "uploaded/")))
    assert (plan.task, plan.name, plan.version) == ("vqa", "uploaded", 2)
    assert (store.root / "vqa" / "uploaded" / "weights.safetensors").is_file()
    assert "uploaded" in json.loads((store.root / "store.json").read_text())["loaded"]["vqa"]
    # the same version again is refused; nothing left behind in the store
    archive = tmp_path / "p.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, data in _plan_files(plan_dir).items():
            zipped.writestr(name, data)
    with pytest.raises(RegistryError) as refused:
        registry.load_archive(archive)
    assert refused.value.status == 409
    assert not [p for p in store.root.iterdir() if p.name.startswith(".upload-")]


def test_hostile_archives_cannot_escape_the_store(backbone, plan_dir, tmp_path):
    store = PlanStore(tmp_path / "store")
    registry = PlanRegistry(backbone, store)
    files = _plan_files(plan_dir, "../../")
    files["../../escaped.txt"] = b"x"
    files["/tmp/absolute-escape.txt"] = b"x"
    registry.load_archive(_tar(tmp_path / "evil.tar.gz", files))
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute-escape.txt").exists()
    assert sorted(p.name for p in (store.root / "vqa" / "uploaded").iterdir()) == ["plan.json", "weights.safetensors"]


def test_bad_archives_are_refused_with_reasons(backbone, plan_dir, tmp_path, monkeypatch):
    registry = PlanRegistry(backbone, PlanStore(tmp_path / "store"))
    not_archive = tmp_path / "x.bin"
    not_archive.write_bytes(b"hello")
    with pytest.raises(RegistryError, match="not a .tar"):
        registry.load_archive(not_archive)
    with pytest.raises(RegistryError, match="lacks weights.safetensors"):
        registry.load_archive(_tar(tmp_path / "a.tar.gz", {"plan.json": (plan_dir / "plan.json").read_bytes()}))
    corrupt = _plan_files(plan_dir)
    corrupt["weights.safetensors"] = corrupt["weights.safetensors"][:-1] + b"\x00"
    with pytest.raises(RegistryError, match="checksum") as bad:
        registry.load_archive(_tar(tmp_path / "b.tar.gz", corrupt))
    assert bad.value.status == 422
    monkeypatch.setattr(store_module, "MAX_ARCHIVE_BYTES", 100)
    with pytest.raises(RegistryError, match="limit") as big:
        registry.load_archive(_tar(tmp_path / "c.tar.gz", _plan_files(plan_dir)))
    assert big.value.status == 413
    assert registry.get("vqa").name == "full"


@pytest.mark.parametrize("plan_json, message", [
    (b"[" * 200_000 + b"]" * 200_000, "nested more than 32 levels"),
    (None, "the limit for plan.json is 1048576"),  # valid JSON, but 2 MB
])
def test_hostile_plan_json_in_an_archive_is_a_422_naming_the_limit(backbone, plan_dir, tmp_path, plan_json, message):
    files = _plan_files(plan_dir)
    files["plan.json"] = plan_json or files["plan.json"] + b" " * 2_000_000
    store = PlanStore(tmp_path / "store")
    registry = PlanRegistry(backbone, store)
    with pytest.raises(RegistryError) as refused:
        registry.load_archive(_tar(tmp_path / "hostile.tar.gz", files))
    assert refused.value.status == 422 and message in str(refused.value)
    assert not (store.root / "vqa" / "uploaded").exists() and registry.get("vqa").name == "full"
