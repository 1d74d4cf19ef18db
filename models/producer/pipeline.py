"""`das pipeline`: regenerates a plan store (the embedded default: backbone + plans for every task) from
seeds, deterministically: synthetic data, pre-training, search, a plan per skip level, val and test
evaluation, searched vs random skip sets, and store.json. Selection (store.json's active plan, the
"within 97%" rule) uses val numbers only; test numbers are reported, never used to choose.
:func:`remeasure_store` re-evaluates an existing store's plans (no retraining). ``models/producer/report.py`` writes its tables and plot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.backbones.base import Backbone, load_backbone
from models.das.plan import PLAN_FILE, PlanError, PlanSpec, validate_plan
from models.paths import STORE_BACKBONE_DIR, STORE_STATE_FILE
from models.producer.engine import RunError
from models.producer.evaluate import evaluate_plan_dir
from models.producer.pretrain import PretrainConfig, pretrain_backbone
from models.producer.search import (OBJECTIVES, SearchConfig, das_search, select_within_budget, skip_set_for,
                                    write_search_outputs)
from models.producer.runs import TrainConfig
from models.producer.data import scenes_of
from models.producer.datasets import read_task
from models.producer.train import retrieval_gallery_scenes, retrieval_gallery_size, train_plan
from models.producer.world.export import synthesize
from models.producer.world.language import retrieval_ceiling
from models.tasks import METRIC_KEYS, TASKS, primary_score

# what an evaluation writes into plan.json's metrics: the metric values and the keys that qualify them
EVALUATION_KEYS = (*METRIC_KEYS, "eval_split", "n", "intervals")


@dataclass
class PipelineSettings:
    """Sizes for a full regeneration (about 3.3 h on 2 CPU cores) or a --quick smoke run."""

    arch: str = "vilt"  # models.producer.pretrain.ARCHS
    n: dict[str, int] = field(default_factory=lambda: {"vqa": 12000, "nlvr2": 6000, "retrieval": 3000})
    # 128 px in 16 px patches (an 8 x 8 grid): a small object is ~20 px across (at 96 px: 15 px, one patch)
    image_size: int = 128
    patch_size: int = 16
    # the convolutional stem's widths in place of the linear patch embedding (models/backbones/conv_stem.py;
    # () = the linear one): a linear embedding trained from scratch at this scale never tells shapes apart
    conv_stem_channels: tuple[int, ...] = (16, 32, 64, 128)
    # weights of pre-training's patch shape and colour classification (PretrainConfig.patch_shape_weight,
    # patch_color_weight); 0 = off
    patch_shape_weight: float = 1.0
    patch_color_weight: float = 1.0
    # fp32, or bf16 autocast for pre-training and every training and evaluation (models/producer/engine.py)
    precision: str = "fp32"
    # fresh scenes for pre-training only (work/data/pretrain), captioned 5 times each with hard negatives
    pretrain_images: int = 20000
    # over every caption pair (retrieval captions + captioned train scenes of all tasks); with the stem and
    # the patch objectives 0.7 epoch ends at a lower ITM loss than 1.6 epochs of the linear embedding
    pretrain_epochs: float = 0.7
    hidden_size: int = 128
    layers: int = 8  # ViLT: encoder layers; METER: fusion layers per stream
    vision_layers: int = 2  # METER only: uni-modal encoder depths
    text_layers: int = 2
    heads: int = 4
    # VQA (the others: train_epochs_by_task). The adapters-only plan under-fits at 3 epochs: val 0.726 at 3,
    # 0.774 at 6, 0.804 at 10 on the shipped backbone (docs/plans.md, "Longer training")
    train_epochs: float = 10.0
    # at 1.5 epochs NLVR2 stayed near chance and retrieval's skip adapters lost 60% of the adapters-only R@1
    # (2026-11-23); NLVR2's adapters-only plan: val 0.682 at 5 epochs, 0.772 at 10; retrieval's gains nothing
    # from 6 to 10 (docs/plans.md, "Longer training")
    train_epochs_by_task: dict[str, float] = field(default_factory=lambda: {"nlvr2": 10.0, "retrieval": 6.0})
    search_epochs: float = 1.0
    search_update_every: int = 10
    baseline_epochs: float = 0.5
    # skip3 is the >= 25% rung: the stem's fixed cost makes skip2 save ~19%, skip3 ~29%
    skip_levels: tuple[int, ...] = (2, 3, 4)
    # VQA gets a deeper ladder: load-adaptive serving (service/adaptive.py) steps down to skip6 when skip4's
    # capacity (at most ~1.8x the adapters plan's) cannot absorb an overload
    skip_levels_by_task: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"vqa": (2, 3, 4, 6)})
    # skip adapter widths for named plans (task -> plan -> bottleneck; the others: hidden/2). None by default:
    # narrower ones on VQA's skip4 save up to 2 points more FLOPs but do not keep its score reliably
    # (docs/plans.md, "Narrower skip adapters")
    skip_bottleneck_by_plan: dict[str, dict[str, int]] = field(default_factory=dict)
    search_k: int | None = None  # skip_num of the search (default: the first skip level)
    # models.producer.search.OBJECTIVES, or "compare": both, compared at equal FLOPs on val; the better one's
    # search makes the plans (compare_objectives)
    search_objective: str = "reward"
    random_baselines: int = 5  # random skip sets of (nearly) the searched set's FLOPs saving
    batch_size: int = 32
    max_eval: int | None = None  # whole val/test splits (retrieval: its gallery of RETRIEVAL_EVAL_IMAGES)

    @classmethod
    def quick(cls) -> PipelineSettings:
        return cls(n={"vqa": 96, "nlvr2": 64, "retrieval": 48}, image_size=64, pretrain_images=16, pretrain_epochs=1.0,
                   conv_stem_channels=(8, 8, 8, 8), hidden_size=32, layers=4,
                   heads=2, train_epochs=1.0, train_epochs_by_task={}, skip_levels_by_task={}, search_epochs=3.0, search_update_every=2, baseline_epochs=0.5,
                   skip_levels=(1, 2), skip_bottleneck_by_plan={"vqa": {"skip2": 8}},
                   random_baselines=3, batch_size=8, max_eval=32)

    @classmethod
    def meter(cls, quick: bool = False) -> PipelineSettings:
        """The tiny METER: 2-layer encoders, 6 fusion layers per stream (12 arms, as METER), searched
        with skip_num 4 as in the DAS reference, both search objectives compared at equal FLOPs. The
        ViLT's recipe otherwise: the convolutional stem (in the vision encoder), the patch objectives,
        0.7 epoch of pre-training, the same training epochs. Its full model costs about 1.2x the tiny
        ViLT's FLOPs per request."""
        if quick:
            return dataclasses.replace(cls.quick(), arch="meter", layers=2, vision_layers=1, text_layers=1,
                                       skip_levels=(2,), search_k=2, search_objective="compare", skip_bottleneck_by_plan={})
        # VQA also skips 6 of the 12 arms, a deeper rung (skip4 saves about 27% of its FLOPs, skip6 about 38%)
        return cls(arch="meter", layers=6, vision_layers=2, text_layers=2, skip_levels=(4,),
                   skip_levels_by_task={"vqa": (4, 6)}, search_k=4, search_objective="compare")


