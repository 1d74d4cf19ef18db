"""`das bench` runs end to end (its tiny smoke size) and reports what the README table shows."""

from __future__ import annotations

import json
from pathlib import Path

from models.cli.main import main


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


def test_bench_embedded_times_the_shipped_plans(tmp_path):
    assert main(["bench", "--size", "embedded", "--batch-sizes", "2", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--max-others-cpu", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench-runtime-embedded.json").read_text())
    config = json.loads((Path(__file__).resolve().parent.parent / "plans" / "backbone" / "config.json").read_text())
    patches = (config["image_size"] // config["patch_size"]) ** 2
    assert result["settings"]["size"] == "embedded" and result["settings"]["seq_len"] == 16 + patches + 1
    rows = {row["plan"]: row for row in result["rows"]}
    assert set(rows) == {"full", "skip2", "skip4"}
    from models.bench.fixtures import EMBEDDED_DIR
    from models.das.plan import read_plan_spec

    shipped_skip4 = list(read_plan_spec(EMBEDDED_DIR / "vqa" / "skip4").skipped_layers)
    assert rows["full"]["skipped_layers"] == [] and rows["skip4"]["skipped_layers"] == shipped_skip4
    assert 0 < rows["skip2"]["flops_saved"] < rows["skip4"]["flops_saved"] < 1
    assert not (tmp_path / "bench-runtime.json").exists()  # the base-size results are not overwritten


def test_a_full_plan_with_parts_equals_transformers_on_the_converted_checkpoint(tmp_path):
    """The service benchmark's baseline runs transformers on a checkpoint written from a DAS full plan's
    tensors (a backbone without a VQA head, the pooler and head from a plan); both must compute the same
    answers, or the comparison would not be like for like."""
    import torch
    from transformers import ViltForQuestionAnswering, ViltProcessor

    from helpers import VQA_LABELS, make_checkpoint, random_image
    from models.backbones.vilt.checkpoint import save_vqa_checkpoint_with_plan_parts
    from models.backbones.vilt.modeling import ViltBackbone
    from models.bench.fixtures import full_plan_with_parts_of
    from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec
    from models.runtime import DASRuntime

    make_checkpoint(tmp_path / "backbone", None, seed=2)
    backbone = ViltBackbone.from_pretrained(tmp_path / "backbone")
    spec = PlanSpec(task="vqa", name="adapters", version=1, backbone=BackboneRef("vilt", backbone.fingerprint),
                    skipped_layers=(), adapters=AdapterShapes(None, 4), own_head=True, labels=tuple(VQA_LABELS))
    source = Plan(spec, backbone.build_plan_modules(spec, init_from_backbone=True))
    with torch.no_grad():  # a head far from its initialisation, so that a wrong tensor moves the answers
        for param in source.modules.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.5)
    full = full_plan_with_parts_of(backbone, source)
    assert full.skipped_layers == () and not list(full.modules.skip_adapters) and not list(full.modules.parallel_adapters)
    save_vqa_checkpoint_with_plan_parts(tmp_path / "backbone", full, tmp_path / "converted")
    model = ViltForQuestionAnswering.from_pretrained(tmp_path / "converted").eval()
    processor = ViltProcessor.from_pretrained(tmp_path / "converted")
    images, questions = [random_image(96, 96, seed=1), random_image(80, 120, seed=2)], ["what color is the circle?", "is there a red square?"]
    results = DASRuntime(backbone).vqa(full, images, questions, top_k=len(full.spec.labels))
    for image, question, result in zip(images, questions, results):
        with torch.no_grad():
            scores = torch.sigmoid(model(**processor(images=image, text=question, return_tensors="pt")).logits)[0]
        expected = {model.config.id2label[i]: s for i, s in enumerate(scores.tolist())}
        assert {a.answer for a in result.answers} == set(expected)
        assert max(abs(a.score - expected[a.answer]) for a in result.answers) < 1e-4
    assert len({round(s, 3) for s in expected.values()}) > 1  # the answers differ, so the match means something


def test_bench_producer_row_in_its_tiniest_mode_reports_every_column(tmp_path, capsys):
    """Correctness of the producer row's report only (no timing assertions): bound, one process, DDP."""
    assert main(["bench", "--producer", "--producer-sizes", "tiny", "--producer-batch", "2", "--producer-steps", "2",
                 "--workers", "0", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| size | compute bound (samples/s) |" in table and "| tiny |" in table
    result = json.loads((tmp_path / "bench-producer.json").read_text())
    (row,) = result["rows"]
    assert row["size"] == "tiny" and row["steps"] == 2 and row["batch_size"] == 2
    for key in ("bound_samples_per_s", "train_samples_per_s", "ddp_samples_per_s"):
        assert row[key] > 0, key
    assert row["ratio_to_bound"] == row["train_samples_per_s"] / row["bound_samples_per_s"]
    assert row["ddp_scaling"] == row["ddp_samples_per_s"] / row["train_samples_per_s"]
    assert "DDP scaling" in (tmp_path / "bench-producer.md").read_text()
