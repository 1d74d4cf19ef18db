"""The DAS layer-significance bandit's two rules, shared by every search (``models/producer/search.py``
for ViLT and METER, ``models/producer/generative.py`` for the decoder blocks of LLaVA and LaVIN):
drawing a skip set from the gates, and moving the gates by the rewards of sampled skip sets.

One gate per arm (layer); sigmoid(gate) is the arm's weight when drawing. A reward (exp(-loss) on a
validation batch) above the mean of its round raises the gates of the set's arms, below it lowers
them: REINFORCE with the round's mean as baseline, ``gate += lr * (reward - mean) * p * (1 - p)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def level_budget(savings: Sequence[float], k: int) -> float:
    """B_k = k * mean(s_i): what ``k`` average arms save."""
    return k * sum(savings) / len(savings)


def sample_skip_set(gates: torch.Tensor, k: int, generator: torch.Generator,
                    savings: Sequence[float] | None = None, budget: float | None = None) -> set[int]:
    """``k`` arms drawn from sigmoid(gates) without replacement; with ``savings`` (the reward-per-flop
    objective), arms drawn one by one until they save ``budget`` (default: what ``k`` average arms save)."""
    if savings is None:
        return set(torch.multinomial(torch.sigmoid(gates), k, replacement=False, generator=generator).tolist())
    order = torch.multinomial(torch.sigmoid(gates), len(savings), replacement=False, generator=generator).tolist()
    need = (level_budget(savings, k) if budget is None else budget) * (1 - 1e-9)
    chosen, total = set(), 0.0
    for i in order:
        chosen.add(i)
        total += savings[i]
        if total >= need:
            break
    return chosen


def update_gates(gates: torch.Tensor, skip_sets: Sequence[set[int] | Sequence[int]], rewards: Sequence[float],
                 lr: float) -> float:
    """Move ``gates`` in place by one round of rewards (one per skip set); returns the round's mean reward."""
    baseline = float(sum(float(r) for r in rewards) / len(rewards))
    probs = torch.sigmoid(gates)
    for skip_set, reward in zip(skip_sets, rewards):
        for i in skip_set:
            gates[i] += lr * (float(reward) - baseline) * probs[i] * (1 - probs[i])
    return baseline
