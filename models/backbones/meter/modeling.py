"""METER as a frozen DAS backbone: two uni-modal encoders and a dual-stream co-attention fusion.

METER (Dou et al., github.com/zdou0830/METER) is not in transformers, so it is assembled here from
transformers' parts:

* image encoder: ``CLIPVisionModel`` (METER's CLIP-ViT-B/16; METER keeps all but the last residual
  block of CLIP and applies ``ln_post`` to every token),
* text encoder: ``RobertaModel`` (no pooler; METER does not use it),
* linear projections of both streams to the fusion width plus modality token-type embeddings
  (type 0 text, 1 image; NLVR2 checkpoints carry a third for the second image),
* ``num_fusion_layers`` co-attention layers per stream, each METER's ``BertCrossLayer`` (post-norm
  self-attention, cross-attention to the other stream, MLP) built from transformers' BERT modules.
  Both streams advance in lock-step: layer i of each stream reads the outputs of layer i-1 of both,
* poolers on both streams (text: first token, image: first token, the CLIP [CLS]); their outputs are
  concatenated (2 x hidden) and feed METER's heads: VQA (2h -> 2h -> LayerNorm/GELU -> answers),
  NLVR2 (two passes, 4h -> 2h -> LayerNorm/GELU -> 2), retrieval (2h -> 1, METER's ``rank_output``).

DAS arms (the plan format's ``skipped_layers``): the fusion layers, text side first.
Arm ``i`` for ``0 <= i < n`` is text-side fusion layer ``i``; arm ``n + i`` is image-side fusion layer
``i`` (``n = num_fusion_layers``, 6 for METER: arms 0-5 text side, 6-11 image side). Skipping an arm
replaces that layer on its own stream only by a skip adapter; the other stream's layer still runs
and cross-attends to the skipped stream's previous output. The uni-modal encoders are frozen and
never skipped. Kept fusion layers may carry parallel adapters: beside the self-attention sub-block
and beside the MLP, each reading the sub-block's input and added before the sub-block's residual
LayerNorm (the cross-attention sub-block has none).

The directory layout (config.json with model_type "meter", model.safetensors under this module's own
parameter names, tokenizer files, preprocessor_config.json) is written by ``models/backbones/meter/convert.py``,
which also maps METER's official Lightning checkpoints onto it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    BertConfig,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    RobertaModel,
    RobertaTokenizerFast,
)
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput, BertPooler

from models.backbones.base import (
    BackboneError,
    check_nlvr2_token_types,
    check_own_parts,
    fingerprint,
    padded_region,
    read_checkpoint_state,
    to_rgb,
    token_type_vocab,
)
from models.backbones.conv_stem import ConvStemPatchEmbeddings
from models.backbones.meter.configuration import MODEL_TYPE, MeterConfig, arm_names
from models.backbones.meter.image_processing import meter_pixels
from models.das.adapters import ParallelAdapters, PlanModules, SkipAdapter
from models.das.flops import (
    FlopsReport,
    LayerFlops,
    adapter_flops,
    patch_embedding_flops,
    cross_attention_flops,
    linear_flops,
    mlp_flops,
    self_attention_flops,
    transformer_layer_flops,
)
from models.das.plan import PlanError, PlanSpec

SKIP_BOTTLENECK = 288  # the DAS reference's METER skip adapter
# METER resizes the shorter side and centre-crops; padding first bounds what a very elongated image
# costs to resize (a 1 x 10000 image would otherwise become 288 x 2.9M pixels). Up to this ratio
# images are treated exactly as METER does.
MAX_ASPECT_RATIO = 32.0
# Images larger than this many times the model's resolution are cut down before the processor sees
# them (bounded memory for any upload): the longer side to its centre part, CROP_RATIO times the
# shorter side (METER's centre crop keeps only the middle), then shrunk to a shorter side of
# SHRINK_TO times the resolution. Smaller images are treated exactly as METER does.
LARGE_SIDE, CROP_RATIO, SHRINK_TO = 8, 4, 2
# OpenAI CLIP's normalisation (METER's clip_transform)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class FusionLayer(nn.Module):
    """METER's ``BertCrossLayer`` from transformers' BERT parts (same parameter names as METER's):
    self-attention, cross-attention to the other stream, MLP, each post-norm with a residual."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)


class MeterPoolers(nn.Module):
    """Both streams' poolers (dense + tanh on the first token); pooled vectors concatenated, text first."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.text = BertPooler(config)
        self.image = BertPooler(config)

    def forward(self, text_states: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.text(text_states), self.image(image_states)], dim=-1)


def vqa_head(hidden_size: int, num_labels: int) -> nn.Sequential:
    """METER's vqa_classifier: pooled pair (2h) -> answer logits."""
    width = 2 * hidden_size
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, num_labels))


