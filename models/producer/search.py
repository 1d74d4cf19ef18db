"""DAS search: layer significance as a k-armed bandit (shared/reference/das-method.md).

Every backbone layer is an arm with a gate g_i (initialised to 0); p_i = sigmoid(g_i) is the
probability of skipping it. Each training step samples ``skip_num`` distinct arms from p (no
replacement), runs that reduced network (skipped layers -> skip adapters, kept layers -> parallel
adapters) and takes a gradient step on the trainable parts. After the warm-up, every
``update_every`` steps it samples ``num_samples`` skip sets, scores each on a validation batch
without gradients (reward r = exp(-loss), the batch's mean loss), and for every arm i in a sampled set updates
g_i += gate_lr * (r - mean(r)) * p_i * (1 - p_i). Arms whose removal keeps the loss low gain weight.
The final skip set is the ``skip_num`` arms with the largest gates.

That is the reference rule (``objective="reward"``); it treats every arm as equally costly. With
``objective="reward-per-flop"`` the search spends a FLOPs budget instead of a count. Let s_i be the
fraction of the no-skip plan's FLOPs that skipping arm i alone saves (at the plan's reference input,
skip adapter counted) and B = skip_num * mean(s) (what skip_num arms save on average):

* every sampled set is drawn from p without replacement, arm by arm, until sum(s_i) >= B, so every set
  saves about B however many arms it takes; an arm that saves much leaves room for fewer others, so
  the sets it is in lose less and it earns more reward for what it saves;
* the gate update is the reference's;
* the final set for a budget B' is the one with sum(s_i) >= B' of least d = sum over the set of
  (max(g) - g_i + eps): the arms the bandit found cheapest to lose, per FLOP they must save
  (exhaustive over subsets up to 16 arms; above, arms in increasing (max(g) - g_i + eps) / s_i).

When every arm costs the same (ViLT: one sequence through every layer) both objectives draw sets of
skip_num arms and select the skip_num largest gates.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.backbones.base import Backbone
from models.das.adapters import ParallelAdapters, PlanModules, SkipAdapter
from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec
from models.producer.bandit import level_budget, sample_skip_set, update_gates
from models.producer.data import StepBatches, loader
from models.producer.engine import RunError, all_reduce_sum, autocast, init_world
from models.producer.generative_plans import search_generative
from models.producer.runs import TrainConfig, total_steps
from models.producer.train import REFERENCE_TEXT_LEN, make_spec, run_training, task_data
from models.runtime import DASRuntime


OBJECTIVES = ("reward", "reward-per-flop")


@dataclass
class SearchConfig:
    skip_num: int = 2
    objective: str = "reward"  # see OBJECTIVES and the module docstring
    # reward-per-flop only: the FLOPs share every set must save (default: what skip_num average arms save)
    flops_budget: float | None = None
    warmup_fraction: float = 0.3  # of all steps (the reference warms up for one epoch)
    update_every: int = 10
    num_samples: int = 3
    # rewards exp(-loss) of sampled skip sets differ by ~1e-2, so with the p(1-p) factor a rate of 1
    # barely moves the gates (seen in the first shipped search: |g| < 0.01); 50 makes them rank.
    gate_lr: float = 50.0
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class SearchResult:
    task: str
    skip_num: int
    gates: list[float]
    ranking: list[int]  # layers, most skippable first
    skip_set: list[int]
    gate_log: list[dict[str, Any]]  # one row per gate update: step, reward mean, g_0..g_n
    objective: str = "reward"
    savings: list[float] = field(default_factory=list)  # s_i: FLOPs fraction saved by skipping arm i alone
    budget: float | None = None  # reward-per-flop: the FLOPs share every sampled set saved

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "skip_num": self.skip_num, "objective": self.objective, "gates": self.gates,
                "ranking": self.ranking, "skip_set": self.skip_set, "savings": self.savings, "budget": self.budget}


def layer_savings(backbone: Backbone, spec: PlanSpec) -> list[float]:
    """s_i: the fraction of ``spec``'s (no-skip) FLOPs that skipping arm i alone saves, at the plan's
    reference input, the skip adapter (``spec.adapters.skip_bottleneck``) that replaces it counted."""
    size = backbone.config.image_size
    base = backbone.flops_at(spec.task, spec, REFERENCE_TEXT_LEN, size).executed
    savings = []
    for i in range(backbone.num_layers):
        one = dataclasses.replace(spec, skipped_layers=(i,))
        savings.append((base - backbone.flops_at(spec.task, one, REFERENCE_TEXT_LEN, size).executed) / base)
    return savings


def skip_set_for(search: dict[str, Any], k: int) -> list[int]:
    """The skip set a finished search (its ``to_json``) gives for level ``k``: the ``k`` largest gates
    (objective reward), or the cheapest set saving what ``k`` average arms save (reward-per-flop)."""
    if search.get("objective", "reward") == "reward":
        return sorted(search["ranking"][:k])
    return select_within_budget(search["gates"], search["savings"], level_budget(search["savings"], k))


def select_within_budget(gates: list[float], savings: list[float], budget: float) -> list[int]:
    """The set of arms saving at least ``budget`` with the least sum of (max(g) - g_i + eps)."""
    top = max(gates)
    eps = 1e-3 * (top - min(gates)) + 1e-9
    damage = [top - g + eps for g in gates]
    n, need = len(gates), budget * (1 - 1e-9)
    if n <= 16:
        best: tuple[float, list[int]] | None = None
        for size in range(1, n + 1):
            for subset in itertools.combinations(range(n), size):
                if sum(savings[i] for i in subset) >= need:
                    cost = sum(damage[i] for i in subset)
                    if best is None or cost < best[0] - 1e-12:
                        best = (cost, list(subset))
        if best is None:
            raise ValueError(f"no set of arms saves {budget:.3f} of the FLOPs")
        return best[1]
    chosen, total = [], 0.0
    for i in sorted(range(n), key=lambda i: damage[i] / max(savings[i], 1e-12)):
        if total >= need:
            break
        chosen.append(i)
        total += savings[i]
    return sorted(chosen)


class SearchSupernet(nn.Module):
    """A skip adapter and a parallel-adapter pair for every layer, plus the task's own parts.
    ``plan_modules(skip_set)`` is a view that shares these modules (no copies)."""

    def __init__(self, backbone: Backbone, base: PlanModules, skip_bottleneck: int, parallel_bottleneck: int | None) -> None:
        super().__init__()
        hidden, eps = backbone.config.hidden_size, backbone.config.layer_norm_eps
        layers = range(backbone.num_layers)
        self.skip = nn.ModuleList([SkipAdapter(hidden, skip_bottleneck, eps) for _ in layers])
        self.parallel = nn.ModuleList(
            [ParallelAdapters(hidden, parallel_bottleneck, eps) for _ in layers] if parallel_bottleneck else []
        )
        self.base = base

    def plan_modules(self, skip_set: set[int]) -> PlanModules:
        n = len(self.skip)
        return PlanModules(
            skip_adapters={i: self.skip[i] for i in skip_set},
            parallel_adapters={i: self.parallel[i] for i in range(n) if i not in skip_set} if len(self.parallel) else {},
            pooler=self.base.pooler, token_type_embeddings=self.base.token_type_embeddings, head=self.base.head,
        )


def das_search(
    backbone: Backbone, task: str, data_dir: str | Path, config: SearchConfig, progress: bool = True
) -> SearchResult:
    """One bandit, also under torchrun: every rank draws the same skip sets from the same generator
    (seeded alike), so the gates stay identical on every rank; each reward's validation batch is
    split across the ranks and its loss sums are all-reduced."""
    if getattr(backbone, "generative", False):
        return _generative_search(backbone, task, data_dir, config)
    world = init_world(backbone.device)
    runtime = DASRuntime(backbone)
    data = task_data(task, runtime, data_dir, config.train)
    spec = make_spec(backbone, data, "search", 1, [], config.train)
    torch.manual_seed(config.train.seed)
    base = backbone.build_plan_modules(spec, init_from_backbone=True)
    supernet = SearchSupernet(backbone, base, config.train.skip_bottleneck, config.train.parallel_bottleneck).to(backbone.device)
    n = backbone.num_layers
    if not 1 <= config.skip_num < n:
        raise ValueError(f"skip_num must be between 1 and {n - 1}, got {config.skip_num}")
    if config.objective not in OBJECTIVES:
        raise RunError(f"unknown search objective {config.objective!r} (use {', '.join(OBJECTIVES)})")
    savings = layer_savings(backbone, dataclasses.replace(spec, adapters=dataclasses.replace(
        spec.adapters, skip_bottleneck=config.train.skip_bottleneck)))
    if config.flops_budget is not None and config.objective != "reward-per-flop":
        raise RunError("a FLOPs budget (--flops-budget) needs the reward-per-flop objective")
    budgeted = savings if config.objective == "reward-per-flop" else None
    budget = (config.flops_budget or level_budget(savings, config.skip_num)) if budgeted else None
    if budget is not None and not 0 < budget <= sum(savings):
        raise RunError(f"the FLOPs budget must be in (0, {sum(savings):.3f}] (what skipping every layer saves), got {budget}")
    gates = torch.zeros(n)
    generator = torch.Generator().manual_seed(config.train.seed)
    val_data = data.dataset("val", config.train.max_eval_examples, seed=config.train.seed + 1)
    val_batch = min(config.train.batch_size, len(val_data)) // world.world_size * world.world_size
    if val_batch < 1:
        raise RunError(f"the val split has {len(val_data)} examples, fewer than the {world.world_size} processes")
    train_examples = len(data.examples("train", config.train.max_train_examples))
    warmup = int(config.warmup_fraction * total_steps(train_examples, config.train))
    log: list[dict[str, Any]] = [{"step": 0, "reward_mean": None, **{f"g{i}": 0.0 for i in range(n)}}]
    val_iter = None

    def next_val_batch():
        nonlocal val_iter
        if val_iter is None:  # starts where a resumed run left off: one val batch per gate update
            order = StepBatches(len(val_data), val_batch, seed=config.train.seed + 1, rank=world.rank,
                                world_size=world.world_size, start=len(log) - 1)
            val_iter = iter(loader(val_data, data.collate(), workers=config.train.workers, batch_sampler=order))
        return next(val_iter)

    def plan_for_step(step: int) -> Plan:
        return Plan(spec, supernet.plan_modules(sample_skip_set(gates, config.skip_num, generator, budgeted, budget)))

    def on_step(step: int, loss: float) -> None:
        if step < warmup or (step + 1) % config.update_every:
            return
        batch = next_val_batch()
        sets = [sample_skip_set(gates, config.skip_num, generator, budgeted, budget) for _ in range(config.num_samples)]
        with torch.no_grad(), autocast(backbone.device, config.train.precision):
            sums = torch.stack([data.losses(Plan(spec, supernet.plan_modules(s)), batch).sum() for s in sets])
        rewards = torch.exp(-all_reduce_sum(sums.float(), world).cpu() / val_batch)
        baseline = update_gates(gates, sets, rewards.tolist(), config.gate_lr)
        log.append({"step": step + 1, "reward_mean": round(baseline, 6),
                    **{f"g{i}": round(gates[i].item(), 6) for i in range(n)}})

    def state() -> dict[str, Any]:
        return {"gates": gates.clone(), "generator": generator.get_state(), "log": [dict(row) for row in log]}

    def load_state(saved: dict[str, Any]) -> None:
        gates.copy_(saved["gates"].cpu())
        generator.set_state(saved["generator"].cpu())
        log[:] = saved["log"]

    run_training(data, supernet, plan_for_step, config.train, on_step=on_step, progress=progress,
                 desc=f"search {task} k={config.skip_num}", world=world, state=state, load_state=load_state)
    ranking = sorted(range(n), key=lambda i: -gates[i].item())
    result = SearchResult(task, config.skip_num, [round(g, 6) for g in gates.tolist()], ranking, [], log,
                          config.objective, [round(s, 6) for s in savings], budget)
    result.skip_set = (select_within_budget(result.gates, savings, budget) if budget is not None
                       else sorted(ranking[: config.skip_num]))
    return result


def _generative_search(backbone: Backbone, task: str, data_dir: str | Path, config: SearchConfig) -> SearchResult:
    """The bandit over a generative backbone's decoder blocks (models/producer/generative_plans.py). Every
    block costs the same, so the objectives agree (module docstring); the FLOPs budget does not apply."""
    if not 1 <= config.skip_num < backbone.num_layers:
        raise ValueError(f"skip_num must be between 1 and {backbone.num_layers - 1}, got {config.skip_num}")
    if config.flops_budget is not None:
        raise RunError("a FLOPs budget needs arms of different costs; a generative backbone's blocks all cost the same")
    found = search_generative(backbone, task, data_dir, config.skip_num, config.train, config.warmup_fraction,
                              config.update_every, config.gate_lr)
    spec = PlanSpec(task=task, name="search", version=1, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
                    adapters=AdapterShapes(config.train.skip_bottleneck, config.train.parallel_bottleneck))
    savings = [round(s, 6) for s in layer_savings(backbone, spec)]
    return SearchResult(task, config.skip_num, found["gates"], found["ranking"], found["skip_set"], found["gate_log"],
                        config.objective, savings)


def write_search_outputs(result: SearchResult, out_dir: str | Path) -> dict[str, Path]:
    """search.json (ranking, gates, skip set), gates.csv (gate values over steps) and gates.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    with open(out / "gates.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.gate_log[0]))
        writer.writeheader()
        writer.writerows(result.gate_log)
    import matplotlib  # here, not at the top: only writing the plot needs it (and the Agg backend)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [row["step"] for row in result.gate_log]
    for i in range(len(result.gates)):
        style = "-" if i in result.skip_set else ":"
        ax.plot(steps, [row[f"g{i}"] for row in result.gate_log], style, label=f"layer {i}")
    ax.set_xlabel("training step")
    ax.set_ylabel("gate value g (skip probability = sigmoid(g))")
    ax.set_title(f"DAS search, {result.task}, skip_num={result.skip_num}: chosen {result.skip_set} (solid)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "gates.png", dpi=110)
    plt.close(fig)
    return {"json": out / "search.json", "csv": out / "gates.csv", "png": out / "gates.png"}
