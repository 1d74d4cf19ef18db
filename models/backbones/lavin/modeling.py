"""LaVIN (LLaMA + CLIP with mixture-of-modality adaptation) as a frozen generative DAS backbone.

LaVIN (Luo et al., "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language
Models", 2023) feeds a LLaMA decoder with a frozen CLIP ViT's features through small trained parts:

* **visual adapters** inside every CLIP block: ``x + attn(A(ln_1(x)))`` (and, for "router_block",
  ``x + mlp(A(ln_2(x)))``), where ``A`` is a mixture-of-modality adapter (below), routed per token;
* the **visual projection** (``adapter_proj``): LaVIN reads CLIP's class token after every 4th block
  (6 tokens for ViT-L/14's 24 blocks, no ``ln_post``) and maps each through
  ``up(SiLU(down(f)))`` (1024 -> 128 -> decoder width);
* the **modality token** (``adapter_modality_embedding``, 2 rows: 0 = text only, 1 = with image),
  put in front of the sequence. No other token attends to it and it attends only to itself: it is
  the routers' input;
* **mixture-of-modality adapters (MMA)** in every decoder block, sequential in front of attention
  (LaVIN's "attn" type) and also in front of the MLP ("block" type):
  ``A(y) = y + s · (w0 · B(down(y)) + w1 · D(down(y)))``, a shared down projection, two grouped
  (block-diagonal, 2 groups) up projections, no activation (a RepAdapter), mixed by the router
  ``w = softmax(expert_weights(y_m) / t)``, where ``y_m`` is the sub-block's normed input at the
  modality token: one weighting per request and block, computed at prefill and kept for decoding.

The sequence is ``[modality token, BOS, "Image: " tokens, 6 image features, prompt tokens]`` (or
``"Image: N/A"`` and no features for a prompt without image); rotary positions count from the
modality token (0).

DAS over it, as for LLaVA: the arms are the decoder blocks. A skipped block does not run (nor its
MMA adapters) and has no KV-cache entry; its skip adapter ``x + up(ReLU(down(LN(x))))`` runs
instead on every position. Kept blocks run as in the checkpoint (with their MMA adapters) and may
carry parallel adapters. Everything here is frozen backbone: LaVIN's trained parts are part of the
checkpoint, shared by every plan.

Generation (sampling, stop strings, streaming, VQA answers) is :class:`~models.backbones.lavin.generation.LavinRuntime`,
the LLaVA runtime over this backbone's :meth:`~LavinBackbone.prefill` / :meth:`~LavinBackbone.decode_step`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlamaModel, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings

from models.backbones.base import BackboneError, fingerprint, read_config, to_rgb
from models.backbones.llava.modeling import (
    REFERENCE_NEW_TOKENS,
    DecoderBlockPlans,
    KVCache,
    decoder_block_flops,
    decoder_block_forward,
    prefill_mask,
)
from models.das.adapters import PlanModules
from models.das.flops import FlopsReport, LayerFlops, adapter_flops, conv_patch_flops, linear_flops, transformer_layer_flops
from models.das.plan import PlanError, PlanSpec

MODEL_TYPE = "lavin"
SKIP_BOTTLENECK = 256  # LaVIN-DAS trains its skipped blocks' adapters at 4 x the MMA width; ours: LLaVA-DAS's 256
ADAPTER_TYPES = ("attn", "block")  # MMA in front of attention only / in front of attention and the MLP
VISUAL_ADAPTER_TYPES = ("router", "router_block", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # LaVIN's image transform: 224 x 224 bicubic, ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
FINGERPRINT_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "vocab_size",
                         "max_position_embeddings", "rope_parameters", "rope_theta")
FINGERPRINT_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
class LavinConfig:
    """config.json of a LaVIN directory: the decoder (``text``, a LlamaConfig), CLIP's vision tower
    (``vision``, a CLIPVisionConfig) and LaVIN's own settings; plus the fields every backbone config
    answers (``image_size``, ``patch_size``, ``hidden_size`` and ``layer_norm_eps`` of the arms)."""

    def __init__(self, text: LlamaConfig, vision: CLIPVisionConfig, adapter_type: str = "attn", adapter_dim: int = 8,
                 adapter_groups: int = 2, adapter_scale: float = 1.0, router_temperature: float = 10.0,
                 visual_adapter_type: str = "router", visual_adapter_dim: int | None = None,
                 projector_hidden: int = 128, feature_every: int = 4, image_prefix: str = "Image: ",
                 no_image_prefix: str = "Image: N/A") -> None:
        if adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type {adapter_type!r} (LaVIN's: {', '.join(ADAPTER_TYPES)})")
        if visual_adapter_type not in VISUAL_ADAPTER_TYPES:
            raise ValueError(f"visual_adapter_type {visual_adapter_type!r} (supported: {', '.join(VISUAL_ADAPTER_TYPES)})")
        if not 0 < feature_every <= vision.num_hidden_layers:
            raise ValueError(f"feature_every {feature_every} for {vision.num_hidden_layers} CLIP blocks")
        if adapter_dim % adapter_groups or text.hidden_size % adapter_groups:
            raise ValueError(f"adapter_dim {adapter_dim} and the width must divide into {adapter_groups} groups")
        self.text, self.vision = text, vision
        self.adapter_type, self.adapter_dim, self.adapter_groups = adapter_type, int(adapter_dim), int(adapter_groups)
        self.adapter_scale, self.router_temperature = float(adapter_scale), float(router_temperature)
        self.visual_adapter_type = visual_adapter_type
        self.visual_adapter_dim = int(visual_adapter_dim or adapter_dim)
        self.projector_hidden, self.feature_every = int(projector_hidden), int(feature_every)
        self.image_prefix, self.no_image_prefix = image_prefix, no_image_prefix
        self.image_size = int(vision.image_size)
        self.patch_size = int(vision.patch_size)
        self.hidden_size = int(text.hidden_size)
        self.layer_norm_eps = float(text.rms_norm_eps)
        self.num_hidden_layers = int(text.num_hidden_layers)

    model_type = MODEL_TYPE

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text, "head_dim", None) or self.text.hidden_size // self.text.num_attention_heads)

    @property
    def feature_layers(self) -> list[int]:
        """CLIP blocks (1-based) after which the class token is read: every ``feature_every``-th."""
        return list(range(self.feature_every, self.vision.num_hidden_layers + 1, self.feature_every))

    @property
    def image_tokens(self) -> int:
        return len(self.feature_layers)

    @property
    def vision_layers_run(self) -> int:
        return max(self.feature_layers)

    @property
    def max_positions(self) -> int:
        return int(self.text.max_position_embeddings)

    @property
    def visual_routed_sublayers(self) -> int:
        return {"none": 0, "router": 1, "router_block": 2}[self.visual_adapter_type]

    @property
    def text_routed_sublayers(self) -> int:
        return {"attn": 1, "block": 2}[self.adapter_type]

    def own_items(self) -> dict[str, Any]:
        return {"adapter_type": self.adapter_type, "adapter_dim": self.adapter_dim, "adapter_groups": self.adapter_groups,
                "adapter_scale": self.adapter_scale, "router_temperature": self.router_temperature,
                "visual_adapter_type": self.visual_adapter_type, "visual_adapter_dim": self.visual_adapter_dim,
                "projector_hidden": self.projector_hidden, "feature_every": self.feature_every,
                "image_prefix": self.image_prefix, "no_image_prefix": self.no_image_prefix}

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **self.own_items(), "text_config": self.text.to_dict(),
                "vision_config": self.vision.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LavinConfig:
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        own = {k: raw[k] for k in ("adapter_type", "adapter_dim", "adapter_groups", "adapter_scale", "router_temperature",
                                   "visual_adapter_type", "visual_adapter_dim", "projector_hidden", "feature_every",
                                   "image_prefix", "no_image_prefix") if k in raw}
        text = {k: v for k, v in raw["text_config"].items() if k != "model_type"}
        vision = {k: v for k, v in raw["vision_config"].items() if k != "model_type"}
        return cls(LlamaConfig(**text), CLIPVisionConfig(**vision), **own)

    def fingerprint_items(self) -> dict[str, Any]:
        text, vision = self.text.to_dict(), self.vision.to_dict()
        return {"model_type": MODEL_TYPE, **self.own_items(),
                "text": {k: text.get(k) for k in FINGERPRINT_TEXT_KEYS},
                "vision": {k: vision.get(k) for k in FINGERPRINT_VISION_KEYS}}


def config_from_dir(directory: str | os.PathLike) -> LavinConfig:
    raw = read_config(directory)
    try:
        return LavinConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise BackboneError(f"{directory}: config.json is not a LaVIN config ({exc})") from None


# ---------------------------------------------------------------------------------------------
# LaVIN's modules
# ---------------------------------------------------------------------------------------------
class GroupedLinear(nn.Module):
    """A block-diagonal linear layer (a 1x1 ``Conv1d`` with ``groups``): group g's outputs read only
    group g's inputs. ``weight`` is (out, in / groups), as the convolution's kernel without its width."""

    def __init__(self, in_features: int, out_features: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.zeros_(self.weight)  # LaVIN's init: the adapter starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        out, per_group = self.weight.shape
        grouped = x.reshape(*x.shape[:-1], g, per_group)
        y = torch.einsum("...gi,goi->...go", grouped, self.weight.view(g, out // g, per_group))
        return y.reshape(*x.shape[:-1], out) + self.bias


class ModalityRouterAdapter(nn.Module):
    """LaVIN's mixture-of-modality adapter (``RepAdapter_Router``): ``y + s · (w0·up0(down(y)) +
    w1·up1(down(y)))`` with routing weights ``w = softmax(router(y_m) / t)`` given by the caller."""

    def __init__(self, dim: int, bottleneck: int, groups: int = 2, scale: float = 1.0, temperature: float = 10.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.ModuleList([GroupedLinear(bottleneck, dim, groups) for _ in range(2)])
        self.router = nn.Linear(dim, 2)
        self.scale, self.temperature = scale, temperature

    def route(self, y: torch.Tensor) -> torch.Tensor:
        """Routing weights (..., 2) for router inputs ``y`` (..., dim)."""
        return torch.softmax(self.router(y).float() / self.temperature, dim=-1).to(y.dtype)

    def forward(self, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` broadcast against ``y``'s positions: (B, 1, 2) per sequence, (B, L, 2) per token."""
        h = self.down(y)
        return y + self.scale * (self.up[0](h) * weights[..., 0:1] + self.up[1](h) * weights[..., 1:2])


