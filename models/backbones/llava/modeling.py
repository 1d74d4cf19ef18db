"""LLaVA-style generative VLMs as frozen DAS backbones.

The frozen weights live in transformers' own ``LlavaForConditionalGeneration`` modules (CLIP vision
tower, multimodal projector, Llama decoder, lm head), loaded once and shared by every plan. This
file adds what DAS needs on top of them:

* the DAS *arms* are the decoder blocks (``text_config.num_hidden_layers`` of them). A skipped block
  does not run and has no KV-cache entry; its skip adapter ``x + up(ReLU(down(LN(x))))`` runs
  instead, token by token. Kept blocks may carry parallel adapters beside attention and the MLP.
* the reduced forward pass (:meth:`LlavaBackbone.decode`): kept blocks run with PyTorch's fused
  attention over a :class:`KVCache` that holds keys and values of the kept blocks only;
* the vision tower runs only up to the layer LLaVA reads its features from (``vision_feature_layer``,
  -2 for LLaVA-1.5: the last CLIP layer is never computed);
* the per-request FLOPs count: vision tower + projector + prefill + every decoded token.

Generation (sampling, stop strings, streaming, VQA answers) is ``generation.LlavaRuntime``, over
this backbone's :meth:`~LlavaBackbone.prefill` and :meth:`~LlavaBackbone.decode_step`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb, repeat_kv

from models.backbones.base import BackboneError, check_own_parts, fingerprint, padded_region, read_config, to_rgb
from models.das.adapters import ParallelAdapters, PlanModules, SkipAdapter
from models.das.flops import (
    FlopsReport,
    LayerFlops,
    adapter_flops,
    conv_patch_flops,
    gated_mlp_flops,
    gqa_attention_flops,
    linear_flops,
    transformer_layer_flops,
)
from models.das.plan import PlanError, PlanSpec

MODEL_TYPE = "llava"
# LLaVA-DAS (the DAS reference) trains skip adapters of width 256 ("dim_replace") and adapters of
# width 128 in kept blocks ("dim_adapt", two halves of 64)
SKIP_BOTTLENECK = 256
# what the fingerprint covers besides every tensor: the fields that change what the network computes
FINGERPRINT_TOP_KEYS = ("model_type", "vision_feature_layer", "vision_feature_select_strategy", "image_token_id",
                        "projector_hidden_act", "multimodal_projector_bias", "image_seq_length")
FINGERPRINT_TEXT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "vocab_size",
                         "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias",
                         "mlp_bias", "tie_word_embeddings")
FINGERPRINT_VISION_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels")
# images reach the processor at most this many times its resolution on the shorter side (memory bound)
SHRINK_TO = 2
# the processor centre-crops a square: a band of the longer side this many times the shorter is kept
CROP_BAND = 2
REFERENCE_NEW_TOKENS = 16  # decoded tokens a plan's quoted FLOPs assume (with flops_at's text_len)


# ---------------------------------------------------------------------------------------------
# Configuration: transformers' LlavaConfig, with the fields every backbone's config answers
# ---------------------------------------------------------------------------------------------
class LlavaBackboneConfig:
    """``LlavaConfig`` (``.hf``) plus what the Backbone contract reads from every config:
    ``image_size`` / ``patch_size`` (the vision tower's), ``hidden_size`` / ``layer_norm_eps`` of the
    arms (the decoder's width and RMSNorm epsilon). Any other attribute is the LlavaConfig's."""

    def __init__(self, hf: LlavaConfig) -> None:
        self.hf = hf
        self.image_size = int(hf.vision_config.image_size)
        self.patch_size = int(hf.vision_config.patch_size)
        self.hidden_size = int(hf.text_config.hidden_size)
        self.layer_norm_eps = float(hf.text_config.rms_norm_eps)
        self.num_hidden_layers = int(hf.text_config.num_hidden_layers)

    def __getattr__(self, name: str) -> Any:  # only called for names not set above
        if name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)

    @property
    def text(self) -> Any:
        return self.hf.text_config

    @property
    def vision(self) -> Any:
        return self.hf.vision_config

    @property
    def head_dim(self) -> int:
        text = self.text
        return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)

    @property
    def feature_layers(self) -> list[int]:
        """Vision hidden-state indices LLaVA reads (0 = the embeddings, k = after k CLIP layers)."""
        layers = self.hf.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        depth = self.vision.num_hidden_layers
        return [layer % (depth + 1) for layer in layers]

    @property
    def vision_layers_run(self) -> int:
        """CLIP layers that have to run: up to the deepest feature layer, no further."""
        return max(self.feature_layers)

    @property
    def keeps_cls(self) -> bool:
        return self.hf.vision_feature_select_strategy != "default"  # "default" drops CLIP's class token

    def image_tokens(self, grid: tuple[int, int] | None = None) -> int:
        """Decoder tokens one image becomes (its patches, plus the class token under "full")."""
        rows, cols = grid or (self.image_size // self.patch_size,) * 2
        return rows * cols + (1 if self.keeps_cls else 0)

    @property
    def max_positions(self) -> int:
        return int(self.text.max_position_embeddings)


def config_from_dir(directory: str | os.PathLike) -> LlavaBackboneConfig:
    raw = read_config(directory)
    try:
        return LlavaBackboneConfig(LlavaConfig.from_dict(raw))
    except (TypeError, ValueError, KeyError) as exc:
        raise BackboneError(f"{directory}: config.json is not a LLaVA config ({exc})") from None


def _config_items(config: LlavaBackboneConfig) -> dict[str, Any]:
    text, vision = config.text.to_dict(), config.vision.to_dict()
    top = config.hf.to_dict()
    return {"top": {k: top.get(k) for k in FINGERPRINT_TOP_KEYS},
            "text": {k: text.get(k) for k in FINGERPRINT_TEXT_KEYS},
            "vision": {k: vision.get(k) for k in FINGERPRINT_VISION_KEYS}}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
@dataclass
class LlavaBatch:
    """Prompts tokenised with their images' placeholder tokens expanded, left-padded to the longest.

    ``text_lengths`` counts each prompt's tokens, image tokens and BOS included (what the decoder
    reads at prefill); ``image_counts`` says how many of ``pixel_values`` belong to each prompt, in order.
    """

    input_ids: torch.Tensor  # (B, L), left-padded
    attention_mask: torch.Tensor  # (B, L), 0 on the padding
    pixel_values: torch.Tensor | None  # (images, 3, H, W) or None when no prompt has an image
    image_counts: list[int]
    text_lengths: list[int]
    truncated: list[bool]  # never: LLaVA prompts are not cut (a prompt over the context is refused)
    patch_grids: list[tuple[int, int]]  # per image

    def __len__(self) -> int:
        return len(self.text_lengths)

    def to(self, device: torch.device, dtype: torch.dtype) -> LlavaBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            pixel_values=None if self.pixel_values is None else self.pixel_values.to(device, dtype, non_blocking=True),
        )

    def image_grids(self, index: int) -> list[tuple[int, int]]:
        start = sum(self.image_counts[:index])
        return self.patch_grids[start : start + self.image_counts[index]]


# ---------------------------------------------------------------------------------------------
# The KV cache: kept blocks only
# ---------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of the *kept* decoder blocks, preallocated for ``capacity`` positions.

    A skipped block has no entry at all (:meth:`update` refuses one). Positions are columns shared by
    the batch (prompts are left-padded, so every row's next token lands in the same column);
    ``key_mask`` says which columns of each row hold a real token.
    """

    def __init__(self, kept_layers: Sequence[int], batch: int, kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.layers = {i: (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for i in kept_layers}
        self.key_mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0  # columns filled
        self.capacity = capacity

    def __contains__(self, layer_index: int) -> bool:
        return layer_index in self.layers

    def update(self, layer_index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values of one block; return all of its keys and values so far."""
        if layer_index not in self.layers:
            raise KeyError(f"decoder block {layer_index} has no KV-cache entry (it is skipped under this plan)")
        new = keys.shape[2]
        end = self.length + new
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions, capacity {self.capacity}")
        k_buffer, v_buffer = self.layers[layer_index]
        k_buffer[:, :, self.length : end] = keys
        v_buffer[:, :, self.length : end] = values
        return k_buffer[:, :, :end], v_buffer[:, :, :end]

    def attend_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """The key mask (B, length + new) for the next positions, whose own validity is ``new_mask`` (B, new)."""
        new = new_mask.shape[1]
        self.key_mask[:, self.length : self.length + new] = new_mask.bool()
        return self.key_mask[:, : self.length + new]

    def advance(self, new: int) -> None:
        self.length += new

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished requests leave the batch)."""
        self.layers = {i: (k.index_select(0, rows), v.index_select(0, rows)) for i, (k, v) in self.layers.items()}
        self.key_mask = self.key_mask.index_select(0, rows)

    def num_entries(self) -> int:
        return len(self.layers)


# ---------------------------------------------------------------------------------------------
# One decoder block under a plan
# ---------------------------------------------------------------------------------------------
def decoder_block_forward(
    layer: LlamaDecoderLayer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor,
    adapters: ParallelAdapters | None, cache: KVCache | None = None, layer_index: int = 0,
    attention_in: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mlp_in: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """LlamaDecoderLayer's computation (RMSNorm, rotary grouped-query attention, RMSNorm, gated MLP)
    with fused attention, over the cached keys/values of this block when ``cache`` is given.

    ``attention_mask``: bool, (B, 1, new, keys), True where a query may attend to a key.
    Parallel adapters read the sub-block's input and add their output beside the sub-block's.
    ``attention_in`` / ``mlp_in`` (LaVIN's sequential adapters) map the normed input of attention /
    the MLP before the sub-block reads it.
    """
    attention = layer.self_attn
    batch, new, _ = x.shape
    head_dim = attention.head_dim
    normed = layer.input_layernorm(x)
    if attention_in is not None:
        normed = attention_in(normed)
    q = attention.q_proj(normed).view(batch, new, -1, head_dim).transpose(1, 2)
    k = attention.k_proj(normed).view(batch, new, -1, head_dim).transpose(1, 2)
    v = attention.v_proj(normed).view(batch, new, -1, head_dim).transpose(1, 2)
    cos, sin = rope
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer_index, k, v)
    groups = attention.num_key_value_groups
    context = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=attention_mask,
                                             scale=attention.scaling)
    attention_out = attention.o_proj(context.transpose(1, 2).reshape(batch, new, -1))
    if adapters is not None:
        attention_out = attention_out + adapters.attention(x)
    x = x + attention_out
    normed = layer.post_attention_layernorm(x)
    if mlp_in is not None:
        normed = mlp_in(normed)
    mlp_out = layer.mlp(normed)
    if adapters is not None:
        mlp_out = mlp_out + adapters.mlp(x)
    return x + mlp_out


def prefill_mask(attention_mask: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, new, past + new) bool: causal over the new positions, padding keys masked. A padding
    query may attend to itself, so that no row is all-masked (its output is never read)."""
    new = attention_mask.shape[1]
    valid = attention_mask.bool()
    keys = valid if past is None else torch.cat([past, valid], dim=1)
    offset = keys.shape[1] - new
    causal = torch.ones(new, keys.shape[1], dtype=torch.bool, device=valid.device).tril(offset)
    mask = causal[None] & keys[:, None, :]
    diagonal = torch.arange(new, device=valid.device)
    mask[:, diagonal, diagonal + offset] |= ~valid
    return mask[:, None]


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------
class DecoderBlockPlans:
    """What every generative backbone whose DAS arms are its decoder blocks shares (LLaVA, LaVIN): the
    arms, the plans' checks and modules (skip adapters, optional parallel adapters, nothing else), and
    the lm head that answers for every plan. A backbone sets ``family`` and provides ``config``
    (num_hidden_layers, hidden_size, layer_norm_eps), ``lm_head`` and ``config_flops_at``."""

    family = ""  # the architecture's name in messages

    @staticmethod
    def arm_count(config: Any) -> int:
        return config.num_hidden_layers

    @staticmethod
    def arm_names(config: Any) -> list[str]:
        return [f"decoder block {i}" for i in range(config.num_hidden_layers)]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def task_heads(self) -> dict[str, int | None]:
        """VQA, answered in text by the lm head (no label vocabulary: None)."""
        return {"vqa": None}

    def labels(self, task: str) -> list[str]:
        """A generative backbone has no label vocabulary: answers are generated text."""
        return []

    def check_plan_spec(self, spec: PlanSpec) -> None:
        where = f"plan {spec.task}/{spec.name}"
        if spec.task != "vqa":
            raise PlanError(f"{where}: a {self.family} backbone answers vqa (in text); {spec.task} has no head here")
        if spec.own_head:
            raise PlanError(f"{where}: a {self.family} plan carries no head of its own (answers come from the "
                            "backbone's lm head, shared by every plan)")
        check_own_parts(spec, self.plan_own_parts, self.family)

    plan_own_parts: tuple[str, ...] = ()  # the backbone's parts a plan may carry its own copies of

    def build_plan_modules(self, spec: PlanSpec, init_from_backbone: bool = False) -> PlanModules:
        """Skip adapters for the skipped decoder blocks, parallel adapters (if any) for the kept ones,
        and the plan's own copies of ``spec.own_parts`` in the kept blocks (``init_from_backbone``:
        equal to the backbone's, the start of training)."""
        hidden, eps = self.config.hidden_size, self.config.layer_norm_eps
        skipped = set(spec.skipped_layers)
        skip = {i: SkipAdapter(hidden, spec.adapters.skip_bottleneck, eps) for i in skipped}
        parallel = {}
        if spec.adapters.parallel_bottleneck:
            parallel = {i: ParallelAdapters(hidden, spec.adapters.parallel_bottleneck, eps)
                        for i in range(self.num_layers) if i not in skipped}
        kept = [i for i in range(self.num_layers) if i not in skipped]
        return PlanModules(skip, parallel, mma_adapters=self.own_block_parts(spec, kept, init_from_backbone))

    def own_block_parts(self, spec: PlanSpec, kept: list[int], init_from_backbone: bool) -> dict[int, nn.Module]:
        """The plan's own per-block parts (none for LLaVA)."""
        return {}

    def head_for(self, task: str, plan: PlanModules) -> nn.Module:
        """The lm head (the backbone's, for every plan)."""
        if task != "vqa":
            raise PlanError(f"no {task} head: a {self.family} backbone answers vqa in text")
        return self.lm_head

    def kept_layers(self, plan: PlanModules) -> list[int]:
        return [i for i in range(self.num_layers) if plan.skip_adapter(i) is None]

    # -- teacher forcing -------------------------------------------------------------------------
    # The batch's per-position fields and what an appended token holds in each ("token": its id), and
    # the fields that hold a column index (they move with their row's padding).
    appended_token_fields: dict[str, Any] = {"input_ids": "token", "attention_mask": 1}
    column_fields: tuple[str, ...] = ()

    def append_tokens(self, batch: Any, tokens: Sequence[Sequence[int]]) -> Any:
        """``batch`` (from ``preprocess``) with each row's ``tokens`` after its prompt, left padding
        kept: one sequence to run whole (teacher forcing on an answer), as if they had been generated."""
        if len(tokens) != len(batch):
            raise ValueError(f"{len(tokens)} token lists for a batch of {len(batch)}")
        width = batch.input_ids.shape[1]
        new_width = width + max((len(t) for t in tokens), default=0)
        shifts = [new_width - width - len(t) for t in tokens]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        changes: dict[str, Any] = {}
        for name, fill in self.appended_token_fields.items():
            old = getattr(batch, name)
            new = old.new_full((len(tokens), new_width), pad if name == "input_ids" else 0)
            for row, (extra, shift) in enumerate(zip(tokens, shifts)):
                new[row, shift:shift + width] = old[row]
                if extra:
                    new[row, shift + width:] = torch.tensor(extra, dtype=old.dtype) if fill == "token" else fill
            changes[name] = new
        for name in self.column_fields:
            column = getattr(batch, name)
            changes[name] = column + torch.tensor(shifts, dtype=column.dtype, device=column.device)
        changes["text_lengths"] = [n + len(t) for n, t in zip(batch.text_lengths, tokens)]
        return replace(batch, **changes)

    def flops_at(self, task: str, spec: PlanSpec | None, text_len: int, image_size: int | tuple[int, int],
                 new_tokens: int = REFERENCE_NEW_TOKENS) -> FlopsReport:
        """FLOPs of a prompt of ``text_len`` text tokens with one image at ``image_size``, and
        ``new_tokens`` generated tokens (a plan's reference input)."""
        return self.config_flops_at(self.config, task, spec, text_len, image_size, new_tokens=new_tokens)


class LlavaBackbone(DecoderBlockPlans, nn.Module):
    """A frozen LLaVA-style checkpoint (``LlavaForConditionalGeneration``) and its ``LlavaProcessor``."""

    family = "LLaVA"

    architecture = MODEL_TYPE
    default_skip_bottleneck = SKIP_BOTTLENECK
    generative = True  # answers are generated text; the lm head is the backbone's own, for every plan

    def __init__(self, config: LlavaBackboneConfig, processor: LlavaProcessor | None = None,
                 model: LlavaForConditionalGeneration | None = None, fingerprint: str = "") -> None:
        super().__init__()
        self.config = config
        self.processor = processor
        self.llava = model if model is not None else LlavaForConditionalGeneration(config.hf)
        self.fingerprint = fingerprint

    # -- what `das flops` and the CLI need without weights ------------------------------------
    @classmethod
    def load_config(cls, directory: str | os.PathLike) -> LlavaBackboneConfig:
        return config_from_dir(directory)

    @staticmethod
    def config_flops_at(config: LlavaBackboneConfig, task: str, spec: PlanSpec | None, text_len: int,
                        image_size: int | tuple[int, int], num_labels: int | None = None,
                        new_tokens: int = REFERENCE_NEW_TOKENS) -> FlopsReport:
        """One prompt of ``text_len`` text tokens and one image resized to ``image_size``, answered with
        ``new_tokens`` generated tokens (``num_labels`` is unused: the lm head is the vocabulary)."""
        if task != "vqa":
            raise PlanError(f"a LLaVA backbone answers vqa (in text); {task} has no head here")
        grid = square_grid(config, image_size)
        return llava_request_flops(config, spec, text_len + config.image_tokens(grid), [grid], new_tokens)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device = torch.device("cpu"),
                        dtype: torch.dtype = torch.float32) -> LlavaBackbone:
        """Load a ``LlavaForConditionalGeneration`` checkpoint and its processor from a local directory
        (transformers' loader: sharded safetensors, and the older llava-hf key layout, work)."""
        directory = Path(directory)
        config = config_from_dir(directory)
        if config.text.model_type not in ("llama", "mistral", "qwen2"):
            raise BackboneError(f"{directory}: text_config.model_type {config.text.model_type!r} is not a "
                                "Llama-style decoder (llama, mistral, qwen2)")
        if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer.model").is_file():
            raise BackboneError(f"{directory}: tokenizer files missing (tokenizer.json or tokenizer.model is needed "
                                "beside config.json)")
        if not any((directory / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
            raise BackboneError(f"{directory}: image processor missing (preprocessor_config.json or "
                                "processor_config.json is needed beside config.json)")
        try:
            processor = LlavaProcessor.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BackboneError(f"{directory}: processor files unreadable: {exc}") from None
        processor.tokenizer.padding_side = "left"
        try:
            model, info = LlavaForConditionalGeneration.from_pretrained(
                # the checkpoint's own dtype: the fingerprint then does not depend on the dtype asked for
                str(directory), local_files_only=True, dtype="auto", attn_implementation="sdpa",
                output_loading_info=True,
            )
        except (OSError, ValueError) as exc:
            raise BackboneError(f"{directory}: weights unreadable: {exc}") from None
        missing = [k for k in info.get("missing_keys", ()) if k != "lm_head.weight" or not config.text.tie_word_embeddings]
        if missing:
            raise BackboneError(f"{directory}: checkpoint lacks backbone weights: {sorted(missing)[:8]}")
        backbone = cls(config, processor, model.eval())
        backbone.ignored_keys = sorted(info.get("unexpected_keys", ()))
        backbone.fingerprint = fingerprint(_config_items(config), backbone.llava.state_dict())
        backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return backbone

    # -- facts about the backbone ------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.llava.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.llava.model.vision_tower

    @property
    def device(self) -> torch.device:
        return self.llava.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llava.lm_head.weight.dtype

    @property
    def max_text_len(self) -> int:
        """The context: prompt tokens (image tokens included) plus generated tokens."""
        return self.config.max_positions

    @property
    def lm_head(self) -> nn.Module:
        return self.llava.lm_head

    @property
    def image_placeholder(self) -> str:
        """The token that marks an image's place in a prompt's text (clients must not send it as text)."""
        return self.processor.image_token if self.processor is not None else ""

    @property
    def tokenizer(self) -> Any:
        if self.processor is None:
            raise BackboneError("this LLaVA backbone was built without a processor")
        return self.processor.tokenizer

    # -- plans -------------------------------------------------------------------------------
    # -- preprocessing -------------------------------------------------------------------------
    def _bounded(self, image: Image.Image) -> Image.Image:
        """What the processor (shorter side to its resolution, centre square) would see of ``image``,
        at most SHRINK_TO times that resolution on the shorter side: a 40000 x 1 upload costs no more
        than a square one."""
        resolution = (self.processor.image_processor.size or {}).get("shortest_edge") or self.config.image_size
        width, height = image.size
        shorter, longer = min(width, height), max(width, height)
        keep = min(longer, CROP_BAND * shorter)
        start = (longer - keep) // 2
        box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
        return padded_region(image, box, min(1.0, SHRINK_TO * resolution / shorter))

    def prompt_for(self, question: str, with_image: bool = True) -> list[dict[str, Any]]:
        """Chat messages asking ``question`` about one image, as LLaVA-1.5's short-answer VQA prompt."""
        content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": f"{question}\nAnswer the question using a single word or phrase."})
        return [{"role": "user", "content": content}]

    def render(self, conversation: str | Sequence[dict[str, Any]]) -> str:
        """A prompt string: raw text as given (``<image>`` marks each image), or chat messages through
        the checkpoint's chat template, with the assistant's turn opened."""
        if isinstance(conversation, str):
            return conversation
        if self.processor is None:
            raise BackboneError("this LLaVA backbone was built without a processor")
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)
        # no template: LLaVA-1.5's conversation format
        parts = []
        for message in conversation:
            content = message["content"]
            if not isinstance(content, str):
                content = "".join(self.processor.image_token + "\n" if part.get("type") == "image" else part.get("text", "")
                                  for part in content)
            parts.append(content if message["role"] == "system" else f"{message['role'].upper()}: {content}")
        return "\n".join(parts) + "\nASSISTANT:"

    def preprocess(self, images: Sequence[Image.Image | Sequence[Image.Image] | None],
                   texts: Sequence[str | Sequence[dict[str, Any]]]) -> LlavaBatch:
        """Prompts (strings with one ``<image>`` per image, or chat messages) and their images (one image,
        a list of images, or None per prompt): tokens with the image placeholders expanded, left-padded."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} image entries but {len(texts)} prompts")
        if self.processor is None:
            raise BackboneError("this LLaVA backbone was built without a processor")
        prompts = [self.render(text) for text in texts]
        per_prompt = [[] if entry is None else [entry] if isinstance(entry, Image.Image) else list(entry)
                      for entry in images]
        image_token = self.processor.image_token
        for i, (prompt, imgs) in enumerate(zip(prompts, per_prompt)):
            if prompt.count(image_token) != len(imgs):
                raise ValueError(f"prompt {i} has {prompt.count(image_token)} {image_token} placeholder(s) but "
                                 f"{len(imgs)} image(s)")
        flat = [self._bounded(to_rgb(image)) for imgs in per_prompt for image in imgs]
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        encoding = self.processor(images=flat or None, text=prompts, padding="longest", return_tensors="pt")
        pixels = encoding.get("pixel_values")
        grids = [square_grid(self.config, tuple(pixels.shape[-2:]))] * len(flat) if flat else []
        lengths = [int(n) for n in encoding["attention_mask"].sum(dim=1).tolist()]
        return LlavaBatch(
            input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"], pixel_values=pixels,
            image_counts=[len(imgs) for imgs in per_prompt], text_lengths=lengths, truncated=[False] * len(prompts),
            patch_grids=grids,
        )

    def prompt_text_len(self, batch: LlavaBatch, row: int) -> int:
        """The text tokens of ``batch``'s row (its image tokens not counted), as ``flops_at`` counts them."""
        return batch.text_lengths[row] - sum(self.config.image_tokens(grid) for grid in batch.image_grids(row))

    # -- forward -------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, tokens, text hidden): CLIP up to the feature layer (never further), the selected
        hidden states (class token dropped under "default"), through the multimodal projector."""
        tower = self.vision_tower
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        states = [hidden]
        for layer in tower.encoder.layers[: self.config.vision_layers_run]:
            hidden = layer(hidden, None)
            states.append(hidden)
        selected = [states[i] for i in self.config.feature_layers]
        if not self.config.keeps_cls:
            selected = [s[:, 1:] for s in selected]
        return self.llava.model.multi_modal_projector(torch.cat(selected, dim=-1))

    def embed(self, batch: LlavaBatch) -> torch.Tensor:
        """Token embeddings with each image's projected features in its placeholder positions."""
        embeds = self.language_model.embed_tokens(batch.input_ids)
        if batch.pixel_values is not None:
            features = self.image_features(batch.pixel_values).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            placeholder = batch.input_ids == self.config.hf.image_token_id
            if int(placeholder.sum()) != features.shape[0]:
                raise ValueError(f"{int(placeholder.sum())} image tokens in the prompts but {features.shape[0]} image "
                                 "features")
            embeds = embeds.masked_scatter(placeholder[..., None], features)
        return embeds

    def decode(self, x: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, plan: PlanModules,
               cache: KVCache | None = None) -> torch.Tensor:
        """The decoder under ``plan`` on new positions ``x`` (B, new, hidden) at ``positions`` (B, new);
        ``attention_mask`` is (B, 1, new, keys) bool. Returns the final-norm hidden states. With a cache,
        the kept blocks attend to their cached keys/values and store the new ones (the caller advances it)."""
        rope = self.language_model.rotary_emb(x, positions)
        for index, layer in enumerate(self.language_model.layers):
            skip = plan.skip_adapter(index)
            if skip is not None:
                x = skip(x)  # the block is not executed and has no cache entry
            else:
                x = decoder_block_forward(layer, x, rope, attention_mask, plan.parallel_adapter(index), cache, index)
        return self.language_model.norm(x)

    def new_cache(self, plan: PlanModules, batch: int, capacity: int) -> KVCache:
        text = self.config.text
        return KVCache(self.kept_layers(plan), batch, text.num_key_value_heads, self.config.head_dim, capacity,
                       self.device, self.dtype)

    def prefill(self, batch: LlavaBatch, plan: PlanModules, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the whole (left-padded) prompts into an empty ``cache``: the next-token logits (B, vocab)
        and each row's next position (B,)."""
        positions = self.positions(batch.attention_mask)
        cache.attend_mask(batch.attention_mask)
        hidden = self.decode(self.embed(batch), positions, prefill_mask(batch.attention_mask), plan, cache)
        cache.advance(batch.input_ids.shape[1])
        return self.llava.lm_head(hidden[:, -1]), positions[:, -1] + 1

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, plan: PlanModules,
                    cache: KVCache) -> torch.Tensor:
        """Feed one token per row (``tokens``, ``positions``: (B,)) attending to the cache; the next-token
        logits (B, vocab)."""
        x = self.language_model.embed_tokens(tokens[:, None])
        mask = cache.attend_mask(torch.ones_like(tokens[:, None], dtype=torch.bool))[:, None, None, :]
        hidden = self.decode(x, positions[:, None], mask, plan, cache)
        cache.advance(1)
        return self.llava.lm_head(hidden[:, -1])

    @staticmethod
    def positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids of left-padded prompts: 0 at each prompt's first real token (padding: 0)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def sequence_output(self, batch: LlavaBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """Final hidden states (B, L, hidden) of the whole (left-padded) sequence, no cache."""
        x = self.embed(batch)
        return self.decode(x, self.positions(batch.attention_mask), prefill_mask(batch.attention_mask), plan)

    def encode(self, batch: LlavaBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """(B, hidden): each prompt's last hidden state (the one its next token is read from)."""
        return self.sequence_output(batch, plan)[:, -1]

    def logits(self, batch: LlavaBatch, plan: PlanModules) -> torch.Tensor:
        """(B, L, vocab) next-token logits at every position, recomputing the whole sequence."""
        return self.llava.lm_head(self.sequence_output(batch, plan))

    # -- FLOPs -----------------------------------------------------------------------------------
    def flops(self, task: str, spec: PlanSpec | None, text_len: int, patch_grids: Sequence[tuple[int, int]],
              new_tokens: int = REFERENCE_NEW_TOKENS) -> FlopsReport:
        """FLOPs of one request: ``text_len`` prompt tokens (image tokens included), its images'
        patch grids, ``new_tokens`` generated tokens."""
        return llava_request_flops(self.config, spec, text_len, patch_grids, new_tokens)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def decoder_block_flops(config: LlavaBackboneConfig, query_len: int, context_len: int) -> int:
    """One decoder block on ``query_len`` new positions attending to ``context_len`` keys."""
    text = config.text
    return (gqa_attention_flops(query_len, context_len, text.hidden_size, text.num_attention_heads,
                                text.num_key_value_heads, config.head_dim)
            + gated_mlp_flops(query_len, text.hidden_size, text.intermediate_size))


def vision_flops(config: LlavaBackboneConfig, grid: tuple[int, int]) -> int:
    """One image: patch embedding, the CLIP layers up to the feature layer, the projector."""
    vision, text = config.vision, config.text
    patches = grid[0] * grid[1]
    flops = conv_patch_flops(patches, vision.num_channels, vision.patch_size, vision.hidden_size)
    flops += config.vision_layers_run * transformer_layer_flops(patches + 1, vision.hidden_size, vision.intermediate_size)
    tokens = config.image_tokens(grid)
    flops += linear_flops(tokens, vision.hidden_size * len(config.feature_layers), text.hidden_size)
    flops += linear_flops(tokens, text.hidden_size, text.hidden_size)
    return flops


def llava_request_flops(config: LlavaBackboneConfig, spec: PlanSpec | None, prompt_len: int,
                        image_grids: Sequence[tuple[int, int]], new_tokens: int) -> FlopsReport:
    """Analytic FLOPs of one generation request, full model vs ``spec`` (None = the full model).

    ``prompt_len`` counts every token the decoder reads at prefill (BOS, text, image tokens);
    ``new_tokens`` the tokens generated (EOS included when it ended the answer). Prefill runs the
    prompt once; each generated token but the last is fed back as one more position attending to the
    cache (prompt_len + t keys at step t); the lm head runs once per generated token. Needs only the
    config, so `das flops` does not load weights.
    """
    text = config.text
    hidden = text.hidden_size
    skipped = set(spec.skipped_layers) if spec else set()
    skip_b = spec.adapters.skip_bottleneck if spec else None
    par_b = spec.adapters.parallel_bottleneck if spec else None
    steps = max(new_tokens - 1, 0)  # decoded positions after the prefill
    tokens = prompt_len + steps  # positions every block (or its skip adapter) processes
    full_block = decoder_block_flops(config, prompt_len, prompt_len)
    full_block += sum(decoder_block_flops(config, 1, prompt_len + t) for t in range(1, steps + 1))
    layers = []
    for i in range(config.num_hidden_layers):
        if i in skipped:
            executed = adapter_flops(tokens, hidden, skip_b)
        else:
            executed = full_block + (2 * adapter_flops(tokens, hidden, par_b) if par_b else 0)
        layers.append(LayerFlops(i, full_block, executed, i in skipped))
    other = sum(vision_flops(config, grid) for grid in image_grids)
    other += linear_flops(new_tokens, hidden, text.vocab_size)  # the lm head, once per generated token
    return FlopsReport(per_layer=tuple(layers), other=other, seq_lens=(prompt_len, prompt_len + steps))


def square_grid(config: LlavaBackboneConfig, image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return (h // config.patch_size, w // config.patch_size)


__all__ = [
    "LlavaBackbone", "LlavaBackboneConfig", "LlavaBatch", "KVCache", "decoder_block_forward", "prefill_mask",
    "llava_request_flops", "decoder_block_flops", "vision_flops", "square_grid", "config_from_dir",
]
