"""METER checkpoints: the one key mapping from METER's official Lightning ``.ckpt`` files to this
project's layout, the converter (behind `das meter convert`), and writing METER directories offline.

This project's layout for a METER backbone is a directory like any other checkpoint here:
``config.json`` (``MeterConfig``, model_type "meter"), ``model.safetensors`` (``MeterBackbone``'s own
parameter names), the RoBERTa tokenizer files and ``preprocessor_config.json`` (METER's CLIP
transform). METER's fine-tuned checkpoints (github.com/zdou0830/METER) are PyTorch Lightning files:
a dict whose ``state_dict`` uses METER's module names, mapped by :data:`KEY_MAP`:

====================================================================  ==============================================
METER (``state_dict`` key)                                            this project (``model.safetensors`` key)
====================================================================  ==============================================
vit_model.visual.conv1.weight                                         vision.embeddings.patch_embedding.weight
vit_model.visual.class_embedding                                      vision.embeddings.class_embedding
vit_model.visual.positional_embedding                                 vision.embeddings.position_embedding.weight
vit_model.visual.ln_pre.{p}                                           vision.pre_layrnorm.{p}
vit_model.visual.transformer.resblocks.{n}.attn.in_proj_{p}           vision.encoder.layers.{n}.self_attn.{q,k,v}_proj.{p}
                                                                      (split in three along dim 0: q, k, v)
vit_model.visual.transformer.resblocks.{n}.attn.out_proj.{p}          vision.encoder.layers.{n}.self_attn.out_proj.{p}
vit_model.visual.transformer.resblocks.{n}.ln_1.{p} / ln_2.{p}        vision.encoder.layers.{n}.layer_norm1.{p} / layer_norm2.{p}
vit_model.visual.transformer.resblocks.{n}.mlp.c_fc.{p} / c_proj.{p}  vision.encoder.layers.{n}.mlp.fc1.{p} / fc2.{p}
vit_model.visual.ln_post.{p}                                          vision.post_layernorm.{p}
text_transformer.{rest}                                               text.{rest}   (transformers' RobertaModel names)
cross_modal_text_transform.{p} / cross_modal_image_transform.{p}      text_projection.{p} / image_projection.{p}
token_type_embeddings.weight                                          token_type_embeddings.weight
cross_modal_text_layers.{n}.{rest}                                    text_fusion_layers.{n}.{rest}
cross_modal_image_layers.{n}.{rest}                                   image_fusion_layers.{n}.{rest}
cross_modal_text_pooler.dense.{p} / cross_modal_image_pooler.dense.{p}  pooler.text.dense.{p} / pooler.image.dense.{p}
vqa_classifier.{i}.{p}                                                heads.vqa.{i}.{p}
nlvr2_classifier.{i}.{p}                                              heads.nlvr2.{i}.{p}
rank_output.{p}                                                       heads.retrieval.{p}
itm_score.fc.{p}  (only without rank_output)                          heads.retrieval.{p} = row 1 (the "match" logit),
                                                                      as METER initialises rank_output from it
====================================================================  ==============================================

``{p}`` is weight or bias, ``{n}`` a layer number. Keys METER keeps but does not use at inference
(CLIP's text-side leftovers and ``visual.proj``, RoBERTa's pooler, ``mlm_score``, ``itm_score`` beside
``rank_output``, ...) are reported as ignored. Every weight the model needs must be present with the
shape the inferred config implies, or conversion is refused naming the METER keys.

The config is inferred from the weights' shapes (widths, depths, vocabulary, image size from the
position table, patch size from ``conv1``); head counts come from the checkpoint's hyper-parameters
(``num_heads`` for the fusion layers) or the options, else width / 64 (CLIP's and RoBERTa-base's rule).
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from transformers import RobertaTokenizerFast

from models.backbones.base import BackboneError
from models.backbones.meter.configuration import MeterConfig, meter_text_defaults, meter_vision_defaults
from models.backbones.meter.modeling import (
    MeterBackbone,
    check_state_against,
    default_image_processor,
    heads_in_state,
    nlvr2_head,
    retrieval_head,
    vqa_head,
)

_PLACEHOLDERS = {"n": r"\d+", "i": r"\d+", "p": r"weight|bias", "rest": r".+"}


@dataclass(frozen=True)
class KeyRule:
    """One row of the mapping: METER's key template <-> this project's, ``{name}`` placeholders shared.
    ``split_qkv``: METER's fused ``in_proj`` tensor is three of ours (``{qkv}`` = q, k, v)."""

    meter: str
    ours: str
    split_qkv: bool = False

    def _regex(self, template: str) -> re.Pattern:
        pattern = re.escape(template)
        for name, expr in _PLACEHOLDERS.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{expr})")
        pattern = pattern.replace(re.escape("{qkv}"), "(?P<qkv>[qkv])")
        return re.compile(pattern + r"\Z")

    def match_meter(self, key: str) -> dict[str, str] | None:
        found = self._regex(self.meter).match(key)
        return found.groupdict() if found else None

    def match_ours(self, key: str) -> dict[str, str] | None:
        found = self._regex(self.ours).match(key)
        return found.groupdict() if found else None