def nlvr2_head(hidden_size: int, num_labels: int = 2) -> nn.Sequential:
    """METER's nlvr2_classifier ("pair"): both passes' pooled pairs (4h) -> false/true."""
    return nn.Sequential(nn.Linear(4 * hidden_size, 2 * hidden_size), nn.LayerNorm(2 * hidden_size), nn.GELU(),
                         nn.Linear(2 * hidden_size, num_labels))


def retrieval_head(hidden_size: int) -> nn.Linear:
    """METER's rank_output: pooled pair (2h) -> image-text matching score."""
    return nn.Linear(2 * hidden_size, 1)


HEAD_PREFIX = "heads."


def heads_in_state(state: dict[str, torch.Tensor], config: MeterConfig) -> dict[str, nn.Module]:
    """Task heads present in a checkpoint directory's weights (``heads.<task>.*``), shaped from them."""
    hidden = config.hidden_size
    heads: dict[str, nn.Module] = {}
    if "heads.vqa.3.weight" in state:
        heads["vqa"] = vqa_head(hidden, state["heads.vqa.3.weight"].shape[0])
    if "heads.nlvr2.3.weight" in state:
        heads["nlvr2"] = nlvr2_head(hidden, state["heads.nlvr2.3.weight"].shape[0])
    if "heads.retrieval.weight" in state:
        heads["retrieval"] = retrieval_head(hidden)
    return heads


def _attend(attention: nn.Module, queries: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention of ``queries`` over ``context`` with a BERT (self or cross) attention's
    projections, fused (``scaled_dot_product_attention``). ``mask``: bool (B, 1, 1, context_len),
    True where a key may be attended to; None = every key."""
    batch, q_len, hidden = queries.shape
    heads = attention.num_attention_heads
    q = attention.query(queries).view(batch, q_len, heads, -1).transpose(1, 2)
    k = attention.key(context).view(batch, context.shape[1], heads, -1).transpose(1, 2)
    v = attention.value(context).view(batch, context.shape[1], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, q_len, hidden)


def fusion_layer_forward(
    layer: FusionLayer,
    x: torch.Tensor,
    context: torch.Tensor,
    x_mask: torch.Tensor | None,
    context_mask: torch.Tensor | None,
    adapters: ParallelAdapters | None,
) -> torch.Tensor:
    """One stream's fusion layer (METER's BertCrossLayer.forward) with fused attention; parallel
    adapters beside self-attention and MLP, added before each sub-block's residual LayerNorm."""
    attention_out = layer.attention.output.dense(_attend(layer.attention.self, x, x, x_mask))
    if adapters is not None:
        attention_out = attention_out + adapters.attention(x)
    x = layer.attention.output.LayerNorm(attention_out + x)
    cross_out = layer.crossattention.output.dense(_attend(layer.crossattention.self, x, context, context_mask))
    x = layer.crossattention.output.LayerNorm(cross_out + x)
    mlp_out = layer.output.dense(layer.intermediate(x))
    if adapters is not None:
        mlp_out = mlp_out + adapters.mlp(x)
    return layer.output.LayerNorm(mlp_out + x)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
