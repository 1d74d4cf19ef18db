"""CUDA checks (`make gpu-check` runs them; skipped without a GPU): the runtime and the service in fp16
and bf16, a training step under autocast (fp16 with its GradScaler, bf16), and DDP over NCCL on one GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import post_vqa, random_image, serve, two_plan_vqa_store
from models.backbones.base import load_backbone
from models.das.plan import builtin_full_plan
from models.producer.runs import TrainConfig
from models.producer.train import train_plan
from models.producer.world.export import synthesize
from models.runtime import DASRuntime

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by `make gpu-check`)")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_runtime_in_low_precision_agrees_with_fp32(checkpoints, dtype):
    directory, _ = checkpoints["vqa"]
    reference = load_backbone(directory, device="cpu")
    low = load_backbone(directory, device="cuda", dtype=dtype)
    image = random_image(64, 64, seed=3)
    want = DASRuntime(reference).vqa(builtin_full_plan(reference, "vqa"), [image], ["what color is the circle"])[0]
    got = DASRuntime(low).vqa(builtin_full_plan(low, "vqa"), [image], ["what color is the circle"])[0]
    assert got.answers[0].answer == want.answers[0].answer
    assert abs(got.answers[0].score - want.answers[0].score) < 5e-2


def test_service_answers_in_fp16_on_cuda(tmp_path):
    backbone_dir, store, _ = two_plan_vqa_store(tmp_path)
    (store / "store.json").write_text(json.dumps({"loaded": {"vqa": ["skip1", "skip2"]}, "active": {"vqa": "skip1"}}))
    with serve(tmp_path, DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_DEVICE="cuda",
               DAS_DTYPE="float16", DAS_WORKERS="1") as client:
        response = post_vqa(client, random_image(64, 64), "what color is the circle")
        assert response.status_code == 200, response.text
        assert response.json()["answers"]


@pytest.fixture(scope="module")
def vqa_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-world")
    synthesize("vqa", root / "vqa", n=64, seed=0, image_size=64, progress=False)
    return root / "vqa"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_training_step_under_autocast_on_cuda(checkpoints, vqa_world, precision):
    backbone = load_backbone(checkpoints["vqa"][0], device="cuda")
    result = train_plan(backbone, "vqa", vqa_world, [1], TrainConfig(
        epochs=1, batch_size=8, max_train_examples=32, max_eval_examples=8, skip_bottleneck=8, parallel_bottleneck=4,
        precision=precision), progress=False)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert 0 <= result.metrics["vqa_score"] <= 1


_NCCL = r"""
import os, sys, torch, torch.distributed as dist
from models.backbones.base import load_backbone
from models.das.plan import Plan
from models.producer.engine import World, wrap_ddp
from models.producer.runs import TrainConfig
from models.producer.train import StepLoss, make_spec, task_data
from models.producer.data import StepBatches, loader
from models.runtime import DASRuntime
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="file://" + sys.argv[3], rank=0, world_size=1)
backbone = load_backbone(sys.argv[1], device="cuda")
config = TrainConfig(batch_size=4, skip_bottleneck=8, parallel_bottleneck=4)
data = task_data("vqa", DASRuntime(backbone), sys.argv[2], config)
spec = make_spec(backbone, data, "nccl", 1, [1], config)
modules = backbone.build_plan_modules(spec, init_from_backbone=True).to("cuda")
ddp = torch.nn.parallel.DistributedDataParallel(StepLoss(modules, data), find_unused_parameters=True)
dataset = data.dataset("train", 8)
batch = next(iter(loader(dataset, data.collate(), batch_sampler=StepBatches(len(dataset), 4, seed=0, stop=1))))
ddp(Plan(spec, modules), batch).mean().backward()
total = torch.ones(1, device="cuda"); dist.all_reduce(total)
assert total.item() == 1 and all(p.grad is None or torch.isfinite(p.grad).all() for p in modules.parameters())
dist.destroy_process_group()
print("nccl ddp ok")
"""


def test_ddp_over_nccl_on_one_gpu(checkpoints, vqa_world, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _NCCL, str(checkpoints["vqa"][0]), str(vqa_world), str(tmp_path / "pg")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "nccl ddp ok" in out.stdout, out.stderr[-4000:]


def test_torchrun_one_gpu_trains_on_cuda(checkpoints, vqa_world, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "1", "--no-python", sys.executable, "-m",
                          "models.cli.main", "train", "--backbone", str(checkpoints["vqa"][0]), "--task", "vqa",
                          "--data", str(vqa_world), "--skip", "1", "--epochs", "1", "--batch-size", "8",
                          "--max-train", "32", "--max-eval", "8", "--device", "cuda", "--precision", "bf16",
                          "--out", str(tmp_path / "plan")], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "plan" / "plan.json").is_file()
