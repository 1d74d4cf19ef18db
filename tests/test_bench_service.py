"""The service-level benchmark runs end to end at micro settings: real `bentoml serve` processes (the
plain transformers baseline, the same behind BentoML's adaptive batching, DAS with its full plan, DAS
with two skip plans over a tiny VQA checkpoint, and a no-op BentoML service for the overhead's
floor), and writes every row the README table shows. No timing thresholds: only that the numbers are
there and consistent (the paired per-round ratios are recomputed from the per-round values)."""

from __future__ import annotations

import pytest

import importlib.util
import json
import sys
from pathlib import Path

from helpers import make_checkpoint
from models.cli.main import main as das_main

REPO = Path(__file__).resolve().parent.parent


def _bench_service():
    spec = importlib.util.spec_from_file_location("bench_service", REPO / "loadtests" / "bench_service.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_service_benchmark_micro_run_writes_every_row(tmp_path):
    checkpoint, out = tmp_path / "checkpoint", tmp_path / "out"
    checkpoint.mkdir()
    make_checkpoint(checkpoint, "vqa")
    assert das_main(["bench", "--size", "tiny", "--batch-sizes", "1", "--skips", "2", "--repeats", "2",
                     "--warmup", "0", "--threads", "1", "--max-others-cpu", "1",
                     "--out", str(out)]) == 0
    bench_service = _bench_service()
    assert bench_service.main([
        "--checkpoint", str(checkpoint), "--skip-layers", "2,1", "--concurrency", "1,3", "--rounds", "2",
        "--duration", "0.6", "--warmup", "0.2", "--min-requests", "2", "--overhead-requests", "4",
        "--no-zero-wait-overhead", "--device", "cpu", "--out", str(out), "--model-results", str(out / "bench-runtime.json"),
    ]) == 0

    result = json.loads((out / "bench-service.json").read_text())
    services = {row["service"]: row for row in result["services"]}
    assert list(services) == ["baseline", "baseline-batched", "das-full", "das-skip1", "das-skip2"]
    for row in services.values():
        assert [lv["concurrency"] for lv in row["levels"]] == [1, 3]
        for level in row["levels"]:
            assert level["errors"] == 0 and level["ok"] > 0 and level["throughput"] > 0
            assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
            assert len(level["round_throughputs"]) == 2 and all(t >= 0 for t in level["round_throughputs"])
            assert len(level["round_p50_ms"]) == 2
            # DAS services report the batches that formed: at least one request each, at most the clients
            if row["role"] == "baseline":
                assert level["mean_batch_size"] is None
            else:
                assert 1 <= level["mean_batch_size"] <= level["concurrency"]
        assert row["peak_throughput"] == max(lv["throughput"] for lv in row["levels"])
        assert row["throughput_at_budget"] is None or row["throughput_at_budget"] <= row["peak_throughput"]
    # the plans the DAS services ran, as their responses said
    assert services["das-full"]["probe"]["plan"]["name"] == "full" and services["das-full"]["flops_saved"] == 0
    assert services["das-skip2"]["probe"]["plan"]["skipped_layers"] == [1, 3]
    assert 0 < services["das-skip1"]["flops_saved"] < services["das-skip2"]["flops_saved"] < 1
    # both baselines and DAS full run the same weights, so they answer alike
    assert result["answers_agree"]["same"], result["answers_agree"]
    assert result["baselines_agree"]["same"], result["baselines_agree"]
    # paired per round at concurrency 3: full vs the better plain service of each round, and each skip plan
    paired = {(row["comparison"], row["measure"]): row for row in result["paired"]}
    assert {row["concurrency"] for row in result["paired"]} == {3}
    full3 = next(lv for lv in services["das-full"]["levels"] if lv["concurrency"] == 3)
    plain = [max(next(lv for lv in services[b]["levels"] if lv["concurrency"] == 3)["round_throughputs"][r]
                 for b in ("baseline", "baseline-batched")) for r in range(2)]
    ratio = paired[("das-full vs the better plain service", "throughput ratio")]
    assert ratio["rounds"] == pytest.approx([t / p for t, p in zip(full3["round_throughputs"], plain)], abs=1e-4)
    skip3 = next(lv for lv in services["das-skip2"]["levels"] if lv["concurrency"] == 3)
    gain = paired[("das-skip2 vs das-full", "throughput gain")]
    assert gain["rounds"] == pytest.approx(
        [t / u - 1 for t, u in zip(skip3["round_throughputs"], full3["round_throughputs"])], abs=1e-4)
    assert gain["min"] <= gain["median"] <= gain["max"]
    saved = paired[("das-skip2 vs das-full", "p50 latency saved")]
    assert saved["rounds"] == pytest.approx(
        [1 - a / b for a, b in zip(skip3["round_p50_ms"], full3["round_p50_ms"])], abs=1e-4)
    budget = result["budget_ms"]
    assert budget == result["settings"]["budget_factor"] * services["baseline"]["p50_ms_at_1"]
    (overhead,) = result["overhead"]
    assert overhead["service"] == "das-full" and overhead["pairs"] == 4
    assert overhead["e2e_p50_ms"] > 0 and overhead["inprocess_p50_ms"] > 0
    # the report rounds the p50s (to 0.01 and 0.001 ms), so their ratio is known only to about 1%
    assert overhead["overhead"] + 1 == pytest.approx(overhead["e2e_p50_ms"] / overhead["inprocess_p50_ms"], rel=1e-2)
    # the no-op BentoML service with the same inputs: BentoML's own share, and what DAS adds beyond it
    assert overhead["bentoml_floor_p50_ms"] > 0
    assert abs(overhead["das_added_ms"] - (overhead["e2e_p50_ms"] - overhead["inprocess_p50_ms"]
                                           - overhead["bentoml_floor_p50_ms"])) < 1e-2
    # at budget: full vs plain, one gain per skip plan; paired: full vs plain, two per skip plan; overhead
    assert len(result["targets"]) == 1 + 2 + (1 + 2 * 2) + 1
    assert all(t["result"] in ("PASS", "MISS") for t in result["targets"])
    assert "| das-skip2 | 3 |" in (out / "bench-service.md").read_text()
    assert {p.name for p in (out / "service-logs").iterdir()} == {
        "baseline.log", "baseline-batched.log", "das-full.log", "das-skip1.log", "das-skip2.log", "bentoml-floor.log"}

    summary = json.loads((out / "bench.json").read_text())
    levels = [t["level"] for t in summary["targets"]]
    assert levels == ["model (tiny, float32)"] + ["service (checkpoint, float32)"] * len(result["targets"])
    assert summary["passed"] + summary["missed"] == len(summary["targets"])
    assert "| service (checkpoint, float32) |" in (out / "bench.md").read_text()
    # an earlier service run (make bench's ViLT-B/32-size one) joins the summary with its own rows
    combined = tmp_path / "combined"
    combined.mkdir()
    bench_service.write_summary(result, [], combined, [out / "bench-service.json"])
    summary = json.loads((combined / "bench.json").read_text())
    assert [t["name"] for t in summary["targets"]] == [t["name"] for t in result["targets"]] * 2
    assert summary["files"][0] == str(out / "bench-service.json")


def test_service_benchmark_on_a_stem_backbone_runs_the_das_services_only(tmp_path):
    """transformers' ViLT cannot load a convolutional stem (the embedded default has one): the benchmark
    then runs no plain service, says so, and lets das-full's p50 at concurrency 1 set the budget."""
    checkpoint, out = tmp_path / "checkpoint", tmp_path / "out"
    checkpoint.mkdir()
    make_checkpoint(checkpoint, "vqa", conv_stem_channels=[8, 8, 8, 8])
    bench_service = _bench_service()
    assert bench_service.main([
        "--checkpoint", str(checkpoint), "--skip-layers", "1", "--concurrency", "1,2", "--rounds", "2",
        "--duration", "0.5", "--warmup", "0.2", "--min-requests", "2", "--overhead-requests", "2",
        "--no-zero-wait-overhead", "--device", "cpu", "--out", str(out),
    ]) == 0
    result = json.loads((out / "bench-service.json").read_text())
    services = {row["service"]: row for row in result["services"]}
    assert list(services) == ["das-full", "das-skip1"]
    assert result["answers_agree"] is None and result["baselines_agree"] is None
    assert result["budget_ms"] == result["settings"]["budget_factor"] * services["das-full"]["p50_ms_at_1"]
    assert "das-full p50 at concurrency 1" in result["budget_rule"]
    assert not [t for t in result["targets"] if "plain service" in t["name"]]
    assert {row["comparison"] for row in result["paired"]} == {"das-skip1 vs das-full"}
    assert "convolutional stem" in result["settings"]["weights"]
    assert "No plain service ran" in (out / "bench-service.md").read_text()
    assert {p.name for p in (out / "service-logs").iterdir()} == {"das-full.log", "das-skip1.log", "bentoml-floor.log"}
