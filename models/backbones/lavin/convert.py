"""LaVIN checkpoints: the one key mapping from LaVIN's released layout to this project's, and the
converter behind `das lavin convert`.

LaVIN (github.com/luogen1996/LaVIN, and the DAS reference's LaVIN-DAS) builds one ``Transformer``
module whose state dict names everything: Meta's LLaMA weights (``consolidated.*.pth``, as Meta ships
them), OpenAI CLIP's visual tower under ``backbone.visual`` (``clip.load('ViT-L/14')``), and LaVIN's
trained parts, which its ``save_model`` writes alone (``torch.save({'model': {name: tensor for every
parameter with 'adapter' in its name}, 'optimizer': ..., 'args': Namespace(...)}, 'checkpoint-N.pth')``).
The converter reads any mix of these (files, or a Meta directory with ``params.json`` and its
``consolidated.*.pth`` shards, which are joined along their model-parallel dimension), maps every key
through :data:`KEY_MAP` and writes a backbone directory: config.json (model_type "lavin", inferred from
the shapes), model.safetensors (this project's names), the tokenizer and preprocessor_config.json.

=======================================================================  =========================================================  ============
LaVIN (state dict key)                                                   this project (model.safetensors key)                       transform
=======================================================================  =========================================================  ============
tok_embeddings.weight                                                    language_model.embed_tokens.weight
norm.weight                                                              language_model.norm.weight
output.weight                                                            lm_head.weight
layers.{i}.attention.wq.weight / wk.weight                               language_model.layers.{i}.self_attn.q_proj / k_proj.weight  rotary
layers.{i}.attention.wv.weight / wo.weight                               language_model.layers.{i}.self_attn.v_proj / o_proj.weight
layers.{i}.feed_forward.w1 / w3 / w2.weight                              language_model.layers.{i}.mlp.gate_proj / up_proj / down_proj.weight
layers.{i}.attention_norm.weight / ffn_norm.weight                       language_model.layers.{i}.input_layernorm / post_attention_layernorm.weight
layers.{i}.adapter_{s}.conv_A.{p}                                        text_adapters.{i}.{s}.down.{p}                             kernel
layers.{i}.adapter_{s}.conv_B.{p} / conv_D.{p}                           text_adapters.{i}.{s}.up.0.{p} / up.1.{p}                  kernel
layers.{i}.adapter_{s}.expert_weights.{p}                                text_adapters.{i}.{s}.router.{p}
backbone.visual.conv1.weight                                             vision_model.embeddings.patch_embedding.weight
backbone.visual.class_embedding / positional_embedding                   vision_model.embeddings.class_embedding / position_embedding.weight
backbone.visual.ln_pre.{p}                                               vision_model.pre_layrnorm.{p}
backbone.visual.transformer.resblocks.{j}.attn.in_proj_{p}               vision_model.encoder.layers.{j}.self_attn.{q,k,v}_proj.{p}  split in 3
backbone.visual.transformer.resblocks.{j}.attn.out_proj.{p}              vision_model.encoder.layers.{j}.self_attn.out_proj.{p}
backbone.visual.transformer.resblocks.{j}.ln_1.{p} / ln_2.{p}            vision_model.encoder.layers.{j}.layer_norm1.{p} / layer_norm2.{p}
backbone.visual.transformer.resblocks.{j}.mlp.c_fc.{p} / c_proj.{p}      vision_model.encoder.layers.{j}.mlp.fc1.{p} / fc2.{p}
backbone.visual.transformer.resblocks.{j}.adapter_{s}.(as in layers)     vision_adapters.{j}.{s}.(as in text_adapters)              kernel
adapter_proj.conv_A.{p} / conv_B.{p}                                     projector.down.{p} / up.{p}
adapter_modality_embedding.weight                                        modality_embedding.weight
=======================================================================  =========================================================  ============

``{i}`` a decoder block, ``{j}`` a CLIP block, ``{s}`` ``attn`` (or ``mlp``, for LaVIN's "block" adapters
and the "router_block" visual adapters), ``{p}`` weight or bias. Transforms: *rotary* reorders the
rows of each head from Meta's interleaved rotary pairs to transformers' halves (the permutation
transformers' own LLaMA converter applies); *kernel* drops the width-1 kernel axis of a 1x1
``Conv1d`` (``(out, in / groups, 1)`` -> ``(out, in / groups)``); *split in 3* cuts CLIP's packed
``in_proj`` into q, k, v along dim 0. A separate OpenAI CLIP file (one with ``visual.*`` keys) is read
under ``backbone.`` as LaVIN holds it; a ``module.`` prefix (DDP) is dropped.

Not converted, reported as ignored: CLIP's text side and head (``backbone.token_embedding``,
``backbone.positional_embedding``, ``backbone.ln_final``, ``backbone.text_projection``,
``backbone.logit_scale``, CLIP's text ``backbone.transformer``, ``backbone.visual.ln_post``,
``backbone.visual.proj``), the DAS search
``scores`` buffers and LLaMA-1's ``rope.freqs``. Refused: LaVIN-DAS's ``replaced_adapter`` (a skipped
block's adapter belongs in a plan, not the backbone), LoRA weights, any other key; and any key the
inferred config needs that is missing or has another shape (the message names LaVIN's keys).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from models.backbones.base import BackboneError
from models.backbones.lavin.modeling import LavinConfig, LavinModel, save_lavin_directory

COPY, ROTARY, KERNEL, SPLIT3 = "copy", "rotary", "kernel", "split3"


@dataclass(frozen=True)
class Entry:
    lavin: str  # LaVIN's key, with {i} {j} {s} {p} placeholders
    ours: str  # ours ({qkv} for the three parts of a split)
    transform: str = COPY
    shard_dim: int | None = None  # the model-parallel dimension of Meta's shards (None: replicated)


_ADAPTER = (("conv_A", "down", KERNEL), ("conv_B", "up.0", KERNEL), ("conv_D", "up.1", KERNEL),
            ("expert_weights", "router", COPY))
_RES = "backbone.visual.transformer.resblocks.{j}"
_LAYER = "language_model.layers.{i}"
_CLIP = "vision_model.encoder.layers.{j}"

# The one key table (see the module docstring for it as a table).
KEY_MAP: tuple[Entry, ...] = (
    Entry("tok_embeddings.weight", "language_model.embed_tokens.weight", COPY, 1),
    Entry("norm.weight", "language_model.norm.weight"),
    Entry("output.weight", "lm_head.weight", COPY, 0),
    Entry("layers.{i}.attention.wq.weight", f"{_LAYER}.self_attn.q_proj.weight", ROTARY, 0),
    Entry("layers.{i}.attention.wk.weight", f"{_LAYER}.self_attn.k_proj.weight", ROTARY, 0),
    Entry("layers.{i}.attention.wv.weight", f"{_LAYER}.self_attn.v_proj.weight", COPY, 0),
    Entry("layers.{i}.attention.wo.weight", f"{_LAYER}.self_attn.o_proj.weight", COPY, 1),
    Entry("layers.{i}.feed_forward.w1.weight", f"{_LAYER}.mlp.gate_proj.weight", COPY, 0),
    Entry("layers.{i}.feed_forward.w3.weight", f"{_LAYER}.mlp.up_proj.weight", COPY, 0),
    Entry("layers.{i}.feed_forward.w2.weight", f"{_LAYER}.mlp.down_proj.weight", COPY, 1),
    Entry("layers.{i}.attention_norm.weight", f"{_LAYER}.input_layernorm.weight"),
    Entry("layers.{i}.ffn_norm.weight", f"{_LAYER}.post_attention_layernorm.weight"),
    *(Entry(f"layers.{{i}}.adapter_{{s}}.{theirs}.{{p}}", f"text_adapters.{{i}}.{{s}}.{mine}.{{p}}", t)
      for theirs, mine, t in _ADAPTER),
    Entry("backbone.visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    Entry("backbone.visual.class_embedding", "vision_model.embeddings.class_embedding"),
    Entry("backbone.visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    Entry("backbone.visual.ln_pre.{p}", "vision_model.pre_layrnorm.{p}"),
    Entry(f"{_RES}.attn.in_proj_{{p}}", f"{_CLIP}.self_attn.{{qkv}}_proj.{{p}}", SPLIT3),
    Entry(f"{_RES}.attn.out_proj.{{p}}", f"{_CLIP}.self_attn.out_proj.{{p}}"),
    Entry(f"{_RES}.ln_1.{{p}}", f"{_CLIP}.layer_norm1.{{p}}"),
    Entry(f"{_RES}.ln_2.{{p}}", f"{_CLIP}.layer_norm2.{{p}}"),
    Entry(f"{_RES}.mlp.c_fc.{{p}}", f"{_CLIP}.mlp.fc1.{{p}}"),
    Entry(f"{_RES}.mlp.c_proj.{{p}}", f"{_CLIP}.mlp.fc2.{{p}}"),
    *(Entry(f"{_RES}.adapter_{{s}}.{theirs}.{{p}}", f"vision_adapters.{{j}}.{{s}}.{mine}.{{p}}", t)
      for theirs, mine, t in _ADAPTER),
    Entry("adapter_proj.conv_A.{p}", "projector.down.{p}"),
    Entry("adapter_proj.conv_B.{p}", "projector.up.{p}"),
    Entry("adapter_modality_embedding.weight", "modality_embedding.weight"),
)
IGNORED = re.compile(r"^(backbone\.(token_embedding|positional_embedding|ln_final|text_projection|logit_scale"
                     r"|transformer\.|input_resolution|context_length|vocab_size)"
                     r"|backbone\.visual\.(ln_post|proj$)|(.*\.)?scores$|rope\.freqs$)")
DAS_SKIP_ADAPTER = re.compile(r"\.replaced_adapter\.")
LAVIN_FEATURE_EVERY = 4  # LaVIN reads CLIP's class token after every 4th block ((i + 1) % 4 == 0)
DEFAULT_HEAD_DIM = 128  # every LLaMA size's head width (when params.json does not say n_heads)


# ---------------------------------------------------------------------------------------------
# The table as patterns
# ---------------------------------------------------------------------------------------------
def _regex(pattern: str) -> re.Pattern[str]:
    escaped = re.escape(pattern)
    for name, group in (("i", r"\d+"), ("j", r"\d+"), ("s", "attn|mlp"), ("p", "weight|bias")):
        escaped = escaped.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile(f"^{escaped}$")


_PATTERNS = [(_regex(entry.lavin), entry) for entry in KEY_MAP]


def match(key: str) -> tuple[Entry, dict[str, str]] | None:
    """The table entry for one of LaVIN's keys, and its placeholders' values."""
    for regex, entry in _PATTERNS:
        found = regex.match(key)
        if found:
            return entry, found.groupdict()
    return None


def our_keys(entry: Entry, values: dict[str, str]) -> list[str]:
    if entry.transform == SPLIT3:
        return [entry.ours.format(qkv=part, **values) for part in ("q", "k", "v")]
    return [entry.ours.format(**values)]


def expected_lavin_keys(config: LavinConfig) -> list[str]:
    """Every key of LaVIN's layout that a model with ``config`` has, in table order."""
    text_parts = ("attn", "mlp") if config.adapter_type == "block" else ("attn",)
    visual_parts = {"none": (), "router": ("attn",), "router_block": ("attn", "mlp")}[config.visual_adapter_type]
    keys = []
    for entry in KEY_MAP:
        pattern = entry.lavin
        ranges = {
            "i": range(config.num_hidden_layers) if "{i}" in pattern else [None],
            "j": range(config.vision.num_hidden_layers) if "{j}" in pattern else [None],
            "s": (visual_parts if "{j}" in pattern else text_parts) if "{s}" in pattern else [None],
            "p": ("weight", "bias") if "{p}" in pattern else [None],
        }
        for i in ranges["i"]:
            for j in ranges["j"]:
                for s in ranges["s"]:
                    for p in ranges["p"]:
                        keys.append(pattern.format(i=i, j=j, s=s, p=p))
    return keys