def run_pipeline(out: Path, work: Path, settings: PipelineSettings, seed: int = 0, progress: bool = True,
                 log=print) -> dict[str, Any]:
    started = time.time()
    reused: list[str] = []
    print_line = log

    def log(message: str) -> None:  # counts "[resume]" lines: steps cached by an earlier run
        if message.startswith("[resume]"):
            reused.append(message)
        print_line(message)

    data = _synthesize(work, settings, seed, progress, log)
    backbone_dir = out / STORE_BACKBONE_DIR
    pretrain_file = work / "pretrain.json"
    pretrain_config = PretrainConfig(
        arch=settings.arch, hidden_size=settings.hidden_size, num_layers=settings.layers,
        vision_layers=settings.vision_layers, text_layers=settings.text_layers, num_heads=settings.heads,
        intermediate_size=4 * settings.hidden_size, image_size=settings.image_size,
        patch_size=settings.patch_size, conv_stem_channels=settings.conv_stem_channels,
        patch_shape_weight=settings.patch_shape_weight, patch_color_weight=settings.patch_color_weight,
        precision=settings.precision, epochs=settings.pretrain_epochs, seed=seed,
        # resumable: an interrupted pre-training goes on from its last checkpoint
        checkpoint_every=200, checkpoint_dir=str(work / "pretrain.ckpt"), resume=True)
    recipe = pretrain_recipe(pretrain_config)
    if (backbone_dir / "config.json").is_file() and pretrain_file.is_file():
        pretrain_summary = json.loads(pretrain_file.read_text())
        # a backbone of another recipe (say --resume --conv-stem after a run with the linear embedding) is
        # not silently reused; summaries written before recipes were recorded carry none
        made_with = pretrain_summary.get("recipe", recipe)
        if made_with != recipe:
            changed = sorted(key for key in recipe.keys() | made_with.keys() if recipe.get(key) != made_with.get(key))
            raise RunError(f"{backbone_dir} was pre-trained with other settings ({', '.join(changed)}: "
                           f"{ {k: made_with.get(k) for k in changed} }, asked for { {k: recipe.get(k) for k in changed} }); "
                           "use --force to regenerate the store, or another --out")
        log("[resume] pretrain: reusing the backbone already in the output")
    else:
        log(f"[pretrain] {settings.arch}: ITM + MLM on the synthetic image-caption pairs")
        pretrain_summary = pretrain_backbone(
            data["retrieval"], backbone_dir, pretrain_config,
            extra_text_dirs={"vqa": data["vqa"], "nlvr2": data["nlvr2"]}, progress=progress,
            scene_dirs=[data["vqa"], data["nlvr2"]] + ([data[PRETRAIN_CORPUS]] if settings.pretrain_images else []),
        )
        pretrain_summary["recipe"] = recipe
        pretrain_file.write_text(json.dumps(pretrain_summary, indent=2) + "\n")
    backbone = load_backbone(backbone_dir, device="cpu")
    report: dict[str, Any] = {"pretrain": pretrain_summary, "tasks": {}}
    for task in TASKS:
        report["tasks"][task] = _run_task(task, backbone, data[task], out, work, settings,
                                          task_train_config(settings, task, seed), seed, progress, log)
        _write_store_state(out, task, report["tasks"][task])
    report["minutes"] = round((time.time() - started) / 60, 1)
    report["reused_steps"] = len(reused)
    return report


