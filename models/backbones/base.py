"""What every backbone provides, and the architecture-independent plumbing around it.

:class:`Backbone` (an instance: a frozen checkpoint) and :class:`BackboneClass` (the class, which also
answers `das flops` from a config without weights) are the contract that the runtime, plans, the
service, FLOPs and training rely on; ``models/backbones/vilt/`` and ``models/backbones/meter/`` are the
two implementations. Here too: reading HF checkpoint directories, fingerprints, device/dtype choice,
the image helpers both backbones share, and the registry that maps a checkpoint's ``model_type`` to
its class.

Adding an architecture = one package ``models/backbones/<arch>/`` with a class that satisfies
:class:`BackboneClass` + one entry in ``ARCHITECTURES``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from models.das.adapters import PlanModules
from models.das.flops import FlopsReport
from models.das.plan import PlanBackbone, PlanError, PlanSpec

# model_type in config.json -> "module:Class" (imported on first use: a ViLT never loads METER's code)
ARCHITECTURES = {
    "vilt": "models.backbones.vilt.modeling:ViltBackbone",
    "meter": "models.backbones.meter.modeling:MeterBackbone",
    "llava": "models.backbones.llava.modeling:LlavaBackbone",
    "lavin": "models.backbones.lavin.modeling:LavinBackbone",
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BackboneError(ValueError):
    """A checkpoint directory could not be loaded; the message says which file and why."""


# ---------------------------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------------------------
class BackboneBatch(Protocol):
    """Preprocessed image-text pairs (``ViltBatch``, ``MeterBatch``)."""

    text_lengths: list[int]  # tokens per pair, special tokens included, after truncation
    truncated: list[bool]  # whether the text was cut to the model's maximum length
    patch_grids: list[tuple[int, int]]  # patch rows x columns per image

    def __len__(self) -> int: ...

    def to(self, device: torch.device, dtype: torch.dtype) -> BackboneBatch: ...


class Backbone(PlanBackbone, Protocol):
    """A loaded, frozen backbone. ``num_layers`` counts its DAS *arms* (the layers plans'
    ``skipped_layers`` index); ``config`` has ``image_size``, ``patch_size``, ``hidden_size`` and
    ``layer_norm_eps`` of the arms."""

    config: Any

    @property
    def max_text_len(self) -> int: ...

    def labels(self, task: str) -> list[str]:
        """The checkpoint head's label vocabulary (index -> label)."""

    def build_plan_modules(self, spec: PlanSpec, init_from_backbone: bool = False) -> PlanModules:
        """Modules with the shapes ``spec`` implies; ``init_from_backbone`` copies the backbone's own parts."""

    def head_for(self, task: str, plan: PlanModules) -> nn.Module:
        """The plan's head for ``task``, else the checkpoint's (PlanError when neither has one)."""

    def preprocess(self, images: Sequence[Image.Image], texts: Sequence[str]) -> BackboneBatch: ...

    def encode(self, batch: BackboneBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """Pooled vectors of the reduced network ``plan`` describes."""

    def sequence_output(self, batch: BackboneBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """Final hidden states (B, text_len + 1 + patches, h): the text tokens, then the image [CLS] and
        the image's patches in raster order (pre-training's patch objectives read them by position)."""

    def flops(self, task: str, spec: PlanSpec | None, text_len: int, patch_grids: Sequence[tuple[int, int]]) -> FlopsReport:
        """FLOPs of one request: one pass per image plus the task head."""

    def flops_at(self, task: str, spec: PlanSpec | None, text_len: int, image_size: int | tuple[int, int]) -> FlopsReport:
        """FLOPs of a request whose images were resized to ``image_size``."""

    def parameters(self) -> Any: ...  # nn.Module's


class BackboneClass(Protocol):
    """A backbone class: loads checkpoints, and answers `das flops` from config.json alone."""

    architecture: str
    default_skip_bottleneck: int  # the DAS reference's skip adapter bottleneck for the architecture

    def from_pretrained(self, directory: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> Backbone: ...

    def load_config(self, directory: str | os.PathLike) -> Any: ...

    def arm_count(self, config: Any) -> int: ...

    def arm_names(self, config: Any) -> list[str]:
        """Human names of the arms, by arm index ("" where the index says it all)."""

    def config_flops_at(self, config: Any, task: str, spec: PlanSpec | None, text_len: int,
                        image_size: int | tuple[int, int], num_labels: int | None = None) -> FlopsReport: ...


# ---------------------------------------------------------------------------------------------
# Modality token types (shared by the ViLT and METER plans)
# ---------------------------------------------------------------------------------------------
NLVR2_TOKEN_TYPES = 3  # 0 text, 1 left image, 2 right image (NLVR2 fine-tuning adds the third)


def token_type_vocab(task: str, backbone_types: int) -> int:
    """Token types a plan's own ``token_type_embeddings`` holds: NLVR2 needs one per image."""
    return max(backbone_types, NLVR2_TOKEN_TYPES) if task == "nlvr2" else backbone_types


def check_own_parts(spec: PlanSpec, allowed: Sequence[str], family: str) -> None:
    """A plan carries its own copies only of parts its backbone has (``allowed``)."""
    unknown = sorted(set(spec.own_parts) - set(allowed))
    if unknown:
        raise PlanError(f"plan {spec.task}/{spec.name}: own_parts {unknown} do not exist in a {family} backbone"
                        + (f" (it has: {', '.join(allowed)})" if allowed else ""))


def check_nlvr2_token_types(spec: PlanSpec, backbone_types: int) -> None:
    """An NLVR2 plan on a backbone with fewer token types must carry its own embeddings."""
    if spec.task == "nlvr2" and "token_type_embeddings" not in spec.own_parts and backbone_types < NLVR2_TOKEN_TYPES:
        raise PlanError(
            f"plan nlvr2/{spec.name}: NLVR2 needs {NLVR2_TOKEN_TYPES} modality token types, the backbone has "
            f"{backbone_types}; the plan must carry its own token_type_embeddings"
        )


# ---------------------------------------------------------------------------------------------
# Images (shared by every backbone's preprocessing)
# ---------------------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images become RGB (alpha composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def limit_aspect_ratio(image: Image.Image, max_ratio: float, max_side: int | None = None) -> Image.Image:
    """Pad (bottom/right, black) an image whose sides differ by more than ``max_ratio``; with
    ``max_side``, also shrink it so that the padded image's longer side is at most ``max_side``.

    ViLT's resize caps the longer side, so a very long image would shrink its shorter side below
    one size_divisor step and the processor would fail; padding keeps the whole image and only
    affects such images. The shrink comes before the padding, so no step costs more than about
    ``max_side`` squared pixels (padded first, a 40000 x 1 upload was 40000 x 2100: 250 MB).
    """
    width, height = image.size
    padded = (max(width, math.ceil(height / max_ratio)), max(height, math.ceil(width / max_ratio)))
    scale = 1.0 if max_side is None else min(1.0, max_side / max(padded))
    return padded_region(image, (0, 0, *padded), scale)


def padded_region(image: Image.Image, box: tuple[int, int, int, int], scale: float = 1.0) -> Image.Image:
    """The region ``box`` of ``image`` extended with black to the right and bottom, scaled by
    ``scale`` (<= 1), built at the output size: only the part of the image inside ``box`` is read
    and resized, the padding is never made at full size."""
    x0, y0, x1, y1 = box
    if scale >= 1 and box == (0, 0, *image.size):
        return image
    # rounded up, so that shrinking never narrows the padding below the aspect-ratio limit
    out = Image.new(image.mode, (max(1, math.ceil((x1 - x0) * scale - 1e-6)), max(1, math.ceil((y1 - y0) * scale - 1e-6))))
    inside = (max(x0, 0), max(y0, 0), min(x1, image.width), min(y1, image.height))
    if inside[2] > inside[0] and inside[3] > inside[1]:
        if scale >= 1:
            part = image if inside == (0, 0, *image.size) else image.crop(inside)
        else:
            size = (max(1, round((inside[2] - inside[0]) * scale)), max(1, round((inside[3] - inside[1]) * scale)))
            # reducing_gap: a box reduction first keeps a 40M x 1 image's resize at ms, not seconds
            part = image.resize(size, Image.Resampling.BICUBIC, box=inside, reducing_gap=3.0)
        out.paste(part, (round((inside[0] - x0) * scale), round((inside[1] - y0) * scale)))
    return out


# ---------------------------------------------------------------------------------------------
# Loading: device and dtype, checkpoint directories, fingerprints, the registry
# ---------------------------------------------------------------------------------------------


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


def backbone_class(directory: str | os.PathLike) -> BackboneClass:
    """The backbone class for a checkpoint directory (dispatch on config.json model_type)."""
    model_type = read_config(directory).get("model_type")
    if model_type not in ARCHITECTURES:
        raise BackboneError(
            f"{directory}: model_type {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    module_name, class_name = ARCHITECTURES[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_backbone(
    directory: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype = "float32"
) -> Backbone:
    """Load any supported backbone from a local checkpoint directory (dispatch on config.json model_type)."""
    cls = backbone_class(directory)
    device = resolve_device(device) if isinstance(device, str) else device
    return cls.from_pretrained(directory, device=device, dtype=resolve_dtype(dtype))
