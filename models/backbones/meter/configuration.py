"""METER's configuration: what a METER checkpoint directory's config.json holds (model_type "meter").

The uni-modal encoders' settings are transformers' ``CLIPVisionConfig`` / ``RobertaConfig`` keyword
arguments; the rest describes the co-attention fusion (one set of sizes for both streams). The
modules built from it are in ``models/backbones/meter/modeling.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers import BertConfig, CLIPVisionConfig, RobertaConfig

from models.backbones.base import BackboneError, read_config
from models.backbones.conv_stem import checked_stem_widths, stem_widths

MODEL_TYPE = "meter"


# encoder settings the backbone and its FLOPs read directly (the rest default as in transformers)
REQUIRED_ENCODER_KEYS = {
    "vision": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size"),
    "text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings"),
}


def meter_vision_defaults(image_size: int = 288) -> dict[str, Any]:
    """METER's CLIP-ViT-B/16: 12 CLIP blocks of which METER keeps 11."""
    return dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=11, num_attention_heads=12,
                image_size=image_size, patch_size=16, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def meter_text_defaults() -> dict[str, Any]:
    """roberta-base."""
    return dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", max_position_embeddings=514, type_vocab_size=1,
                layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


@dataclass
class MeterConfig:
    """What a METER checkpoint directory's config.json holds (model_type "meter").

    ``vision`` and ``text`` are the keyword arguments of transformers' ``CLIPVisionConfig`` and
    ``RobertaConfig``; the rest describes the fusion part (one set of sizes for both streams).
    """

    vision: dict[str, Any] = field(default_factory=meter_vision_defaults)
    text: dict[str, Any] = field(default_factory=meter_text_defaults)
    hidden_size: int = 768  # fusion width (both streams)
    num_fusion_layers: int = 6  # per stream
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12  # METER's BertConfig default (fusion layers)
    max_text_len: int = 40  # METER's VQA setting
    modality_type_vocab_size: int = 2
    id2label: dict[int, str] = field(default_factory=dict)  # the VQA head's answers, index -> answer

    model_type: ClassVar[str] = MODEL_TYPE

    def __post_init__(self) -> None:
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    # -- derived -------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision["patch_size"])

    @property
    def vision_stem_channels(self) -> tuple[int, ...]:
        """The vision encoder's convolutional stem widths (``vision["conv_stem_channels"]``,
        models/backbones/conv_stem.py); () for CLIP's linear patch embedding."""
        return stem_widths(self.vision.get("conv_stem_channels"))

    @property
    def num_arms(self) -> int:
        return 2 * self.num_fusion_layers

    def vision_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(**self.vision)

    def text_config(self) -> RobertaConfig:
        return RobertaConfig(**self.text)

    def fusion_config(self) -> BertConfig:
        return BertConfig(
            vocab_size=1, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size, hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["id2label"] = {str(k): v for k, v in sorted(self.id2label.items())}
        return {"model_type": MODEL_TYPE, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> MeterConfig:
        if data.get("model_type") != MODEL_TYPE:
            raise BackboneError(f"{where}: model_type {data.get('model_type')!r} is not {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise BackboneError(f"{where}: unknown METER config field(s) {unknown} (known: {sorted(known)})")
        for name in ("vision", "text"):
            if not isinstance(data.get(name), dict):
                raise BackboneError(f"{where}: missing or malformed '{name}' (an object of {name} encoder settings)")
            absent = [k for k in REQUIRED_ENCODER_KEYS[name] if k not in data[name]]
            if absent:
                raise BackboneError(f"{where}: '{name}' lacks {absent}")
        try:
            config = cls(**{k: v for k, v in data.items() if k != "model_type"})
        except (TypeError, ValueError) as exc:
            raise BackboneError(f"{where}: malformed METER config: {exc}") from None
        if config.hidden_size % config.num_attention_heads:
            raise BackboneError(f"{where}: hidden_size {config.hidden_size} is not a multiple of "
                                f"num_attention_heads {config.num_attention_heads}")
        if config.image_size % config.patch_size:
            raise BackboneError(f"{where}: vision image_size {config.image_size} is not a multiple of "
                                f"patch_size {config.patch_size}")
        checked_stem_widths(config.vision.get("conv_stem_channels"), config.patch_size, f"{where}: vision")
        return config

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> MeterConfig:
        return cls.from_dict(read_config(directory), where=str(Path(directory) / "config.json"))

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def arm_names(config: MeterConfig) -> list[str]:
    """Human names of the arms, by arm index."""
    n = config.num_fusion_layers
    return [f"text fusion {i}" for i in range(n)] + [f"image fusion {i}" for i in range(n)]


