"""The producer at real scale: bounded memory (Datasets decode on demand), device and precision,
resumable runs, data parallel under real torchrun (gloo on CPU), metrics with n and bootstrap
intervals, val-only selection, the remeasure command, and no README writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.backbones.base import load_backbone
from models.cli.main import main
from models.das.plan import validate_plan
from models.producer.data import StepBatches, TaskDataset, scenes_of
from models.producer.datasets import read_flickr30k
from models.producer.pipeline import choose_active
from models.producer.search import SearchConfig, das_search
from models.producer.stats import bootstrap_interval
from models.producer.runs import TrainConfig, TrainingStopped
from models.producer.train import train_plan
from models.producer.world.export import synthesize

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def world(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("scale-world")
    for seed, task in enumerate(("vqa", "nlvr2", "retrieval")):
        synthesize(task, root / task, n=64, seed=seed, image_size=64, progress=False)
    return root, load_backbone(checkpoints["retrieval"][0], device="cpu"), checkpoints["retrieval"][0]


def _env() -> dict[str, str]:
    # the clone first: the venv's editable install maps `models` to another checkout
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _small(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=1, batch_size=8, lr=1e-3, skip_bottleneck=8, parallel_bottleneck=4,
                                 max_train_examples=32, max_eval_examples=8), **overrides})


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def test_rank_shards_make_up_the_one_process_global_batch():
    one = StepBatches(50, 8, seed=3)
    two = [StepBatches(50, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(one.steps_per_epoch * 2 + 1):  # into the third epoch
        assert sorted(one.batch(step)) == sorted(two[0].batch(step) + two[1].batch(step))
        assert not set(two[0].batch(step)) & set(two[1].batch(step))
    assert list(StepBatches(50, 8, seed=3, start=4, stop=6)) == [one.batch(4), one.batch(5)]
    with pytest.raises(ValueError, match="multiple"):
        StepBatches(50, 8, seed=0, world_size=3)


def test_retrieval_negatives_are_a_function_of_seed_epoch_and_index(world):
    root, _, _ = world
    examples = read_flickr30k(root / "retrieval", "train").examples
    a = TaskDataset("retrieval", examples, seed=5, negatives=3, scenes=scenes_of(root / "retrieval"))
    b = TaskDataset("retrieval", examples, seed=5, negatives=3, scenes=scenes_of(root / "retrieval"))
    assert [a.candidates(1, i) for i in range(10)] == [b.candidates(1, i) for i in range(10)]
    assert [a.candidates(1, i) for i in range(10)] != [a.candidates(2, i) for i in range(10)]
    for i in range(10):
        positive, *negatives = a.candidates(0, i)
        assert positive in examples[i].captions and len(negatives) == 3
        assert not set(negatives) & set(examples[i].captions)


_RSS_SCRIPT = r"""
import json, resource, sys
from models.backbones.base import load_backbone
from models.producer.runs import TrainConfig
from models.producer.train import train_plan
backbone = load_backbone(sys.argv[1], device="cpu")
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
train_plan(backbone, "retrieval", sys.argv[2], [], TrainConfig(epochs=0.5, batch_size=4, skip_bottleneck=8,
           parallel_bottleneck=4, max_eval_examples=4), progress=False)  # warm up the allocator on a few steps
base = peak()
train_plan(backbone, "retrieval", sys.argv[2], [], TrainConfig(epochs=1, batch_size=4, skip_bottleneck=8,
           parallel_bottleneck=4, max_eval_examples=4), progress=False)
