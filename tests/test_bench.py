"""`das bench` runs end to end (its tiny smoke size) and reports what the README table shows."""

from __future__ import annotations

import json

from models.cli import main


def test_bench_smoke_run_writes_rows_for_every_plan_and_batch(tmp_path, capsys):
    assert main(["bench", "--size", "tiny", "--batch-sizes", "1,2", "--skips", "1", "--repeats", "2",
                 "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench-runtime.json").read_text())
    rows = result["rows"]
    assert {(r["batch_size"], r["plan"]) for r in rows} == {(1, "full"), (1, "skip1"), (2, "full"), (2, "skip1")}
    for row in rows:
        assert row["latency_ms"] > 0 and row["throughput"] > 0
        if row["plan"] != "full":
            assert 0 < row["flops_saved"] < 1 and row["skipped_layers"]
            assert "efficiency" in row and row["result"] in ("PASS", "MISS")
    assert "| batch |" in (tmp_path / "bench-runtime.md").read_text()