class VisualProjection(nn.Module):
    """LaVIN's ``adapter_proj``: up(SiLU(down(f))) from CLIP's width to the decoder's."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, hidden)
        self.up = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.nn.functional.silu(self.down(x)))


class _Encoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class VisionTower(nn.Module):
    """CLIP's vision transformer as LaVIN runs it: embeddings, ``ln_pre``, the blocks (no ``ln_post``,
    no projection: LaVIN reads class tokens between blocks)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = _Encoder(config)


def _adapter_pair(dim: int, bottleneck: int, config: LavinConfig, both: bool) -> nn.ModuleDict:
    make = lambda: ModalityRouterAdapter(dim, bottleneck, config.adapter_groups, config.adapter_scale,  # noqa: E731
                                         config.router_temperature)
    return nn.ModuleDict({"attn": make(), **({"mlp": make()} if both else {})})


class LavinModel(nn.Module):
    """Every frozen weight of a LaVIN checkpoint, under this project's names (see convert.py's table)."""

    def __init__(self, config: LavinConfig) -> None:
        super().__init__()
        config.text._attn_implementation = "sdpa"
        config.vision._attn_implementation = "sdpa"
        self.language_model = LlamaModel(config.text)
        self.lm_head = nn.Linear(config.hidden_size, config.text.vocab_size, bias=False)
        self.vision_model = VisionTower(config.vision)
        self.projector = VisualProjection(config.vision.hidden_size, config.projector_hidden, config.hidden_size)
        self.modality_embedding = nn.Embedding(2, config.hidden_size)
        visual = config.visual_routed_sublayers
        self.vision_adapters = nn.ModuleList(
            [_adapter_pair(config.vision.hidden_size, config.visual_adapter_dim, config, visual == 2)
             for _ in range(config.vision.num_hidden_layers)] if visual else [])
        self.text_adapters = nn.ModuleList(
            [_adapter_pair(config.hidden_size, config.adapter_dim, config, config.adapter_type == "block")
             for _ in range(config.num_hidden_layers)])


