"""ViLT as a frozen DAS backbone.

One file for the architecture, in the spirit of transformers' ``modeling_vilt.py``: the frozen
weights live in transformers' own ``ViltModel`` modules (loaded once, shared by every plan); this
file adds what DAS needs on top of them:

* ``ViltBackbone.encode``: the forward pass under a plan. A skipped layer is not executed; its skip
  adapter runs instead. Kept layers run with PyTorch's fused attention
  (``scaled_dot_product_attention``) and may carry parallel adapters.
* the task heads as transformers defines them (so checkpoint heads load as-is),
* patch embedding that keeps every valid patch in raster order (transformers samples the order
  at random; the result is the same up to float rounding, ours is deterministic),
* the per-request FLOPs count for this architecture,
* optionally a convolutional stem in place of the linear patch embedding (``conv_stem_channels`` in
  config.json; models/backbones/conv_stem.py). transformers' ViLT has none: a checkpoint with one
  loads here, not in ``ViltModel.from_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import ViltConfig, ViltModel, ViltProcessor
from transformers.models.vilt.modeling_vilt import ViltLayer, ViltPooler

from models.backbones.base import (
    BackboneError,
    check_nlvr2_token_types,
    check_own_parts,
    token_type_vocab, fingerprint, limit_aspect_ratio, read_checkpoint_state, read_config, to_rgb,
)
from models.backbones.conv_stem import ConvStemPatchEmbeddings, checked_stem_widths, stem_widths
from models.backbones.vilt.image_processing import vilt_pixels
from models.das.adapters import ParallelAdapters, PlanModules, SkipAdapter
from models.das.flops import (
    FlopsReport,
    LayerFlops,
    adapter_flops,
    patch_embedding_flops,
    linear_flops,
    transformer_layer_flops,
)
from models.das.plan import PlanError, PlanSpec

# Config fields that change what the frozen network computes (the fingerprint covers these).
FINGERPRINT_CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
    "max_image_length", "vocab_size", "type_vocab_size", "modality_type_vocab_size",
    "max_position_embeddings", "num_images", "id2label",
)
# Fingerprinted only where config.json sets them, so that the fingerprints of checkpoints without them
# (and the plans made for those) stay what they were.
OPTIONAL_FINGERPRINT_CONFIG_KEYS = ("conv_stem_channels",)


def conv_stem_channels(config: ViltConfig) -> tuple[int, ...]:
    """The convolutional stem's widths; () for transformers' linear patch embedding."""
    return stem_widths(getattr(config, "conv_stem_channels", None))


def install_conv_stem(vilt: ViltModel, config: ViltConfig) -> ViltModel:
    """Put the convolutional stem the config asks for (if any) in place of ``vilt``'s patch embedding,
    before its weights are loaded: any ViltModel (a bare one or a task model's ``.vilt``) then holds and
    saves the stem's parameters under ``embeddings.patch_embeddings.``."""
    channels = conv_stem_channels(config)
    if channels:
        vilt.embeddings.patch_embeddings = ConvStemPatchEmbeddings(
            config.num_channels, channels, config.hidden_size, config.patch_size)
    return vilt


# ---------------------------------------------------------------------------------------------
# Task heads (same module structure and parameter names as transformers' ViltFor* classes)
# ---------------------------------------------------------------------------------------------
def vqa_head(hidden_size: int, num_labels: int) -> nn.Sequential:
    """ViltForQuestionAnswering.classifier: pooled -> answer logits (sigmoid, multi-label)."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size * 2), nn.LayerNorm(hidden_size * 2), nn.GELU(),
        nn.Linear(hidden_size * 2, num_labels),
    )


def nlvr2_head(hidden_size: int, num_images: int = 2, num_labels: int = 2) -> nn.Sequential:
    """ViltForImagesAndTextClassification.classifier: concatenated pooled vectors -> true/false."""
    width = hidden_size * num_images
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, num_labels))


def retrieval_head(hidden_size: int) -> nn.Linear:
    """ViltForImageAndTextRetrieval.rank_output: pooled -> image-text matching score."""
    return nn.Linear(hidden_size, 1)


def _heads_in_checkpoint(state: dict[str, torch.Tensor], config: ViltConfig) -> dict[str, nn.Module]:
    """Recognise task heads by their parameter names and shapes; load their weights."""
    hidden = config.hidden_size
    heads: dict[str, nn.Module] = {}
    if "rank_output.weight" in state:
        heads["retrieval"] = retrieval_head(hidden)
        prefix = "rank_output."
        heads["retrieval"].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    if "classifier.0.weight" in state:
        out_features, in_features = state["classifier.0.weight"].shape
        num_labels = state["classifier.3.weight"].shape[0]
        if in_features == hidden and out_features == 2 * hidden:
            heads["vqa"] = vqa_head(hidden, num_labels)
        elif in_features == out_features and in_features % hidden == 0 and in_features // hidden >= 2:
            heads["nlvr2"] = nlvr2_head(hidden, in_features // hidden, num_labels)
        else:
            raise BackboneError(f"unrecognised classifier head of shape {[out_features, in_features]}")
        task = "vqa" if "vqa" in heads else "nlvr2"
        heads[task].load_state_dict({k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")})
    return heads


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
@dataclass
class ViltBatch:
    """Processed image-text pairs, padded to the longest text and the largest image."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    pixel_mask: torch.Tensor
    text_lengths: list[int]  # tokens per pair, [CLS] and [SEP] included, after truncation
    truncated: list[bool]  # whether the text was cut to the model's maximum length
    patch_grids: list[tuple[int, int]]  # valid patch rows x columns per image

    def __len__(self) -> int:
        return len(self.text_lengths)

    def to(self, device: torch.device, dtype: torch.dtype) -> ViltBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            token_type_ids=self.token_type_ids.to(device, non_blocking=True),
            pixel_values=self.pixel_values.to(device, dtype, non_blocking=True),
            pixel_mask=self.pixel_mask.to(device, non_blocking=True),
        )


