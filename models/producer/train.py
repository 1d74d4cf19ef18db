"""Adapter training and evaluation for DAS plans, the backbone frozen.

One training loop for every task: a :class:`TaskData` object per task turns dataset examples into
model inputs, a loss and evaluation metrics (VQA ``vqa_score``; NLVR2 ``accuracy``; retrieval
``ir_r1/5/10`` and ``tr_r1/5/10``, fractions in 0-1). The forward pass is the serving runtime's own
(``DASRuntime.*_logits``), so what is trained is exactly what is served.

Data come from ``torch.utils.data`` Datasets decoding on demand (``models/producer/data.py``; with
``TrainConfig.workers`` worker processes decode and preprocess); a run may be one process or several
under torchrun (DDP), in fp32, bf16 or fp16, and resumable from checkpoints (``models/producer/engine.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models.backbones.base import Backbone
from models.das.adapters import PlanModules
from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec, save_plan
from models.producer.data import Collate, RetrievalRows, StepBatches, TaskBatch, TaskDataset, loader, scenes_of
from models.producer.datasets import read_task
from models.producer.engine import (RunError, World, all_reduce_sum, autocast, check_precision, check_resumable,
                                    grad_scaler, init_world, load_checkpoint, rng_state, save_checkpoint,
                                    set_rng_state, wrap_ddp)
from models.producer.runs import (Evaluation, TrainConfig, TrainingStopped, TrainResult, question_type_groups,
                                  total_steps)
from models.producer.stats import bootstrap_interval
from models.producer.world.language import true_pairs
from models.runtime import DASRuntime

REFERENCE_TEXT_LEN = 16
RETRIEVAL_EVAL_IMAGES = 100


def retrieval_gallery_size(limit: int | None) -> int:
    """How many of a split's first images (with their first captions) a retrieval evaluation ranks."""
    return min(limit or RETRIEVAL_EVAL_IMAGES, RETRIEVAL_EVAL_IMAGES)


def retrieval_gallery_scenes(examples: Sequence[Any], scenes: dict[Path, Any]) -> list[Any] | None:
    """The recorded scene of each gallery image (``scenes_of``), or None unless every one is recorded."""
    found = [scenes.get(e.image_path.resolve()) for e in examples]
    return found if found and all(found) else None


