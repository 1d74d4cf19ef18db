"""`das bench --generation`: decode speed and time to first token of DAS plans on a generative
(LaVIN) backbone, against their FLOPs.

A randomly initialised LaVIN at a ~1B-parameter Llama shape (2048 wide, 22 blocks, 32 heads, MLP 5632,
vocabulary 32000; a CLIP-L/14 tower at 224 px with LaVIN's routed adapters, 6 image tokens) answers one
ScienceQA-like request (one image, ``--prompt-tokens`` prompt tokens, ``--new-tokens`` generated) under
the full plan and under plans skipping 2 / 4 / 6 decoder blocks. Each *round* runs every plan once
(in an order rotated by one each round, so drift hits all plans alike): the prefill (vision tower,
projection, the prompt through the kept blocks: the time to first token), then the decode steps, one
token at a time through the KV cache. Latencies are medians over the rounds with their quartiles;
the speedup efficiency is latency saved / FLOPs saved, for the prefill and for the decode,
``(1 - t_plan / t_full) / (1 - F_plan / F_full)``, with a 90% bootstrap interval over the paired rounds.
The FLOPs are the analytic counts of exactly what is timed (``lavin_request_flops``: prefill with one
lm-head row; each decode step with its own attention length).

The LaVIN paper's time ratios are reported beside ours: skipping 2 / 4 / 6 of LLaMA-7B's 32 blocks
took a ScienceQA sample from 3.70 s to 3.44 / 3.23 / 3.06 s (0.930 / 0.873 / 0.827 of full). Theirs is
a 7B model on a GPU with a 64-token answer; ours is the shape above on this machine, so the comparison
is of ratios, and of how close each gets to the FLOPs it saves.

``--short`` is a smoke run: a tiny LaVIN (64 wide, 8 blocks), 4 new tokens, 2 rounds; seconds on a CPU.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from models.backbones.base import resolve_device, resolve_dtype
from models.backbones.lavin.modeling import LavinBackbone, LavinConfig, LavinModel, lavin_request_flops
from models.backbones.llava.checkpoint import build_tokenizer
from models.bench.fixtures import WORDS, log, make_images, skipped_layers
from models.bench.timing import efficiency_interval, load_average, machine_info, quartiles
from models.das.adapters import ADAPTER_INIT_STD
from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec, builtin_full_plan

PAPER = {
    "source": "DAS paper, LaVIN-7B on ScienceQA: seconds per sample, full vs skipping 2 / 4 / 6 of 32 blocks",
    "blocks": 32,
    "full_s": 3.70,
    "skipped_s": {2: 3.44, 4: 3.23, 6: 3.06},
}
SHAPES = {
    # ~1.2B parameters: TinyLlama-1.1B's widths with LLaMA's multi-head attention (LaVIN's), CLIP-L/14
    "1b": dict(text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
               vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
               adapter_dim=8, projector_hidden=128),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                             image_size=32, patch_size=8),
                 adapter_dim=8, projector_hidden=16),
}
OUTPUT_STEM = "bench-generation"


@dataclass
class GenerationOptions:
    short: bool = False
    device: str = "auto"
    dtype: str = "float32"
    skips: list[int] = field(default_factory=lambda: [2, 4, 6])
    placement: str = "even"
    repeats: int | None = None  # rounds (default 7; 2 with --short)
    warmup: int | None = None  # untimed rounds (default 1; 0 with --short)
    new_tokens: int | None = None  # generated per request (default 32; 4 with --short)
    prompt_tokens: int | None = None  # prompt text tokens (default 128; 8 with --short)
    threads: int | None = None
    seed: int = 0


def lavin_config(shape: str) -> LavinConfig:
    spec = SHAPES[shape]
    text = LlamaConfig(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3, **spec["text"])
    vision = CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, **spec["vision"])
    return LavinConfig(text, vision, adapter_dim=spec["adapter_dim"], projector_hidden=spec["projector_hidden"])


def build_backbone(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LavinBackbone:
    """A random LaVIN of ``shape`` (its MMA adapters' up projections moved off LaVIN's zero init, so
    that they compute something); the fingerprint names the shape, not the weights (hashing 5 GB of
    random weights measures nothing)."""
    config = lavin_config(shape)
    torch.manual_seed(seed)
    model = LavinModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".up." in name and "adapters" in name:
                parameter.normal_(std=ADAPTER_INIT_STD)
    return LavinBackbone.from_model(config, model, build_tokenizer(WORDS), device=device, dtype=dtype,
                                    fingerprint_value=f"bench:lavin-{shape}")


def build_plans(backbone: LavinBackbone, skips: list[int], placement: str, seed: int = 0) -> list[Plan]:
    plans = [builtin_full_plan(backbone, "vqa")]
    for count in skips:
        spec = PlanSpec(task="vqa", name=f"skip{count}", version=1,
                        backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
                        skipped_layers=skipped_layers(backbone.num_layers, count, placement),
                        adapters=AdapterShapes(backbone.default_skip_bottleneck))
        torch.manual_seed(seed + count)
        modules = backbone.build_plan_modules(spec).to(backbone.device, backbone.dtype).eval().requires_grad_(False)
        plans.append(Plan(spec=spec, modules=modules))
    return plans


def prompt_of(tokens: int) -> str:
    return "Question: " + " ".join(WORDS[i % len(WORDS)] for i in range(max(tokens - 2, 1))) + "\nResponse:"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_request(backbone: LavinBackbone, plan: Plan, batch: Any, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy request of exactly ``new_tokens`` tokens."""
    device = backbone.device
    with torch.inference_mode():
        _sync(device)
        started = time.perf_counter()
        cache = backbone.new_cache(plan.modules, len(batch), batch.input_ids.shape[1] + new_tokens)
        logits, position = backbone.prefill(batch, plan.modules, cache)
        token = logits.argmax(-1)
        _sync(device)
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = backbone.decode_step(token, position, plan.modules, cache)
            token, position = logits.argmax(-1), position + 1
        _sync(device)
        return prefilled - started, time.perf_counter() - prefilled


