"""Architecture-independent backbone plumbing: reading HF checkpoint directories, fingerprints,
device/dtype choice, and the registry that maps a checkpoint's ``model_type`` to its module.

Adding an architecture = one module (``models/<arch>.py``) with a backbone class + one entry in
``ARCHITECTURES``. What the runtime, plans, service, FLOPs and training use of that class
(``models/vilt.py`` and ``models/meter.py`` are the two implementations):

* ``from_pretrained(directory, device, dtype)``; ``architecture``, ``fingerprint``, ``config``
  (with ``image_size``, and ``hidden_size`` / ``layer_norm_eps`` of the arms), ``device``, ``dtype``;
* ``num_layers``: the number of DAS *arms* (skippable layers) that plans' ``skipped_layers`` index;
* ``preprocess(images, texts)`` -> a batch with ``text_lengths``, ``truncated``, ``patch_grids``, ``to()``;
  ``encode(batch, plan_modules, image_token_type_idx)`` -> pooled vectors; ``head_for``, ``task_heads``,
  ``labels``; ``check_plan_spec``, ``build_plan_modules``; ``flops(...)`` / ``flops_at(...)``;
* without weights (``das flops``): ``load_config(directory)``, ``arm_count(config)``,
  ``arm_names(config)``, ``config_flops_at(config, task, spec, text_len, image_size, num_labels)``,
  ``default_skip_bottleneck``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

# model_type in config.json -> "module:Class"
ARCHITECTURES = {"vilt": "models.backbones.vilt.modeling:ViltBackbone", "meter": "models.backbones.meter.modeling:MeterBackbone"}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BackboneError(ValueError):
    """A checkpoint directory could not be loaded; the message says which file and why."""


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device {name!r} requested but CUDA is not available on this machine")
    if not (name == "cpu" or name.startswith("cuda")):
        raise BackboneError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype = "float32") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise BackboneError(f"unknown dtype {name!r} (use {', '.join(DTYPES)})")
    return DTYPES[name]


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise BackboneError(f"{directory}: not a directory (expected a checkpoint in the Hugging Face layout)")
    if not path.is_file():
        raise BackboneError(f"{directory}: missing config.json (expected a checkpoint in the Hugging Face layout)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BackboneError(f"{path}: not valid JSON ({exc})") from None


def read_checkpoint_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, its sharded form, or pytorch_model.bin."""
    directory = Path(directory)
    single_st = directory / "model.safetensors"
    index_st = directory / "model.safetensors.index.json"
    single_bin = directory / "pytorch_model.bin"
    index_bin = directory / "pytorch_model.bin.index.json"
    if single_st.is_file():
        files = [single_st]
    elif index_st.is_file():
        files = sorted({directory / f for f in json.loads(index_st.read_text())["weight_map"].values()})
    elif single_bin.is_file():
        files = [single_bin]
    elif index_bin.is_file():
        files = sorted({directory / f for f in json.loads(index_bin.read_text())["weight_map"].values()})
    else:
        raise BackboneError(f"{directory}: no weights found (model.safetensors or pytorch_model.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def fingerprint(config_items: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """sha256 over the architecture-relevant config and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config_items, sort_keys=True, default=str).encode())
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def backbone_class(directory: str | os.PathLike) -> type:
    """The backbone class for a checkpoint directory (dispatch on config.json model_type)."""
    model_type = read_config(directory).get("model_type")
    if model_type not in ARCHITECTURES:
        raise BackboneError(
            f"{directory}: model_type {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    module_name, class_name = ARCHITECTURES[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_backbone(directory: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype = "float32"):
    """Load any supported backbone from a local checkpoint directory (dispatch on config.json model_type)."""
    cls = backbone_class(directory)
    device = resolve_device(device) if isinstance(device, str) else device
    return cls.from_pretrained(directory, device=device, dtype=resolve_dtype(dtype))