def _materialize_buffers(model: LavinModel, config: LavinConfig) -> None:
    """The non-persistent buffers of a model built on the meta device (rotary frequencies, CLIP's
    position ids), computed on the CPU."""
    model.language_model.rotary_emb = type(model.language_model.rotary_emb)(config.text)
    embeddings = model.vision_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions).expand((1, -1)), persistent=False)
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:
        raise BackboneError(f"buffers left uncomputed: {left}")


# ---------------------------------------------------------------------------------------------
# Inputs and the cache
# ---------------------------------------------------------------------------------------------
@dataclass
class LavinBatch:
    """Left-padded LaVIN sequences: ``[modality, BOS, prefix, image slots, prompt]`` per row.

    ``text_lengths`` counts the positions the decoder reads at prefill (the modality token, BOS, the
    prefix, the image features and the prompt); ``key_mask`` is ``attention_mask`` without the
    modality token (no position attends to it)."""

    input_ids: torch.Tensor  # (B, L); the modality and image slots hold the pad id (their embeddings are replaced)
    attention_mask: torch.Tensor  # (B, L), 0 on the padding
    key_mask: torch.Tensor  # (B, L) bool: real tokens other than the modality token
    image_mask: torch.Tensor  # (B, L) bool: the image feature slots
    modality_columns: torch.Tensor  # (B,) the modality token's column
    modality: torch.Tensor  # (B,) 1 with an image, 0 without
    pixel_values: torch.Tensor | None  # (images, 3, H, W), the rows with an image in order
    image_counts: list[int]
    text_lengths: list[int]
    truncated: list[bool]
    patch_grids: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.text_lengths)

    def to(self, device: torch.device, dtype: torch.dtype) -> LavinBatch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       key_mask=move(self.key_mask), image_mask=move(self.image_mask),
                       modality_columns=move(self.modality_columns), modality=move(self.modality),
                       pixel_values=None if self.pixel_values is None else self.pixel_values.to(device, dtype))

    def image_grids(self, index: int) -> list[tuple[int, int]]:
        start = sum(self.image_counts[:index])
        return self.patch_grids[start : start + self.image_counts[index]]


