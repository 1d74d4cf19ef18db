"""Shared fixtures: tiny ViLT checkpoints made with save_pretrained (no hub, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import make_checkpoint
from models.backbones.vilt.modeling import ViltBackbone

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny tensors gain nothing from a second thread, and CI's 2 cores are shared with the servers the tests start.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str | None, tuple[Path, object]]:
    """One tiny checkpoint per head layout: {head: (directory, transformers model)}."""
    made = {}
    for head in ("vqa", "nlvr2", "retrieval", None):
        directory = tmp_path_factory.mktemp(f"vilt-{head or 'base'}")
        made[head] = (directory, make_checkpoint(directory, head))
    return made


@pytest.fixture(scope="session")
def backbones(checkpoints) -> dict:
    """Each tiny checkpoint loaded as a ViltBackbone: {head: backbone}."""
    return {head: ViltBackbone.from_pretrained(directory) for head, (directory, _) in checkpoints.items()}


@pytest.fixture(scope="module")
def backbone(checkpoints) -> ViltBackbone:
    """A tiny backbone whose checkpoint carries only a VQA head."""
    directory, _ = checkpoints["vqa"]
    backbone = ViltBackbone.from_pretrained(directory)
    assert set(backbone.task_heads()) == {"vqa"}
    return backbone
