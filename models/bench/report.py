"""The tables and files a `das bench` run writes: bench-runtime{,-embedded,-meter}.{json,md}."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.bench.fixtures import EMBEDDED_HEAD_SOURCE

ARCH_NAMES = {"vilt": "ViLT", "meter": "METER"}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _efficiency_cell(row: dict[str, Any]) -> str:
    if row["efficiency"] is None:
        return "-"
    ci = row.get("efficiency_ci90")
    return f"{row['efficiency']:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    compiled = any(row["variant"] != "eager" for row in rows)
    header = (["mode"] if compiled else []) + [
        "batch", "plan", "skipped layers", "GFLOPs/sample", "FLOPs saved", "latency ms (p25-p75)",
        "samples/s", "latency saved", "efficiency (90% CI)", "target", "result", "others' CPU",
    ]
    aligns = (["---"] if compiled else []) + ["--:", "---", "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "---", "--:"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    for row in rows:
        cells = ([row["variant"]] if compiled else []) + [
            str(row["batch_size"]),
            row["plan"],
            ",".join(map(str, row["skipped_layers"])) or "none",
            f"{row['gflops_per_sample']:.3g}",
            _pct(row["flops_saved"]) if row["skipped_layers"] else "-",
            f"{row['latency_ms']:.1f} ({row['latency_p25_ms']:.1f}-{row['latency_p75_ms']:.1f})",
            f"{row['throughput']:.2f}",
            _pct(row["latency_saved"]),
            _efficiency_cell(row),
            "-" if row["target"] is None else f">= {row['target']:.1f}",
            row["result"],
            _pct(row["others_cpu"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_machine(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    arch = s.get("arch", "vilt")
    layers = "fusion layers (DAS arms)" if arch == "meter" else "layers"
    sequence = (f"sequence {s['seq_len']}" if isinstance(s["seq_len"], int)  # METER: two streams
                else f"{s['seq_len'][0]} text and {s['seq_len'][1]} image tokens")
    return (
        f"Machine: {m['device_name']}; {m['cpu_cores']} CPU cores ({m['torch_threads']} torch threads); "
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; {m['platform']}.\n"
        f"Setup: {ARCH_NAMES[arch]} {s['size']} ({s['num_layers']} {layers}, hidden {s['hidden_size']}), "
        f"{s['dtype']} on {s['device']}{', torch.compile' if s['compile'] else ''}; {s['text_tokens']} text tokens + "
        f"{s['image_size']}x{s['image_size']} image ({s['patch_size']} px patches) = {sequence}; "
        f"skip adapters of bottleneck {s['skip_bottleneck']}, "
        + (f"parallel adapters of bottleneck {s['parallel_bottleneck']}" if s.get("parallel_bottleneck")
           else "no parallel adapters")
        + f", placement '{s['placement']}'"
        + (f" (full = no skip, no adapters, pooler and head of the shipped '{EMBEDDED_HEAD_SOURCE}' plan)"
           if s["size"] == "embedded" else "") + ".\n"
        f"Timing: median of {', '.join(f'{n} runs at batch {b}' for b, n in s['repeats'].items())} after "
        f"{', '.join(f'{n} warm-up round(s) at batch {b}' for b, n in s['warmup_rounds'].items())}; "
        f"plans interleaved round-robin{_rounds_note(s)}. Whole run: {result['wall_seconds']:.0f} s."
        + (f"\nLoad average (1, 5, 15 min) before the run: {', '.join(map(str, m['load_average_before']))}."
           if m.get("load_average_before") else "")
    )


def _rounds_note(settings: dict[str, Any]) -> str:
    extra = {b: log for b, log in settings.get("rounds", {}).items() if log["rounds_run"] > len(log["kept"])}
    if not extra:
        return ""
    return "; busy rounds (others' CPU > {:.0%}) replaced: ".format(settings["max_others_cpu"]) + ", ".join(
        f"kept the {len(log['kept'])} quietest of {log['rounds_run']} at batch {b}" for b, log in extra.items()
    )


def busy_warning(result: dict[str, Any]) -> str | None:
    """A warning when some kept rounds were still busy (other processes took CPU during them)."""
    settings = result["settings"]
    busy = {b: log for b, log in settings.get("rounds", {}).items() if log["kept_busy"]}
    if not busy:
        return None
    return (
        "Warning: other processes used more than {:.0%} of the CPUs during ".format(settings["max_others_cpu"])
        + ", ".join(f"{log['kept_busy']} of the {len(log['kept'])} kept rounds at batch {b}" for b, log in busy.items())
        + " (column \"others' CPU\"); those latencies are inflated and noisy. Re-run on a quiet machine."
    )


def output_stem(size: str, arch: str = "vilt") -> str:
    """File name stem of a run's results: the embedded default's and METER's go beside the base size's."""
    if arch == "meter":
        return "bench-runtime-meter"
    return "bench-runtime-embedded" if size == "embedded" else "bench-runtime"


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(result["settings"]["size"], result["settings"].get("arch", "vilt"))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n\n".join([
        "# das bench: latency vs FLOPs of DAS plans",
        f"Run {result['created_at']}.",
        describe_machine(result).replace("\n", "  \n"),
        markdown_table(result["rows"]),
        *([busy_warning(result)] if busy_warning(result) else []),
        "Efficiency = (fraction of the full plan's median latency saved) / (fraction of its FLOPs saved). "
        "FLOPs per sample from `backbone.flops` (1 multiply-add = 2 FLOPs), for the actual input. "
        "Latency: median of the timed runs of one forward pass (`DASRuntime.vqa_logits` under "
        "`torch.inference_mode`); preprocessing is not timed. samples/s = batch / median latency. "
        "90% CI: bootstrap over the timed rounds (resampled in pairs with the full plan's); a wide "
        "interval means the machine was too noisy for the number of repeats. "
        "others' CPU: share of all CPUs that other processes used while the row's runs were timed "
        "(from /proc/stat; ~0% on a quiet machine).",
    ])
    (out / f"{stem}.md").write_text(text + "\n")