@dataclass
class MeterBatch:
    """Tokenised texts (padded to the longest) and images at the model's square resolution."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    text_lengths: list[int]  # tokens per pair, <s> and </s> included, after truncation
    truncated: list[bool]  # whether the text was cut to the model's maximum length
    patch_grids: list[tuple[int, int]]  # patch rows x columns per image (always the full square)

    def __len__(self) -> int:
        return len(self.text_lengths)

    def to(self, device: torch.device, dtype: torch.dtype) -> MeterBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            pixel_values=self.pixel_values.to(device, dtype, non_blocking=True),
        )


def default_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """METER's clip_transform: shorter side to ``image_size`` (bicubic), centre crop, CLIP normalisation."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )


def _load_tokenizer(directory: Path, config: MeterConfig):
    if not (directory / "tokenizer.json").is_file() and not (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    ):
        raise BackboneError(
            f"{directory}: tokenizer files missing (tokenizer.json, or RoBERTa's vocab.json + merges.txt, is "
            "needed beside config.json; `das meter convert --tokenizer DIR` copies them)"
        )
    try:
        tokenizer = RobertaTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise BackboneError(f"{directory}: tokenizer files unreadable: {exc}") from None
    pad = config.text.get("pad_token_id", 1)
    if tokenizer.pad_token_id != pad:
        # RoBERTa numbers positions from the padding id; another padding id would shift them
        raise BackboneError(f"{directory}: the tokenizer pads with id {tokenizer.pad_token_id}, the text encoder "
                            f"expects pad_token_id {pad}")
    if len(tokenizer) > config.text["vocab_size"]:
        raise BackboneError(f"{directory}: the tokenizer has {len(tokenizer)} tokens, the text encoder's vocabulary "
                            f"{config.text['vocab_size']}")
    return tokenizer


