"""Adapter training and evaluation for DAS plans, the backbone frozen.

One training loop for every task: a :class:`TaskData` object per task turns dataset examples into
model inputs, a loss and evaluation metrics (VQA ``vqa_score``; NLVR2 ``accuracy``; retrieval
``ir_r1/5/10`` and ``tr_r1/5/10``, fractions in 0-1). The forward pass is the serving runtime's own
(``DASRuntime.*_logits``), so what is trained is exactly what is served.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from models.backbones.base import Backbone
from models.das.adapters import PlanModules
from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec, save_plan
from models.producer.datasets import read_task
from models.producer.world.export import load_scenes
from models.producer.world.language import hard_negative_captions
from models.runtime import DASRuntime

REFERENCE_TEXT_LEN = 16
RETRIEVAL_EVAL_IMAGES = 100


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    skip_bottleneck: int = 64
    parallel_bottleneck: int | None = 32
    retrieval_negatives: int = 3  # negative captions per positive pair
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0


class ImageCache:
    """Decoded RGB images by path; the synthetic and benchmark images are small."""

    def __init__(self) -> None:
        self._images: dict[Path, Image.Image] = {}

    def __call__(self, path: Path) -> Image.Image:
        image = self._images.get(path)
        if image is None:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            self._images[path] = image
        return image


# ---------------------------------------------------------------------------------------------
# Per-task data, loss and metrics
# ---------------------------------------------------------------------------------------------
class TaskData:
    """What differs between tasks; the training loop is shared."""

    task: str

    def __init__(self, runtime: DASRuntime, data_dir: Path, config: TrainConfig) -> None:
        self.runtime = runtime
        self.backbone: Backbone = runtime.backbone
        self.data_dir = Path(data_dir)
        self.config = config
        self.images = ImageCache()
        self._splits: dict[str, Any] = {}

    def split(self, name: str):
        if name not in self._splits:
            self._splits[name] = read_task(self.task, self.data_dir, name)
        return self._splits[name]

    def examples(self, name: str, limit: int | None) -> list:
        examples = list(self.split(name).examples)
        return examples[:limit] if limit else examples

    # what the plan carries for this task
    def plan_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, plan: Plan, examples: Sequence, rng: random.Random) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, plan: Plan, split: str, limit: int | None = None, progress: bool = False) -> tuple[dict[str, float], tuple[float, float]]:
        """Metrics and (mean full FLOPs, mean executed FLOPs) per request over the split."""
        raise NotImplementedError

    def _prepare(self, images: Sequence[Image.Image], texts: Sequence[str]):
        return self.backbone.preprocess(images, texts).to(self.backbone.device, self.backbone.dtype)

    def _mean_flops(self, plan: Plan, batches: Sequence, index: int) -> tuple[int, int]:
        report = self.backbone.flops(plan.task, plan.spec, batches[0].text_lengths[index], [b.patch_grids[index] for b in batches])
        return report.full, report.executed


class VQATaskData(TaskData):
    task = "vqa"

    def plan_fields(self) -> dict[str, Any]:
        return {"own_head": True, "labels": tuple(self.split("train").answer_vocab), "own_parts": ("pooler",)}

    def _targets(self, examples: Sequence, labels: Sequence[str]) -> torch.Tensor:
        index = {label: i for i, label in enumerate(labels)}
        targets = torch.zeros(len(examples), len(labels))
        for row, example in enumerate(examples):
            for answer, score in example.answer_scores.items():
                if answer in index:
                    targets[row, index[answer]] = score
        return targets

    def loss(self, plan: Plan, examples: Sequence, rng: random.Random) -> torch.Tensor:
        batch = self._prepare([self.images(e.image_path) for e in examples], [e.question for e in examples])
        logits = self.runtime.vqa_logits(plan, batch).float()
        targets = self._targets(examples, plan.spec.labels).to(logits.device)
        # ViLT's VQA loss: BCE summed over answers (mean over batch)
        return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]

    @torch.no_grad()
    def evaluate(self, plan, split, limit=None, progress=False):
        examples = self.examples(split, limit)
        labels = self.runtime.labels(plan)
        score, flops_full, flops_exec = 0.0, 0, 0
        for start in tqdm(range(0, len(examples), 64), desc=f"eval vqa/{split}", disable=not progress, leave=False):
            chunk = examples[start:start + 64]
            batch = self._prepare([self.images(e.image_path) for e in chunk], [e.question for e in chunk])
            best = self.runtime.vqa_logits(plan, batch).argmax(dim=-1).tolist()
            for i, (example, answer) in enumerate(zip(chunk, best)):
                score += example.answer_scores.get(labels[answer], 0.0)
                full, executed = self._mean_flops(plan, [batch], i)
                flops_full, flops_exec = flops_full + full, flops_exec + executed
        n = max(1, len(examples))
        return {"vqa_score": score / n}, (flops_full / n, flops_exec / n)


class NLVR2TaskData(TaskData):
    task = "nlvr2"

    def plan_fields(self) -> dict[str, Any]:
        return {"own_head": True, "labels": ("False", "True"), "own_parts": ("pooler", "token_type_embeddings")}

    def _logits(self, plan: Plan, examples: Sequence):
        texts = [e.statement for e in examples]
        left = self._prepare([self.images(e.left_image_path) for e in examples], texts)
        right = self._prepare([self.images(e.right_image_path) for e in examples], texts)
        return self.runtime.nlvr2_logits(plan, left, right).float(), (left, right)

    def loss(self, plan: Plan, examples: Sequence, rng: random.Random) -> torch.Tensor:
        logits, _ = self._logits(plan, examples)
        targets = torch.tensor([int(e.label) for e in examples], device=logits.device)
        return F.cross_entropy(logits, targets)

    @torch.no_grad()
    def evaluate(self, plan, split, limit=None, progress=False):
        examples = self.examples(split, limit)
        true_index = [label.lower() for label in self.runtime.labels(plan)].index("true")
        correct, flops_full, flops_exec = 0, 0, 0
        for start in tqdm(range(0, len(examples), 64), desc=f"eval nlvr2/{split}", disable=not progress, leave=False):
            chunk = examples[start:start + 64]
            logits, batches = self._logits(plan, chunk)
            predictions = (logits.argmax(dim=-1) == true_index).tolist()
            for i, (example, predicted) in enumerate(zip(chunk, predictions)):
                correct += int(predicted == example.label)
                full, executed = self._mean_flops(plan, batches, i)
                flops_full, flops_exec = flops_full + full, flops_exec + executed
        n = max(1, len(examples))
        return {"accuracy": correct / n}, (flops_full / n, flops_exec / n)


class RetrievalTaskData(TaskData):
    """Image-text matching: each positive pair is scored against negatives (other images'
    captions), cross-entropy over the candidates, as ViLT fine-tunes retrieval."""

    task = "retrieval"

    def plan_fields(self) -> dict[str, Any]:
        return {"own_head": True, "labels": None, "own_parts": ("pooler",)}

    def _hard_negative(self, example, rng: random.Random) -> str | None:
        """A caption false for the image by one attribute, when the data set records its scenes
        (`das data synth` writes scenes.jsonl); None for real data sets."""
        if not hasattr(self, "_scenes"):
            try:
                self._scenes = {(self.data_dir / k).resolve(): v for k, v in load_scenes(self.data_dir).items()}
            except FileNotFoundError:
                self._scenes = {}
        scene = self._scenes.get(Path(example.image_path).resolve())
        if scene is None:
            return None
        captions = hard_negative_captions(scene, k=1, rng=rng)
        return captions[0] if captions else None

    def loss(self, plan: Plan, examples: Sequence, rng: random.Random) -> torch.Tensor:
        pool = self.split("train").examples
        k = self.config.retrieval_negatives
        images, texts = [], []
        for example in examples:
            image = self.images(example.image_path)
            candidates = [rng.choice(example.captions)]
            hard = self._hard_negative(example, rng) if k > 1 else None
            if hard is not None:
                candidates.append(hard)
            while len(candidates) < k + 1:
                other = pool[rng.randrange(len(pool))]
                if other.image_id != example.image_id:
                    candidates.append(rng.choice(other.captions))
            images += [image] * len(candidates)
            texts += candidates
        scores = self.runtime.retrieval_logits(plan, self._prepare(images, texts)).float().view(len(examples), k + 1)
        return F.cross_entropy(scores, torch.zeros(len(examples), dtype=torch.long, device=scores.device))

    @torch.no_grad()
    def evaluate(self, plan, split, limit=None, progress=False):
        """Recall@1/5/10 over the first N images of the split (N <= RETRIEVAL_EVAL_IMAGES, since every
        image is scored against every caption) and their first captions."""
        examples = self.examples(split, min(limit or RETRIEVAL_EVAL_IMAGES, RETRIEVAL_EVAL_IMAGES))
        n = len(examples)
        images = [self.images(e.image_path) for e in examples]
        captions = [e.captions[0] for e in examples]
        scores = torch.empty(n, n)  # [image, caption]
        flops_full, flops_exec, pairs = 0, 0, 0
        for i in tqdm(range(n), desc=f"eval retrieval/{split}", disable=not progress, leave=False):
            batch = self._prepare([images[i]] * n, captions)
            scores[i] = self.runtime.retrieval_logits(plan, batch).float().cpu()
            if i == 0 or i == n - 1:  # FLOPs per pair depend only on text length and image grid
                for j in range(n):
                    full, executed = self._mean_flops(plan, [batch], j)
                    flops_full, flops_exec, pairs = flops_full + full, flops_exec + executed, pairs + 1
        target = torch.arange(n)
        metrics = {}
        for k in (1, 5, 10):
            ir_top = scores.t().topk(min(k, n), dim=1).indices  # caption -> images
            tr_top = scores.topk(min(k, n), dim=1).indices  # image -> captions
            metrics[f"ir_r{k}"] = (ir_top == target[:, None]).any(dim=1).float().mean().item()
            metrics[f"tr_r{k}"] = (tr_top == target[:, None]).any(dim=1).float().mean().item()
        return metrics, (flops_full / max(1, pairs), flops_exec / max(1, pairs))


TASK_DATA: dict[str, type[TaskData]] = {"vqa": VQATaskData, "nlvr2": NLVR2TaskData, "retrieval": RetrievalTaskData}


def task_data(task: str, runtime: DASRuntime, data_dir: str | Path, config: TrainConfig) -> TaskData:
    if task not in TASK_DATA:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASK_DATA)})")
    return TASK_DATA[task](runtime, Path(data_dir), config)


# ---------------------------------------------------------------------------------------------
# The shared loop
# ---------------------------------------------------------------------------------------------
def minibatches(examples: Sequence, batch_size: int, rng: random.Random) -> Iterator[list]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


def run_training(
    data: TaskData,
    trainable: PlanModules,
    plan_for_step: Callable[[int], Plan],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """AdamW over ``trainable``; ``plan_for_step(step)`` gives the plan to run at each step (fixed
    for training, sampled for search). Returns the loss per step."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    examples = data.examples("train", config.max_train_examples)
    steps_per_epoch = max(1, len(examples) // config.batch_size)
    total = max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=0.1)
    trainable.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    step = 0
    while step < total:
        for batch in minibatches(examples, config.batch_size, rng):
            if step >= total:
                break
            loss = data.loss(plan_for_step(step), batch, rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
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


@dataclass
class TrainResult:
    spec: PlanSpec
    losses: list[float]
    metrics: dict[str, float] = field(default_factory=dict)


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
    """Train one plan with a fixed skip set; evaluate it; write it (if ``out_dir``) with metrics."""
    runtime = DASRuntime(backbone)
    data = task_data(task, runtime, data_dir, config)
    spec = make_spec(backbone, data, name, version, skipped, config)
    torch.manual_seed(config.seed)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True).to(backbone.device)
    plan = Plan(spec, modules)
    losses = run_training(data, modules, lambda step: plan, config, progress=progress, desc=f"train {task}/{name}")
    metrics, _ = data.evaluate(plan, eval_split, config.max_eval_examples, progress=progress)
    trainable = sum(p.numel() for p in modules.parameters())
    spec = dataclasses.replace(spec, metrics={**metrics, "eval_split": eval_split, **reference_flops(backbone, spec),
                                              "trainable_params": trainable})
    if out_dir is not None:
        spec = save_plan(out_dir, spec, modules, overwrite=True)
    return TrainResult(spec, losses, metrics)
