"""`das bench --producer`: how fast does `das train` train, against what the model allows?

For each size (``embedded``: the shipped backbone at 96 px; ``base``: a randomly initialised ViLT-B/32,
384 px, 3129 answers; ``tiny``: a 12-layer hidden-256 ViLT for smoke runs) it writes a VQAv2-layout data
set of random images and questions, then measures, in the same run:

* the compute bound: the same plan (two skipped layers, skip and parallel adapters, own head) doing
  forward + backward + AdamW step on one pre-made, pre-processed batch on the device, in one process;
* ``das train`` in one process (``--workers`` DataLoader workers decode and preprocess);
* ``das train`` under ``torchrun --nproc-per-node 2`` (DDP; gloo on CPU, NCCL on CUDA), same global batch.

Throughput is global training samples per second, as ``das train`` reports it (from the end of its
first step to the end of its last: data loading included, the first step's warm-up and the final
evaluation not). Target: one process >= 0.85 of the bound. The DDP row's scaling (2 processes over 1)
is reported as measured: on a CPU host both processes share the same cores (torchrun gives each one
thread unless OMP_NUM_THREADS says otherwise), so it can be below 1. A measurement, not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import models
from models.backbones.base import resolve_device
from models.bench.fixtures import EMBEDDED_DIR, WORDS, build_backbone, log
from models.bench.timing import machine_info
from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec
from models.producer.world.language import world_vocabulary  # the embedded default's words
from models.runtime import DASRuntime

TARGET = 0.85
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SIZES = ("embedded", "base", "tiny")
IMAGE_SIDE = {"embedded": 96, "base": 384, "tiny": 128}


@dataclass
class ProducerBenchOptions:
    sizes: tuple[str, ...] = ("embedded", "base")
    batch_size: int = 8  # the global batch
    steps: int | None = None  # timed steps per measurement (None: 30, or 6 with short)
    short: bool = False
    ddp: bool = True
    workers: int = 2
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None


def _repo_root() -> Path:
    return Path(models.__file__).resolve().parent.parent


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(_repo_root())] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def write_vqa_data(root: Path, examples: int, side: int, words: list[str], answers: list[str], seed: int = 0) -> Path:
    """A VQAv2-layout data set (train, val) of random images and questions: what `das train` reads."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "answer_vocab.txt").write_text("\n".join(answers) + "\n")
    for split, sub, count in (("train", "train2014", examples), ("val", "val2014", 8)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(
                root / sub / f"COCO_{sub}_{i:012d}.jpg", quality=90)
            text = " ".join(rng.choice(words, size=6)) + "?"
            answer = answers[int(rng.integers(len(answers)))]
            questions.append({"question_id": i, "image_id": i, "question": text})
            annotations.append({"question_id": i, "image_id": i, "answers": [{"answer": answer}] * 10,
                                "multiple_choice_answer": answer})
        (root / f"v2_OpenEnded_mscoco_{sub}_questions.json").write_text(json.dumps({"questions": questions}))
        (root / f"v2_mscoco_{sub}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return root


def _skips(num_layers: int) -> list[int]:
    return [num_layers // 3, 2 * num_layers // 3]


def compute_bound(backbone, answers: list[str], batch_size: int, steps: int, precision: str, side: int,
                  words: list[str], skip_bottleneck: int, parallel_bottleneck: int) -> float:
    """Samples/s of forward + backward + AdamW on one pre-made batch (no data loading at all)."""
    spec = PlanSpec(task="vqa", name="bound", version=1, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
                    skipped_layers=tuple(_skips(backbone.num_layers)),
                    adapters=AdapterShapes(skip_bottleneck, parallel_bottleneck), own_head=True, labels=tuple(answers),
                    own_parts=("pooler",))
    torch.manual_seed(0)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True).to(backbone.device).train()
    plan = Plan(spec, modules)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)) for _ in range(batch_size)]
    texts = [" ".join(rng.choice(words, size=6)) + "?" for _ in range(batch_size)]
    batch = backbone.preprocess(images, texts).to(backbone.device, backbone.dtype)
    targets = torch.zeros(batch_size, len(answers), device=backbone.device)
    targets[:, 0] = 1.0
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-4)
    runtime = DASRuntime(backbone)
    autocast = (torch.autocast(backbone.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else None)
    scaler = torch.amp.GradScaler(backbone.device.type, enabled=precision == "fp16")
    marks = []
    for _ in range(steps + 1):  # the first one warms up
        if autocast is not None:
            with autocast:
                logits = runtime.vqa_logits(plan, batch).float()
        else:
            logits = runtime.vqa_logits(plan, batch).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # synchronises
        marks.append(time.perf_counter())
    return steps * batch_size / (marks[-1] - marks[0])


def run_das_train(backbone_dir: Path, data: Path, steps: int, batch_size: int, device: str, precision: str,
                  workers: int, nproc: int, threads: int | None, out: Path) -> dict[str, Any]:
    """`das train` (under torchrun when ``nproc`` > 1) for ``steps + 1`` steps; its reported throughput."""
    command = [sys.executable, "-m", "models.cli.main"]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   "--no-python", *command]
    command += ["train", "--backbone", str(backbone_dir), "--task", "vqa", "--data", str(data),
                "--skip", ",".join(map(str, _skips(_num_layers(backbone_dir)))), "--epochs", "1",
                "--batch-size", str(batch_size), "--max-train", str((steps + 1) * batch_size), "--max-eval", "8",
                "--device", device, "--precision", precision, "--workers", str(workers), "--out", str(out)]
    done = subprocess.run(command, env=_env(threads), capture_output=True, text=True, cwd=_repo_root())
    if done.returncode != 0:
        raise RuntimeError(f"das train failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return report["throughput"]


def _num_layers(backbone_dir: Path) -> int:
    config = json.loads((backbone_dir / "config.json").read_text())
    return int(config.get("num_hidden_layers", 12))


def run_producer_bench(options: ProducerBenchOptions) -> dict[str, Any]:
    device = resolve_device(options.device)
    precision = PRECISION_OF_DTYPE[options.dtype]
    if precision == "fp16" and device.type != "cuda":
        log("note: fp16 training needs CUDA; the producer row runs in fp32 on CPU")
        precision = "fp32"
    if options.threads:
        torch.set_num_threads(options.threads)
    steps = options.steps or (6 if options.short else 30)
    rows = []
    with tempfile.TemporaryDirectory(prefix="das-bench-producer-") as tmp:
        for size in options.sizes:
            work = Path(tmp) / size
            work.mkdir()
            if size == "embedded":
                backbone_dir = EMBEDDED_DIR / "backbone"
                backbone = build_backbone("embedded", device, torch.float32, work)
                words = [w for w in world_vocabulary() if " " not in w][:200]
            else:
                backbone_dir = work / "backbone"
                backbone = build_backbone(size, device, torch.float32, backbone_dir)
                words = list(WORDS)
            hidden = backbone.config.hidden_size
            skip_bottleneck, parallel_bottleneck = 64, 16  # das train's defaults
            answers = [f"answer{i}" for i in range(3129 if size == "base" else 64)]
            side = IMAGE_SIDE[size]
            data = write_vqa_data(work / "data", (steps + 1) * options.batch_size, side, words, answers)
            log(f"producer bench {size}: hidden {hidden}, {backbone.num_layers} layers, {side} px, "
                f"batch {options.batch_size}, {steps} timed steps, {precision} on {device}")
            bound = compute_bound(backbone, answers, options.batch_size, steps, precision, side, words,
                                  skip_bottleneck, parallel_bottleneck)
            del backbone
            device_name = "cuda" if device.type == "cuda" else "cpu"
            single = run_das_train(backbone_dir, data, steps, options.batch_size, device_name, precision,
                                   options.workers, 1, options.threads, work / "plan-1")
            row = {"size": size, "bound_samples_per_s": bound, "train_samples_per_s": single["samples_per_s"],
                   "ratio_to_bound": single["samples_per_s"] / bound if bound else None, "target": TARGET,
                   "steps": steps, "batch_size": options.batch_size, "precision": precision, "workers": options.workers}
            if options.ddp:
                ddp_device = device_name
                if device.type == "cuda" and torch.cuda.device_count() < 2:
                    log("note: one GPU: the 2-process DDP row shares it")
                ddp = run_das_train(backbone_dir, data, steps, options.batch_size, ddp_device, precision,
                                    options.workers, 2, options.threads, work / "plan-2")
                row.update(ddp_samples_per_s=ddp["samples_per_s"],
                           ddp_scaling=ddp["samples_per_s"] / single["samples_per_s"] if single["samples_per_s"] else None)
            rows.append(row)
    return {"kind": "producer", "rows": rows, "settings": asdict(options) | {"steps": steps, "precision": precision},
            "machine": machine_info(device)}


def producer_table(result: dict[str, Any]) -> str:
    lines = ["| size | compute bound (samples/s) | das train, 1 process | vs bound | target | "
             "das train, 2-process DDP | DDP scaling (2 vs 1) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = r["ratio_to_bound"]
        verdict = "PASS" if ratio is not None and ratio >= r["target"] else "MISS"
        ddp = f"{r['ddp_samples_per_s']:.2f}" if "ddp_samples_per_s" in r else "-"
        scaling = f"{r['ddp_scaling']:.2f}x" if r.get("ddp_scaling") is not None else "-"
        lines.append(f"| {r['size']} | {r['bound_samples_per_s']:.2f} | {r['train_samples_per_s']:.2f} | "
                     f"{ratio:.2f} | >= {r['target']:.2f} {verdict} | {ddp} | {scaling} |")
    s = result["settings"]
    lines += ["", f"Global batch {s['batch_size']}, {s['steps']} timed steps, {s['precision']}, {s['workers']} "
                  f"DataLoader workers per process, device {result['machine'].get('device', '?')}. The bound: the same "
                  "plan's forward + backward + AdamW on one pre-made batch, one process. DDP scaling is as measured "
                  "(on a CPU host both processes share the cores)."]
    return "\n".join(lines)


def write_producer_outputs(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-producer.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench-producer.md").write_text("# Producer throughput (`das bench --producer`)\n\n" + producer_table(result) + "\n")
    return out / "bench-producer.json", out / "bench-producer.md"
