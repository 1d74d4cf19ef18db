"""Helpers shared by the test modules (fixtures live in conftest.py): tiny ViLT and LLaVA checkpoints made
with save_pretrained (no hub, no downloads), images, plans with perturbed adapters, and a real `bentoml serve`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from transformers import ViltConfig

from models.backbones.llava.checkpoint import save_llava_checkpoint
from models.backbones.vilt.checkpoint import save_vilt_checkpoint
from models.backbones.vilt.modeling import ViltBackbone
from models.das.plan import AdapterShapes, BackboneRef, PlanSpec, load_plan, save_plan
from service.registry import PlanRegistry
from service.store import STATE_FILE

WORDS = ["what", "color", "is", "the", "circle", "square", "red", "blue", "green", "left", "right",
         "of", "a", "there", "two", "one", "how", "many", "shapes", "are", "image", "both", "images"]
VQA_LABELS = ["red", "blue", "green", "yes", "no", "one", "two"]
# the tiny LLaVA's word-level vocabulary (models.backbones.llava.checkpoint); LLaVA-1.5's VQA prompt is in words
LLAVA_WORDS = ["what", "color", "is", "the", "circle", "square", "red", "blue", "green", "left", "right", "of", "a",
               "there", "two", "one", "how", "many", "shapes", "are", "image", "yes", "no", "describe", "answer",
               "question", "using", "single", "word", "or", "phrase"]


def tiny_config(head: str | None = None, **overrides) -> ViltConfig:
    """A ViLT small enough for fast tests: hidden 32, 4 layers, 64 px images, 16 px patches."""
    kwargs = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=64, patch_size=16, max_position_embeddings=16, vocab_size=64,
        max_image_length=-1,
    )
    if head == "vqa":
        kwargs.update(id2label=dict(enumerate(VQA_LABELS)), label2id={l: i for i, l in enumerate(VQA_LABELS)})
    if head == "nlvr2":
        kwargs.update(num_images=2, modality_type_vocab_size=3, id2label={0: "False", 1: "True"},
                      label2id={"False": 0, "True": 1})
    kwargs.update(overrides)
    return ViltConfig(**kwargs)


def make_checkpoint(directory: Path, head: str | None, seed: int = 0, **overrides):
    """Save a tiny checkpoint with ``head`` into ``directory``; return the transformers model."""
    return save_vilt_checkpoint(directory, tiny_config(head, **overrides), head, WORDS, seed=seed)


def make_llava_checkpoint(directory: Path, seed: int = 0, **config_overrides):
    """A tiny LLaVA checkpoint (CLIP 32 wide x 2 layers at 32 px, Llama 32 wide x 4 blocks, 256 positions)
    with its processor in ``directory``; returns the transformers model."""
    return save_llava_checkpoint(directory, LLAVA_WORDS, seed=seed, **config_overrides)


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return image.convert(mode) if mode != "RGB" else image


# ---------------------------------------------------------------------------------------------
# plans and a real service
# ---------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def save_random_plan(backbone, store: Path, task: str, name: str, skipped=(), version: int = 1, seed: int = 0,
               parallel_bottleneck: int | None = None, **spec_kwargs):
    """A plan for any backbone (ViLT or METER), adapters perturbed from their init so it changes outputs."""
    spec = PlanSpec(task=task, name=name, version=version,
                    backbone=BackboneRef(backbone.architecture, backbone.fingerprint), skipped_layers=tuple(skipped),
                    adapters=AdapterShapes(8 if skipped else None, parallel_bottleneck), **spec_kwargs)
    torch.manual_seed(seed)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True)
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_plan(store / task / name, spec, modules, overwrite=True)


def two_plan_vqa_store(root: Path, skip1_metrics: dict | None = None, skip2_metrics: dict | None = None):
    """A tiny VQA checkpoint in root/backbone and a store root/plans with plans skip1 (layer 1) and skip2
    (layers 1, 2); store.json is the caller's. Returns (backbone dir, store, backbone)."""
    backbone_dir, store = root / "backbone", root / "plans"
    backbone_dir.mkdir()
    make_checkpoint(backbone_dir, "vqa")
    backbone = ViltBackbone.from_pretrained(backbone_dir)
    save_random_plan(backbone, store, "vqa", "skip1", skipped=(1,), **({"metrics": skip1_metrics} if skip1_metrics else {}))
    save_random_plan(backbone, store, "vqa", "skip2", skipped=(1, 2), seed=1,
               **({"metrics": skip2_metrics} if skip2_metrics else {}))
    return backbone_dir, store, backbone


@contextlib.contextmanager
def serve(root: Path, **settings: str):
    """Run `bentoml serve` from the repository root with DAS_* settings; yield a client once ready."""
    port = free_port()
    # BentoML keeps the Prometheus multiprocess files in $BENTOML_HOME/prometheus_multiproc_dir and a
    # starting server empties it: servers sharing one home mix and erase each other's metrics.
    env = {**os.environ, "DAS_ADMIN_TOKEN": TOKEN, "DAS_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": str(root / f"bentoml-home-{port}"), **settings}
    log_path = root / f"serve-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:DASService", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
            deadline = time.time() + 300  # a start on a loaded 2-core host can take minutes; a crash ends it at once
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.time() > deadline:
                    log.flush()
                    raise RuntimeError("bentoml serve did not start:\n" + log_path.read_text()[-4000:])
                time.sleep(0.5)
            yield client
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def post_vqa(client, image: Image.Image, question: str, **fields):
    return client.post("/vqa", files={"image": ("q.png", png(image), "image/png")},
                       data={"question": question, **fields})


def assert_client_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert fragment.lower() in json.dumps(body).lower(), body


# -- plan stores (in process) -------------------------------------------------------------------
def make_spec(backbone, name: str, task: str = "vqa", version: int = 1, skipped=(1,), **fields) -> PlanSpec:
    return PlanSpec(
        task=task, name=name, version=version, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
        skipped_layers=tuple(skipped), adapters=AdapterShapes(skip_bottleneck=4), metrics={"vqa_score": 0.5}, **fields,
    )


def write_plan(root: Path, backbone, name: str, task: str = "vqa", version: int = 1, skipped=(1,), seed: int = 0,
               at: Path | None = None) -> PlanSpec:
    """save_plan(<store>/<task>/<name>, spec, modules) with random (non-zero) weights."""
    spec = make_spec(backbone, name, task, version, skipped)
    modules = backbone.build_plan_modules(spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in modules.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return save_plan(at if at is not None else root / task / name, spec, modules, overwrite=True)


def store_json(root: Path) -> dict | None:
    path = root / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def served(reg: PlanRegistry) -> dict:
    """What a worker serves: task -> (active, {name: version})."""
    return {task: (entry["active"], {name: plan.version for name, plan in entry["plans"].items()})
            for task, entry in reg.snapshot().items()}


def perturbed_decoder_plan(backbone, tmp_path: Path, name: str = "skip", skipped=(1, 2), parallel=4, seed: int = 0):
    """A saved and loaded vqa plan for a generative backbone (LLaVA, LaVIN) whose adapters are moved
    away from their init (so they change outputs)."""
    spec = PlanSpec(task="vqa", name=name, version=1, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
                    skipped_layers=tuple(skipped), adapters=AdapterShapes(8 if skipped else None, parallel))
    torch.manual_seed(seed)
    modules = backbone.build_plan_modules(spec)
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_plan(tmp_path / name, spec, modules)
    return load_plan(tmp_path / name, backbone)