def true_match_hits(scores: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption query (IR) and per image query (TR): is the top-scored match a true pair? ``scores`` and
    ``truth`` are [image, caption]; ties go to the lower index."""
    images, captions = torch.arange(truth.shape[0]), torch.arange(truth.shape[1])
    return truth[scores.argmax(dim=0), captions], truth[images, scores.argmax(dim=1)]


# ---------------------------------------------------------------------------------------------
# Per-task data, loss and metrics
# ---------------------------------------------------------------------------------------------
class TaskData:
    """What differs between tasks; the training loop is shared. Holds the split's example records
    (light), never decoded images: :meth:`dataset` gives a ``torch.utils.data`` Dataset that decodes
    on demand (see ``models/producer/data.py``)."""

    task: str

    def __init__(self, runtime: DASRuntime, data_dir: Path, config: TrainConfig) -> None:
        self.runtime = runtime
        self.backbone: Backbone = runtime.backbone
        self.data_dir = Path(data_dir)
        self.config = config
        self._splits: dict[str, Any] = {}
        self._scenes: dict[Path, Any] | None = None

    def split(self, name: str):
        if name not in self._splits:
            self._splits[name] = read_task(self.task, self.data_dir, name)
        return self._splits[name]

    def examples(self, name: str, limit: int | None) -> list:
        examples = list(self.split(name).examples)
        return examples[:limit] if limit else examples

    def scenes(self) -> dict[Path, Any]:
        if self._scenes is None:
            self._scenes = scenes_of(self.data_dir)
        return self._scenes

    def dataset(self, split: str, limit: int | None = None, seed: int | None = None) -> TaskDataset:
        """The training-style Dataset of ``split`` (VQA targets over the plan's labels, i.e. the train
        split's answer vocabulary; retrieval: negatives drawn from ``seed``, default the run's)."""
        labels = self.plan_fields()["labels"] if self.task == "vqa" else None
        return TaskDataset(self.task, self.examples(split, limit), labels=labels,
                           seed=self.config.seed if seed is None else seed,
                           negatives=self.config.retrieval_negatives,
                           scenes=self.scenes() if self.task == "retrieval" else None)

    def collate(self) -> Collate:
        return Collate(self.backbone.preprocess, self.task)

    def _on_device(self, batch: TaskBatch) -> list:
        return [b.to(self.backbone.device, self.backbone.dtype) for b in batch.inputs]

    # what the plan carries for this task
    def plan_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def losses(self, plan: Plan, batch: TaskBatch) -> torch.Tensor:
        """The loss of every example of the batch (fp32); a step's loss is their sum over the global batch
        divided by its size."""
        raise NotImplementedError

    def evaluate(self, plan: Plan, split: str, limit: int | None = None, progress: bool = False) -> Evaluation:
        raise NotImplementedError

    def _loader(self, dataset, batch_size: int):
        return loader(dataset, self.collate(), workers=self.config.workers, batch_size=batch_size,
                      pin_memory=self.backbone.device.type == "cuda")

    def _mean_flops(self, plan: Plan, batches: Sequence, index: int) -> tuple[int, int]:
        report = self.backbone.flops(plan.task, plan.spec, batches[0].text_lengths[index], [b.patch_grids[index] for b in batches])
        return report.full, report.executed

    def _autocast(self):
        return autocast(self.backbone.device, self.config.precision)


class VQATaskData(TaskData):
    task = "vqa"

    def plan_fields(self) -> dict[str, Any]:
        return {"own_head": True, "labels": tuple(self.split("train").answer_vocab), "own_parts": ("pooler",)}

    def losses(self, plan: Plan, batch: TaskBatch) -> torch.Tensor:
        (inputs,) = self._on_device(batch)
        logits = self.runtime.vqa_logits(plan, inputs).float()
        targets = batch.targets.to(logits.device)
        # ViLT's VQA loss: BCE summed over answers (mean over the batch)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)

    @torch.no_grad()
    def evaluate(self, plan, split, limit=None, progress=False):
        examples = self.examples(split, limit)
        labels = self.runtime.labels(plan)
        scores, types, flops_full, flops_exec = [], [], 0, 0
        dataset = TaskDataset("vqa", examples, labels=labels)
        for batch in tqdm(self._loader(dataset, 64), desc=f"eval vqa/{split}", disable=not progress, leave=False):
            (inputs,) = self._on_device(batch)
            with self._autocast():
                best = self.runtime.vqa_logits(plan, inputs).argmax(dim=-1).tolist()
            for i, (index, answer) in enumerate(zip(batch.indices, best)):
                scores.append(examples[index].answer_scores.get(labels[answer], 0.0))
                types.append(examples[index].question_type)
                full, executed = self._mean_flops(plan, batch.inputs, i)
                flops_full, flops_exec = flops_full + full, flops_exec + executed
        n = max(1, len(scores))
        return Evaluation({"vqa_score": sum(scores) / n}, len(scores), {"vqa_score": bootstrap_interval(scores)},
                          (flops_full / n, flops_exec / n), question_type_groups(types, scores))


class NLVR2TaskData(TaskData):
    task = "nlvr2"

    def plan_fields(self) -> dict[str, Any]:
        return {"own_head": True, "labels": ("False", "True"), "own_parts": ("pooler", "token_type_embeddings")}

    def _logits(self, plan: Plan, batch: TaskBatch) -> torch.Tensor:
        left, right = self._on_device(batch)
        return self.runtime.nlvr2_logits(plan, left, right).float()

    def losses(self, plan: Plan, batch: TaskBatch) -> torch.Tensor:
        logits = self._logits(plan, batch)
        true_index = [label.lower() for label in self.runtime.labels(plan)].index("true")
        targets = batch.targets.to(logits.device)
        targets = targets if true_index == 1 else 1 - targets
        return F.cross_entropy(logits, targets, reduction="none")

    @torch.no_grad()
    def evaluate(self, plan, split, limit=None, progress=False):
        examples = self.examples(split, limit)
        true_index = [label.lower() for label in self.runtime.labels(plan)].index("true")
        correct, flops_full, flops_exec = [], 0, 0
        dataset = TaskDataset("nlvr2", examples)
        for batch in tqdm(self._loader(dataset, 64), desc=f"eval nlvr2/{split}", disable=not progress, leave=False):
            with self._autocast():
                predictions = (self._logits(plan, batch).argmax(dim=-1) == true_index).tolist()
            for i, (index, predicted) in enumerate(zip(batch.indices, predictions)):
                correct.append(float(predicted == examples[index].label))
                full, executed = self._mean_flops(plan, batch.inputs, i)
                flops_full, flops_exec = flops_full + full, flops_exec + executed
        n = max(1, len(correct))
        return Evaluation({"accuracy": sum(correct) / n}, len(correct), {"accuracy": bootstrap_interval(correct)},
                          (flops_full / n, flops_exec / n))


class RetrievalTaskData(TaskData):
    """Image-text matching: each positive pair is scored against negatives (a hard negative where the
    data set records scenes, then other images' captions), cross-entropy over the candidates, as ViLT
    fine-tunes retrieval. The Dataset draws the candidates from (seed, epoch, index)."""

    task = "retrieval"

    def plan_fields(self) -> dict[str, Any]:
        return {"own_head": True, "labels": None, "own_parts": ("pooler",)}

    def losses(self, plan: Plan, batch: TaskBatch) -> torch.Tensor:
        (inputs,) = self._on_device(batch)
        scores = self.runtime.retrieval_logits(plan, inputs).float().view(len(batch), batch.group)
        return F.cross_entropy(scores, torch.zeros(len(batch), dtype=torch.long, device=scores.device), reduction="none")

    @torch.no_grad()
    def evaluate(self, plan, split, limit=None, progress=False):
        """Recall@1/5/10 over the first N images of the split (N <= RETRIEVAL_EVAL_IMAGES, since every
        image is scored against every caption) and their first captions; ``n`` is the gallery size. Where the
        data set records scenes, also ir_true_r1 and tr_true_r1: the top match is any true one, not only the
        pair the caption was written for."""
        examples = self.examples(split, retrieval_gallery_size(limit))
        n = len(examples)
        scores = torch.empty(n, n)  # [image, caption]
        flops_full, flops_exec, pairs = 0, 0, 0
        rows = self._loader(RetrievalRows(examples), 1)
        for batch in tqdm(rows, total=n, desc=f"eval retrieval/{split}", disable=not progress, leave=False):
            (i,) = batch.indices
            (inputs,) = self._on_device(batch)
            with self._autocast():
                scores[i] = self.runtime.retrieval_logits(plan, inputs).float().cpu()
            if i == 0 or i == n - 1:  # FLOPs per pair depend only on text length and image grid
                for j in range(n):
                    full, executed = self._mean_flops(plan, batch.inputs, j)
                    flops_full, flops_exec, pairs = flops_full + full, flops_exec + executed, pairs + 1
        target = torch.arange(n)
        metrics, intervals = {}, {}
        for k in (1, 5, 10):
            ir_hits = (scores.t().topk(min(k, n), dim=1).indices == target[:, None]).any(dim=1).float()  # caption queries
            tr_hits = (scores.topk(min(k, n), dim=1).indices == target[:, None]).any(dim=1).float()  # image queries
            for key, hits in ((f"ir_r{k}", ir_hits), (f"tr_r{k}", tr_hits)):
                metrics[key] = hits.mean().item() if n else 0.0
                intervals[key] = bootstrap_interval(hits.tolist())
        if gallery_scenes := retrieval_gallery_scenes(examples, self.scenes()):
            # synthetic captions can be true of several images: also count a top match that is any true one
            truth = torch.tensor(true_pairs([e.captions[0] for e in examples], gallery_scenes))
            for key, hits in zip(("ir_true_r1", "tr_true_r1"), true_match_hits(scores, truth)):
                metrics[key] = hits.float().mean().item()
                intervals[key] = bootstrap_interval(hits.float().tolist())
        return Evaluation(metrics, n, intervals, (flops_full / max(1, pairs), flops_exec / max(1, pairs)))


TASK_DATA: dict[str, type[TaskData]] = {"vqa": VQATaskData, "nlvr2": NLVR2TaskData, "retrieval": RetrievalTaskData}


def task_data(task: str, runtime: DASRuntime, data_dir: str | Path, config: TrainConfig) -> TaskData:
    if task not in TASK_DATA:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASK_DATA)})")
    return TASK_DATA[task](runtime, Path(data_dir), config)


# ---------------------------------------------------------------------------------------------
# The shared loop
# ---------------------------------------------------------------------------------------------
class StepLoss(nn.Module):
    """The trainable parts and the task's loss as one module, so that DistributedDataParallel can wrap
    it (the frozen backbone is not a sub-module: DDP neither broadcasts nor synchronises it)."""

    def __init__(self, trainable: nn.Module, data: TaskData) -> None:
        super().__init__()
        self.trainable = trainable
        self.data = data

    def forward(self, plan: Plan, batch: TaskBatch) -> torch.Tensor:
        return self.data.losses(plan, batch)


def one_cycle(optimizer, lr: float, total: int):
    """OneCycleLR warming up over 10% of the steps (at least 2: torch's schedule divides by zero below
    that); a constant rate for runs of fewer than 4 steps."""
    if total < 4:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=max(0.1, 2 / total))


def run_training(
    data: TaskData,
    trainable: PlanModules,
    plan_for_step: Callable[[int], Plan],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    world: World | None = None,
    state: Callable[[], dict[str, Any]] | None = None,
    load_state: Callable[[dict[str, Any]], None] | None = None,
    timing: dict[str, float] | None = None,
) -> list[float]:
    """AdamW over ``trainable``; ``plan_for_step(step)`` gives the plan to run at each step (fixed
    for training, sampled for search). Returns the loss per step (the global batch's mean).

    Distributed (``world``): DDP over the trainable parts; every rank reads its shard of each global
    batch of ``config.batch_size`` examples; the per-rank loss is the sum over its examples divided by
    the global batch size times the world size, so DDP's gradient average is the one-process gradient.
    ``state``/``load_state`` add the caller's own state (the search's gates) to checkpoints.
    ``timing``, when given, receives the throughput: global samples per second from the end of the
    first step to the end of the last (data loading included; the first step's warm-up not)."""
    world = world or World()
    device = data.backbone.device
    check_precision(config.precision, device)
    torch.manual_seed(config.seed)
    dataset = data.dataset("train", config.max_train_examples)
    total = total_steps(len(dataset), config)
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = one_cycle(optimizer, config.lr, total)
    scaler = grad_scaler(device, config.precision)
    run = {"task": data.task, "examples": len(dataset), "batch_size": config.batch_size, "total_steps": total,
           "seed": config.seed, "lr": config.lr, "precision": config.precision}
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if (config.checkpoint_every or config.resume) and checkpoint_dir is None:
        raise RunError("checkpoints need a checkpoint directory (checkpoint_dir)")
    start, losses = 0, []
    if config.resume:
        saved = load_checkpoint(checkpoint_dir, device)
        if saved is not None:
            check_resumable(saved, run, checkpoint_dir)
            trainable.load_state_dict(saved["trainable"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
            set_rng_state(saved["rng"])
            if load_state is not None:
                load_state(saved["extra"])
            start, losses = saved["step"], list(saved["losses"])

    def checkpoint(step: int) -> None:
        save_checkpoint(checkpoint_dir, {
            "run": run, "step": step, "losses": losses, "trainable": trainable.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state(), "extra": state() if state is not None else {},
        }, world)

    model = wrap_ddp(StepLoss(trainable, data), world)
    order = StepBatches(len(dataset), config.batch_size, seed=config.seed, rank=world.rank,
                        world_size=world.world_size, start=start, stop=total)
    batches = loader(dataset, data.collate(), workers=config.workers, batch_sampler=order,
                     pin_memory=device.type == "cuda")
    trainable.train()
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress or not world.is_main, leave=False)
    scale = world.world_size / config.batch_size
    clock: list[float] = []
    for step, batch in enumerate(batches, start):
        step_plan = plan_for_step(step)
        with autocast(device, config.precision):
            per_example = model(step_plan, batch)
        loss = per_example.sum() * scale
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        mean = all_reduce_sum(per_example.detach().sum().reshape(1), world) / config.batch_size
        losses.append(mean.item())
        if on_step is not None:
            on_step(step, losses[-1])
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if timing is not None:  # .item() above has synchronised the device
            clock.append(time.perf_counter())
        done = step + 1
        if checkpoint_dir is not None and config.checkpoint_every and (done % config.checkpoint_every == 0 or done == total):
            checkpoint(done)
        if config.stop_after is not None and done >= config.stop_after and done < total:
            bar.close()
            raise TrainingStopped(f"stopped after {done} of {total} steps (stop_after)")
    bar.close()
    if timing is not None and len(clock) > 1:
        seconds = clock[-1] - clock[0]
        timing.update(steps=len(clock) - 1, seconds=seconds, global_batch=config.batch_size,
                      samples_per_s=(len(clock) - 1) * config.batch_size / seconds if seconds > 0 else 0.0,
                      world_size=world.world_size, precision=config.precision, workers=config.workers)
    trainable.eval()
    return losses


def make_spec(backbone: Backbone, data: TaskData, name: str, version: int, skipped: Sequence[int], config: TrainConfig) -> PlanSpec:
    return PlanSpec(
        task=data.task, name=name, version=version, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
        skipped_layers=tuple(sorted(skipped)),
        adapters=AdapterShapes(config.skip_bottleneck if skipped else None, config.parallel_bottleneck),
        **data.plan_fields(),
    )


def reference_flops(backbone: Backbone, spec: PlanSpec) -> dict[str, Any]:
    size = backbone.config.image_size
    report = backbone.flops_at(spec.task, spec, REFERENCE_TEXT_LEN, size)
    return {"reference_input": {"text_len": REFERENCE_TEXT_LEN, "image_size": size},
            "flops_full": report.full, "flops_reduced": report.executed}


def train_plan(
    backbone: Backbone,
    task: str,
    data_dir: str | Path,
    skipped: Sequence[int],
    config: TrainConfig,
    out_dir: str | Path | None = None,
    name: str = "plan",
    version: int = 1,
    eval_split: str = "val",
    progress: bool = True,
) -> TrainResult:
    """Train one plan with a fixed skip set; evaluate it; write it (if ``out_dir``) with metrics.
    Under torchrun every rank trains its shard; rank 0 alone evaluates and writes the plan (the other
    ranks' results have no metrics). A generative backbone trains through
    ``models/producer/generative_plans.py`` (one process)."""
    if config.train_mma_adapters and "mma_adapters" not in getattr(backbone, "plan_own_parts", ()):
        raise RunError(f"--train-mma: a {backbone.architecture} backbone has no mixture-of-modality adapters (LaVIN has)")
    if getattr(backbone, "generative", False):
        # here, not at the top: generative_plans imports this module
        from models.producer.generative_plans import train_generative_plan

        return train_generative_plan(backbone, task, data_dir, skipped, config, out_dir, name, version, eval_split)
    world = init_world(backbone.device)
    runtime = DASRuntime(backbone)
    data = task_data(task, runtime, data_dir, config)
    spec = make_spec(backbone, data, name, version, skipped, config)
    torch.manual_seed(config.seed)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True).to(backbone.device)
    plan = Plan(spec, modules)
    timing: dict[str, float] = {}
    losses = run_training(data, modules, lambda step: plan, config, progress=progress, desc=f"train {task}/{name}",
                          world=world, timing=timing)
    if not world.is_main:
        return TrainResult(spec, losses, {}, timing=timing)
    evaluation = data.evaluate(plan, eval_split, config.max_eval_examples, progress=progress)
    trainable = sum(p.numel() for p in modules.parameters())
    spec = dataclasses.replace(spec, metrics={**evaluation.plan_metrics(eval_split), **reference_flops(backbone, spec),
                                              "trainable_params": trainable})
    if out_dir is not None:
        spec = save_plan(out_dir, spec, modules, overwrite=True)
    return TrainResult(spec, losses, evaluation.metrics, evaluation, timing)
