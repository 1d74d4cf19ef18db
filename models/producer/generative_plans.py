"""`das search`, `das train` and `das eval` on a generative backbone (LLaVA-style or LaVIN):
the same commands, options and data layout (VQAv2) as for ViLT and METER.

A generative backbone answers in text, so a plan is trained with the next-token loss on the answer
(the train split's best-scored answer, as LLaVA fine-tunes on VQAv2) through the generative producer
(``models/producer/generative.py``), searched with its bandit over the decoder blocks, and scored with
VQA's soft score of the generated answer (greedy, normalised like the annotators' answers) against
the annotators' answers, with split, n, a 95% interval and the score per question type as for the
classifier backbones. Images are decoded on demand (:class:`ImageTable`), so memory does not grow
with the data set.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from PIL import Image

from models.backbones.base import Backbone
from models.backbones.llava.generation import LlavaRuntime
from models.das.plan import Plan, builtin_full_plan, load_plan, save_plan
from models.producer import generative as g
from models.producer.datasets import VQAExample, normalize_answer, read_vqa
from models.producer.engine import RunError, world_from_env
from models.producer.stats import bootstrap_interval
from models.producer.runs import Evaluation, TrainConfig, TrainResult, question_type_groups, total_steps

EVAL_BATCH = 32
ANSWER_TOKENS = 4  # VQA answers are a word or two


class ImageTable:
    """Image files as ``ExampleSet.images`` reads them (``table[row]``: H x W x 3 uint8; ``table[rows]``:
    N x H x W x 3), decoded and resized to ``size`` on access."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def _one(self, row: int) -> np.ndarray:
        with Image.open(self.paths[row]) as image:
            return np.asarray(image.convert("RGB").resize((self.size, self.size), Image.BICUBIC))

    def __getitem__(self, rows):
        if isinstance(rows, (int, np.integer)):
            return self._one(int(rows))
        return np.stack([self._one(int(r)) for r in rows])


def check_trainable(backbone: Backbone, task: str, config: TrainConfig | None = None) -> None:
    """Refuse what the generative producer cannot do, saying why."""
    if config is not None:
        unsupported = [name for name, used in (
            ("--precision", config.precision != "fp32"), ("--workers", bool(config.workers)),
            ("--checkpoint-every", bool(config.checkpoint_every)), ("--resume", config.resume),
            ("torchrun", world_from_env().world_size > 1)) if used]
        if unsupported:
            raise RunError(f"a generative backbone's plans train in one process, fp32, without checkpoints: "
                           f"{', '.join(unsupported)} not supported")
    if task != "vqa":
        raise RunError(f"a generative backbone serves vqa (and chat); it has no {task} plans")


def vqa_example_set(data_dir: str | Path, split: str, image_size: int, limit: int | None = None
                    ) -> tuple[g.ExampleSet, list[VQAExample]]:
    """A VQAv2-layout split as the generative producer's examples: prompt = the question, target = its
    best-scored answer, kind = its question type (else answer type); and the split's own examples."""
    examples = read_vqa(data_dir, split).examples
    examples = [e for e in examples if e.answer_scores][:limit] if limit else [e for e in examples if e.answer_scores]
    if not examples:
        raise RunError(f"{data_dir}: the {split} split has no question with a scored answer")
    rows: dict[Path, int] = {}
    items = []
    for example in examples:
        row = rows.setdefault(example.image_path, len(rows))
        target = max(example.answer_scores, key=lambda a: (example.answer_scores[a], a))
        items.append(g.Example(row, example.question_type or example.answer_type or "vqa", example.question, target))
    return g.ExampleSet(items, ImageTable(list(rows), image_size), []), examples


def evaluate_generative(backbone: Backbone, plan: Plan, data_dir: str | Path, split: str,
                        limit: int | None = None) -> Evaluation:
    """Greedy answers to ``split``'s questions, scored with VQA's soft score."""
    data, examples = vqa_example_set(data_dir, split, backbone.config.image_size, limit)
    runtime = LlavaRuntime(backbone)  # drives LaVIN too (LavinRuntime adds nothing)
    scores, full, executed = [], [], []
    for start in range(0, len(data), EVAL_BATCH):
        chunk = data.examples[start:start + EVAL_BATCH]
        answers = runtime.answer(plan, [data.pil(e.image) for e in chunk], [e.prompt for e in chunk], ANSWER_TOKENS)
        for offset, answer in enumerate(answers):
            scores.append(examples[start + offset].answer_scores.get(normalize_answer(answer.text), 0.0))
            full.append(answer.flops.full)
            executed.append(answer.flops.executed)
    return Evaluation({"vqa_score": statistics.fmean(scores)}, len(scores), {"vqa_score": bootstrap_interval(scores)},
                      (statistics.fmean(full), statistics.fmean(executed)),
                      question_type_groups([e.question_type for e in examples], scores))


