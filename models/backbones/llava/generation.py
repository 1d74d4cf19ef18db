"""Generation through the reduced path of a LLaVA-style backbone: greedy and sampled decoding,
stop strings, streaming, per-request accounting.

One call runs a batch of prompts: the prompts are left-padded, prefilled together (one pass through
the kept decoder blocks, whose keys and values go into a :class:`~models.backbones.llava.modeling.KVCache`
that has no entry for skipped blocks), then decoded one token per step for every prompt still
running; a prompt that finishes leaves the batch (its cache rows are dropped).

:class:`LlavaRuntime` is the entry point (the generative counterpart of ``models.runtime.DASRuntime``):

* :meth:`LlavaRuntime.stream` yields a :class:`TokenEvent` for every token as it is produced (with the text it
  adds: text that may turn out to be the start of a stop string is held back until it cannot) and
  a :class:`Finished` with the prompt's :class:`Completion` when it ends.
* :meth:`LlavaRuntime.generate` returns the completions; :meth:`LlavaRuntime.answer` gives short VQA
  answers with their sequence probabilities.

A completion's ``finish_reason`` is ``"stop"`` (an end-of-sequence token, or a stop string, which is
cut from the text) or ``"length"`` (``max_new_tokens``, or the model's context, was reached).
Nothing here knows HTTP; the service maps these onto its endpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from models.backbones.llava.modeling import LlavaBackbone
from models.das.flops import FlopsReport
from models.das.plan import Plan, PlanError

ANSWER_MAX_NEW_TOKENS = 16
MAX_STOP_STRINGS = 8
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class GenerationParams:
    """How to decode. ``temperature`` 0 is greedy (``top_p`` and ``seed`` then play no part); above 0,
    tokens are sampled from the tempered distribution cut to its ``top_p`` nucleus, each prompt with
    its own generator seeded with ``seed`` (so a prompt's sample does not depend on its batch)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One prompt's result. ``logprob`` sums the chosen tokens' log-probabilities under the model's own
    (untempered) distribution, the end-of-sequence token included when it ended the answer."""

    index: int  # the prompt's position in the call
    text: str
    token_ids: list[int]  # generated, end-of-sequence token included
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int  # image tokens included
    completion_tokens: int
    logprob: float
    time_to_first_token_s: float
    flops: FlopsReport

    @property
    def probability(self) -> float:
        return math.exp(self.logprob)


@dataclass(frozen=True)
class TokenEvent:
    """A token was produced for prompt ``index``; ``text`` is what it adds to the completion's text
    (possibly "", e.g. while a possible stop string is held back, or for the end-of-sequence token)."""

    index: int
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Finished:
    index: int
    completion: Completion


StreamEvent = TokenEvent | Finished


@dataclass(frozen=True)
class GeneratedAnswer:
    """A generated VQA answer and the probability of exactly this token sequence (exp of its logprob)."""

    text: str
    probability: float
    flops: FlopsReport
    completion: Completion


@dataclass
class _Row:
    """Decoding state of one prompt."""

    index: int
    budget: int  # tokens it may generate
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    logprob: float = 0.0
    emitted: str = ""
    first_token_s: float | None = None


def _check(backbone: LlavaBackbone, plan: Plan) -> None:
    if plan.task != "vqa":
        name = {"llava": "LLaVA", "lavin": "LaVIN"}.get(backbone.architecture, backbone.architecture)
        raise PlanError(f"plan {plan.task}/{plan.name}: a {name} backbone generates for vqa plans, not {plan.task}")
    if plan.spec.backbone.fingerprint != backbone.fingerprint:
        raise PlanError(f"plan {plan.task}/{plan.name} was made for another backbone")


def _eos_ids(backbone: LlavaBackbone) -> set[int]:
    ids: set[int] = set()
    if hasattr(backbone, "eos_token_ids"):  # a backbone that says itself (LaVIN)
        return set(backbone.eos_token_ids())
    configured = getattr(backbone.llava.generation_config, "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])):
        ids.add(int(value))
    if backbone.tokenizer.eos_token_id is not None:
        ids.add(int(backbone.tokenizer.eos_token_id))
    return ids


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could start a stop string (or are an incomplete
    character of a multi-byte token) and must not be streamed yet."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


def _choose(logits: torch.Tensor, rows: Sequence[_Row], params: GenerationParams) -> tuple[list[int], list[float]]:
    """Next token per active row and its log-probability under the untempered distribution."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        tokens = logits.argmax(dim=-1).tolist()
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1).cpu()
        if params.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p  # the nucleus keeps the top token
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = [int(torch.multinomial(probs[r], 1, generator=row.generator)) for r, row in enumerate(rows)]
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    return [int(t) for t in tokens], chosen


