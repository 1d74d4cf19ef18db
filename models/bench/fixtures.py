"""What `das bench` and the service-level benchmarks (loadtests/) measure on: backbones of the
reference sizes written to disk and loaded as the service loads them, the plans timed against each
other, questions and images, and the embedded default's plans."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import ViltConfig
from transformers.utils import logging as transformers_logging

from models.backbones.base import Backbone
from models.backbones.meter.configuration import MeterConfig
from models.backbones.meter.convert import save_meter_checkpoint
from models.backbones.meter.modeling import MeterBackbone
from models.backbones.vilt.checkpoint import save_vilt_checkpoint
from models.backbones.vilt.modeling import ViltBackbone
from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec, builtin_full_plan, load_plan
from models.paths import SHIPPED_PLANS

# A few dozen words: the questions are made of them, so every word is one WordPiece token.
WORDS = [
    "what", "color", "is", "the", "dog", "cat", "on", "left", "right", "of", "a", "an", "there", "how",
    "many", "people", "are", "in", "picture", "image", "sitting", "standing", "next", "to", "table",
    "car", "red", "blue", "green", "white", "black", "man", "woman", "holding", "wearing", "shirt",
    "under", "tree", "street", "sky", "this", "room", "kind", "food", "plate", "small", "large",
    "near", "window", "does", "have", "any", "which", "side", "behind", "chair", "yellow",
]
TEXT_TOKENS = 16  # per question, [CLS] and [SEP] included
SOURCE_IMAGE_SIZE = 480  # pre-made square images; the processor resizes them to the model's 384
SKIP_BOTTLENECK = 192
NUM_VQA_LABELS = 3129




def log(message: str) -> None:
    """Progress notes go to stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def bench_config(size: str) -> ViltConfig:
    """ViLT-B/32 (transformers' default ViltConfig: 12 layers, hidden 768, 384 px, 32 px patches)
    with a 3129-answer VQA head, or a tiny config of the same depth for a quick smoke run."""
    labels = {i: f"answer{i}" for i in range(NUM_VQA_LABELS)}
    label2id = {v: k for k, v in labels.items()}
    if size == "base":
        return ViltConfig(id2label=labels, label2id=label2id)
    if size == "tiny":
        return ViltConfig(
            hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=1024,
            image_size=128, patch_size=32, id2label=labels, label2id=label2id,
        )
    raise ValueError(f"unknown size {size!r} (use base or tiny)")


def meter_bench_config(size: str) -> MeterConfig:
    """METER-B (``MeterConfig()`` defaults, 288 px) with a 3129-answer VQA head, or a tiny METER with
    the same 12 arms for a quick smoke run."""
    labels = {i: f"answer{i}" for i in range(NUM_VQA_LABELS)}
    if size == "base":
        return MeterConfig(id2label=labels)
    if size == "tiny":
        small = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
        return MeterConfig(
            vision={**small, "image_size": 64, "patch_size": 16, "num_channels": 3, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5},
            text={**small, "vocab_size": 512, "max_position_embeddings": 64, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
                  "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
            hidden_size=128, num_attention_heads=4, intermediate_size=512, id2label=labels,
        )
    raise ValueError(f"unknown METER size {size!r} (use base or tiny)")


def skipped_layers(num_layers: int, count: int, placement: str) -> tuple[int, ...]:
    """Which layers a plan skipping ``count`` of ``num_layers`` leaves out.

    ``even``: spread over the depth, ending with the last layer (12 layers: 2 -> 5,11;
    4 -> 2,5,8,11; 6 -> 1,3,5,7,9,11). ``last``: the last ``count`` layers. Every ViLT layer costs
    the same, so the placement changes the FLOPs not at all and the latency hardly."""
    if not 0 < count < num_layers:
        raise ValueError(f"cannot skip {count} of {num_layers} layers")
    if placement == "last":
        return tuple(range(num_layers - count, num_layers))
    if placement == "even":
        return tuple(sorted({round((j + 1) * num_layers / count) - 1 for j in range(count)}))
    raise ValueError(f"unknown placement {placement!r} (use even or last)")


def make_questions(batch_size: int, words: list[str] = WORDS) -> list[str]:
    """``batch_size`` different questions of TEXT_TOKENS - 2 words each (one token per word)."""
    words_per_question = TEXT_TOKENS - 2
    return [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(words_per_question)) for i in range(batch_size)
    ]


def single_token_words(backbone: Backbone, candidates: list[str]) -> list[str]:
    """The candidates the backbone's tokenizer keeps as one token (so a question's length is known)."""
    tokenizer = backbone.processor.tokenizer
    return [w for w in candidates if len(tokenizer.tokenize(w)) == 1]