def evaluate_generative_plan_dir(plan_dir: str | Path, data_dir: str | Path, backbone: Backbone, split: str,
                                 limit: int | None) -> dict[str, Any]:
    """As ``evaluate_plan_dir`` reports a classifier plan (``vqa/full``: the built-in full plan)."""
    if Path(plan_dir).is_dir():
        plan = load_plan(plan_dir, backbone)
    elif str(plan_dir).partition("/")[0] == "vqa":
        plan = builtin_full_plan(backbone, "vqa")
    else:
        raise RunError(f"{plan_dir}: a generative backbone has vqa plans only (a plan directory or vqa/full)")
    return evaluate_generative(backbone, plan, data_dir, split, limit).report(plan, split)


def _plan_config(config: TrainConfig, train_examples: int, val_examples: int) -> g.PlanTrainConfig:
    steps = total_steps(train_examples, config)
    return g.PlanTrainConfig(skip_bottleneck=config.skip_bottleneck, parallel_bottleneck=config.parallel_bottleneck,
                             own_parts=("mma_adapters",) if config.train_mma_adapters else (),
                             batch_size=config.batch_size, lr=config.lr, steps=steps,
                             warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 5),
                             val_examples=min(300, val_examples), seed=config.seed)


def train_generative_plan(backbone: Backbone, task: str, data_dir: str | Path, skipped: Sequence[int],
                          config: TrainConfig, out_dir: str | Path | None, name: str, version: int,
                          eval_split: str = "val") -> TrainResult:
    """``train_plan`` for a generative backbone: train on ``data_dir``'s train split, score on
    ``eval_split``, write the plan with those metrics (split, n, intervals) and its FLOPs."""
    check_trainable(backbone, task, config)
    size = backbone.config.image_size
    train, _ = vqa_example_set(data_dir, "train", size, config.max_train_examples)
    val, _ = vqa_example_set(data_dir, eval_split, size, config.max_eval_examples)
    with TemporaryDirectory(prefix="das-plan-") as scratch:
        target = Path(out_dir) if out_dir is not None else Path(scratch) / name
        spec = g.train_decoder_plan(backbone, name, skipped, train, val, target,
                                  _plan_config(config, len(train), len(val)), version=version, log=lambda _: None)
        plan = load_plan(target, backbone)
        evaluation = evaluate_generative(backbone, plan, data_dir, eval_split, config.max_eval_examples)
        spec = dataclasses.replace(spec, metrics={**evaluation.plan_metrics(eval_split), **spec.metrics,
                                                  "eval_split": eval_split})
        if out_dir is not None:
            spec = save_plan(target, spec, plan.modules, overwrite=True)
    losses = [point["train_loss"] for point in spec.metrics.get("curve", [])]
    return TrainResult(spec, losses, evaluation.metrics, evaluation)


def search_generative(backbone: Backbone, task: str, data_dir: str | Path, skip_num: int, config: TrainConfig,
                      warmup_fraction: float, update_every: int, gate_lr: float) -> dict[str, Any]:
    """The bandit over the decoder blocks on ``data_dir`` (train steps on train, rewards on val); returns
    gates, ranking, skip set and one gate-log row per update (as ``SearchResult`` holds them)."""
    check_trainable(backbone, task, config)
    size = backbone.config.image_size
    train, _ = vqa_example_set(data_dir, "train", size, config.max_train_examples)
    val, _ = vqa_example_set(data_dir, "val", size, config.max_eval_examples)
    found = g.search_skips(backbone, train, val, g.SearchConfig(
        skip_num=skip_num, steps=total_steps(len(train), config), warmup_fraction=warmup_fraction,
        update_every=update_every, gate_lr=gate_lr, batch_size=config.batch_size, lr=config.lr,
        skip_bottleneck=config.skip_bottleneck, seed=config.seed), log=lambda _: None)
    n = backbone.num_layers
    log = [{"step": 0, "reward_mean": None, **{f"g{i}": 0.0 for i in range(n)}}]
    log += [{"step": h["step"], "reward_mean": round(statistics.fmean(h["rewards"]), 6),
             **{f"g{i}": h["gates"][i] for i in range(n)}} for h in found["history"]]
    return {"gates": found["gates"], "ranking": found["ranking"], "skip_set": found["skip_set"], "gate_log": log}
