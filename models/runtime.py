"""Task-level inference over a frozen backbone and a plan: VQA, NLVR2, image-text retrieval.

Knows tasks and heads, not HTTP and not plan files: callers hand in a validated :class:`Plan`
(from ``models.das.plan``) and PIL images; results carry the per-request FLOPs of the path that ran.
The ``*_logits`` functions are differentiable (training uses them); the public task methods run
under ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from models.backbones.base import Backbone, BackboneBatch
from models.das.flops import FlopsReport
from models.das.plan import Plan, PlanError

DEFAULT_CANDIDATE_BATCH = 32


@dataclass(frozen=True)
class Answer:
    answer: str
    score: float


@dataclass(frozen=True)
class VQAResult:
    answers: list[Answer]
    flops: FlopsReport
    truncated: bool


@dataclass(frozen=True)
class NLVR2Result:
    label: bool
    probability: float  # probability that the statement is true
    flops: FlopsReport
    truncated: bool


@dataclass(frozen=True)
class RankedCandidate:
    index: int  # position in the candidates as given
    score: float  # image-text matching score (higher = better match)


@dataclass(frozen=True)
class RankingResult:
    ranking: list[RankedCandidate]  # best first
    flops: FlopsReport  # summed over every (image, text) pair scored
    truncated: list[bool]  # per text


class DASRuntime:
    """Runs requests for every task through the reduced path a plan describes."""

    def __init__(self, backbone: Backbone, candidate_batch_size: int = DEFAULT_CANDIDATE_BATCH) -> None:
        self.backbone = backbone
        self.candidate_batch_size = candidate_batch_size

    # -- checks ----------------------------------------------------------------------------
    def _check(self, plan: Plan, task: str) -> None:
        if plan.task != task:
            raise PlanError(f"plan {plan.task}/{plan.name} is for {plan.task}, not {task}")
        if plan.spec.backbone.fingerprint != self.backbone.fingerprint:
            raise PlanError(f"plan {plan.task}/{plan.name} was made for another backbone")

    def labels(self, plan: Plan) -> list[str]:
        return list(plan.spec.labels) if plan.spec.own_head else self.backbone.labels(plan.task)

    def _prepare(self, images: Sequence[Image.Image], texts: Sequence[str]) -> BackboneBatch:
        return self.backbone.preprocess(images, texts).to(self.backbone.device, self.backbone.dtype)

    def _flops(self, plan: Plan, batches: Sequence[BackboneBatch], i: int) -> FlopsReport:
        grids = [batch.patch_grids[i] for batch in batches]
        return self.backbone.flops(plan.task, plan.spec, batches[0].text_lengths[i], grids)

    # -- differentiable logits ---------------------------------------------------------------
    def vqa_logits(self, plan: Plan, batch: BackboneBatch) -> torch.Tensor:
        """(B, num_answers) logits; sigmoid gives per-answer scores."""
        pooled = self.backbone.encode(batch, plan.modules)
        return self.backbone.head_for("vqa", plan.modules)(pooled)

    def nlvr2_logits(self, plan: Plan, left: BackboneBatch, right: BackboneBatch) -> torch.Tensor:
        """(B, 2) logits: one pass per image (token types 1 and 2), pooled vectors concatenated."""
        pooled = [self.backbone.encode(batch, plan.modules, image_token_type_idx=i + 1) for i, batch in enumerate((left, right))]
        return self.backbone.head_for("nlvr2", plan.modules)(torch.cat(pooled, dim=-1))

    def retrieval_logits(self, plan: Plan, batch: BackboneBatch) -> torch.Tensor:
        """(B,) image-text matching scores, one per pair."""
        pooled = self.backbone.encode(batch, plan.modules)
        return self.backbone.head_for("retrieval", plan.modules)(pooled)[:, 0]

    # -- tasks --------------------------------------------------------------------------------
    @torch.inference_mode()
    def vqa(self, plan: Plan, images: Sequence[Image.Image], questions: Sequence[str], top_k: int = 5) -> list[VQAResult]:
        self._check(plan, "vqa")
        labels = self.labels(plan)
        batch = self._prepare(images, questions)
        scores = torch.sigmoid(self.vqa_logits(plan, batch).float())
        top = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [
            VQAResult(
                answers=[Answer(labels[j], s) for j, s in zip(indices[i], values[i])],
                flops=self._flops(plan, [batch], i),
                truncated=batch.truncated[i],
            )
            for i in range(len(batch))
        ]

    @torch.inference_mode()
    def nlvr2(
        self, plan: Plan, left: Sequence[Image.Image], right: Sequence[Image.Image], statements: Sequence[str]
    ) -> list[NLVR2Result]:
        self._check(plan, "nlvr2")
        labels = [label.lower() for label in self.labels(plan)]
        true_index = labels.index("true") if "true" in labels else 1
        left_batch, right_batch = self._prepare(left, statements), self._prepare(right, statements)
        probs = torch.softmax(self.nlvr2_logits(plan, left_batch, right_batch).float(), dim=-1)[:, true_index]
        return [
            NLVR2Result(
                label=p > 0.5, probability=p, flops=self._flops(plan, [left_batch, right_batch], i),
                truncated=left_batch.truncated[i],
            )
            for i, p in enumerate(probs.cpu().tolist())
        ]

    @torch.inference_mode()
    def match_scores(self, plan: Plan, images: Sequence[Image.Image], texts: Sequence[str]) -> tuple[list[float], list[FlopsReport], list[bool]]:
        """Scores of (image, text) pairs, run in chunks of ``candidate_batch_size``."""
        self._check(plan, "retrieval")
        scores: list[float] = []
        flops: list[FlopsReport] = []
        truncated: list[bool] = []
        for start in range(0, len(texts), self.candidate_batch_size):
            stop = start + self.candidate_batch_size
            batch = self._prepare(images[start:stop], texts[start:stop])
            scores += self.retrieval_logits(plan, batch).float().cpu().tolist()
            flops += [self._flops(plan, [batch], i) for i in range(len(batch))]
            truncated += batch.truncated
        return scores, flops, truncated

    def _rank(self, plan: Plan, images: Sequence[Image.Image], texts: Sequence[str]) -> RankingResult:
        scores, flops, truncated = self.match_scores(plan, images, texts)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        total = flops[0]
        for report in flops[1:]:
            total = total + report
        return RankingResult([RankedCandidate(i, scores[i]) for i in order], total, truncated)

    def rank_texts(self, plan: Plan, image: Image.Image, texts: Sequence[str]) -> RankingResult:
        """Text retrieval: rank candidate captions for one image."""
        if not texts:
            raise ValueError("no candidate texts to rank")
        return self._rank(plan, [image] * len(texts), texts)

    def rank_images(self, plan: Plan, text: str, images: Sequence[Image.Image]) -> RankingResult:
        """Image retrieval: rank candidate images for one caption."""
        if not images:
            raise ValueError("no candidate images to rank")
        return self._rank(plan, images, [text] * len(images))