# ---------------------------------------------------------------------------------------------
# One encoder layer under a plan
# ---------------------------------------------------------------------------------------------
def vilt_layer_forward(
    layer: ViltLayer, x: torch.Tensor, attention_mask: torch.Tensor, adapters: ParallelAdapters | None
) -> torch.Tensor:
    """ViltLayer's computation (pre-norm attention, then pre-norm MLP) with fused attention.

    ``attention_mask``: bool, (batch, 1, 1, seq), True where a key may be attended to.
    Parallel adapters read the sub-block's input and add their output beside the sub-block's.
    """
    self_attention = layer.attention.attention
    batch, seq, hidden = x.shape
    heads = self_attention.num_attention_heads

    normed = layer.layernorm_before(x)
    q, k, v = (
        proj(normed).view(batch, seq, heads, -1).transpose(1, 2)
        for proj in (self_attention.query, self_attention.key, self_attention.value)
    )
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
    attention_out = layer.attention.output.dense(context.transpose(1, 2).reshape(batch, seq, hidden))
    if adapters is not None:
        attention_out = attention_out + adapters.attention(x)
    x = x + attention_out

    mlp_out = layer.output.dense(layer.intermediate(layer.layernorm_after(x)))
    if adapters is not None:
        mlp_out = mlp_out + adapters.mlp(x)
    return x + mlp_out


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------
class ViltBackbone(nn.Module):
    """A frozen ViLT checkpoint (encoder + whatever task heads it carries) and its processor."""

    architecture = "vilt"

    def __init__(
        self,
        config: ViltConfig,
        processor: ViltProcessor,
        heads: dict[str, nn.Module] | None = None,
        fingerprint: str = "",
    ) -> None:
        super().__init__()
        self.config = config
        self.processor = processor
        self.vilt = install_conv_stem(ViltModel(config, add_pooling_layer=True), config)
        self.heads = nn.ModuleDict(heads or {})
        self.fingerprint = fingerprint

    # -- what `das flops` and the CLI need without weights (the same for every architecture) ---
    default_skip_bottleneck = 192  # the DAS reference's ViLT skip adapter

    @classmethod
    def load_config(cls, directory: str | os.PathLike) -> ViltConfig:
        return config_from_dir(directory)

    @staticmethod
    def arm_count(config: ViltConfig) -> int:
        return config.num_hidden_layers

    @staticmethod
    def arm_names(config: ViltConfig) -> list[str]:
        return [""] * config.num_hidden_layers  # the encoder layer index says it all

    @staticmethod
    def config_flops_at(
        config: ViltConfig, task: str, spec: PlanSpec | None, text_len: int, image_size: int | tuple[int, int],
        num_labels: int | None = None,
    ) -> FlopsReport:
        grid = square_grid(config, image_size)
        return vilt_request_flops(config, task, spec, text_len, [grid] * (2 if task == "nlvr2" else 1), num_labels)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32
    ) -> ViltBackbone:
        """Load ViltModel / ViltForQuestionAnswering / ViltForImagesAndTextClassification /
        ViltForImageAndTextRetrieval checkpoints (any of their layouts) from a local directory."""
        directory = Path(directory)
        raw_config = read_config(directory)
        config = ViltConfig.from_dict(raw_config)
        checked_stem_widths(raw_config.get("conv_stem_channels"), config.patch_size, f"{directory}: config.json")
        state = read_checkpoint_state(directory)
        # Task checkpoints prefix the encoder with "vilt."; a bare ViltModel does not.
        encoder_state = {k[len("vilt."):]: v for k, v in state.items() if k.startswith("vilt.")}
        if not encoder_state:
            encoder_state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "rank_output.", "mlm_score."))}
        if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
            # without them transformers silently builds a tokenizer that knows only the special tokens
            raise BackboneError(
                f"{directory}: tokenizer files missing (tokenizer.json or vocab.txt is needed beside config.json)"
            )
        try:
            processor = ViltProcessor.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise BackboneError(
                f"{directory}: processor files missing or unreadable (tokenizer files and "
                f"preprocessor_config.json are needed beside config.json): {exc}"
            ) from None
        heads = _heads_in_checkpoint(state, config)
        if "vqa" in heads and len(config.id2label) != heads["vqa"][3].out_features:
            raise BackboneError(
                f"{directory}: VQA head has {heads['vqa'][3].out_features} outputs but config.id2label has "
                f"{len(config.id2label)} labels"
            )
        backbone = cls(config, processor, heads)
        missing, unexpected = backbone.vilt.load_state_dict(encoder_state, strict=False)
        if missing:
            raise BackboneError(f"{directory}: checkpoint lacks backbone weights: {sorted(missing)[:8]}")
        backbone.ignored_keys = sorted(unexpected)
        config_items = {k: raw_config.get(k) for k in FINGERPRINT_CONFIG_KEYS}
        config_items.update({k: raw_config[k] for k in OPTIONAL_FINGERPRINT_CONFIG_KEYS if k in raw_config})
        backbone.fingerprint = fingerprint(config_items, backbone.state_dict())
        backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return backbone

    # -- facts about the backbone ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.vilt.embeddings.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vilt.embeddings.cls_token.dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def max_text_len(self) -> int:
        return self.config.max_position_embeddings

    def task_heads(self) -> dict[str, int | None]:
        """Tasks whose head this checkpoint carries -> number of labels (None for retrieval)."""
        sizes: dict[str, int | None] = {}
        for task, head in self.heads.items():
            sizes[task] = None if task == "retrieval" else head[3].out_features
        return sizes

    def labels(self, task: str) -> list[str]:
        """The checkpoint head's label vocabulary (index -> label) from config.id2label."""
        id2label = self.config.id2label
        return [str(id2label[i]) for i in range(len(id2label))]

    # -- plans -------------------------------------------------------------------------------
    def _token_type_vocab(self, task: str) -> int:
        return token_type_vocab(task, self.config.modality_type_vocab_size)

    def check_plan_spec(self, spec: PlanSpec) -> None:
        check_own_parts(spec, ("pooler", "token_type_embeddings"), "ViLT")
        check_nlvr2_token_types(spec, self.config.modality_type_vocab_size)

    def build_plan_modules(self, spec: PlanSpec, init_from_backbone: bool = False) -> PlanModules:
        """Modules with the shapes ``spec`` implies. ``init_from_backbone`` starts the plan's own
        copies (pooler, token types, head) from the backbone's, as training does."""
        hidden, eps = self.config.hidden_size, self.config.layer_norm_eps
        skipped = set(spec.skipped_layers)
        skip = {i: SkipAdapter(hidden, spec.adapters.skip_bottleneck, eps) for i in skipped}
        parallel = {}
        if spec.adapters.parallel_bottleneck:
            parallel = {
                i: ParallelAdapters(hidden, spec.adapters.parallel_bottleneck, eps)
                for i in range(self.num_layers)
                if i not in skipped
            }
        pooler = ViltPooler(self.config) if "pooler" in spec.own_parts else None
        token_types = (
            nn.Embedding(self._token_type_vocab(spec.task), hidden) if "token_type_embeddings" in spec.own_parts else None
        )
        head = None
        if spec.own_head:
            head = {
                "vqa": lambda: vqa_head(hidden, len(spec.labels or ())),
                "nlvr2": lambda: nlvr2_head(hidden, 2, len(spec.labels or ())),
                "retrieval": lambda: retrieval_head(hidden),
            }[spec.task]()
        modules = PlanModules(skip, parallel, pooler, token_types, head)
        if init_from_backbone:
            self._copy_trainable_parts_into(modules, spec.task)
        return modules

    @torch.no_grad()
    def _copy_trainable_parts_into(self, modules: PlanModules, task: str) -> None:
        if modules.pooler is not None:
            modules.pooler.load_state_dict(self.vilt.pooler.state_dict())
        if modules.token_type_embeddings is not None:
            source = self.vilt.embeddings.token_type_embeddings.weight
            target = modules.token_type_embeddings.weight
            target[: source.shape[0]] = source.to(target)
            target[source.shape[0]:] = source[-1].to(target)  # extra image slots start as "image" (as ViLT does)
        if modules.head is not None and task in self.heads:
            own, theirs = modules.head.state_dict(), self.heads[task].state_dict()
            if all(own[k].shape == theirs[k].shape for k in own):
                modules.head.load_state_dict(theirs)

    def head_for(self, task: str, plan: PlanModules) -> nn.Module:
        if plan.head is not None:
            return plan.head
        if task not in self.heads:
            raise PlanError(f"no {task} head: neither the plan nor the backbone checkpoint has one")
        return self.heads[task]

    # -- preprocessing -------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image], texts: Sequence[str]) -> ViltBatch:
        """Same resize, normalisation, pixel mask and tokenisation as the checkpoint's ViltProcessor;
        texts are truncated to the model's maximum length and the truncation is reported."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        tokenizer = self.processor.tokenizer
        max_len = self.max_text_len
        untruncated = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        encoding = tokenizer(
            list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt"
        )
        ratio, side = self._max_aspect_ratio(), self._max_input_side()
        pixels = vilt_pixels(
            self.processor.image_processor, [limit_aspect_ratio(to_rgb(image), ratio, side) for image in images]
        )
        text_lengths = encoding["attention_mask"].sum(dim=1).tolist()
        return ViltBatch(
            input_ids=encoding["input_ids"],
            attention_mask=encoding["attention_mask"],
            token_type_ids=encoding.get("token_type_ids", torch.zeros_like(encoding["input_ids"])),
            pixel_values=pixels["pixel_values"],
            pixel_mask=pixels["pixel_mask"],
            text_lengths=[int(n) for n in text_lengths],
            truncated=[len(ids) > max_len for ids in untruncated],
            patch_grids=self._patch_grids(pixels["pixel_mask"]),
        )

    def _longer_cap(self) -> int:
        """The longest side the image processor resizes to (ViLT's rule, see transformers' ViltImageProcessor)."""
        return int(1333 / 800 * (self.processor.image_processor.size or {}).get("shortest_edge", 384))

    def _max_aspect_ratio(self) -> float:
        """The widest aspect ratio the image processor resizes without a side dropping to zero."""
        divisor = getattr(self.processor.image_processor, "size_divisor", None) or 32
        return self._longer_cap() / (divisor + 1)

    def _max_input_side(self) -> int:
        """Larger images are shrunk to this (longer side) before the processor sees them: twice what
        it resizes to, so that the processor still only shrinks, and a 40-megapixel upload costs
        the processor 1280 x 1280 pixels, not 40 million."""
        return 2 * self._longer_cap()

    def _patch_grids(self, pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
        """Valid patch rows/columns per image, computed as ViltEmbeddings.visual_embed does."""
        p = self.config.patch_size
        grid = F.interpolate(pixel_mask[:, None].float(), size=(pixel_mask.shape[1] // p, pixel_mask.shape[2] // p))
        grid = grid[:, 0].long()
        rows = grid[:, :, 0].sum(dim=1).tolist()
        cols = grid[:, 0, :].sum(dim=1).tolist()
        return [(int(r), int(c)) for r, c in zip(rows, cols)]

    def num_image_tokens(self, grid: tuple[int, int]) -> int:
        """Patches a grid contributes after ViLT's max_image_length cap (the image [CLS] not included)."""
        patches = grid[0] * grid[1]
        cap = self.config.max_image_length
        return min(patches, cap) if cap and cap > 0 else patches

    # -- forward -------------------------------------------------------------------------------
    def _image_embeddings(self, batch: ViltBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings + interpolated position embeddings, valid patches only, then padding."""
        emb = self.vilt.embeddings
        x = emb.patch_embeddings(batch.pixel_values)  # (B, hidden, rows, cols)
        hidden = x.shape[1]
        side = self.config.image_size // self.config.patch_size
        spatial_pos = emb.position_embeddings[:, 1:, :].transpose(1, 2).reshape(1, hidden, side, side)
        pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        sequences = []
        for i, (rows, cols) in enumerate(batch.patch_grids):
            if (rows, cols) not in pos_cache:
                pos = spatial_pos
                if (rows, cols) != (side, side):
                    pos = F.interpolate(spatial_pos.float(), size=(rows, cols), mode="bilinear", align_corners=True)
                pos_cache[(rows, cols)] = pos.to(x.dtype)[0]
            tokens = (x[i, :, :rows, :cols] + pos_cache[(rows, cols)]).flatten(1).transpose(0, 1)
            keep = self.num_image_tokens((rows, cols))
            if keep < tokens.shape[0]:  # deterministic, evenly spread subset under max_image_length
                tokens = tokens[torch.linspace(0, tokens.shape[0] - 1, keep, device=tokens.device).round().long()]
            sequences.append(tokens)
        longest = max(t.shape[0] for t in sequences)
        patches = x.new_zeros(len(sequences), longest, hidden)
        mask = torch.zeros(len(sequences), longest + 1, dtype=torch.bool, device=x.device)
        mask[:, 0] = True
        for i, tokens in enumerate(sequences):
            patches[i, : tokens.shape[0]] = tokens
            mask[i, 1 : tokens.shape[0] + 1] = True
        cls = (emb.cls_token + emb.position_embeddings[:, :1, :]).expand(len(sequences), -1, -1)
        return torch.cat([cls, patches], dim=1), mask

    def embed(
        self, batch: ViltBatch, plan: PlanModules, image_token_type_idx: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and image tokens with modality embeddings, concatenated: (B, seq, hidden), mask."""
        emb = self.vilt.embeddings
        text = emb.text_embeddings(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids)
        image, image_mask = self._image_embeddings(batch)
        token_types = plan.token_type_embeddings if plan.token_type_embeddings is not None else emb.token_type_embeddings
        text = text + token_types.weight[0]
        image = image + token_types.weight[image_token_type_idx]
        mask = torch.cat([batch.attention_mask.bool(), image_mask], dim=1)
        return torch.cat([text, image], dim=1), mask

    def encode(self, batch: ViltBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """Pooled vectors (B, hidden) of the reduced network ``plan`` describes."""
        pooler = plan.pooler if plan.pooler is not None else self.vilt.pooler
        return pooler(self.sequence_output(batch, plan, image_token_type_idx))

    def sequence_output(self, batch: ViltBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """Final hidden states (B, seq, hidden): text tokens first, then the image [CLS] and patches."""
        x, mask = self.embed(batch, plan, image_token_type_idx)
        attention_mask = mask[:, None, None, :]
        for index, layer in enumerate(self.vilt.encoder.layer):
            skip = plan.skip_adapter(index)
            if skip is not None:
                x = skip(x)  # the layer itself is not executed
            else:
                x = vilt_layer_forward(layer, x, attention_mask, plan.parallel_adapter(index))
        return self.vilt.layernorm(x)

    # -- FLOPs -----------------------------------------------------------------------------------
    def flops_at(self, task: str, spec: PlanSpec | None, text_len: int, image_size: int | tuple[int, int]) -> FlopsReport:
        """FLOPs of a request whose images were resized to ``image_size`` (e.g. a plan's reference input)."""
        grid = square_grid(self.config, image_size)
        return self.flops(task, spec, text_len, [grid] * (2 if task == "nlvr2" else 1))

    def flops(
        self, task: str, spec: PlanSpec | None, text_len: int, patch_grids: Sequence[tuple[int, int]]
    ) -> FlopsReport:
        """FLOPs of one request: one pass per image (NLVR2 has two) plus the task head."""
        num_labels = (len(spec.labels) if spec is not None and spec.labels else None) or self.task_heads().get(task)
        return vilt_request_flops(self.config, task, spec, text_len, patch_grids, num_labels)


def vilt_request_flops(
    config: ViltConfig,
    task: str,
    spec: PlanSpec | None,
    text_len: int,
    patch_grids: Sequence[tuple[int, int]],
    num_labels: int | None = None,
) -> FlopsReport:
    """Analytic FLOPs of one request, full model vs ``spec`` (None = the full model).

    ``text_len`` counts text tokens including [CLS]/[SEP]; ``patch_grids`` gives each image's valid
    patch rows x columns. Needs only the config, so `das flops` does not load weights.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    skipped = set(spec.skipped_layers) if spec else set()
    skip_b = spec.adapters.skip_bottleneck if spec else None
    par_b = spec.adapters.parallel_bottleneck if spec else None
    cap = config.max_image_length
    report: FlopsReport | None = None
    for rows, cols in patch_grids:
        patches = min(rows * cols, cap) if cap and cap > 0 else rows * cols
        seq = text_len + 1 + patches
        layers = []
        for i in range(config.num_hidden_layers):
            full = transformer_layer_flops(seq, hidden, inter)
            if i in skipped:
                executed = adapter_flops(seq, hidden, skip_b)
            else:
                executed = full + (2 * adapter_flops(seq, hidden, par_b) if par_b else 0)
            layers.append(LayerFlops(i, full, executed, i in skipped))
        other = patch_embedding_flops(rows, cols, config.num_channels, config.patch_size, hidden,
                                      conv_stem_channels(config))
        other += linear_flops(1, hidden, hidden)  # pooler
        one_pass = FlopsReport(per_layer=tuple(layers), other=other, seq_lens=(seq,))
        report = one_pass if report is None else report + one_pass
    assert report is not None, "at least one image is needed"
    head = {
        "vqa": lambda: linear_flops(1, hidden, 2 * hidden) + linear_flops(1, 2 * hidden, num_labels or len(config.id2label)),
        "nlvr2": lambda: linear_flops(1, 2 * hidden, 2 * hidden) + linear_flops(1, 2 * hidden, num_labels or 2),
        "retrieval": lambda: linear_flops(1, hidden, 1),
    }[task]()
    return FlopsReport(per_layer=report.per_layer, other=report.other + head, seq_lens=report.seq_lens)


def square_grid(config: ViltConfig, image_size: int | tuple[int, int]) -> tuple[int, int]:
    """Patch grid of an image already resized to ``image_size`` (an int means square)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return (h // config.patch_size, w // config.patch_size)


def config_from_dir(directory: str | os.PathLike) -> ViltConfig:
    return ViltConfig.from_dict(read_config(directory))


__all__: list[Any] = [
    "ViltBackbone", "ViltBatch", "vilt_layer_forward", "vilt_request_flops", "vqa_head", "nlvr2_head",
    "retrieval_head", "square_grid", "config_from_dir", "conv_stem_channels", "install_conv_stem",
]