# ---------------------------------------------------------------------------------------------
# Transforms, both ways
# ---------------------------------------------------------------------------------------------
def _rotary(weight: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    rows, cols = weight.shape
    half = rows // heads // 2
    shape = (heads, 2, half, cols) if inverse else (heads, half, 2, cols)
    return weight.reshape(shape).transpose(1, 2).reshape(rows, cols)


def forward_transform(entry: Entry, tensor: torch.Tensor, heads: int) -> list[torch.Tensor]:
    if entry.transform == ROTARY:
        return [_rotary(tensor, heads)]
    if entry.transform == KERNEL:
        return [tensor[..., 0] if tensor.dim() == 3 and tensor.shape[-1] == 1 else tensor]
    if entry.transform == SPLIT3:
        return list(tensor.chunk(3, dim=0)) if tensor.shape[0] % 3 == 0 else [tensor]
    return [tensor]


def lavin_shape(entry: Entry, ours: Sequence[tuple[int, ...]], key: str) -> tuple[int, ...]:
    """The shape LaVIN's tensor must have to become tensors of shapes ``ours``."""
    if entry.transform == SPLIT3:
        return (sum(s[0] for s in ours), *ours[0][1:])
    if entry.transform == KERNEL and key.endswith(".weight"):
        return (*ours[0], 1)
    return ours[0]


def to_lavin(state: dict[str, torch.Tensor], config: LavinConfig) -> dict[str, torch.Tensor]:
    """This project's state dict back in LaVIN's layout (the inverse of the table)."""
    out = {}
    heads = config.text.num_attention_heads
    for key in expected_lavin_keys(config):
        entry, values = match(key)
        parts = [state[k] for k in our_keys(entry, values)]
        if entry.transform == SPLIT3:
            out[key] = torch.cat(parts, dim=0)
        elif entry.transform == ROTARY:
            out[key] = _rotary(parts[0], heads, inverse=True)
        elif entry.transform == KERNEL and key.endswith(".weight"):
            out[key] = parts[0][..., None]
        else:
            out[key] = parts[0]
    return out


# ---------------------------------------------------------------------------------------------
# Reading LaVIN's files
# ---------------------------------------------------------------------------------------------
@dataclass
class Sources:
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # Meta's params.json
    args: dict[str, Any] = field(default_factory=dict)  # LaVIN's training arguments, when the file has them
    tokenizer_dirs: list[Path] = field(default_factory=list)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise BackboneError(f"{path}: holds non-tensor objects (LaVIN saves its training arguments and optimizer "
                            f"state beside the weights); pass --trust-pickle for a file you trust ({exc})") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise BackboneError(f"{path}: not a torch checkpoint ({exc})") from None


def _state_of(loaded: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    args: dict[str, Any] = {}
    if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        raw = loaded.get("args")
        args = vars(raw) if hasattr(raw, "__dict__") else dict(raw) if isinstance(raw, dict) else {}
        loaded = loaded["model"]
    elif isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BackboneError(f"{path}: not a state dict (expected tensors by name, or LaVIN's {{'model': ...}})")
    clip_file = any(k.startswith("visual.") for k in loaded)  # OpenAI CLIP's own file: LaVIN holds it as backbone
    state = {}
    for key, value in loaded.items():
        key = key.removeprefix("module.")
        state["backbone." + key if clip_file else key] = value
    return state, args


def _join_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Meta's model-parallel shards as one state dict (along each key's split dimension)."""
    joined = {}
    for key in shards[0]:
        found = match(key)
        dim = found[0].shard_dim if found else None
        joined[key] = shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return joined


def read_sources(paths: Iterable[str | Path], trust_pickle: bool = False) -> Sources:
    sources = Sources()
    for path in map(Path, paths):
        if path.is_dir():
            shards = sorted(path.glob("consolidated.*.pth"))
            if not shards:
                raise BackboneError(f"{path}: a directory without consolidated.*.pth (Meta's LLaMA layout)")
            if (path / "params.json").is_file():
                sources.params.update(json.loads((path / "params.json").read_text()))
            states = [_state_of(_torch_load(s, trust_pickle), s)[0] for s in shards]
            sources.state.update(_join_shards(states) if len(states) > 1 else states[0])
            sources.tokenizer_dirs += [path, path.parent]
        elif path.is_file():
            if path.name == "params.json":
                sources.params.update(json.loads(path.read_text()))
                continue
            state, args = _state_of(_torch_load(path, trust_pickle), path)
            sources.state.update(state)
            sources.args.update(args)
            sources.tokenizer_dirs += [path.parent]
        else:
            raise BackboneError(f"{path}: no such file or directory")
    return sources


# ---------------------------------------------------------------------------------------------
# The config, from the shapes
# ---------------------------------------------------------------------------------------------
def _need(state: dict[str, torch.Tensor], keys: Sequence[str], why: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise BackboneError(f"LaVIN checkpoint lacks {', '.join(missing)} ({why})")


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    found = [int(m.group(1)) for k in state for m in [regex.match(k)] if m]
    return max(found) + 1 if found else 0


def infer_config(sources: Sources, heads: int | None = None, max_seq_len: int | None = None,
                 adapter_scale: float | None = None, temperature: float | None = None,
                 feature_every: int | None = None) -> LavinConfig:
    state, params, args = sources.state, sources.params, sources.args
    _need(state, ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight"],
          "the LLaMA weights: pass Meta's consolidated.*.pth or its directory")
    _need(state, ["backbone.visual.conv1.weight", "backbone.visual.positional_embedding",
                  f"{_RES.format(j=0)}.mlp.c_fc.weight"],
          "CLIP's visual tower: pass LaVIN's full state dict or OpenAI CLIP's ViT-L/14 weights")
    _need(state, ["layers.0.adapter_attn.conv_A.weight", "layers.0.adapter_attn.conv_B.weight",
                  "adapter_proj.conv_A.weight"], "LaVIN's adapters: pass LaVIN's checkpoint-*.pth")
    vocab, dim = state["tok_embeddings.weight"].shape
    n_heads = heads or params.get("n_heads") or max(1, dim // DEFAULT_HEAD_DIM)
    if dim % n_heads:
        raise BackboneError(f"tok_embeddings.weight: width {dim} does not divide into {n_heads} heads")
    text = LlamaConfig(
        hidden_size=dim, intermediate_size=state["layers.0.feed_forward.w1.weight"].shape[0],
        num_hidden_layers=_count(state, r"^layers\.(\d+)\.attention\.wq\.weight$"), num_attention_heads=n_heads,
        num_key_value_heads=n_heads, vocab_size=vocab, rms_norm_eps=float(params.get("norm_eps", 1e-6)),
        max_position_embeddings=int(max_seq_len or args.get("max_seq_len") or 2048), rope_theta=10000.0,
        tie_word_embeddings=False, hidden_act="silu",
    )
    conv1 = state["backbone.visual.conv1.weight"]
    width, patch = conv1.shape[0], conv1.shape[-1]
    grid = math.isqrt(state["backbone.visual.positional_embedding"].shape[0] - 1)
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=state[f"{_RES.format(j=0)}.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count(state, r"^backbone\.visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$"),
        num_attention_heads=max(1, width // 64), image_size=grid * patch, patch_size=patch, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, num_channels=conv1.shape[1],
    )
    conv_a, conv_b = state["layers.0.adapter_attn.conv_A.weight"], state["layers.0.adapter_attn.conv_B.weight"]
    adapter_dim = conv_a.shape[0]
    groups = max(1, adapter_dim // conv_b.shape[1])
    adapter_type = "block" if any(re.match(r"^layers\.\d+\.adapter_mlp\.", k) for k in state) else "attn"
    visual_keys = [k for k in state if re.match(r"^backbone\.visual\.transformer\.resblocks\.\d+\.adapter_", k)]
    visual_type, visual_dim = "none", None
    if visual_keys:
        routed = [k for k in visual_keys if ".expert_weights." in k]
        if not routed:
            raise BackboneError(f"{visual_keys[0]}: a visual adapter without a router (LaVIN's 'normal' RepAdapter) "
                                "is not supported; LaVIN's released models use visual_adapter_type 'router'")
        visual_type = "router_block" if any(".adapter_mlp." in k for k in visual_keys) else "router"
        first = f"{_RES.format(j=0)}.adapter_attn.conv_A.weight"
        _need(state, [first], "the visual adapters")
        visual_dim = state[first].shape[0]
    try:
        return LavinConfig(
            text, vision, adapter_type=adapter_type, adapter_dim=adapter_dim, adapter_groups=groups,
            adapter_scale=float(adapter_scale if adapter_scale is not None else args.get("adapter_scale", 1.0)),
            router_temperature=float(temperature if temperature is not None else args.get("temperature", 10.0)),
            visual_adapter_type=visual_type, visual_adapter_dim=visual_dim,
            projector_hidden=state["adapter_proj.conv_A.weight"].shape[0],
            feature_every=feature_every or LAVIN_FEATURE_EVERY,
        )
    except ValueError as exc:
        raise BackboneError(f"LaVIN checkpoint: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------
def map_state(state: dict[str, torch.Tensor], config: LavinConfig,
              dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LaVIN's state dict -> ours, through :data:`KEY_MAP`; (our state, LaVIN keys ignored). Refuses,
    naming LaVIN's keys, anything missing, misshapen or unknown."""
    das = sorted(k for k in state if DAS_SKIP_ADAPTER.search(k))
    if das:
        raise BackboneError(f"{das[0]} (and {len(das) - 1} more): LaVIN-DAS's adapters of skipped blocks are a "
                            "plan's, not the backbone's; convert the LaVIN checkpoint, then make a DAS plan")
    expected = expected_lavin_keys(config)
    missing = [k for k in expected if k not in state]
    if missing:
        raise BackboneError(f"LaVIN checkpoint lacks {len(missing)} key(s) the model needs: {missing[:8]}"
                            + (" ..." if len(missing) > 8 else ""))
    wanted = set(expected)
    ignored = sorted(k for k in state if k not in wanted and IGNORED.match(k))
    unknown = sorted(k for k in state if k not in wanted and not IGNORED.match(k))
    if unknown:
        raise BackboneError(f"LaVIN checkpoint has {len(unknown)} key(s) outside LaVIN's layout for this config "
                            f"(adapter_type {config.adapter_type}, visual {config.visual_adapter_type}): {unknown[:8]}")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LavinModel(config).state_dict().items()}
    heads = config.text.num_attention_heads
    out: dict[str, torch.Tensor] = {}
    wrong = []
    for key in expected:
        entry, values = match(key)
        targets = our_keys(entry, values)
        need = lavin_shape(entry, [shapes[t] for t in targets], key)
        tensor = state[key]
        if tuple(tensor.shape) != tuple(need):
            wrong.append(f"{key}: {tuple(tensor.shape)}, expected {tuple(need)}")
            continue
        for target, part in zip(targets, forward_transform(entry, tensor, heads)):
            out[target] = part.to(dtype or tensor.dtype).contiguous()
    if wrong:
        raise BackboneError(f"LaVIN checkpoint: {len(wrong)} tensor(s) with the wrong shape: {wrong[:6]}")
    left = sorted(set(shapes) - set(out))
    if left:  # the table covers the model: this is a bug here, not in the checkpoint
        raise BackboneError(f"conversion left weights unset: {left[:8]}")
    return out, ignored


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer directory (tokenizer.json); LLaMA's has no pad token: LaVIN pads with 0 (unk)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise BackboneError(f"{directory}: no tokenizer.json (LLaMA's tokenizer.model needs converting to the fast "
                            "format first, e.g. with transformers' LlamaTokenizerFast on a machine with sentencepiece)")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise BackboneError(f"{directory}: tokenizer unreadable: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


@dataclass
class Converted:
    directory: Path
    config: LavinConfig
    ignored: list[str]
    tokenizer_written: bool


def convert_checkpoint(paths: Sequence[str | Path], out: str | Path, tokenizer_dir: str | Path | None = None,
                       trust_pickle: bool = False, heads: int | None = None, max_seq_len: int | None = None,
                       adapter_scale: float | None = None, temperature: float | None = None,
                       feature_every: int | None = None, dtype: torch.dtype | None = None) -> Converted:
    """LaVIN's files -> a backbone directory (see the module docstring)."""
    sources = read_sources(paths, trust_pickle)
    config = infer_config(sources, heads, max_seq_len, adapter_scale, temperature, feature_every)
    if dtype is None:
        dtype = sources.state["tok_embeddings.weight"].dtype
    state, ignored = map_state(sources.state, config, dtype)
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        for candidate in sources.tokenizer_dirs:
            if (candidate / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(candidate)
                break
    if tokenizer is not None:
        config.text.bos_token_id, config.text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.text.pad_token_id = tokenizer.pad_token_id
    directory = save_lavin_directory(out, config, state, tokenizer)
    return Converted(directory, config, ignored, tokenizer is not None)