class LavinCache(KVCache):
    """The kept blocks' keys and values (as for LLaVA) plus each kept block's MMA routing weights per
    row, set at prefill from the modality token and read at every decode step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routes: dict[tuple[int, str], torch.Tensor] = {}

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        self.routes = {key: w.index_select(0, rows) for key, w in self.routes.items()}


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------
class LavinBackbone(DecoderBlockPlans, nn.Module):
    """A frozen LaVIN checkpoint directory (config.json, model.safetensors, tokenizer, preprocessor)."""

    family = "LaVIN"

    architecture = MODEL_TYPE
    default_skip_bottleneck = SKIP_BOTTLENECK
    generative = True

    def __init__(self, config: LavinConfig, tokenizer: Any = None, image_processor: Any = None,
                 model: LavinModel | None = None, fingerprint: str = "") -> None:
        super().__init__()
        self.config = config
        self.tokenizer_ = tokenizer
        self.image_processor = image_processor
        self.model = model if model is not None else LavinModel(config)
        self.fingerprint = fingerprint

    # -- what `das flops` and the CLI need without weights ------------------------------------
    @classmethod
    def load_config(cls, directory: str | os.PathLike) -> LavinConfig:
        return config_from_dir(directory)

    @staticmethod
    def config_flops_at(config: LavinConfig, task: str, spec: PlanSpec | None, text_len: int,
                        image_size: int | tuple[int, int], num_labels: int | None = None,
                        new_tokens: int = REFERENCE_NEW_TOKENS) -> FlopsReport:
        """A prompt of ``text_len`` tokens (BOS, prefix and question) with one image, ``new_tokens`` generated."""
        if task != "vqa":
            raise PlanError(f"a LaVIN backbone answers vqa (in text); {task} has no head here")
        return lavin_request_flops(config, spec, 1 + text_len + config.image_tokens, [grid_of(config, image_size)],
                                   new_tokens)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device = torch.device("cpu"),
                        dtype: torch.dtype = torch.float32) -> LavinBackbone:
        directory = Path(directory)
        config = config_from_dir(directory)
        if not (directory / "tokenizer.json").is_file():
            raise BackboneError(f"{directory}: tokenizer files missing (tokenizer.json is needed beside config.json)")
        if not (directory / "preprocessor_config.json").is_file():
            raise BackboneError(f"{directory}: image processor missing (preprocessor_config.json)")
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise BackboneError(f"{directory}: no weights (model.safetensors)")
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
            image_processor = CLIPImageProcessorPil.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BackboneError(f"{directory}: tokenizer or image processor unreadable: {exc}") from None
        state = load_file(str(weights))
        with torch.device("meta"):
            model = LavinModel(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise BackboneError(f"{directory}: weights do not match the config: missing {missing[:8]}, "
                                f"unexpected {unexpected[:8]}")
        wrong = [f"{k}: {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                 if tuple(state[k].shape) != tuple(v.shape)]
        if wrong:
            raise BackboneError(f"{directory}: weights have the wrong shape: {wrong[:8]}")
        model.load_state_dict(state, assign=True)
        _materialize_buffers(model, config)
        return cls.from_model(config, model, tokenizer, image_processor, device, dtype, state)

    @classmethod
    def from_model(cls, config: LavinConfig, model: LavinModel, tokenizer: Any, image_processor: Any = None,
                   device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                   state: dict[str, torch.Tensor] | None = None, fingerprint_value: str | None = None) -> LavinBackbone:
        """A backbone over an in-memory model (the benchmark's random init); the fingerprint covers
        ``state`` (default: the model's), unless ``fingerprint_value`` is given."""
        backbone = cls(config, tokenizer, image_processor or image_processor_for(config), model.eval())
        backbone.fingerprint = fingerprint_value or fingerprint(config.fingerprint_items(), state or model.state_dict())
        backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return backbone

    # -- facts -------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def max_text_len(self) -> int:
        """The context: prompt positions (modality token and image features included) plus generated tokens."""
        return self.config.max_positions

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def image_placeholder(self) -> str:
        """LaVIN has one image slot outside the text, so no text token stands for an image."""
        return ""

    @property
    def tokenizer(self) -> Any:
        if self.tokenizer_ is None:
            raise BackboneError("this LaVIN backbone was built without a tokenizer")
        return self.tokenizer_

    def eos_token_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return set() if eos is None else {int(eos)}

    # -- plans -------------------------------------------------------------------------------
    # -- preprocessing -------------------------------------------------------------------------
    def prompt_for(self, question: str, with_image: bool = True) -> str:
        """A short-answer VQA prompt in LaVIN's instruction style."""
        return f"Question: {question}\nAnswer the question using a single word or phrase.\nResponse:"

    @staticmethod
    def render(conversation: str | Sequence[dict[str, Any]]) -> str:
        """Raw text as given; chat messages as their text parts, one line per message."""
        if isinstance(conversation, str):
            return conversation
        lines = []
        for message in conversation:
            content = message["content"]
            if not isinstance(content, str):
                content = "".join(part.get("text", "") for part in content if part.get("type") != "image")
            lines.append(content)
        return "\n".join(lines)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def preprocess(self, images: Sequence[Image.Image | Sequence[Image.Image] | None],
                   texts: Sequence[str | Sequence[dict[str, Any]]]) -> LavinBatch:
        """Prompts and their image (one, or None: LaVIN has one image slot per prompt)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} image entries but {len(texts)} prompts")
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bos = tokenizer.bos_token_id
        rows, slots, has_image, flat = [], [], [], []
        for i, (entry, text) in enumerate(zip(images, texts)):
            imgs = [] if entry is None else [entry] if isinstance(entry, Image.Image) else list(entry)
            if len(imgs) > 1:
                raise ValueError(f"prompt {i} has {len(imgs)} images; a LaVIN prompt takes at most one")
            head = ([bos] if bos is not None else [])
            if imgs:
                head += self._ids(self.config.image_prefix.rstrip())
                flat.append(to_rgb(imgs[0]))
            else:
                head += self._ids(self.config.no_image_prefix)
            features = self.config.image_tokens if imgs else 0
            ids = [pad] + head + [pad] * features + self._ids(self.render(text))
            rows.append(ids)
            slots.append((1 + len(head), features))
            has_image.append(bool(imgs))
        width = max(len(r) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, width), pad, dtype=torch.long)
        attention = torch.zeros(batch, width, dtype=torch.long)
        image_mask = torch.zeros(batch, width, dtype=torch.bool)
        columns = torch.zeros(batch, dtype=torch.long)
        for r, ids in enumerate(rows):
            start = width - len(ids)
            input_ids[r, start:] = torch.tensor(ids)
            attention[r, start:] = 1
            columns[r] = start
            first, count = slots[r]
            image_mask[r, start + first : start + first + count] = True
        key_mask = attention.bool().clone()
        key_mask[torch.arange(batch), columns] = False
        pixels = None
        if flat:
            pixels = self.image_processor(images=flat, return_tensors="pt")["pixel_values"]
        grids = [grid_of(self.config, tuple(pixels.shape[-2:]))] * len(flat) if flat else []
        return LavinBatch(
            input_ids=input_ids, attention_mask=attention, key_mask=key_mask, image_mask=image_mask,
            modality_columns=columns, modality=torch.tensor([int(h) for h in has_image]), pixel_values=pixels,
            image_counts=[int(h) for h in has_image], text_lengths=[len(r) for r in rows],
            truncated=[False] * batch, patch_grids=grids,
        )

    # -- plans: LaVIN-DAS trains the MMA adapters of the kept blocks with the skip adapters; a plan
    # with own_parts ["mma_adapters"] carries its own copies (the backbone's stay as converted)
    plan_own_parts = ("mma_adapters",)

    def own_block_parts(self, spec: PlanSpec, kept: list[int], init_from_backbone: bool) -> dict[int, nn.Module]:
        if "mma_adapters" not in spec.own_parts:
            return {}
        parts = {}
        for i in kept:
            own = _adapter_pair(self.config.hidden_size, self.config.adapter_dim, self.config,
                                self.config.adapter_type == "block")
            if init_from_backbone:
                own.load_state_dict(self.model.text_adapters[i].state_dict())
            parts[i] = own
        return parts

    appended_token_fields = {"input_ids": "token", "attention_mask": 1, "key_mask": True, "image_mask": False}
    column_fields = ("modality_columns",)

    def prompt_text_len(self, batch: LavinBatch, row: int) -> int:
        """The text tokens of ``batch``'s row (BOS, prefix, prompt: not the modality token nor the image
        features), as ``flops_at`` counts them."""
        return batch.text_lengths[row] - 1 - self.config.image_tokens * batch.image_counts[row]

    # -- forward -------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, features, decoder width): CLIP with LaVIN's per-token routed adapters, the class
        token after every ``feature_every``-th block, through the visual projection."""
        tower = self.model.vision_model
        x = tower.pre_layrnorm(tower.embeddings(pixel_values))
        read = set(self.config.feature_layers)
        features = []
        for index, layer in enumerate(tower.encoder.layers[: self.config.vision_layers_run]):
            adapters = self.model.vision_adapters[index] if len(self.model.vision_adapters) else None
            y = layer.layer_norm1(x)
            if adapters is not None:
                y = adapters["attn"](y, adapters["attn"].route(y))
            x = x + layer.self_attn(hidden_states=y)[0]
            y = layer.layer_norm2(x)
            if adapters is not None and "mlp" in adapters:
                y = adapters["mlp"](y, adapters["mlp"].route(y))
            x = x + layer.mlp(y)
            if index + 1 in read:
                features.append(x[:, :1])
        return self.model.projector(torch.cat(features, dim=1))

    def embed(self, batch: LavinBatch) -> torch.Tensor:
        """Token embeddings, the modality token in its column, image features in their slots."""
        embeds = self.language_model.embed_tokens(batch.input_ids)
        rows = torch.arange(len(batch), device=embeds.device)
        embeds[rows, batch.modality_columns] = self.model.modality_embedding(batch.modality).to(embeds.dtype)
        if batch.pixel_values is not None:
            features = self.image_features(batch.pixel_values).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(batch.image_mask[..., None], features)
        return embeds

    def _mma(self, adapter: ModalityRouterAdapter, key: tuple[int, str], routes: dict, columns: torch.Tensor | None):
        """The sequential MMA adapter of one sub-block: routed from the modality token when its column
        is given (prefill, or a whole sequence), else with the weights kept from the prefill."""
        def apply(normed: torch.Tensor) -> torch.Tensor:
            if columns is not None:
                routes[key] = adapter.route(normed[torch.arange(normed.shape[0], device=normed.device), columns])
            return adapter(normed, routes[key][:, None, :])
        return apply

    def decode(self, x: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, plan: PlanModules,
               cache: LavinCache | None = None, modality_columns: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder under ``plan``; ``modality_columns`` given = this pass holds the modality token
        (its routing weights are computed, and kept in the cache)."""
        rope = self.language_model.rotary_emb(x, positions)
        routes = cache.routes if cache is not None else {}
        for index, layer in enumerate(self.language_model.layers):
            skip = plan.skip_adapter(index)
            if skip is not None:
                x = skip(x)  # the block (and its MMA adapters) does not run, and has no cache entry
                continue
            own = plan.mma_adapter(index)  # the plan's own MMA adapters, else the checkpoint's
            adapters = own if own is not None else self.model.text_adapters[index]
            attention_in = self._mma(adapters["attn"], (index, "attn"), routes, modality_columns)
            mlp_in = self._mma(adapters["mlp"], (index, "mlp"), routes, modality_columns) if "mlp" in adapters else None
            x = decoder_block_forward(layer, x, rope, attention_mask, plan.parallel_adapter(index), cache, index,
                                      attention_in=attention_in, mlp_in=mlp_in)
        return self.language_model.norm(x)

    def new_cache(self, plan: PlanModules, batch: int, capacity: int) -> LavinCache:
        return LavinCache(self.kept_layers(plan), batch, self.config.text.num_key_value_heads, self.config.head_dim,
                          capacity, self.device, self.dtype)

    @staticmethod
    def positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """Rotary positions: 0 at the modality token, counting each row's real tokens (padding: 0)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def prefill(self, batch: LavinBatch, plan: PlanModules, cache: LavinCache) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.positions(batch.attention_mask)
        cache.attend_mask(batch.key_mask)
        hidden = self.decode(self.embed(batch), positions, prefill_mask(batch.key_mask), plan, cache,
                             modality_columns=batch.modality_columns)
        cache.advance(batch.input_ids.shape[1])
        return self.model.lm_head(hidden[:, -1]), positions[:, -1] + 1

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, plan: PlanModules,
                    cache: LavinCache) -> torch.Tensor:
        x = self.language_model.embed_tokens(tokens[:, None])
        mask = cache.attend_mask(torch.ones_like(tokens[:, None], dtype=torch.bool))[:, None, None, :]
        hidden = self.decode(x, positions[:, None], mask, plan, cache)
        cache.advance(1)
        return self.model.lm_head(hidden[:, -1])

    def sequence_output(self, batch: LavinBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """Final hidden states (B, L, hidden) of the whole sequence, no cache."""
        return self.decode(self.embed(batch), self.positions(batch.attention_mask), prefill_mask(batch.key_mask), plan,
                           modality_columns=batch.modality_columns)

    def encode(self, batch: LavinBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        return self.sequence_output(batch, plan)[:, -1]

    def logits(self, batch: LavinBatch, plan: PlanModules) -> torch.Tensor:
        return self.model.lm_head(self.sequence_output(batch, plan))

    # -- FLOPs -----------------------------------------------------------------------------------
    def flops(self, task: str, spec: PlanSpec | None, text_len: int, patch_grids: Sequence[tuple[int, int]],
              new_tokens: int = REFERENCE_NEW_TOKENS) -> FlopsReport:
        """``text_len``: the prompt positions (``LavinBatch.text_lengths``: modality token and image features included)."""
        return lavin_request_flops(self.config, spec, text_len, patch_grids, new_tokens)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def mma_flops(tokens: int, dim: int, bottleneck: int, groups: int, routed: int) -> int:
    """One MMA adapter on ``tokens`` positions (the down projection, both grouped up projections)
    plus its router on ``routed`` vectors (1 per request in the decoder, every token in CLIP)."""
    return (linear_flops(tokens, dim, bottleneck) + 2 * linear_flops(tokens, bottleneck, dim) // groups
            + linear_flops(routed, dim, 2))


def lavin_vision_flops(config: LavinConfig, grid: tuple[int, int]) -> int:
    """One image: patch embedding, CLIP blocks with their routed adapters up to the last feature, the projection."""
    vision = config.vision
    tokens = grid[0] * grid[1] + 1
    flops = conv_patch_flops(tokens - 1, vision.num_channels, vision.patch_size, vision.hidden_size)
    per_block = transformer_layer_flops(tokens, vision.hidden_size, vision.intermediate_size)
    per_block += config.visual_routed_sublayers * mma_flops(tokens, vision.hidden_size, config.visual_adapter_dim,
                                                            config.adapter_groups, tokens)
    flops += config.vision_layers_run * per_block
    features = config.image_tokens
    flops += linear_flops(features, vision.hidden_size, config.projector_hidden)
    flops += linear_flops(features, config.projector_hidden, config.hidden_size)
    return flops


def lavin_request_flops(config: LavinConfig, spec: PlanSpec | None, prompt_len: int,
                        image_grids: Sequence[tuple[int, int]], new_tokens: int) -> FlopsReport:
    """Analytic FLOPs of one generation request, the full LaVIN vs ``spec`` (None = the full model).

    ``prompt_len`` counts every position of the prefill (modality token, BOS, prefix, image features,
    prompt). A block's full cost is LLaVA's decoder block (prefill over ``prompt_len`` positions, then
    one position per decode step attending to the cache; the cache keeps the modality token's column,
    masked) plus its MMA adapters on every position and their routers once. A skipped block costs its
    skip adapter on every position."""
    hidden = config.hidden_size
    skipped = set(spec.skipped_layers) if spec else set()
    skip_b = spec.adapters.skip_bottleneck if spec else None
    par_b = spec.adapters.parallel_bottleneck if spec else None
    steps = max(new_tokens - 1, 0)
    tokens = prompt_len + steps
    full_block = decoder_block_flops(config, prompt_len, prompt_len)
    full_block += sum(decoder_block_flops(config, 1, prompt_len + t) for t in range(1, steps + 1))
    full_block += config.text_routed_sublayers * mma_flops(tokens, hidden, config.adapter_dim, config.adapter_groups, 1)
    layers = []
    for i in range(config.num_hidden_layers):
        if i in skipped:
            executed = adapter_flops(tokens, hidden, skip_b)
        else:
            executed = full_block + (2 * adapter_flops(tokens, hidden, par_b) if par_b else 0)
        layers.append(LayerFlops(i, full_block, executed, i in skipped))
    other = sum(lavin_vision_flops(config, grid) for grid in image_grids)
    other += linear_flops(new_tokens, hidden, config.text.vocab_size)
    return FlopsReport(per_layer=tuple(layers), other=other, seq_lens=(prompt_len, prompt_len + steps))


def grid_of(config: LavinConfig, image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return (h // config.patch_size, w // config.patch_size)


# ---------------------------------------------------------------------------------------------
# Writing directories
# ---------------------------------------------------------------------------------------------
def image_processor_for(config: LavinConfig) -> CLIPImageProcessorPil:
    """LaVIN's transform: resize to the tower's square (bicubic, no crop), ImageNet mean and std."""
    size = config.image_size
    return CLIPImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False,
                                 image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def save_lavin_directory(directory: str | os.PathLike, config: LavinConfig, state: dict[str, torch.Tensor],
                         tokenizer: Any) -> Path:
    """config.json, model.safetensors (this project's names), the tokenizer and preprocessor_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    if tokenizer is not None:  # the converter may be run without one (a note says so)
        tokenizer.save_pretrained(str(directory))
    image_processor_for(config).save_pretrained(str(directory))
    return directory


__all__ = [
    "LavinBackbone", "LavinConfig", "LavinModel", "LavinBatch", "LavinCache", "ModalityRouterAdapter",
    "GroupedLinear", "lavin_request_flops", "lavin_vision_flops", "mma_flops", "config_from_dir",
    "save_lavin_directory", "image_processor_for",
]