_RES = "vit_model.visual.transformer.resblocks.{n}"
_LAYER = "vision.encoder.layers.{n}"
KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule("vit_model.visual.conv1.weight", "vision.embeddings.patch_embedding.weight"),
    KeyRule("vit_model.visual.class_embedding", "vision.embeddings.class_embedding"),
    KeyRule("vit_model.visual.positional_embedding", "vision.embeddings.position_embedding.weight"),
    KeyRule("vit_model.visual.ln_pre.{p}", "vision.pre_layrnorm.{p}"),
    KeyRule(f"{_RES}.attn.in_proj_{{p}}", f"{_LAYER}.self_attn.{{qkv}}_proj.{{p}}", split_qkv=True),
    KeyRule(f"{_RES}.attn.out_proj.{{p}}", f"{_LAYER}.self_attn.out_proj.{{p}}"),
    KeyRule(f"{_RES}.ln_1.{{p}}", f"{_LAYER}.layer_norm1.{{p}}"),
    KeyRule(f"{_RES}.ln_2.{{p}}", f"{_LAYER}.layer_norm2.{{p}}"),
    KeyRule(f"{_RES}.mlp.c_fc.{{p}}", f"{_LAYER}.mlp.fc1.{{p}}"),
    KeyRule(f"{_RES}.mlp.c_proj.{{p}}", f"{_LAYER}.mlp.fc2.{{p}}"),
    KeyRule("vit_model.visual.ln_post.{p}", "vision.post_layernorm.{p}"),
    KeyRule("text_transformer.{rest}", "text.{rest}"),
    KeyRule("cross_modal_text_transform.{p}", "text_projection.{p}"),
    KeyRule("cross_modal_image_transform.{p}", "image_projection.{p}"),
    KeyRule("token_type_embeddings.weight", "token_type_embeddings.weight"),
    KeyRule("cross_modal_text_layers.{n}.{rest}", "text_fusion_layers.{n}.{rest}"),
    KeyRule("cross_modal_image_layers.{n}.{rest}", "image_fusion_layers.{n}.{rest}"),
    KeyRule("cross_modal_text_pooler.dense.{p}", "pooler.text.dense.{p}"),
    KeyRule("cross_modal_image_pooler.dense.{p}", "pooler.image.dense.{p}"),
    KeyRule("vqa_classifier.{i}.{p}", "heads.vqa.{i}.{p}"),
    KeyRule("nlvr2_classifier.{i}.{p}", "heads.nlvr2.{i}.{p}"),
    KeyRule("rank_output.{p}", "heads.retrieval.{p}"),
)
ITM_SCORE = "itm_score.fc.{p}"  # pre-training's 2-way matching head: row 1 stands in for rank_output
MATCH_ROW = 1