def _load_image_processor(directory: Path, config: MeterConfig) -> CLIPImageProcessorPil:
    if not (directory / "preprocessor_config.json").is_file():
        return default_image_processor(config.image_size)
    try:
        processor = CLIPImageProcessorPil.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise BackboneError(f"{directory}: preprocessor_config.json unreadable: {exc}") from None
    crop = processor.crop_size or {}
    if not processor.do_center_crop or (crop.get("height"), crop.get("width")) != (config.image_size, config.image_size):
        raise BackboneError(f"{directory}: preprocessor_config.json must centre-crop to the model's "
                            f"{config.image_size}x{config.image_size} images, it crops to {crop}")
    return processor


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------
class MeterBackbone(nn.Module):
    """A frozen METER checkpoint (encoders, fusion, poolers, whatever task heads it carries)."""

    architecture = MODEL_TYPE
    default_skip_bottleneck = SKIP_BOTTLENECK

    def __init__(
        self, config: MeterConfig, tokenizer: Any = None, image_processor: CLIPImageProcessorPil | None = None,
        heads: dict[str, nn.Module] | None = None, fingerprint: str = "",
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor or default_image_processor(config.image_size)
        vision_config, text_config, fusion_config = config.vision_config(), config.text_config(), config.fusion_config()
        self.vision = CLIPVisionModel(vision_config)
        if config.vision_stem_channels:  # in place of CLIP's linear patch embedding (models/backbones/conv_stem.py)
            self.vision.embeddings.patch_embedding = ConvStemPatchEmbeddings(
                vision_config.num_channels, config.vision_stem_channels, vision_config.hidden_size, config.patch_size)
        self.text = RobertaModel(text_config, add_pooling_layer=False)
        self.text_projection = nn.Linear(text_config.hidden_size, config.hidden_size)
        self.image_projection = nn.Linear(vision_config.hidden_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.modality_type_vocab_size, config.hidden_size)
        self.text_fusion_layers = nn.ModuleList([FusionLayer(fusion_config) for _ in range(config.num_fusion_layers)])
        self.image_fusion_layers = nn.ModuleList([FusionLayer(fusion_config) for _ in range(config.num_fusion_layers)])
        self.pooler = MeterPoolers(fusion_config)
        self.heads = nn.ModuleDict(heads or {})
        self.fingerprint = fingerprint
        self.ignored_keys: list[str] = []

    # -- what `das flops` and the CLI need without weights (the same for every architecture) ---------
    @classmethod
    def load_config(cls, directory: str | os.PathLike) -> MeterConfig:
        return MeterConfig.from_dir(directory)

    @staticmethod
    def arm_count(config: MeterConfig) -> int:
        return config.num_arms

    @staticmethod
    def arm_names(config: MeterConfig) -> list[str]:
        return arm_names(config)

    @staticmethod
    def config_flops_at(
        config: MeterConfig, task: str, spec: PlanSpec | None, text_len: int, image_size: int | tuple[int, int],
        num_labels: int | None = None,
    ) -> FlopsReport:
        grid = square_grid(config, image_size)
        return meter_request_flops(config, task, spec, text_len, [grid] * (2 if task == "nlvr2" else 1), num_labels)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32
    ) -> MeterBackbone:
        """Load a METER directory in this project's layout (see ``models/backbones/meter/convert.py``)."""
        directory = Path(directory)
        config = MeterConfig.from_dir(directory)
        state = read_checkpoint_state(directory)
        tokenizer = _load_tokenizer(directory, config)
        image_processor = _load_image_processor(directory, config)
        heads = heads_in_state(state, config)
        if "vqa" in heads and len(config.id2label) != heads["vqa"][3].out_features:
            raise BackboneError(f"{directory}: VQA head has {heads['vqa'][3].out_features} outputs but config.id2label "
                                f"has {len(config.id2label)} labels")
        backbone = cls(config, tokenizer, image_processor, heads)
        check_state_against(backbone.state_dict(), state, str(directory))
        expected = backbone.state_dict()
        backbone.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
        backbone.ignored_keys = sorted(set(state) - set(expected))
        backbone.fingerprint = fingerprint(config.to_dict(), backbone.state_dict())
        backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return backbone

    # -- facts about the backbone --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.token_type_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_type_embeddings.weight.dtype

    @property
    def num_layers(self) -> int:
        """Number of DAS arms: text-side fusion layers, then image-side ones."""
        return self.config.num_arms

    @property
    def max_text_len(self) -> int:
        # RoBERTa's positions start after the padding id
        positions = self.config.text["max_position_embeddings"] - self.config.text.get("pad_token_id", 1) - 1
        return min(self.config.max_text_len, positions)

    def task_heads(self) -> dict[str, int | None]:
        """Tasks whose head this checkpoint carries -> number of labels (None for retrieval)."""
        return {task: None if task == "retrieval" else head[3].out_features for task, head in self.heads.items()}

    def labels(self, task: str) -> list[str]:
        """The checkpoint head's label vocabulary: config.id2label for VQA; METER's NLVR2 head is (False, True)."""
        if task == "nlvr2":
            return ["False", "True"]
        return [self.config.id2label[i] for i in range(len(self.config.id2label))]

    # -- plans ---------------------------------------------------------------------------------------
    def _token_type_vocab(self, task: str) -> int:
        return token_type_vocab(task, self.config.modality_type_vocab_size)

    def check_plan_spec(self, spec: PlanSpec) -> None:
        check_own_parts(spec, ("pooler", "token_type_embeddings"), "METER")
        check_nlvr2_token_types(spec, self.config.modality_type_vocab_size)

    def build_plan_modules(self, spec: PlanSpec, init_from_backbone: bool = False) -> PlanModules:
        """Modules with the shapes ``spec`` implies (every arm has the fusion width). ``init_from_backbone``
        starts the plan's own copies (poolers, token types, head) from the backbone's, as training does."""
        hidden, eps = self.config.hidden_size, self.config.layer_norm_eps
        skipped = set(spec.skipped_layers)
        skip = {i: SkipAdapter(hidden, spec.adapters.skip_bottleneck, eps) for i in skipped}
        parallel = {}
        if spec.adapters.parallel_bottleneck:
            parallel = {i: ParallelAdapters(hidden, spec.adapters.parallel_bottleneck, eps)
                        for i in range(self.num_layers) if i not in skipped}
        pooler = MeterPoolers(self.config.fusion_config()) if "pooler" in spec.own_parts else None
        token_types = (
            nn.Embedding(self._token_type_vocab(spec.task), hidden) if "token_type_embeddings" in spec.own_parts else None
        )
        head = None
        if spec.own_head:
            head = {
                "vqa": lambda: vqa_head(hidden, len(spec.labels or ())),
                "nlvr2": lambda: nlvr2_head(hidden, len(spec.labels or ())),
                "retrieval": lambda: retrieval_head(hidden),
            }[spec.task]()
        modules = PlanModules(skip, parallel, pooler, token_types, head)
        if init_from_backbone:
            self._copy_trainable_parts_into(modules, spec.task)
        return modules

    @torch.no_grad()
    def _copy_trainable_parts_into(self, modules: PlanModules, task: str) -> None:
        if modules.pooler is not None:
            modules.pooler.load_state_dict(self.pooler.state_dict())
        if modules.token_type_embeddings is not None:
            source = self.token_type_embeddings.weight
            target = modules.token_type_embeddings.weight
            target[: source.shape[0]] = source.to(target)
            target[source.shape[0]:] = source[-1].to(target)  # METER starts the second image's type as the image type
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

    # -- preprocessing ---------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image], texts: Sequence[str]) -> MeterBatch:
        """METER's inputs: RoBERTa tokens (truncated to the maximum length, which is reported) and
        images resized on the shorter side and centre-cropped to the model's resolution."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if self.tokenizer is None:
            raise BackboneError("this METER backbone was built without a tokenizer")
        max_len = self.max_text_len
        untruncated = self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        encoding = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len,
                                  return_tensors="pt")
        pixels = meter_pixels(self.image_processor, [self._bounded(to_rgb(image)) for image in images])
        grid = square_grid(self.config, tuple(pixels.shape[-2:]))
        return MeterBatch(
            input_ids=encoding["input_ids"],
            attention_mask=encoding["attention_mask"],
            pixel_values=pixels,
            text_lengths=[int(n) for n in encoding["attention_mask"].sum(dim=1).tolist()],
            truncated=[len(ids) > max_len for ids in untruncated],
            patch_grids=[grid] * len(texts),
        )

    def _bounded(self, image: Image.Image) -> Image.Image:
        """The image padded to MAX_ASPECT_RATIO and, if large, centre-cut and shrunk (LARGE_SIDE):
        at most SHRINK_TO x LARGE_SIDE times the resolution squared reaches the processor."""
        resolution = (self.image_processor.size or {}).get("shortest_edge") or self.config.image_size
        width, height = image.size
        padded = (max(width, math.ceil(height / MAX_ASPECT_RATIO)), max(height, math.ceil(width / MAX_ASPECT_RATIO)))
        shorter, longer = min(padded), max(padded)
        box = (0, 0, *padded)
        if longer > LARGE_SIDE * resolution:
            keep = min(longer, max(CROP_RATIO * shorter, LARGE_SIDE * resolution))
            start = (longer - keep) // 2
            box = (start, 0, start + keep, padded[1]) if padded[0] > padded[1] else (0, start, padded[0], start + keep)
        return padded_region(image, box, min(1.0, SHRINK_TO * resolution / shorter))

    # -- forward ---------------------------------------------------------------------------------
    def embed(
        self, batch: MeterBatch, plan: PlanModules, image_token_type_idx: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams entering the fusion: the frozen encoders' outputs projected to the fusion
        width, plus their modality embeddings. (B, text_len, h), (B, 1 + patches, h)."""
        text = self.text(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        image = self.vision(pixel_values=batch.pixel_values).last_hidden_state
        image = self.vision.post_layernorm(image)  # METER applies CLIP's ln_post to every token
        token_types = plan.token_type_embeddings if plan.token_type_embeddings is not None else self.token_type_embeddings
        x = self.text_projection(text) + token_types.weight[0]
        y = self.image_projection(image) + token_types.weight[image_token_type_idx]
        return x, y

    def streams(
        self, batch: MeterBatch, plan: PlanModules, image_token_type_idx: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final text and image states after the fusion layers under ``plan``."""
        x, y = self.embed(batch, plan, image_token_type_idx)
        text_mask = batch.attention_mask.bool()[:, None, None, :]
        n = self.config.num_fusion_layers
        for i, (text_layer, image_layer) in enumerate(zip(self.text_fusion_layers, self.image_fusion_layers)):
            text_skip, image_skip = plan.skip_adapter(i), plan.skip_adapter(n + i)
            # both streams read the previous layer's outputs (lock-step); a skipped layer is not executed
            x_next = text_skip(x) if text_skip is not None else fusion_layer_forward(
                text_layer, x, y, text_mask, None, plan.parallel_adapter(i))
            y_next = image_skip(y) if image_skip is not None else fusion_layer_forward(
                image_layer, y, x, None, text_mask, plan.parallel_adapter(n + i))
            x, y = x_next, y_next
        return x, y

    def sequence_output(self, batch: MeterBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """Final states (B, text_len + image_tokens, h): text tokens first, then the image [CLS] and patches."""
        return torch.cat(self.streams(batch, plan, image_token_type_idx), dim=1)

    def encode(self, batch: MeterBatch, plan: PlanModules, image_token_type_idx: int = 1) -> torch.Tensor:
        """Pooled pair vectors (B, 2h): text pooler and image pooler concatenated, as METER's cls_feats."""
        pooler = plan.pooler if plan.pooler is not None else self.pooler
        return pooler(*self.streams(batch, plan, image_token_type_idx))

    # -- FLOPs -----------------------------------------------------------------------------------
    def flops_at(self, task: str, spec: PlanSpec | None, text_len: int, image_size: int | tuple[int, int]) -> FlopsReport:
        """FLOPs of a request whose images were resized to ``image_size`` (e.g. a plan's reference input)."""
        grid = square_grid(self.config, image_size)
        return self.flops(task, spec, text_len, [grid] * (2 if task == "nlvr2" else 1))

    def flops(self, task: str, spec: PlanSpec | None, text_len: int, patch_grids: Sequence[tuple[int, int]]) -> FlopsReport:
        """FLOPs of one request: one pass per image (NLVR2 has two) plus the task head."""
        num_labels = (len(spec.labels) if spec is not None and spec.labels else None) or self.task_heads().get(task)
        return meter_request_flops(self.config, task, spec, text_len, patch_grids, num_labels)


def check_state_against(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str,
                        describe=lambda name: name) -> None:
    """Refuse (BackboneError naming the keys) when weights are missing or have other shapes.
    ``describe`` maps a parameter name to how the user's file names it."""
    missing = sorted(k for k in expected if k not in found)
    if missing:
        names = [describe(k) for k in missing]
        raise BackboneError(f"{where}: checkpoint lacks {len(missing)} METER weight(s): {names[:8]}"
                            + (" ..." if len(missing) > 8 else ""))
    mismatched = [(k, list(found[k].shape), list(v.shape)) for k, v in expected.items() if found[k].shape != v.shape]
    if mismatched:
        details = "; ".join(f"{describe(k)}: file {f}, config implies {e}" for k, f, e in mismatched[:8])
        raise BackboneError(f"{where}: shape mismatch for {len(mismatched)} weight(s): {details}")


def square_grid(config: MeterConfig, image_size: int | tuple[int, int]) -> tuple[int, int]:
    """Patch grid of an image at ``image_size`` (an int means square)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return (h // config.patch_size, w // config.patch_size)


def fusion_layer_flops(query_len: int, context_len: int, hidden: int, intermediate: int) -> int:
    """One stream's fusion layer: self-attention over its tokens, cross-attention to the other stream, MLP."""
    return (self_attention_flops(query_len, hidden) + cross_attention_flops(query_len, context_len, hidden)
            + mlp_flops(query_len, hidden, intermediate))


def meter_request_flops(
    config: MeterConfig,
    task: str,
    spec: PlanSpec | None,
    text_len: int,
    patch_grids: Sequence[tuple[int, int]],
    num_labels: int | None = None,
) -> FlopsReport:
    """Analytic FLOPs of one request, full model vs ``spec`` (None = the full model).

    Per pass (one per image): the frozen encoders, projections and poolers (``other``), and the arms:
    text-side fusion layers (queries: ``text_len`` tokens, context: the image tokens) then image-side
    ones. ``seq_lens`` holds (text tokens, image tokens) per pass. Needs only the config.
    """
    vision, text = config.vision, config.text
    hidden, inter = config.hidden_size, config.intermediate_size
    n = config.num_fusion_layers
    skipped = set(spec.skipped_layers) if spec else set()
    skip_b = spec.adapters.skip_bottleneck if spec else None
    par_b = spec.adapters.parallel_bottleneck if spec else None
    report: FlopsReport | None = None
    for rows, cols in patch_grids:
        image_len = rows * cols + 1  # patches + CLIP's class token
        other = patch_embedding_flops(rows, cols, vision.get("num_channels", 3), config.patch_size, vision["hidden_size"],
                                      config.vision_stem_channels)
        other += vision["num_hidden_layers"] * transformer_layer_flops(
            image_len, vision["hidden_size"], vision["intermediate_size"])
        other += text["num_hidden_layers"] * transformer_layer_flops(text_len, text["hidden_size"], text["intermediate_size"])
        other += linear_flops(text_len, text["hidden_size"], hidden) + linear_flops(image_len, vision["hidden_size"], hidden)
        other += 2 * linear_flops(1, hidden, hidden)  # the two poolers
        layers = []
        for arm in range(2 * n):
            length, context = (text_len, image_len) if arm < n else (image_len, text_len)
            full = fusion_layer_flops(length, context, hidden, inter)
            if arm in skipped:
                executed = adapter_flops(length, hidden, skip_b)
            else:
                executed = full + (2 * adapter_flops(length, hidden, par_b) if par_b else 0)
            layers.append(LayerFlops(arm, full, executed, arm in skipped))
        one_pass = FlopsReport(per_layer=tuple(layers), other=other, seq_lens=(text_len, image_len))
        report = one_pass if report is None else report + one_pass
    assert report is not None, "at least one image is needed"
    head = {
        "vqa": lambda: linear_flops(1, 2 * hidden, 2 * hidden) + linear_flops(1, 2 * hidden, num_labels or len(config.id2label)),
        "nlvr2": lambda: linear_flops(1, 4 * hidden, 2 * hidden) + linear_flops(1, 2 * hidden, num_labels or 2),
        "retrieval": lambda: linear_flops(1, 2 * hidden, 1),
    }[task]()
    return FlopsReport(per_layer=report.per_layer, other=report.other + head, seq_lens=report.seq_lens)


__all__: list[Any] = [
    "MeterConfig", "MeterBackbone", "MeterBatch", "FusionLayer", "MeterPoolers", "fusion_layer_forward",
    "meter_request_flops", "fusion_layer_flops", "vqa_head", "nlvr2_head", "retrieval_head", "arm_names",
    "square_grid", "check_state_against", "heads_in_state", "default_image_processor",
]
