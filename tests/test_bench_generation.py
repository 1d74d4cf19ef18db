"""`das bench --generation --short`: the tiny smoke run of the generation benchmark writes its report;
the report's structure, and its FLOPs ratios against the analytic counts (no timing assertions)."""

from __future__ import annotations

import json

from models.backbones.lavin.modeling import lavin_request_flops
from models.bench.generation import PAPER, lavin_config
from models.cli.main import main
from models.das.plan import AdapterShapes, BackboneRef, PlanSpec


def test_short_generation_benchmark_report(tmp_path, capsys):
    assert main(["bench", "--generation", "--short", "--skips", "2,4", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "TTFT ms" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench-generation-short.json").read_text())
    assert (tmp_path / "bench-generation-short.md").read_text().startswith("# Generation benchmark")
    settings = result["settings"]
    assert result["shape"] == "tiny" and settings["repeats"] == 2 and settings["new_tokens"] == 4
    rows = result["rows"]
    assert [r["plan"] for r in rows] == ["full", "skip2", "skip4"]
    for row in rows:
        assert len(row["prefill_seconds"]) == len(row["decode_seconds"]) == 2  # paired rounds, every plan in each
        for key in ("ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "time_ratio", "prefill_latency_saved"):
            assert isinstance(row[key], (int, float))
    assert rows[0]["prefill_efficiency"] is None and rows[0]["prefill_flops_ratio"] == 1.0
    assert rows[2]["paper_time_ratio"] == round(PAPER["skipped_s"][4] / PAPER["full_s"], 4)

    # FLOPs ratios: the analytic counts of prefill (one lm-head row) and of the decode steps, recomputed here
    config = lavin_config("tiny")
    prompt, steps = settings["prompt_positions"], settings["new_tokens"]
    grid = (config.image_size // config.patch_size,) * 2
    full_prefill = lavin_request_flops(config, None, prompt, [grid], 1).full
    full_decode = lavin_request_flops(config, None, prompt, [grid], steps).full - full_prefill
    for row in rows[1:]:
        spec = PlanSpec(task="vqa", name=row["plan"], version=1, backbone=BackboneRef("lavin", ""),
                        skipped_layers=tuple(row["skipped_layers"]), adapters=AdapterShapes(256))
        prefill = lavin_request_flops(config, spec, prompt, [grid], 1).executed
        decode = lavin_request_flops(config, spec, prompt, [grid], steps).executed - prefill
        assert row["prefill_flops_ratio"] == prefill / full_prefill
        assert row["decode_flops_ratio"] == decode / full_decode
        assert 0 < row["prefill_flops_ratio"] < 1 and 0 < row["decode_flops_ratio"] < 1
    assert rows[2]["decode_flops_ratio"] < rows[1]["decode_flops_ratio"]