def pretrain_recipe(config: PretrainConfig) -> dict[str, Any]:
    """What makes a pre-trained backbone what it is (not how the run was executed: device, checkpoints),
    as JSON: recorded beside the backbone so a resumed pipeline does not reuse one of another recipe."""
    how_run = {"device", "workers", "checkpoint_every", "checkpoint_dir", "resume", "stop_after"}
    return json.loads(json.dumps({key: value for key, value in asdict(config).items() if key not in how_run}))


def task_train_config(settings: PipelineSettings, task: str, seed: int) -> TrainConfig:
    """How the pipeline trains a task's plans (the search and the baselines change only the epochs)."""
    return TrainConfig(epochs=settings.train_epochs_by_task.get(task, settings.train_epochs),
                       batch_size=settings.batch_size, seed=seed, max_eval_examples=settings.max_eval,
                       precision=settings.precision,
                       skip_bottleneck=max(8, settings.hidden_size // 2),
                       # hidden/16: parallel adapters cost ~2% FLOPs, so skipping 2 of 8 layers saves > 20%
                       parallel_bottleneck=max(4, settings.hidden_size // 16))


def plan_train_config(settings: PipelineSettings, train_config: TrainConfig, task: str, name: str) -> TrainConfig:
    """The task's training config for one shipped plan (``settings.skip_bottleneck_by_plan`` applied)."""
    width = settings.skip_bottleneck_by_plan.get(task, {}).get(name)
    return train_config if width is None else dataclasses.replace(train_config, skip_bottleneck=width)


def store_settings(settings: PipelineSettings, backbone: Backbone) -> PipelineSettings:
    """``settings`` for work on an existing store: its data drawn at the size its backbone was trained at
    (not necessarily today's recipe), and no pre-training corpus."""
    return dataclasses.replace(settings, image_size=int(backbone.config.image_size), pretrain_images=0)


def compare_store_objectives(out: Path, work: Path, settings: PipelineSettings, seed: int = 0, progress: bool = True,
                             log=print) -> dict[str, Any]:
    """The search objectives compared at equal FLOPs (:func:`compare_objectives`) for every task on an
    existing store's backbone and the pipeline's synthetic data; trains no shipped plan."""
    backbone = load_backbone(out / STORE_BACKBONE_DIR, device="cpu")
    data = _synthesize(work, store_settings(settings, backbone), seed, progress, log)
    compare = dataclasses.replace(settings, search_objective="compare")
    return {task: _searches(task, backbone, data[task], work, compare, task_train_config(settings, task, seed),
                            progress, log)[1] for task in TASKS}


def _cached(path: Path, make, log, what: str, valid=lambda result: True):
    """Resume support: a step whose JSON result exists in the work directory (and passes ``valid``) is
    not run again."""
    if path.is_file() and valid(json.loads(path.read_text())):
        log(f"[resume] {what}: reusing {path}")
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _run_task(task: str, backbone: Backbone, data_dir: Path, out: Path, work: Path, settings: PipelineSettings, train_config,
              seed: int, progress: bool, log) -> dict[str, Any]:
    """Search, train a plan per skip level, evaluate on test, and compare the search with random
    skip sets. Each step's result is cached under ``work`` so an interrupted run resumes."""
    searches, comparison = _searches(task, backbone, data_dir, work, settings, train_config, progress, log)
    searched = searches[comparison["chosen"] if comparison else settings.search_objective]
    levels = settings.skip_levels_by_task.get(task, settings.skip_levels)
    plans = {"adapters": []}
    for k in levels:
        skipped = skip_set_for(searched, k)
        plans.setdefault(f"skip{len(skipped)}", skipped)
    task_report: dict[str, Any] = {"search": searched, "plans": {}}
    if comparison:
        task_report["objectives"] = comparison
    for name, skipped in plans.items():
        plan_dir = out / task / name
        plan_config = plan_train_config(settings, train_config, task, name)
        try:
            spec = validate_plan(plan_dir, backbone)
            if list(spec.skipped_layers) != skipped:
                raise PlanError("different skip set")
            if skipped and spec.adapters.skip_bottleneck != plan_config.skip_bottleneck:
                raise PlanError("different skip adapter width")
            log(f"[resume] {task}/{name}: reusing the trained plan in {plan_dir}")
        except PlanError:
            log(f"[train] {task}/{name} skipping {skipped}")
            spec = train_plan(backbone, task, data_dir, skipped, plan_config, out_dir=plan_dir, name=name,
                              progress=progress).spec
        # keyed by the weights' digest, so a plan trained again is evaluated again
        evaluation = _cached(work / "eval" / task / f"{name}.json",
                             lambda: {**evaluate_plan_dir(plan_dir, data_dir, backbone, "test", settings.max_eval, progress),
                                      "weights_sha256": spec.weights_sha256},
                             log, f"{task}/{name} test evaluation",
                             valid=lambda r: "intervals" in r and r.get("weights_sha256") == spec.weights_sha256)
        task_report["plans"][name] = plan_report(spec, evaluation)
    task_report["search_vs_random"] = _search_vs_random(task, backbone, data_dir, work, settings, train_config,
                                                        searched, seed, progress, log)
    if task == "retrieval" and (ceiling := retrieval_gallery_ceiling(data_dir, settings.max_eval)):
        task_report["ceiling"] = ceiling
    return task_report


def retrieval_gallery_ceiling(data_dir: Path, max_eval: int | None) -> dict[str, dict[str, float]] | None:
    """Per split, the R@1 of a model that scores every true pair of the evaluation's gallery alike
    (``retrieval_ceiling``): synthetic captions can be true of several images. None for real data."""
    scenes = scenes_of(data_dir)
    if not scenes:
        return None
    out = {}
    for split in ("val", "test"):
        gallery = read_task("retrieval", data_dir, split).examples[:retrieval_gallery_size(max_eval)]
        if gallery_scenes := retrieval_gallery_scenes(gallery, scenes):
            out[split] = retrieval_ceiling([e.captions[0] for e in gallery], gallery_scenes)
    return out or None


def _searches(task: str, backbone: Backbone, data_dir: Path, work: Path, settings: PipelineSettings,
              train_config: TrainConfig, progress: bool, log) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The task's search (``settings.search_objective``), or with "compare" one per objective and their
    comparison at equal FLOPs (:func:`compare_objectives`). Cached under ``work/search``."""
    search_k = settings.search_k or settings.skip_levels[0]
    compare = settings.search_objective == "compare"
    objectives = OBJECTIVES if compare else (settings.search_objective,)

    def search(objective: str) -> dict[str, Any]:
        log(f"[search] {task} ({objective})")
        config = SearchConfig(skip_num=search_k, update_every=settings.search_update_every, objective=objective,
                              train=TrainConfig(**{**asdict(train_config), "epochs": settings.search_epochs}))
        result = das_search(backbone, task, data_dir, config, progress=progress)
        write_search_outputs(result, work / "search" / task / (objective if compare else ""))
        return result.to_json()

    searches = {objective: _cached(work / "search" / task / (objective if compare else "") / "search.json",
                                   lambda objective=objective: search(objective), log, f"{task} search ({objective})",
                                   valid=lambda r, objective=objective: r.get("objective") == objective and "savings" in r)
                for objective in objectives}
    if not compare:
        return searches, None
    return searches, compare_objectives(task, backbone, data_dir, work, settings, train_config, searches, progress, log)


def compare_objectives(task: str, backbone: Backbone, data_dir: Path, work: Path, settings: PipelineSettings,
                       train_config: TrainConfig, searches: dict[str, dict[str, Any]], progress: bool, log) -> dict[str, Any]:
    """The reference rule against reward-per-flop at equal FLOPs: the reference search's skip set, and
    the cost-aware search's least-damage set saving at least as much; both trained alike (the short
    baseline training) and scored on val. The higher val score wins (ties: the reference rule)."""
    reference = searches["reward"]
    savings = reference["savings"]
    target = sum(savings[i] for i in reference["skip_set"])
    sets = {"reward": reference["skip_set"]}
    same_cost = max(savings) <= min(savings) * 1.001
    sets["reward-per-flop"] = (reference["skip_set"] if same_cost else
                               select_within_budget(searches["reward-per-flop"]["gates"], savings, target))
    rows = {objective: _baseline_row(task, backbone, data_dir, work, settings, train_config, skip, savings, progress, log)
            for objective, skip in sets.items()}
    chosen = "reward-per-flop" if rows["reward-per-flop"]["score"] > rows["reward"]["score"] else "reward"
    return {**rows, "target_flops_saved": round(target, 4), "chosen": chosen,
            "note": "every arm costs the same: both objectives are one rule" if same_cost else ""}


def _baseline_row(task: str, backbone: Backbone, data_dir: Path, work: Path, settings: PipelineSettings,
                  train_config: TrainConfig, skip: list[int], savings: list[float], progress: bool, log) -> dict[str, Any]:
    """``skip`` trained with the short baseline training (cached by skip set) and scored on val."""
    baseline_config = TrainConfig(**{**asdict(train_config), "epochs": settings.baseline_epochs})
    key = "-".join(map(str, skip))
    metrics = _cached(work / "baselines" / task / f"skip-{key}.json",
                      # the spec's metrics: the plain numbers with split, n and intervals
                      lambda: train_plan(backbone, task, data_dir, skip, baseline_config, progress=progress).spec.metrics,
                      log, f"{task} baseline {skip}", valid=lambda r: "intervals" in r)
    return {"skip": skip, "score": primary_score(task, metrics), "interval": primary_interval(task, metrics),
            "flops_saved": round(sum(savings[i] for i in skip), 4)}


def random_equal_cost_sets(savings: list[float], target: float, count: int, rng: random.Random,
                           exclude: list[int], tolerance: float = 0.05, tries: int = 20000) -> list[list[int]]:
    """Up to ``count`` distinct random skip sets (not ``exclude``) whose FLOPs saving sum(s_i) lies within
    ``tolerance`` (relative) of ``target``: arms drawn uniformly without replacement until the saving
    reaches target * (1 - tolerance), kept if it is at most target * (1 + tolerance)."""
    found: list[list[int]] = []
    for _ in range(tries):
        order = rng.sample(range(len(savings)), len(savings))
        chosen, total = [], 0.0
        for i in order:
            chosen.append(i)
            total += savings[i]
            if total >= target * (1 - tolerance):
                break
        chosen.sort()
        if total <= target * (1 + tolerance) and chosen != sorted(exclude) and chosen not in found:
            found.append(chosen)
            if len(found) == count:
                break
    return found


def _search_vs_random(task: str, backbone: Backbone, data_dir: Path, work: Path, settings: PipelineSettings,
                      train_config: TrainConfig, searched: dict[str, Any], seed: int, progress: bool, log) -> dict[str, Any]:
    """Evidence for the search at equal cost: the searched skip set against ``random_baselines`` random
    sets saving (nearly) the same FLOPs, all with the same short training, scored on val."""
    savings = searched["savings"]
    target = sum(savings[i] for i in searched["skip_set"])
    others = random_equal_cost_sets(savings, target, settings.random_baselines, random.Random(seed + 17),
                                    exclude=searched["skip_set"])
    rows = [_baseline_row(task, backbone, data_dir, work, settings, train_config, skip, savings, progress, log)
            for skip in [searched["skip_set"]] + others]
    random_scores = [r["score"] for r in rows[1:]]
    return {"k": searched["skip_num"], "objective": searched.get("objective", "reward"),
            "searched_skip": searched["skip_set"], "searched_score": rows[0]["score"],
            "searched_interval": rows[0]["interval"], "searched_flops_saved": rows[0]["flops_saved"],
            "random": rows[1:], "random_mean": sum(random_scores) / max(1, len(random_scores)),
            "beats_random_mean": bool(random_scores) and rows[0]["score"] > sum(random_scores) / len(random_scores)}


def primary_interval(task: str, metrics: dict[str, Any]) -> list[float] | None:
    """The 95% interval of the task's primary score (retrieval: the mean of the IR and TR R@1 bounds)."""
    intervals = metrics.get("intervals") or {}
    if task == "retrieval":
        ir, tr = intervals.get("ir_r1"), intervals.get("tr_r1")
        return [(ir[0] + tr[0]) / 2, (ir[1] + tr[1]) / 2] if ir and tr else None
    return intervals.get("vqa_score" if task == "vqa" else "accuracy")


def plan_report(spec, test: dict[str, Any]) -> dict[str, Any]:
    """A plan's entry in the pipeline report: its test evaluation (reported), and under ``val`` the val
    metrics of its plan.json (what selection uses)."""
    return {**test, "trainable_params": spec.metrics["trainable_params"], "val": val_metrics(spec.metrics)}


def val_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    if metrics.get("eval_split", "val") != "val":
        raise PlanError(f"plan metrics are on {metrics.get('eval_split')!r}; selection needs val metrics")
    return {k: v for k, v in metrics.items() if k in EVALUATION_KEYS}


def choose_active(task: str, plans: dict[str, dict[str, Any]]) -> str:
    """The cheapest plan whose *val* score keeps >= 97% of the adapters-only plan's val score (else the
    adapters-only plan). Test numbers never enter."""
    reference = primary_score(task, plans["adapters"]["val"])
    keeping = [name for name, r in plans.items() if primary_score(task, r["val"]) >= 0.97 * reference]
    return min(keeping, key=lambda name: plans[name]["flops_reduced"]) if keeping else "adapters"


def _write_store_state(out: Path, task: str, task_report: dict[str, Any]) -> None:
    """store.json: every trained plan loaded; active = :func:`choose_active` (decided on val)."""
    path = out / STORE_STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {"loaded": {}, "active": {}, "history": {}}
    plans = task_report["plans"]
    state["loaded"][task] = sorted(plans)
    state["active"][task] = choose_active(task, plans)
    task_report["active"] = state["active"][task]
    path.write_text(json.dumps(state, indent=2) + "\n")


PRETRAIN_CORPUS = "pretrain"  # work/data/pretrain: fresh scenes for pre-training only (no task uses them)


def _synthesize(work: Path, settings: PipelineSettings, seed: int, progress: bool, log) -> dict[str, Path]:
    """Every task's data set (seed + its index in TASKS) and the pre-training corpus (seed + len(TASKS),
    all train), each synthesised again when what is on disk was made with other sizes."""
    data = {task: work / "data" / task for task in (*TASKS, PRETRAIN_CORPUS)}
    for offset, name in enumerate((*TASKS, PRETRAIN_CORPUS)):
        pretrain = name == PRETRAIN_CORPUS
        n = settings.pretrain_images if pretrain else settings.n[name]
        if pretrain and not n:
            continue
        wanted = {"n": n, "seed": seed + offset, "image_size": settings.image_size}
        made = data[name] / "synth.json"
        if made.is_file() and {k: json.loads(made.read_text()).get(k) for k in wanted} == wanted:
            continue
        log(f"[data] synthesising {name}: {n} examples at {settings.image_size} px")
        shutil.rmtree(data[name], ignore_errors=True)
        synthesize("retrieval" if pretrain else name, data[name], n=n, seed=seed + offset,
                   image_size=settings.image_size, progress=progress,
                   **({"val_fraction": 0.0, "test_fraction": 0.0} if pretrain else {}))
    return data


def write_plan_metrics(plan_dir: Path, metrics: dict[str, Any]) -> None:
    """Replace plan.json's ``metrics`` (nothing else: the weights and their checksum stay), atomically."""
    path = plan_dir / PLAN_FILE
    spec = PlanSpec.from_json_dict(json.loads(path.read_text()), where=str(path))
    spec = dataclasses.replace(spec, metrics=metrics)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(spec.to_json_dict(), indent=2) + "\n")
    os.replace(staging, path)


def remeasure_store(out: Path, work: Path, settings: PipelineSettings, seed: int = 0, progress: bool = True,
                    log=print) -> dict[str, Any]:
    """Re-measure a shipped store's plans without retraining: regenerate the pipeline's synthetic data
    (same seed and sizes) under ``work``, evaluate every plan on val and test, write the val metrics
    (with split, n and 95% intervals) into each plan.json, re-decide store.json's active plans on val,
    and return the pipeline report with the new numbers (its pre-training and search parts kept)."""
    backbone = load_backbone(out / STORE_BACKBONE_DIR, device="cpu")
    data = _synthesize(work, store_settings(settings, backbone), seed, progress, log)
    report_path = out / "pipeline-report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"tasks": {}}
    for task in TASKS:
        task_report = report["tasks"].setdefault(task, {})
        names = [p.parent.name for p in sorted((out / task).glob("*/" + PLAN_FILE))]
        order = [n for n in task_report.get("plans", {}) if n in names] + [n for n in names if n not in task_report.get("plans", {})]
        plans = {}
        for name in order:
            plan_dir = out / task / name
            spec = validate_plan(plan_dir, backbone)
            log(f"[remeasure] {task}/{name}: val and test")
            val = evaluate_plan_dir(plan_dir, data[task], backbone, "val", settings.max_eval, progress)
            test = evaluate_plan_dir(plan_dir, data[task], backbone, "test", settings.max_eval, progress)
            kept = {k: v for k, v in spec.metrics.items() if k not in EVALUATION_KEYS}
            metrics = {**{k: val[k] for k in METRIC_KEYS if k in val}, "eval_split": "val", "n": val["n"],
                       "intervals": val["intervals"], **kept}
            write_plan_metrics(plan_dir, metrics)
            spec = validate_plan(plan_dir, backbone)
            plans[name] = plan_report(spec, test)
        task_report["plans"] = plans
        _write_store_state(out, task, task_report)
    report["remeasured"] = {"seed": seed, "data": str(work / "data"), "max_eval": settings.max_eval}
    return report


def clear_store(out: Path) -> None:
    """Remove what a pipeline run writes into a plan store (before a --force run)."""
    for child in (STORE_BACKBONE_DIR, *TASKS, STORE_STATE_FILE):
        target = out / child
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