print(json.dumps({"growth_kib": peak() - base}))
"""


def _flickr(root: Path, n_train: int, side: int = 448) -> Path:
    """A Flickr30K-layout data set of ``n_train`` large JPEGs (small on disk, ~0.6 MB each decoded)."""
    (root / "flickr30k-images").mkdir(parents=True)
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    images = []
    for i in range(n_train + 8):
        pixels = np.stack([np.add.outer(ramp, ramp) // 2 + i % 50, np.tile(ramp, (side, 1)),
                           np.full((side, side), (37 * i) % 256, np.uint8)], axis=-1).astype(np.uint8)
        name = f"{i}.jpg"
        Image.fromarray(pixels).save(root / "flickr30k-images" / name, quality=70)
        split = "train" if i < n_train else ("val" if i < n_train + 4 else "test")
        images.append({"filename": name, "imgid": i, "split": split,
                       "sentences": [{"raw": f"a red circle {i % 7}"}, {"raw": "two blue squares"}]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    return root


def test_memory_does_not_grow_with_the_number_of_images(tmp_path, checkpoints):
    """Peak RSS growth over a training run on N images vs 4N: an image cache would grow by ~0.6 MB per
    image (~70 MB more for 4N); decoding on demand keeps it flat."""
    ckpt = checkpoints["retrieval"][0]
    growth = {}
    for n in (40, 160):
        data = _flickr(tmp_path / f"d{n}", n)
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(ckpt), str(data)], env=_env(),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        growth[n] = json.loads(out.stdout.strip().splitlines()[-1])["growth_kib"] / 1024
    assert growth[160] - growth[40] < 30, f"peak RSS growth (MiB) by number of images: {growth}"


def test_dataloader_workers_give_the_same_plan(world, tmp_path):
    root, backbone, _ = world
    a = train_plan(backbone, "nlvr2", root / "nlvr2", [1], _small(), progress=False, out_dir=tmp_path / "a")
    b = train_plan(backbone, "nlvr2", root / "nlvr2", [1], _small(workers=2), progress=False, out_dir=tmp_path / "b")
    assert a.losses == b.losses
    assert a.spec.weights_sha256 == b.spec.weights_sha256


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
def test_bf16_autocast_trains_on_cpu(world):
    root, backbone, _ = world
    result = train_plan(backbone, "vqa", root / "vqa", [1], _small(precision="bf16"), progress=False)
    assert all(np.isfinite(result.losses)) and 0 <= result.metrics["vqa_score"] <= 1


def test_fp16_is_refused_on_cpu_with_a_clear_error(world, tmp_path, capsys):
    root, _, ckpt = world
    code = main(["train", "--backbone", str(ckpt), "--task", "vqa", "--data", str(root / "vqa"), "--device", "cpu",
                 "--precision", "fp16", "--out", str(tmp_path / "p")])
    assert code == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------
# resumable
# ---------------------------------------------------------------------------------------------
def test_a_stopped_and_resumed_training_ends_where_an_uninterrupted_one_does(world, tmp_path):
    root, backbone, _ = world
    whole = train_plan(backbone, "retrieval", root / "retrieval", [2], _small(epochs=2), out_dir=tmp_path / "whole",
                       progress=False)
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(TrainingStopped):
        train_plan(backbone, "retrieval", root / "retrieval", [2],
                   _small(epochs=2, checkpoint_every=3, checkpoint_dir=ckpt, stop_after=5), progress=False)
    resumed = train_plan(backbone, "retrieval", root / "retrieval", [2],
                         _small(epochs=2, checkpoint_every=3, checkpoint_dir=ckpt, resume=True),
                         out_dir=tmp_path / "resumed", progress=False)
    assert len(resumed.losses) == len(whole.losses) == 8
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    a, b = load_file(str(tmp_path / "whole" / "weights.safetensors")), load_file(str(tmp_path / "resumed" / "weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_stopped_and_resumed_search_has_the_same_gates(world, tmp_path):
    root, backbone, _ = world

    def config(**run):
        return SearchConfig(skip_num=1, update_every=1, warmup_fraction=0.0, gate_lr=50.0, train=_small(epochs=2, **run))

    whole = das_search(backbone, "vqa", root / "vqa", config(), progress=False)
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(TrainingStopped):
        das_search(backbone, "vqa", root / "vqa", config(checkpoint_every=2, checkpoint_dir=ckpt, stop_after=3), progress=False)
    resumed = das_search(backbone, "vqa", root / "vqa", config(checkpoint_every=2, checkpoint_dir=ckpt, resume=True),
                         progress=False)
    assert any(abs(g) > 1e-6 for g in whole.gates)
    assert resumed.gates == pytest.approx(whole.gates, abs=1e-6)
    assert len(resumed.gate_log) == len(whole.gate_log)


def test_resume_refuses_a_checkpoint_of_another_run(world, tmp_path):
    from models.producer.engine import RunError

    root, backbone, _ = world
    ckpt = str(tmp_path / "ckpt")
    train_plan(backbone, "vqa", root / "vqa", [1], _small(checkpoint_every=2, checkpoint_dir=ckpt), progress=False)
    with pytest.raises(RunError, match="another run"):
        train_plan(backbone, "vqa", root / "vqa", [1], _small(lr=5e-3, checkpoint_dir=ckpt, resume=True), progress=False)


# ---------------------------------------------------------------------------------------------
# data parallel under real torchrun
# ---------------------------------------------------------------------------------------------
def _torchrun(args: list[str], tmp_path: Path) -> None:
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--no-python", sys.executable, "-m",
               "models.cli.main", *args]
    out = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])


COMMON = ["--epochs", "1", "--batch-size", "8", "--max-train", "32", "--max-eval", "8", "--lr", "1e-3",
          "--skip-bottleneck", "8", "--parallel-bottleneck", "4", "--device", "cpu"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_two_processes_train_the_same_plan_as_one(world, tmp_path, capsys):
    root, _, ckpt = world
    base = ["train", "--backbone", str(ckpt), "--task", "vqa", "--data", str(root / "vqa"), "--skip", "1", *COMMON]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    _torchrun([*base, "--out", str(tmp_path / "two")], tmp_path)
    a, b = load_file(str(tmp_path / "one" / "weights.safetensors")), load_file(str(tmp_path / "two" / "weights.safetensors"))
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert not (tmp_path / "two.ckpt").exists()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_two_processes_search_with_the_same_gates_as_one(world, tmp_path):
    root, _, ckpt = world
    base = ["search", "--backbone", str(ckpt), "--task", "nlvr2", "--data", str(root / "nlvr2"), "--skip-num", "1",
            "--update-every", "1", "--warmup", "0", *COMMON]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    _torchrun([*base, "--out", str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "search.json").read_text())
    two = json.loads((tmp_path / "two" / "search.json").read_text())
    assert any(abs(g) > 1e-6 for g in one["gates"])
    assert two["gates"] == pytest.approx(one["gates"], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# claims a user can trust
# ---------------------------------------------------------------------------------------------
def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_interval(values)
    assert (low, high) == tuple(bootstrap_interval(values))
    assert low < 0.3 < high and high - low < 0.25
    assert bootstrap_interval([]) == [0.0, 0.0]


def test_trained_plans_and_das_eval_report_split_n_and_intervals(world, tmp_path, capsys):
    root, backbone, ckpt = world
    spec = train_plan(backbone, "retrieval", root / "retrieval", [1], _small(), out_dir=tmp_path / "p", progress=False).spec
    metrics = spec.metrics
    assert metrics["eval_split"] == "val" and isinstance(metrics["ir_r1"], float)
    assert metrics["n"] == len(read_flickr30k(root / "retrieval", "val").examples[:8])  # the gallery
    low, high = metrics["intervals"]["ir_r1"]
    assert low <= metrics["ir_r1"] <= high
    from service.schemas import PlanMetrics  # the service still reads its known keys

    assert PlanMetrics.from_plan_json(metrics).ir_r1 == metrics["ir_r1"]
    assert main(["eval", str(tmp_path / "p"), "--data", str(root / "retrieval"), "--backbone", str(ckpt),
                 "--split", "val", "--max-eval", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(isinstance(result[k], float) for k in ("ir_r1", "tr_r1", "ir_r10"))
    assert result["n"] == metrics["n"] and result["intervals"]["tr_r1"] == metrics["intervals"]["tr_r1"]
    assert main(["eval", str(tmp_path / "p"), "--data", str(root / "retrieval"), "--backbone", str(ckpt),
                 "--split", "val", "--max-eval", "8"]) == 0
    text = capsys.readouterr().out
    assert "95% CI [" in text and "gallery size" in text


def test_selection_uses_val_never_test():
    def entry(val, test, flops):
        return {"vqa_score": test, "flops_reduced": flops, "val": {"vqa_score": val, "eval_split": "val"}}

    plans = {"adapters": entry(0.50, 0.50, 10), "skip2": entry(0.40, 0.60, 5), "skip4": entry(0.49, 0.30, 3)}
    assert choose_active("vqa", plans) == "skip4"  # by test it would be skip2


def test_remeasure_rewrites_metrics_not_weights_and_no_readme(tmp_path, capsys):
    out, work = tmp_path / "plans", tmp_path / "work"
    assert main(["pipeline", "--quick", "--quiet", "--out", str(out), "--work", str(work)]) == 0
    before = {p: json.loads(p.read_text()) for p in out.glob("*/*/plan.json")}
    for path, plan in before.items():  # as shipped before: no n, no intervals
        plan["metrics"] = {k: v for k, v in plan["metrics"].items() if k not in ("n", "intervals")}
        path.write_text(json.dumps(plan))
    readme = (REPO / "README.md").read_text()
    capsys.readouterr()
    assert main(["pipeline", "--quick", "--quiet", "--remeasure", "--out", str(out), "--work", str(tmp_path / "w2")]) == 0
    assert "score (val)" in capsys.readouterr().out
    backbone = load_backbone(out / "backbone", device="cpu")
    for path, plan in before.items():
        after = json.loads(path.read_text())
        assert after["weights_sha256"] == plan["weights_sha256"] and after["version"] == plan["version"]
        assert after["metrics"]["eval_split"] == "val" and after["metrics"]["n"] > 0 and after["metrics"]["intervals"]
        validate_plan(path.parent, backbone)
    report = json.loads((out / "pipeline-report.json").read_text())
    state = json.loads((out / "store.json").read_text())
    for task, task_report in report["tasks"].items():
        assert state["active"][task] == choose_active(task, task_report["plans"])
    results = (out / "RESULTS.md").read_text()
    assert "score (val)" in results and "score (test)" in results and "--remeasure" in results
    assert (REPO / "README.md").read_text() == readme


def test_the_pipeline_never_writes_readme():
    from models.cli.main import build_parser
    import models.producer.report as report

    with pytest.raises(SystemExit):
        build_parser().parse_args(["pipeline", "--update-readme"])
    assert not hasattr(report, "update_readme") and "README" not in Path(report.__file__).read_text().replace(
        "Nothing here writes README.md", "").replace("never README.md", "")
    assert "--update-readme" not in (REPO / "Makefile").read_text()


PRETRAIN = ["--epochs", "1", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--image-size", "32",
            "--batch-size", "8", "--device", "cpu"]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_pretrain_under_torchrun_matches_one_process_and_resumes(world, tmp_path):
    root, _, _ = world
    base = ["pretrain", "--data", str(root / "retrieval"), *PRETRAIN]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    _torchrun([*base, "--out", str(tmp_path / "two")], tmp_path)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert set(one) == set(two)
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-4
    load_backbone(tmp_path / "two", device="cpu")  # a loadable checkpoint, written by rank 0

    from models.producer.pretrain import PretrainConfig, pretrain_backbone

    config = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128, image_size=32, batch_size=8,
                  epochs=1, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(TrainingStopped):
        pretrain_backbone(root / "retrieval", tmp_path / "stopped", PretrainConfig(**config, stop_after=3), progress=False)
    pretrain_backbone(root / "retrieval", tmp_path / "resumed", PretrainConfig(**config, resume=True), progress=False)
    resumed = _weights(tmp_path / "resumed")
    assert max((one[k] - resumed[k]).abs().max().item() for k in one) <= 1e-6


def test_das_pretrain_goes_on_from_a_backbone_with_patch_shapes(world, tmp_path, capsys):
    """`das pretrain --init-from DIR --patch-shape-weight W --patch-color-weight W`: starts from DIR's weights
    and vocabulary (not random ones) and learns patch shapes and colours from the synthetic scenes; a
    backbone of other sizes is refused."""
    root, _, _ = world
    base = ["pretrain", "--data", str(root / "retrieval"), *PRETRAIN]
    assert main([*base, "--out", str(tmp_path / "first")]) == 0
    capsys.readouterr()
    assert main([*base, "--epochs", "0.5", "--init-from", str(tmp_path / "first"), "--patch-shape-weight", "1",
                 "--patch-color-weight", "0.5", "--out", str(tmp_path / "second")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["patch_accuracy"] <= 1 and summary["patch_loss"] > 0
    # six colours: a fresh head starts near log(6) = 1.79 and a short run does not leave that range
    assert 0 <= summary["patch_color_accuracy"] <= 1 and 0.3 < summary["patch_color_loss"] < 3
    assert len(summary["curve"]["patch_color_accuracy"]) == len(summary["curve"]["step"])
    first, second = load_backbone(tmp_path / "first", device="cpu"), load_backbone(tmp_path / "second", device="cpu")
    assert first.processor.tokenizer.get_vocab() == second.processor.tokenizer.get_vocab()
    # one short stage from the first backbone moves its weights a little, unlike a fresh random start
    a, b = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    drift = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < drift < 0.2
    assert main([*base, "--hidden-size", "64", "--init-from", str(tmp_path / "first"), "--out", str(tmp_path / "bad")]) == 2
    assert "init_from" in capsys.readouterr().err and not (tmp_path / "bad" / "config.json").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
def test_das_pipeline_refuses_pretrain_epochs_that_are_no_amount(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["pipeline", "--quick", "--pretrain-epochs", value, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and "expected a positive number" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_a_killed_das_train_resumes_to_the_uninterrupted_plan(world, tmp_path):
    """A real SIGKILL of `das train` after its first checkpoint, then `--resume`: the same plan weights
    as a run never interrupted."""
    import signal
    import time

    root, _, ckpt = world
    base = [sys.executable, "-m", "models.cli.main", "train", "--backbone", str(ckpt), "--task", "nlvr2",
            "--data", str(root / "nlvr2"), "--skip", "1", "--epochs", "12", "--batch-size", "4", "--max-train", "32",
            "--max-eval", "4", "--lr", "1e-3", "--skip-bottleneck", "8", "--parallel-bottleneck", "4",
            "--device", "cpu", "--checkpoint-every", "2"]
    killed = subprocess.Popen([*base, "--out", str(tmp_path / "killed")], env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed.ckpt" / "last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert checkpoint.exists() and not (tmp_path / "killed" / "plan.json").exists(), "killed before the end"
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 2 <= step < 96
    done = subprocess.run([*base, "--out", str(tmp_path / "killed"), "--resume"], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = subprocess.run([*base[:-2], "--out", str(tmp_path / "whole")], env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = load_file(str(tmp_path / "whole" / "weights.safetensors")), load_file(str(tmp_path / "killed" / "weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
