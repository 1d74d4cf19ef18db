"""Shared fixtures: tiny ViLT checkpoints made with save_pretrained (no hub, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViltConfig

from models.backbones.vilt.checkpoint import save_vilt_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny tensors gain nothing from a second thread, and CI's 2 cores are shared with the servers the tests start.
torch.set_num_threads(1)

WORDS = ["what", "color", "is", "the", "circle", "square", "red", "blue", "green", "left", "right",
         "of", "a", "there", "two", "one", "how", "many", "shapes", "are", "image", "both", "images"]
VQA_LABELS = ["red", "blue", "green", "yes", "no", "one", "two"]


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


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str | None, tuple[Path, object]]:
    """One tiny checkpoint per head layout: {head: (directory, transformers model)}."""
    made = {}
    for head in ("vqa", "nlvr2", "retrieval", None):
        directory = tmp_path_factory.mktemp(f"vilt-{head or 'base'}")
        made[head] = (directory, make_checkpoint(directory, head))
    return made


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return image.convert(mode) if mode != "RGB" else image


@pytest.fixture(scope="session")
def backbones(checkpoints) -> dict:
    """Each tiny checkpoint loaded as a ViltBackbone: {head: backbone}."""
    from models.backbones.vilt.modeling import ViltBackbone

    return {head: ViltBackbone.from_pretrained(directory) for head, (directory, _) in checkpoints.items()}