def make_images(batch_size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(SOURCE_IMAGE_SIZE, SOURCE_IMAGE_SIZE, 3), dtype=np.uint8))
        for _ in range(batch_size)
    ]


def build_backbone(size: str, device: torch.device, dtype: torch.dtype, workdir: Path, arch: str = "vilt") -> Backbone:
    """Save a random checkpoint in the Hugging Face layout and load it as the service does
    (``embedded``: load the shipped backbone)."""
    if size == "embedded":
        backbone = ViltBackbone.from_pretrained(EMBEDDED_DIR / "backbone", device=device, dtype=dtype)
        log(f"backbone: embedded default {EMBEDDED_DIR / 'backbone'}, on {device} as {str(dtype).replace('torch.', '')}")
        return backbone
    transformers_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    started = time.perf_counter()
    if arch == "meter":
        model, loader = save_meter_checkpoint(workdir, meter_bench_config(size), ["vqa"], WORDS, seed=0), MeterBackbone
    else:
        model, loader = save_vilt_checkpoint(workdir, bench_config(size), "vqa", WORDS, seed=0), ViltBackbone
    del model
    gc.collect()
    saved = time.perf_counter()
    backbone = loader.from_pretrained(workdir, device=device, dtype=dtype)
    loaded = time.perf_counter()
    params = sum(p.numel() for p in backbone.parameters())
    log(f"backbone: {arch} {size}, {params / 1e6:.1f} M parameters, written in {saved - started:.1f} s, "
         f"loaded in {loaded - saved:.1f} s, on {device} as {str(dtype).replace('torch.', '')}")
    torch.manual_seed(0)
    return backbone


def build_plans(backbone: Backbone, skips: list[int], placement: str, skip_bottleneck: int | None = None) -> list[Plan]:
    """The full plan and one plan per skip count; skip adapters of the architecture's reference
    bottleneck unless given (ViLT 192, METER 288)."""
    skip_bottleneck = skip_bottleneck or getattr(backbone, "default_skip_bottleneck", SKIP_BOTTLENECK)

    plans = [builtin_full_plan(backbone, "vqa")]
    for count in skips:
        spec = PlanSpec(
            task="vqa", name=f"skip{count}", version=1,
            backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
            skipped_layers=skipped_layers(backbone.num_layers, count, placement),
            adapters=AdapterShapes(skip_bottleneck=skip_bottleneck, parallel_bottleneck=None),
        )
        modules = backbone.build_plan_modules(spec).to(device=backbone.device, dtype=backbone.dtype)
        plans.append(Plan(spec, modules.eval().requires_grad_(False)))
    return plans


# The embedded default (plans/): a backbone checkpoint without a VQA head, and trained VQA plans.
EMBEDDED_DIR = SHIPPED_PLANS
EMBEDDED_HEAD_SOURCE = "adapters"  # the shipped plan whose pooler and head the "full" plan uses
EMBEDDED_SKIP_PLANS = ("skip2", "skip4")


def full_plan_with_parts_of(backbone: Backbone, source: Plan, name: str = "full") -> Plan:
    """The full model (no skipped layer, no adapter) with ``source``'s own per-task parts (pooler,
    token-type embeddings, head): what the built-in ``full`` plan would be if the backbone
    checkpoint carried those parts. For backbones without a head for the task, as the embedded one."""
    spec = PlanSpec(
        task=source.task, name=name, version=1, backbone=source.spec.backbone, own_head=source.spec.own_head,
        labels=source.spec.labels, own_parts=source.spec.own_parts,
        metrics={"trainable_params": 0, "parts_from": f"{source.task}/{source.name}"},
    )
    modules = backbone.build_plan_modules(spec)
    adapters = ("skip_adapters.", "parallel_adapters.")
    modules.load_state_dict({k: v for k, v in source.modules.state_dict().items() if not k.startswith(adapters)})
    modules.to(device=backbone.device, dtype=backbone.dtype).eval().requires_grad_(False)
    return Plan(spec, modules)


def embedded_plans(backbone: Backbone, plans_dir: Path = EMBEDDED_DIR,
                   skip_names: tuple[str, ...] = EMBEDDED_SKIP_PLANS) -> list[Plan]:
    """[full (parts of the shipped adapters plan), the shipped VQA skip plans], validated against ``backbone``."""
    source = load_plan(plans_dir / "vqa" / EMBEDDED_HEAD_SOURCE, backbone)
    return [full_plan_with_parts_of(backbone, source)] + [load_plan(plans_dir / "vqa" / n, backbone) for n in skip_names]