def _fill(template: str, groups: dict[str, str]) -> str:
    return template.format(**groups)


def meter_to_ours(meter_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename (and split) METER's tensors into this project's names by :data:`KEY_MAP`.
    Returns the renamed tensors and the METER keys no rule maps."""
    ours: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in meter_state.items():
        for rule in KEY_MAP:
            groups = rule.match_meter(key)
            if groups is None:
                continue
            if rule.split_qkv:
                if tensor.shape[0] % 3:
                    raise BackboneError(f"{key}: a fused q/k/v projection needs a first dimension divisible by 3, "
                                        f"got shape {list(tensor.shape)}")
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                    ours[_fill(rule.ours, {**groups, "qkv": part})] = chunk.clone()
            else:
                ours[_fill(rule.ours, groups)] = tensor
            break
        else:
            unmapped.append(key)
    if "heads.retrieval.weight" not in ours:
        weight, bias = ITM_SCORE.format(p="weight"), ITM_SCORE.format(p="bias")
        if weight in meter_state and bias in meter_state:
            ours["heads.retrieval.weight"] = meter_state[weight][MATCH_ROW:MATCH_ROW + 1].clone()
            ours["heads.retrieval.bias"] = meter_state[bias][MATCH_ROW:MATCH_ROW + 1].clone()
            unmapped = [k for k in unmapped if k not in (weight, bias)]
    return ours, sorted(unmapped)


def meter_name(our_key: str) -> str:
    """How METER names one of this project's tensors (for messages; ``in_proj`` for q/k/v)."""
    for rule in KEY_MAP:
        groups = rule.match_ours(our_key)
        if groups is not None:
            groups.pop("qkv", None)
            return _fill(rule.meter, groups)
    return our_key


def ours_to_meter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse renaming (q/k/v concatenated back into ``in_proj``): this project's tensors under METER's names."""
    meter: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for rule in KEY_MAP:
            groups = rule.match_ours(key)
            if groups is None:
                continue
            if rule.split_qkv:
                part = groups.pop("qkv")
                fused.setdefault(_fill(rule.meter, groups), {})[part] = tensor
            else:
                meter[_fill(rule.meter, groups)] = tensor
            break
        else:
            raise KeyError(f"{key}: no METER name in KEY_MAP")
    for key, parts in fused.items():
        if set(parts) != set("qkv"):
            raise KeyError(f"{key}: needs q, k and v, got {sorted(parts)}")
        meter[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return meter


# ---------------------------------------------------------------------------------------------
# Config from the weights
# ---------------------------------------------------------------------------------------------
def _layer_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    numbers = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(numbers) + 1 if numbers else 0


def _heads(width: int, given: int | None, what: str, option: str) -> int:
    heads = given or width // 64
    if heads < 1 or width % heads:
        raise BackboneError(f"cannot tell the {what}'s attention heads for width {width}: pass {option}")
    return heads


def infer_config(
    meter_state: dict[str, torch.Tensor],
    hparams: dict[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    fusion_heads: int | None = None,
    max_text_len: int | None = None,
    where: str = "checkpoint",
) -> MeterConfig:
    """A MeterConfig that fits METER's tensors (shapes), hyper-parameters and the given overrides."""
    hparams = hparams or {}

    def need(key: str) -> torch.Tensor:
        if key not in meter_state:
            raise BackboneError(f"{where}: not a METER checkpoint, or an incomplete one: missing {key}")
        return meter_state[key]

    conv = need("vit_model.visual.conv1.weight")
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    positions = need("vit_model.visual.positional_embedding").shape[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise BackboneError(f"{where}: vit_model.visual.positional_embedding has {positions} rows, not 1 + a square")
    vision_layers = _layer_count(meter_state, "vit_model.visual.transformer.resblocks")
    vision = {**meter_vision_defaults(side * patch), "hidden_size": width, "num_channels": channels, "patch_size": patch,
              "num_hidden_layers": vision_layers,
              "intermediate_size": need("vit_model.visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0],
              "num_attention_heads": _heads(width, vision_heads, "image encoder", "--vision-heads")}

    words = need("text_transformer.embeddings.word_embeddings.weight")
    text_width = words.shape[1]
    text = {**meter_text_defaults(), "vocab_size": words.shape[0], "hidden_size": text_width,
            "num_hidden_layers": _layer_count(meter_state, "text_transformer.encoder.layer"),
            "intermediate_size": need("text_transformer.encoder.layer.0.intermediate.dense.weight").shape[0],
            "max_position_embeddings": need("text_transformer.embeddings.position_embeddings.weight").shape[0],
            "type_vocab_size": need("text_transformer.embeddings.token_type_embeddings.weight").shape[0],
            "num_attention_heads": _heads(text_width, text_heads, "text encoder", "--text-heads")}

    hidden = need("cross_modal_text_transform.weight").shape[0]
    text_layers = _layer_count(meter_state, "cross_modal_text_layers")
    image_layers = _layer_count(meter_state, "cross_modal_image_layers")
    if text_layers != image_layers or text_layers == 0:
        raise BackboneError(f"{where}: {text_layers} text-side and {image_layers} image-side fusion layers "
                            "(METER has the same number on both sides)")
    num_labels = meter_state["vqa_classifier.3.weight"].shape[0] if "vqa_classifier.3.weight" in meter_state else 0
    if labels is not None and num_labels and len(labels) != num_labels:
        raise BackboneError(f"{where}: the VQA head has {num_labels} answers, the label file {len(labels)}")
    id2label = dict(enumerate(labels if labels is not None else [str(i) for i in range(num_labels)]))
    return MeterConfig(
        vision=vision, text=text, hidden_size=hidden, num_fusion_layers=text_layers,
        num_attention_heads=_heads(hidden, fusion_heads or hparams.get("num_heads"), "fusion layers", "--fusion-heads"),
        intermediate_size=need("cross_modal_text_layers.0.intermediate.dense.weight").shape[0],
        max_text_len=int(max_text_len or hparams.get("max_text_len") or MeterConfig.max_text_len),
        modality_type_vocab_size=need("token_type_embeddings.weight").shape[0],
        id2label=id2label if num_labels else {},
    )


# ---------------------------------------------------------------------------------------------
# Reading METER files, writing this project's directories
# ---------------------------------------------------------------------------------------------
def read_lightning_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """METER's state_dict and hyper-parameter config from a Lightning ``.ckpt`` (or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise BackboneError(
            f"{path}: holds pickled Python objects besides tensors (e.g. Lightning's hyper-parameters), which are "
            f"not loaded by default because unpickling can run code. If you trust the file, pass --trust-pickle. ({exc})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise BackboneError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(data, dict):
        raise BackboneError(f"{path}: expected a dict (a Lightning checkpoint or a state dict), got {type(data).__name__}")
    state = data.get("state_dict", data)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise BackboneError(f"{path}: no tensors found (expected METER's state_dict)")
    hparams = data.get("hyper_parameters") or {}
    if isinstance(hparams, dict) and isinstance(hparams.get("config"), dict):
        hparams = hparams["config"]  # METER saves its sacred config as hyper_parameters["config"]
    return state, dict(hparams) if isinstance(hparams, dict) else {}


def expected_state(config: MeterConfig, heads: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Names and shapes (meta tensors) of every weight a MeterBackbone with ``config`` and ``heads`` has."""
    with torch.device("meta"):
        return MeterBackbone(config, heads=heads).state_dict()


def write_meter_directory(
    directory: str | Path, config: MeterConfig, state: dict[str, torch.Tensor], tokenizer: Any = None,
) -> Path:
    """config.json + model.safetensors (+ tokenizer files) + preprocessor_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    default_image_processor(config.image_size).save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


@dataclass
class Conversion:
    directory: Path
    config: MeterConfig
    heads: list[str]
    ignored: list[str] = field(default_factory=list)  # METER keys not used at inference
    tokenizer_written: bool = False


def convert_meter_state(
    meter_state: dict[str, torch.Tensor], hparams: dict[str, Any] | None = None, where: str = "checkpoint", **overrides: Any,
) -> tuple[MeterConfig, dict[str, torch.Tensor], list[str]]:
    """METER tensors -> (config, this project's tensors, ignored METER keys); refuses (BackboneError
    naming METER's keys) when a needed weight is missing or has another shape than the config implies."""
    config = infer_config(meter_state, hparams, where=where, **overrides)
    ours, unmapped = meter_to_ours(meter_state)
    expected = expected_state(config, heads_in_state(ours, config))
    check_state_against(expected, ours, where, describe=meter_name)
    ignored = sorted(set(unmapped) | {meter_name(k) for k in ours if k not in expected})
    return config, {k: ours[k] for k in expected}, ignored


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    trust_pickle: bool = False,
    **overrides: Any,
) -> Conversion:
    """METER ``.ckpt`` -> a METER directory in this project's layout, read by ``MeterBackbone.from_pretrained``."""
    state, hparams = read_lightning_checkpoint(checkpoint, trust_pickle)
    config, ours, ignored = convert_meter_state(state, hparams, where=str(checkpoint), labels=labels, **overrides)
    tokenizer = None
    if tokenizer_dir is not None:
        try:
            tokenizer = RobertaTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise BackboneError(f"{tokenizer_dir}: not a readable tokenizer directory ({exc})") from None
    directory = write_meter_directory(out, config, ours, tokenizer)
    heads = sorted({k.split(".")[1] for k in ours if k.startswith("heads.")})
    return Conversion(directory, config, heads, ignored, tokenizer is not None)


# ---------------------------------------------------------------------------------------------
# Small METERs made here (tests, benchmarks, the synthetic world): no hub, no downloads
# ---------------------------------------------------------------------------------------------
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0-4: RoBERTa's <s>=0, <pad>=1, </s>=2


def build_roberta_tokenizer(words: Iterable[str], max_length: int = 512):
    """A byte-level BPE tokenizer in RoBERTa's format (any text tokenises), trained on ``words`` so that
    each of them is one token, at the start of a text and after a space alike."""
    words = sorted({w.lower() for w in words})
    bpe = ByteLevelBPETokenizer()
    merges = 2 * sum(len(w) for w in words)  # enough merges for both forms of every word
    bpe.train_from_iterator(words + [" " + w for w in words], vocab_size=256 + len(ROBERTA_SPECIALS) + merges,
                            min_frequency=1, special_tokens=list(ROBERTA_SPECIALS), show_progress=False)
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer, model_max_length=max_length, bos_token="<s>", eos_token="</s>",
        sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )


def save_meter_checkpoint(
    directory: str | Path, config: MeterConfig, heads: Sequence[str], words: Iterable[str], seed: int = 0,
) -> MeterBackbone:
    """A randomly initialised METER with the given task heads, saved with its tokenizer and processor.
    ``config.text["vocab_size"]`` is raised to fit the tokenizer if needed. Returns the model (eval)."""
    tokenizer = build_roberta_tokenizer(words, max_length=config.max_text_len)
    config.text["vocab_size"] = max(config.text["vocab_size"], len(tokenizer))
    hidden = config.hidden_size
    if "vqa" in heads and not config.id2label:
        raise ValueError("a VQA head needs config.id2label")
    factories = {"vqa": lambda: vqa_head(hidden, len(config.id2label)), "nlvr2": lambda: nlvr2_head(hidden),
                 "retrieval": lambda: retrieval_head(hidden)}
    torch.manual_seed(seed)
    model = MeterBackbone(config, tokenizer, heads={task: factories[task]() for task in heads}).eval()
    write_meter_directory(directory, config, model.state_dict(), tokenizer)
    return model