def stream(backbone: LlavaBackbone, plan: Plan, prompts: Sequence[str | Sequence[dict[str, Any]]],
           images: Sequence[Image.Image | Sequence[Image.Image] | None], params: GenerationParams) -> Iterator[StreamEvent]:
    """Decode a batch of prompts under ``plan``; see the module docstring for the events."""
    _check(backbone, plan)
    if not prompts:
        return
    start = time.perf_counter()
    batch = backbone.preprocess(images, prompts).to(backbone.device, backbone.dtype)
    context = backbone.max_text_len
    over = [i for i, n in enumerate(batch.text_lengths) if n >= context]
    if over:
        raise ValueError(f"prompt(s) {over} take {[batch.text_lengths[i] for i in over]} tokens; the model's context "
                         f"is {context} tokens, prompt and answer together")
    seeds = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    rows = [_Row(i, min(params.max_new_tokens, context - n),
                 None if params.greedy else torch.Generator().manual_seed(seeds))
            for i, n in enumerate(batch.text_lengths)]
    padded = batch.input_ids.shape[1]
    eos = _eos_ids(backbone)
    tokenizer = backbone.tokenizer
    modules = plan.modules
    with torch.inference_mode():
        cache = backbone.new_cache(modules, len(rows), padded + max(row.budget for row in rows) - 1)
        logits, next_position = backbone.prefill(batch, modules, cache)
    active = rows
    while active:
        tokens, logprobs = _choose(logits, active, params)
        now = time.perf_counter() - start
        still: list[int] = []
        for r, (row, token, logprob) in enumerate(zip(active, tokens, logprobs)):
            row.ids.append(token)
            row.logprob += logprob
            row.first_token_s = now if row.first_token_s is None else row.first_token_s
            finish = None
            text_ids = row.ids[:-1] if token in eos else row.ids
            text = tokenizer.decode(text_ids, skip_special_tokens=True)
            cut = min((p for p in (text.find(s) for s in params.stop) if p >= 0), default=-1)
            if token in eos:
                finish = "stop"
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif finish is None and len(row.ids) >= row.budget:
                finish = "length"
            shown = text if finish else text[: len(text) - _held_back(text, params.stop)]
            delta = shown[len(row.emitted):] if shown.startswith(row.emitted) else ""
            row.emitted += delta
            yield TokenEvent(row.index, token, delta, logprob)
            if finish is None:
                still.append(r)
                continue
            flops = backbone.flops("vqa", plan.spec, batch.text_lengths[row.index], batch.image_grids(row.index),
                                   new_tokens=len(row.ids))
            yield Finished(row.index, Completion(
                index=row.index, text=text, token_ids=list(row.ids), finish_reason=finish,
                prompt_tokens=batch.text_lengths[row.index], completion_tokens=len(row.ids), logprob=row.logprob,
                time_to_first_token_s=row.first_token_s, flops=flops,
            ))
        if not still:
            break
        with torch.inference_mode():
            if len(still) < len(active):  # finished prompts leave the batch
                keep = torch.tensor(still, device=backbone.device)
                cache.select_rows(keep)
                next_position = next_position.index_select(0, keep)
            active = [active[r] for r in still]
            fed = torch.tensor([row.ids[-1] for row in active], device=backbone.device)
            logits = backbone.decode_step(fed, next_position, modules, cache)
            next_position = next_position + 1


def generate(backbone: LlavaBackbone, plan: Plan, prompts: Sequence[str | Sequence[dict[str, Any]]],
             images: Sequence[Image.Image | Sequence[Image.Image] | None], params: GenerationParams) -> list[Completion]:
    """The completions of :func:`stream`, in prompt order."""
    done: dict[int, Completion] = {}
    for event in stream(backbone, plan, prompts, images, params):
        if isinstance(event, Finished):
            done[event.index] = event.completion
    return [done[i] for i in range(len(prompts))]


def answer(backbone: LlavaBackbone, plan: Plan, images: Sequence[Image.Image], questions: Sequence[str],
           max_new_tokens: int = ANSWER_MAX_NEW_TOKENS) -> list[GeneratedAnswer]:
    """Greedy short answers (LLaVA-1.5's "single word or phrase" prompt), one image per question."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    prompts = [backbone.prompt_for(question) for question in questions]
    completions = generate(backbone, plan, prompts, list(images), GenerationParams(max_new_tokens=max_new_tokens))
    return [GeneratedAnswer(c.text.strip(), c.probability, c.flops, c) for c in completions]


Prompts = Sequence[str | Sequence[dict[str, Any]]]
Images = Sequence[Image.Image | Sequence[Image.Image] | None]


class LlavaRuntime:
    """Generation requests through the reduced path a plan describes, on one frozen LLaVA backbone.

    ``prompts``: per request, chat messages (``[{"role": "user", "content": [{"type": "image"},
    {"type": "text", "text": "..."}]}, ...]``, rendered with the checkpoint's chat template and the
    assistant's turn opened) or a raw prompt string with one ``<image>`` per image. ``images``: per
    request, one image, a list of images (in placeholder order) or None.
    """

    def __init__(self, backbone: LlavaBackbone) -> None:
        self.backbone = backbone

    def stream(self, plan: Plan, prompts: Prompts, images: Images,
               params: GenerationParams | None = None) -> Iterator[StreamEvent]:
        """A :class:`TokenEvent` per token as it is produced, a :class:`Finished` per request when it ends."""
        return stream(self.backbone, plan, prompts, images, params or GenerationParams())

    def generate(self, plan: Plan, prompts: Prompts, images: Images,
                 params: GenerationParams | None = None) -> list[Completion]:
        """The completions, in request order."""
        return generate(self.backbone, plan, prompts, images, params or GenerationParams())

    def answer(self, plan: Plan, images: Sequence[Image.Image], questions: Sequence[str],
               max_new_tokens: int = ANSWER_MAX_NEW_TOKENS) -> list[GeneratedAnswer]:
        """Short greedy VQA answers, one image per question, with their sequence probabilities."""
        return answer(self.backbone, plan, images, questions, max_new_tokens)