def _efficiency(t_plan: float, t_full: float, flops_saved: float) -> float | None:
    return None if flops_saved <= 0 else round((1 - t_plan / t_full) / flops_saved, 3)


def run_generation_benchmark(options: GenerationOptions) -> dict[str, Any]:
    shape = "tiny" if options.short else "1b"
    repeats = options.repeats or (2 if options.short else 7)
    warmup = options.warmup if options.warmup is not None else (0 if options.short else 1)
    new_tokens = options.new_tokens or (4 if options.short else 32)
    prompt_tokens = options.prompt_tokens or (8 if options.short else 128)
    if options.threads:
        torch.set_num_threads(options.threads)
    device, dtype = resolve_device(options.device), resolve_dtype(options.dtype)
    log(f"building a random LaVIN ({shape}) on {device} ({options.dtype})")
    backbone = build_backbone(shape, device, dtype, options.seed)
    parameters = sum(p.numel() for p in backbone.model.parameters())
    plans = build_plans(backbone, list(options.skips), options.placement, options.seed)
    batch = backbone.preprocess(make_images(1, options.seed), [prompt_of(prompt_tokens)]).to(device, dtype)
    prompt_len, grids = batch.text_lengths[0], batch.image_grids(0)

    def flops(plan: Plan, tokens: int):
        spec = None if not plan.spec.skipped_layers else plan.spec
        return lavin_request_flops(backbone.config, spec, prompt_len, grids, tokens)

    full_prefill, full_total = flops(plans[0], 1), flops(plans[0], new_tokens)
    timings: dict[str, dict[str, list[float]]] = {p.spec.name: {"prefill": [], "decode": []} for p in plans}
    for round_index in range(warmup + repeats):
        order = [plans[(round_index + k) % len(plans)] for k in range(len(plans))]
        for plan in order:
            prefill_s, decode_s = run_request(backbone, plan, batch, new_tokens)
            if round_index >= warmup:
                timings[plan.spec.name]["prefill"].append(prefill_s)
                timings[plan.spec.name]["decode"].append(decode_s)
        log(f"round {round_index + 1}/{warmup + repeats}{' (warm-up)' if round_index < warmup else ''}")
    steps = max(new_tokens - 1, 1)
    full_t = timings[plans[0].spec.name]
    rows = []
    for plan in plans:
        t = timings[plan.spec.name]
        prefill_f = flops(plan, 1)
        total_f = flops(plan, new_tokens)
        decode_f = total_f.executed - prefill_f.executed
        full_decode_f = full_total.full - full_prefill.full
        prefill_saved = 1 - prefill_f.executed / full_prefill.full
        decode_saved = 1 - decode_f / full_decode_f if full_decode_f else 0.0
        p_med, d_med = statistics.median(t["prefill"]), statistics.median(t["decode"])
        pf_med, df_med = statistics.median(full_t["prefill"]), statistics.median(full_t["decode"])
        total = [a + b for a, b in zip(t["prefill"], t["decode"])]
        full_total_t = [a + b for a, b in zip(full_t["prefill"], full_t["decode"])]
        count = len(plan.spec.skipped_layers)
        paper = PAPER["skipped_s"].get(count)
        p25, p75 = quartiles(t["prefill"])
        d25, d75 = quartiles(t["decode"])
        rows.append({
            "plan": plan.spec.name, "skipped_layers": list(plan.spec.skipped_layers),
            "prefill_gflops": round(prefill_f.executed / 1e9, 4), "decode_gflops": round(decode_f / 1e9, 4),
            "prefill_flops_ratio": prefill_f.executed / full_prefill.full,
            "decode_flops_ratio": decode_f / full_decode_f if full_decode_f else 1.0,
            "prefill_flops_saved": round(prefill_saved, 4), "decode_flops_saved": round(decode_saved, 4),
            "ttft_ms": round(p_med * 1e3, 2), "ttft_p25_ms": round(p25 * 1e3, 2), "ttft_p75_ms": round(p75 * 1e3, 2),
            "decode_ms_per_token": round(d_med / steps * 1e3, 3),
            "decode_p25_ms_per_token": round(d25 / steps * 1e3, 3),
            "decode_p75_ms_per_token": round(d75 / steps * 1e3, 3),
            "decode_tokens_per_s": round(steps / d_med, 2) if d_med > 0 else None,
            "prefill_latency_saved": round(1 - p_med / pf_med, 4), "decode_latency_saved": round(1 - d_med / df_med, 4),
            "prefill_efficiency": _efficiency(p_med, pf_med, prefill_saved) if count else None,
            "decode_efficiency": _efficiency(d_med, df_med, decode_saved) if count else None,
            "prefill_efficiency_ci90": efficiency_interval(full_t["prefill"], t["prefill"], prefill_saved) if count else None,
            "decode_efficiency_ci90": efficiency_interval(full_t["decode"], t["decode"], decode_saved) if count else None,
            "time_ratio": round(statistics.median(total) / statistics.median(full_total_t), 4),
            "paper_time_ratio": round(paper / PAPER["full_s"], 4) if paper else (1.0 if not count else None),
            "paper_block_fraction_skipped": round(count / PAPER["blocks"], 4),
            "prefill_seconds": t["prefill"], "decode_seconds": t["decode"],
        })
    return {
        "benchmark": "generation", "shape": shape, "parameters": parameters,
        "settings": {**asdict(options), "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens,
                     "prompt_tokens": prompt_tokens, "prompt_positions": prompt_len, "decode_steps": steps,
                     "batch_size": 1},
        "config": {"text": SHAPES[shape]["text"], "vision": SHAPES[shape]["vision"],
                   "image_tokens": backbone.config.image_tokens},
        "machine": machine_info(device), "load_average": load_average(), "paper": PAPER, "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"# Generation benchmark: LaVIN {result['shape']} ({result['parameters'] / 1e9:.2f}B parameters, random init)",
        "",
        f"{result['machine']['device_name']}, {s['dtype']}; one request: {s['prompt_positions']} prompt positions "
        f"(one image), {s['new_tokens']} new tokens; {s['repeats']} paired rounds (+{s['warmup']} warm-up), medians "
        "(p25-p75). Efficiency = latency saved / FLOPs saved (90% bootstrap interval).",
        "",
        "| plan | skipped | TTFT ms | prefill FLOPs saved | prefill efficiency | decode ms/token | tokens/s | "
        "decode FLOPs saved | decode efficiency | time ratio | paper ratio |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def eff(value, ci):
        return "-" if value is None else f"{value:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")

    for row in result["rows"]:
        lines.append(
            f"| {row['plan']} | {','.join(map(str, row['skipped_layers'])) or 'none'} | "
            f"{row['ttft_ms']:.1f} ({row['ttft_p25_ms']:.1f}-{row['ttft_p75_ms']:.1f}) | "
            f"{row['prefill_flops_saved']:.1%} | {eff(row['prefill_efficiency'], row['prefill_efficiency_ci90'])} | "
            f"{row['decode_ms_per_token']:.2f} ({row['decode_p25_ms_per_token']:.2f}-{row['decode_p75_ms_per_token']:.2f}) | "
            f"{row['decode_tokens_per_s'] or '-'} | {row['decode_flops_saved']:.1%} | "
            f"{eff(row['decode_efficiency'], row['decode_efficiency_ci90'])} | {row['time_ratio']:.3f} | "
            f"{'-' if row['paper_time_ratio'] is None else format(row['paper_time_ratio'], '.3f')} |")
    lines += ["", f"Paper: {result['paper']['source']} ({result['paper']['full_s']} s full). Time ratio = "
              "(TTFT + decode) of the plan / of the full model."]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (OUTPUT_STEM + ("-short" if result["shape"] == "tiny" else ""))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    return stem
