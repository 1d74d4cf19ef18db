"""The producer for generative (LLaVA-style) backbones: a tiny LLaVA trained from scratch on the
synthetic world, the DAS search over its decoder blocks, plan training and evaluation.

Everything runs on CPU at the embedded default's size (``LlavaSize()``: CLIP 64 wide x 2 layers at
96 px / 16 px patches, a projector, Llama 128 wide x 8 blocks; about 1.35 M parameters). Steps, each
resumable from what it wrote into a work directory:

* :func:`pretrain_llava` -- the frozen backbone's pre-training. A word-level tokenizer over the world's
  vocabulary (plus the prompt words), a LLaVA-1.5 chat template, ``save_pretrained`` + the
  ``LlavaProcessor`` files, so ``LlavaBackbone.from_pretrained`` loads it offline. Every weight is
  trained, on text targets only: VQA (question -> the short answer, LLaVA-1.5's "single word or
  phrase" prompt) and captioning ("describe the image." -> a caption), next-token loss on the answer
  tokens (and the end-of-sequence token) only. The validation curve (loss, exact-match accuracy) is
  measured every ``eval_every`` steps; training stops when it flattens (``patience`` evaluations without
  a relative gain of ``min_gain`` in val loss), at ``max_steps`` or after ``max_minutes`` (the cosine
  learning-rate schedule runs to whichever of the two ends first).

The search, the plan trainer and the teacher-forced evaluation take any backbone whose DAS arms are
its decoder blocks (LLaVA, LaVIN): they build batches with the backbone's own ``preprocess`` and
``append_tokens`` and run ``sequence_output`` and ``lm_head``; pre-training is the tiny LLaVA's:

* :func:`search_skips` -- the DAS search over the decoder blocks as a bandit (docs/plans.md, "The
  search"): one gate per block, each step skips ``k`` blocks sampled from the gates (their skip
  adapters, shared across steps, are trained), and every ``update_every`` steps three sampled skip
  sets are scored on a validation batch with reward ``exp(-loss)`` and REINFORCE moves the gates.
* :func:`train_decoder_plan` -- a plan (skip adapters for the skipped blocks, parallel adapters in the
  kept ones) trained with the backbone frozen, same loss, saved with ``save_plan``.
* :func:`evaluate_llava_plan` -- generated answers (``LlavaRuntime.answer``, greedy) against the truth:
  exact-match accuracy with a 95 % bootstrap interval, per question type.
* :func:`run_llava_pipeline` -- all of it into a plan store (``backbone/``, ``vqa/<plan>/``,
  ``store.json``, ``RESULTS.md``).

Splits. The backbone and the plans train on world ``seed`` (its train split; the curve on its val
split); plans are chosen on the val split of world ``eval_seed`` and reported on the test split of
world ``eval_seed`` (scenes never seen in training).

Exact match is computed from teacher-forced logits during training (every answer token and the
end-of-sequence token the argmax: exactly when greedy decoding returns the answer) and by generation
in the evaluation.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from models.backbones.llava.checkpoint import build_tokenizer, save_llava_checkpoint, tiny_llava_config
from models.backbones.llava.generation import LlavaRuntime
from models.backbones.lavin.modeling import LavinBackbone
from models.backbones.llava.modeling import LlavaBackbone, LlavaBackboneConfig
from models.das.adapters import PlanModules
from models.das.plan import AdapterShapes, BackboneRef, PlanSpec, load_plan, save_plan
from models.paths import STORE_BACKBONE_DIR, STORE_STATE_FILE
from models.producer.bandit import sample_skip_set, update_gates
from models.producer.stats import bootstrap_interval
from models.producer.world.language import (
    QUESTION_TYPES,
    generate_vqa,
    scene_captions,
    world_vocabulary,
)
from models.producer.world.scenes import Scene, WorldConfig, render_scene, seeded_rng

TASK = "vqa"
CAPTION_PROMPT = "describe the image."
PROMPT_WORDS = ("describe", "answer", "question", "using", "single", "word", "or", "phrase")
KEEP_FRACTION = 0.97  # the active plan keeps at least this share of the adapters-only val accuracy
IGNORE = -100


def log_to(path: Path | None) -> Callable[[str], None]:
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(line + "\n")
    return log


# ---------------------------------------------------------------------------------------------
# sizes and configurations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlavaSize:
    """The tiny LLaVA's architecture (the defaults are the embedded one)."""

    image_size: int = 96
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    hidden: int = 128
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    max_positions: int = 160

    def config(self, vocab_size: int):
        vision = dict(hidden_size=self.vision_hidden, intermediate_size=self.vision_intermediate,
                      num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                      image_size=self.image_size, patch_size=self.patch_size, projection_dim=self.vision_hidden)
        text = dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                    max_position_embeddings=self.max_positions)
        # the last CLIP layer's output is the feature (a 2-layer tower: -2 would leave one layer unused)
        return tiny_llava_config(vocab_size, vision=vision, text=text, vision_feature_layer=-1)


MICRO = LlavaSize(image_size=32, patch_size=16, vision_hidden=16, vision_layers=1, vision_heads=2,
                  vision_intermediate=32, hidden=32, layers=4, heads=2, kv_heads=1, intermediate=64,
                  max_positions=96)


@dataclass(frozen=True)
class DataConfig:
    """Which synthetic examples: world ``seed`` for training (and the pre-training curve on its val
    split), world ``eval_seed`` for plan selection (val) and the report (test)."""

    seed: int = 0
    train_images: int = 12000  # VQA images of world `seed` (80 % train, 10 % val, 10 % test)
    questions_per_image: int = 3
    captions_per_image: int = 1
    eval_seed: int = 1
    eval_images: int = 4000  # of world `eval_seed`: 10 % val, 10 % test -> 3 x 400 questions each
    image_size: int = 96


@dataclass(frozen=True)
class PretrainConfig:
    size: LlavaSize = LlavaSize()
    data: DataConfig = DataConfig()
    batch_size: int = 48
    lr: float = 5e-4
    min_lr_fraction: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    max_steps: int = 6000
    max_minutes: float = 40.0
    eval_every: int = 200
    val_examples: int = 400
    patience: int = 6  # evaluations without a relative gain of min_gain in val loss -> stop (the curve flattened)
    min_gain: float = 0.005
    checkpoint_every: int = 200
    save_dtype: str = "bfloat16"  # the shipped weights (the computation is float32 unless asked otherwise)
    seed: int = 0


@dataclass(frozen=True)
class PlanTrainConfig:
    skip_bottleneck: int = 64
    parallel_bottleneck: int | None = 16
    batch_size: int = 48
    lr: float = 3e-3
    steps: int = 600
    warmup_steps: int = 30
    eval_every: int = 100
    val_examples: int = 300
    seed: int = 0
    own_parts: tuple[str, ...] = ()  # e.g. ("mma_adapters",): LaVIN plans that train their own MMA adapters


@dataclass(frozen=True)
class SearchConfig:
    skip_num: int = 2
    steps: int = 300
    warmup_fraction: float = 0.2
    update_every: int = 5
    gate_lr: float = 10.0
    batch_size: int = 32
    lr: float = 3e-3
    skip_bottleneck: int = 64
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# the data: prompts, targets, images
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    image: int  # index into the image table
    kind: str  # a question type, or "caption"
    prompt: str  # the question, or CAPTION_PROMPT
    target: str


@dataclass
class ExampleSet:
    """Examples over a table of rendered images (uint8, N x H x W x 3) and their scenes."""

    examples: list[Example]
    images: np.ndarray
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.examples)

    def pil(self, index: int):
        from PIL import Image  # PIL is light, but only this helper needs it here

        return Image.fromarray(self.images[index], "RGB")

    def subset(self, kinds: Sequence[str] | None = None, limit: int | None = None, seed: int = 0) -> ExampleSet:
        chosen = [e for e in self.examples if kinds is None or e.kind in kinds]
        if limit is not None and len(chosen) > limit:
            chosen = random.Random(seed).sample(chosen, limit)
        return ExampleSet(chosen, self.images, self.scenes)


def world_words() -> list[str]:
    return list(world_vocabulary()) + list(PROMPT_WORDS)


def build_examples(seed: int, n_images: int, splits: Sequence[str], questions_per_image: int = 3,
                   captions_per_image: int = 0, image_size: int = 96, vqa_only_splits: Sequence[str] = ()
                   ) -> dict[str, ExampleSet]:
    """Examples of world ``seed`` by split: its VQA questions (``generate_vqa``) and, for splits not in
    ``vqa_only_splits``, ``captions_per_image`` captions of each image (``scene_captions``, seeded per image)."""
    items = generate_vqa(n_images * questions_per_image, seed, WorldConfig(image_size=image_size),
                         questions_per_image=questions_per_image)
    out: dict[str, ExampleSet] = {}
    for split in splits:
        chosen = [item for item in items if item.split == split]
        image_of: dict[int, int] = {}
        scenes: list[Scene] = []
        examples: list[Example] = []
        for item in chosen:
            if item.image_id not in image_of:
                image_of[item.image_id] = len(scenes)
                scenes.append(item.scene)
                if captions_per_image and split not in vqa_only_splits:
                    rng = seeded_rng(seed, "llava-caption", item.image_id)
                    for caption in scene_captions(item.scene, rng, captions_per_image):
                        examples.append(Example(image_of[item.image_id], "caption", CAPTION_PROMPT, caption))
            examples.append(Example(image_of[item.image_id], item.question.question_type, item.question.question,
                                    item.question.answer))
        images = np.stack([np.asarray(render_scene(s, image_size)) for s in scenes]) if scenes else \
            np.zeros((0, image_size, image_size, 3), np.uint8)
        out[split] = ExampleSet(examples, images, scenes)
    return out


GenerativeBackbone = LlavaBackbone | LavinBackbone  # what the plan trainer and the search take


def prompt_messages(backbone: GenerativeBackbone, example: Example) -> list[dict[str, Any]]:
    if example.kind == "caption":
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    return backbone.prompt_for(example.prompt)


class Encoder:
    """Training batches for a generative backbone (LLaVA, LaVIN): each prompt through the backbone's
    own ``preprocess`` (exactly what generation feeds) with its target (the answer's tokens and the
    end-of-sequence token) appended, and the labels."""

    def __init__(self, backbone: GenerativeBackbone) -> None:
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        self.eos = int(self.tokenizer.eos_token_id)
        self._targets: dict[str, list[int]] = {}

    def target_ids(self, text: str) -> list[int]:
        if text not in self._targets:
            self._targets[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos]
        return self._targets[text]

    def prompts(self, data: ExampleSet, indices: Sequence[int]):
        """The backbone's batch of the examples' prompts and images (left-padded, no target)."""
        examples = [data.examples[i] for i in indices]
        return self.backbone.preprocess([data.pil(e.image) for e in examples],
                                        [prompt_messages(self.backbone, e) for e in examples])

    def batch(self, data: ExampleSet, indices: Sequence[int]) -> tuple[Any, torch.Tensor]:
        """Prompt + target sequences and the labels (-100 except the target tokens, each label at the
        position whose logits predict it, i.e. shifted left by one)."""
        targets = [self.target_ids(data.examples[i].target) for i in indices]
        batch = self.backbone.append_tokens(self.prompts(data, indices), targets)
        width = batch.input_ids.shape[1]
        labels = torch.full((len(targets), width), IGNORE, dtype=torch.long)
        for row, target in enumerate(targets):
            labels[row, width - len(target) - 1:width - 1] = torch.tensor(target)
        return batch, labels


def answer_loss(backbone: GenerativeBackbone, plan: PlanModules, batch: Any, labels: torch.Tensor,
                per_example: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over the target tokens, and per example whether every target token is the
    argmax (greedy decoding would return exactly the target)."""
    hidden = backbone.sequence_output(batch, plan)
    where = labels != IGNORE
    logits = backbone.lm_head(hidden[where]).float()
    gold = labels[where]
    losses = F.cross_entropy(logits, gold, reduction="none")
    correct_tokens = logits.argmax(-1) == gold
    rows = where.nonzero()[:, 0]
    wrong = torch.zeros(labels.shape[0], dtype=torch.long).index_add_(0, rows, (~correct_tokens).long())
    if per_example:
        per = torch.zeros(labels.shape[0]).index_add_(0, rows, losses.detach()) / where.sum(1).clamp(min=1)
        return per, wrong == 0
    return losses.mean(), wrong == 0


def evaluate_teacher_forced(backbone: GenerativeBackbone, plan: PlanModules, encoder: Encoder, data: ExampleSet,
                            batch_size: int = 64) -> dict[str, Any]:
    """Loss and exact match (from teacher-forced argmax) on ``data``, overall and per kind."""
    losses, exact, kinds = [], [], []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            batch, labels = encoder.batch(data, indices)
            per, ok = answer_loss(backbone, plan, batch, labels, per_example=True)
            losses += per.tolist()
            exact += ok.tolist()
            kinds += [data.examples[i].kind for i in indices]
    out: dict[str, Any] = {"loss": float(np.mean(losses)), "exact": float(np.mean(exact)), "n": len(exact)}
    by_kind = defaultdict(list)
    for kind, ok in zip(kinds, exact):
        by_kind[kind].append(ok)
    out["exact_by_kind"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(by_kind.items())}
    vqa = [ok for kind, ok in zip(kinds, exact) if kind != "caption"]
    out["vqa_exact"] = float(np.mean(vqa)) if vqa else None
    return out


def lr_at(step: int, total: int, warmup: int, min_fraction: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def batches_from(n: int, batch_size: int, seed: int, start_step: int = 0):
    """Index batches over shuffled epochs, deterministic in (seed, step): a resumed run sees the same."""
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, within = divmod(step, per_epoch)
        order = _epoch_order(n, seed, epoch)
        yield step, order[within * batch_size:(within + 1) * batch_size]
        step += 1


# ---------------------------------------------------------------------------------------------
# pre-training the backbone
# ---------------------------------------------------------------------------------------------
def _trainable_backbone(directory: Path) -> LlavaBackbone:
    processor = LlavaProcessor.from_pretrained(str(directory), local_files_only=True)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32,
                                                          attn_implementation="sdpa")
    return LlavaBackbone(LlavaBackboneConfig(model.config), processor, model.train())


def _best_loss(curve: list[dict[str, Any]], min_gain: float) -> tuple[float, int]:
    best = (math.inf, 0)
    for point in curve:
        best = (point["val_loss"], 0) if point["val_loss"] < best[0] * (1 - min_gain) else (best[0], best[1] + 1)
    return best


def pretrain_llava(out: str | Path, config: PretrainConfig = PretrainConfig(), work: str | Path | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the tiny LLaVA from scratch into ``out`` (a backbone directory); resumable from ``work``
    (default ``out``.work): the random init, training checkpoints and the curve live there."""
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    log = log or log_to(work / "pretrain.log")
    init_dir = work / "init"
    state_path = work / "pretrain-state.pt"
    if not (init_dir / "config.json").is_file():
        shutil.rmtree(init_dir, ignore_errors=True)
        words = world_words()
        vocab = len(build_tokenizer(words))
        save_llava_checkpoint(init_dir, words, config=config.size.config(vocab), seed=config.seed)
    backbone = _trainable_backbone(init_dir)
    model = backbone.llava
    d = config.data
    t0 = time.time()
    data = build_examples(d.seed, d.train_images, ("train", "val"), d.questions_per_image, d.captions_per_image,
                          d.image_size)
    train, val = data["train"], data["val"].subset(limit=config.val_examples, seed=config.seed)
    log(f"pretrain data: {len(train)} train examples on {len(train.images)} images, {len(val)} val examples "
        f"({time.time() - t0:.0f} s)")
    encoder = Encoder(backbone)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    start, curve, elapsed, best = 0, [], 0.0, (math.inf, 0)  # (best val loss, evaluations since)
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, curve, elapsed = state["step"], state["curve"], state["elapsed"]
        best = tuple(state["best_loss"]) if "best_loss" in state else _best_loss(curve, config.min_gain)
        log(f"resumed at step {start} ({elapsed / 60:.1f} min trained)")
    empty = PlanModules()
    done_reason = None
    if curve and curve[-1].get("stop"):
        done_reason = curve[-1]["stop"]
    run_start = time.time() - elapsed
    step = start
    if done_reason is None:
        for step, indices in batches_from(len(train), config.batch_size, config.seed, start):
            if step >= config.max_steps:
                done_reason = "max_steps"
                break
            if (time.time() - run_start) / 60 >= config.max_minutes:
                done_reason = "max_minutes"
                break
            for group in optimizer.param_groups:
                # the cosine runs to whichever budget ends first, the steps or the minutes
                minutes = (time.time() - run_start) / 60
                at = max(step, int(config.max_steps * minutes / config.max_minutes))
                group["lr"] = config.lr * lr_at(at, config.max_steps, config.warmup_steps, config.min_lr_fraction)
            model.train()
            batch, labels = encoder.batch(train, indices)
            loss, _ = answer_loss(backbone, empty, batch, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done = step + 1
            if done % config.eval_every == 0:
                model.eval()
                metrics = evaluate_teacher_forced(backbone, empty, encoder, val)
                point = {"step": done, "minutes": round((time.time() - run_start) / 60, 2),
                         "train_loss": round(float(loss.detach()), 4), "val_loss": round(metrics["loss"], 4),
                         "val_exact": round(metrics["exact"], 4), "val_vqa_exact": round(metrics["vqa_exact"], 4),
                         "by_kind": metrics["exact_by_kind"]}
                curve.append(point)
                log(json.dumps(point))
                if metrics["loss"] < best[0] * (1 - config.min_gain):
                    best = (metrics["loss"], 0)
                else:
                    best = (best[0], best[1] + 1)
                if best[1] >= config.patience:
                    done_reason = "flattened"
                    curve[-1]["stop"] = done_reason
            if done % config.checkpoint_every == 0 or done_reason:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                            "curve": curve, "elapsed": time.time() - run_start, "best_loss": list(best)},
                           state_path)
            if done_reason:
                step = done
                break
    if curve and not curve[-1].get("stop"):
        curve[-1]["stop"] = done_reason
    minutes = (time.time() - run_start) / 60
    # the backbone directory: the init's processor files, the trained weights
    model.eval()
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(init_dir, staging)
    dtype = getattr(torch, config.save_dtype)
    model.to(dtype).save_pretrained(str(staging))
    model.to(torch.float32)
    summary = {"steps": step, "minutes": round(minutes, 1), "stop": done_reason, "curve": curve,
               "params": sum(p.numel() for p in model.parameters()), "size": asdict(config.size),
               "data": asdict(config.data), "batch_size": config.batch_size, "lr": config.lr,
               "save_dtype": config.save_dtype}
    (staging / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log(f"pretrained: {step} steps in {minutes:.1f} min ({done_reason}); wrote {out}")
    return summary


# ---------------------------------------------------------------------------------------------
# plans: search and training, the backbone frozen
# ---------------------------------------------------------------------------------------------
def plan_data(backbone: LlavaBackbone, d: DataConfig) -> dict[str, ExampleSet]:
    """Plan training examples (world ``seed``'s train split, VQA only: a plan serves vqa), the
    selection split (world ``eval_seed``'s val) and the report split (its test)."""
    train = build_examples(d.seed, d.train_images, ("train",), d.questions_per_image, 0, d.image_size)["train"]
    held = build_examples(d.eval_seed, d.eval_images, ("val", "test"), d.questions_per_image, 0, d.image_size)
    return {"train": train, "val": held["val"], "test": held["test"]}


def search_skips(backbone: GenerativeBackbone, train: ExampleSet, val: ExampleSet, config: SearchConfig,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """The DAS bandit over the decoder blocks (docs/plans.md): returns the gates, the ranking (most
    skippable first) and the top-``skip_num`` skip set."""
    torch.manual_seed(config.seed)
    n = backbone.num_layers
    spec = PlanSpec(task=TASK, name="search", version=1, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
                    skipped_layers=tuple(range(n)), adapters=AdapterShapes(config.skip_bottleneck, None))
    supernet = backbone.build_plan_modules(spec).train()  # a skip adapter for every block, shared over steps
    optimizer = torch.optim.AdamW(supernet.parameters(), lr=config.lr, weight_decay=0.0)
    gates = torch.zeros(n)
    generator = torch.Generator().manual_seed(config.seed)
    encoder = Encoder(backbone)
    val_rng = random.Random(config.seed)
    warmup = int(config.warmup_fraction * config.steps)
    history = []
    for step, indices in batches_from(len(train), config.batch_size, config.seed):
        if step >= config.steps:
            break
        skips = sorted(sample_skip_set(gates, config.skip_num, generator))
        plan = PlanModules({i: supernet.skip_adapter(i) for i in skips}, {})
        batch, labels = encoder.batch(train, indices)
        loss, _ = answer_loss(backbone, plan, batch, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup and (step + 1) % config.update_every == 0:
            val_indices = val_rng.sample(range(len(val)), min(len(val), config.batch_size))
            vbatch, vlabels = encoder.batch(val, val_indices)
            sets, rewards = [], []
            with torch.no_grad():
                for _ in range(3):
                    skips = sorted(sample_skip_set(gates, config.skip_num, generator))
                    plan = PlanModules({i: supernet.skip_adapter(i) for i in skips}, {})
                    vloss, _ = answer_loss(backbone, plan, vbatch, vlabels)
                    sets.append(skips)
                    rewards.append(math.exp(-float(vloss)))
            update_gates(gates, sets, rewards, config.gate_lr)
            history.append({"step": step + 1, "gates": [round(float(g), 4) for g in gates],
                            "rewards": [round(r, 4) for r in rewards]})
        if (step + 1) % 50 == 0:
            log(f"search k={config.skip_num} step {step + 1}/{config.steps}: loss {float(loss):.3f}, "
                f"gates {[round(float(g), 2) for g in gates]}")
    ranking = sorted(range(n), key=lambda i: -float(gates[i]))
    return {"skip_num": config.skip_num, "gates": [round(float(g), 4) for g in gates], "ranking": ranking,
            "skip_set": sorted(ranking[:config.skip_num]), "history": history, "config": asdict(config)}


def _param_count(modules: PlanModules) -> int:
    return sum(p.numel() for p in modules.parameters())


def reference_text_len(backbone: GenerativeBackbone, encoder: Encoder) -> int:
    """Text tokens (BOS and chat roles included, image tokens not) of a typical VQA prompt."""
    size = backbone.config.image_size
    example = ExampleSet([Example(0, "color", "what color is the circle?", "red")],
                         np.zeros((1, size, size, 3), np.uint8), [])
    return backbone.prompt_text_len(encoder.prompts(example, [0]), 0)


def plan_flops(backbone: GenerativeBackbone, spec: PlanSpec | None, text_len: int, new_tokens: int) -> tuple[float, float]:
    report = backbone.flops_at(TASK, spec, text_len, backbone.config.image_size, new_tokens=new_tokens)
    return float(report.full), float(report.executed)


def train_decoder_plan(backbone: GenerativeBackbone, name: str, skipped: Sequence[int], train: ExampleSet, val: ExampleSet,
                     out: str | Path, config: PlanTrainConfig = PlanTrainConfig(), version: int = 1,
                     extra_metrics: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> PlanSpec:
    """Train one plan with the backbone frozen and save it (``save_plan``, the backbone's fingerprint).
    ``val`` gives the training curve (teacher-forced); the plan's reported metrics come later from
    :func:`evaluate_llava_plan`."""
    torch.manual_seed(config.seed)
    spec = PlanSpec(task=TASK, name=name, version=version,
                    backbone=BackboneRef(backbone.architecture, backbone.fingerprint), skipped_layers=tuple(skipped),
                    adapters=AdapterShapes(config.skip_bottleneck if skipped else None, config.parallel_bottleneck),
                    own_parts=tuple(config.own_parts))
    backbone.check_plan_spec(spec)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True).train()  # own parts start as the backbone's
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.lr, weight_decay=0.0)
    encoder = Encoder(backbone)
    val = val.subset(limit=config.val_examples, seed=config.seed)
    curve = []
    t0 = time.time()
    for step, indices in batches_from(len(train), config.batch_size, config.seed):
        if step >= config.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_at(step, config.steps, config.warmup_steps, 0.05)
        batch, labels = encoder.batch(train, indices)
        loss, _ = answer_loss(backbone, modules, batch, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            modules.eval()
            metrics = evaluate_teacher_forced(backbone, modules, encoder, val)
            modules.train()
            curve.append({"step": step + 1, "train_loss": round(float(loss.detach()), 4), "val_loss": round(metrics["loss"], 4),
                          "val_exact": round(metrics["exact"], 4)})
            log(f"plan {name}: {json.dumps(curve[-1])}")
    text_len = reference_text_len(backbone, encoder)
    full, reduced = plan_flops(backbone, spec, text_len, new_tokens=2)
    metrics = {"eval_split": "val", "reference_input": {"text_len": text_len, "image_size": backbone.config.image_size,
                                                        "new_tokens": 2},
               "flops_full": full, "flops_reduced": reduced, "trainable_params": _param_count(modules),
               "train_steps": config.steps, "train_minutes": round((time.time() - t0) / 60, 2), "curve": curve,
               **(extra_metrics or {})}
    return save_plan(out, replace(spec, metrics=metrics), modules.eval(), overwrite=True)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_llava_plan(runtime: LlavaRuntime, plan, data: ExampleSet, batch_size: int = 50) -> dict[str, Any]:
    """Generated answers (greedy, ``LlavaRuntime.answer``) against the truth: exact match (the whole
    answer, lower-cased and stripped), its 95 % bootstrap interval, per question type."""
    hits, kinds = [], []
    for start in range(0, len(data), batch_size):
        chunk = data.examples[start:start + batch_size]
        images = [data.pil(e.image) for e in chunk]
        answers = runtime.answer(plan, images, [e.prompt for e in chunk], max_new_tokens=4)
        hits += [float(a.text.strip().lower() == e.target.lower()) for a, e in zip(answers, chunk)]
        kinds += [e.kind for e in chunk]
    by_type = {}
    for qtype in QUESTION_TYPES:
        values = [h for h, k in zip(hits, kinds) if k == qtype]
        if values:
            by_type[qtype] = {"accuracy": round(float(np.mean(values)), 4), "n": len(values)}
    return {"accuracy": round(float(np.mean(hits)), 4) if hits else None, "ci95": list(bootstrap_interval(hits)),
            "n": len(hits), "by_type": by_type}


def measure_speed(runtime: LlavaRuntime, plan, data: ExampleSet, requests: int = 20, new_tokens: int = 24,
                  repeats: int = 1) -> dict[str, Any]:
    """Generation speed at batch 1: captions ("describe the image.", greedy, at most ``new_tokens``
    tokens) of ``requests`` images, one request at a time. tokens/s = generated tokens / wall time of
    the requests; time to first token (prefill, image encoding included) as the runtime reports it."""
    from models.backbones.llava.generation import GenerationParams  # light; kept next to its one use

    params = GenerationParams(max_new_tokens=new_tokens)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    images = [data.pil(i % len(data.images)) for i in range(requests)]
    runtime.generate(plan, [messages], [images[0]], params)  # warm-up
    best = None
    for _ in range(repeats):
        tokens, ttft, start = 0, [], time.perf_counter()
        for image in images:
            completion = runtime.generate(plan, [messages], [image], params)[0]
            tokens += completion.completion_tokens
            ttft.append(completion.time_to_first_token_s)
        wall = time.perf_counter() - start
        result = {"tokens_per_s": round(tokens / wall, 1), "ttft_ms": round(1000 * float(np.median(ttft)), 2),
                  "tokens": tokens, "requests": requests, "wall_s": round(wall, 3), "repeats": repeats}
        if best is None or result["tokens_per_s"] > best["tokens_per_s"]:
            best = result
    return best


# ---------------------------------------------------------------------------------------------
# the pipeline: a plan store
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineConfig:
    pretrain: PretrainConfig = PretrainConfig()
    plan: PlanTrainConfig = PlanTrainConfig()
    search: SearchConfig = SearchConfig()
    levels: tuple[int, ...] = (2, 4)  # skip levels (blocks skipped); "adapters" (none) is always made
    speed_requests: int = 40
    speed_new_tokens: int = 24
    speed_repeats: int = 3  # the best of three rounds: the machine is shared
    threads: int | None = None


STAGES = ("pretrain", "plans", "eval", "speed", "report")


def choose_active(plans: dict[str, dict[str, Any]]) -> str:
    """The cheapest plan (FLOPs per request) whose val accuracy is at least 97 % of adapters-only's."""
    reference = plans["adapters"]["val_accuracy"]
    keeping = [name for name, p in plans.items() if p["val_accuracy"] >= KEEP_FRACTION * reference]
    return min(keeping, key=lambda name: (plans[name]["flops_reduced"], name)) if keeping else "adapters"


def run_llava_pipeline(out: str | Path, work: str | Path, config: PipelineConfig = PipelineConfig(),
                       resume: bool = True, stages: Sequence[str] = STAGES, redo: Sequence[str] = (),
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pre-train, search, train and evaluate into the plan store ``out``; every step's result is kept
    in ``work`` and reused when ``resume`` (the default). ``stages`` picks what runs (in this order:
    pretrain, plans, eval, speed, report); ``redo`` ("speed") measures again what is already measured."""
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    log = log or log_to(work / "pipeline.log")
    if config.threads:
        torch.set_num_threads(config.threads)
    if not resume:
        for stale in ("steps", "pretrain", "report.json"):
            target = work / stale
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    steps = work / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    backbone_dir = out / STORE_BACKBONE_DIR
    t_start = time.time()
    if "pretrain" in stages:
        if not (resume and (backbone_dir / "config.json").is_file() and (steps / "pretrain.done").is_file()):
            pretrain_llava(backbone_dir, config.pretrain, work=work / "pretrain", log=log)
            (steps / "pretrain.done").write_text("ok\n")
    backbone = LlavaBackbone.from_pretrained(backbone_dir)
    runtime = LlavaRuntime(backbone)
    data = plan_data(backbone, config.pretrain.data)
    log(f"plan data: train {len(data['train'])}, val {len(data['val'])}, test {len(data['test'])} questions")
    report_path = work / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() and resume else {}
    if report.get("fingerprint") != backbone.fingerprint:
        report = {"fingerprint": backbone.fingerprint}
    report.setdefault("plans", {})
    report.setdefault("search", {})

    def save_report():
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    if "plans" in stages:
        # search (on world `seed`: its train split for the adapters, its val split for the rewards)
        search_val = build_examples(config.pretrain.data.seed, config.pretrain.data.train_images, ("val",),
                                    config.pretrain.data.questions_per_image, 0,
                                    config.pretrain.data.image_size)["val"]
        for k in config.levels:
            if str(k) not in report["search"]:
                t0 = time.time()
                result = search_skips(backbone, data["train"], search_val, replace(config.search, skip_num=k), log=log)
                result["minutes"] = round((time.time() - t0) / 60, 2)
                result.pop("history")
                report["search"][str(k)] = result
                save_report()
                log(f"search k={k}: skip {result['skip_set']} (ranking {result['ranking']}, gates {result['gates']})")
        wanted = {"adapters": []} | {f"skip{k}": report["search"][str(k)]["skip_set"] for k in config.levels}
        for name, skipped in wanted.items():
            plan_dir = out / TASK / name
            done = report["plans"].get(name, {})
            if resume and done.get("skipped") == list(skipped) and (plan_dir / "plan.json").is_file():
                continue
            log(f"training plan {name} (skip {list(skipped)})")
            spec = train_decoder_plan(backbone, name, skipped, data["train"], data["val"], plan_dir, config.plan, log=log)
            report["plan_steps"] = config.plan.steps
            report["plans"][name] = {"skipped": list(skipped), "flops_full": spec.metrics["flops_full"],
                                     "reference_input": spec.metrics["reference_input"],
                                     "flops_reduced": spec.metrics["flops_reduced"],
                                     "trainable_params": spec.metrics["trainable_params"],
                                     "train_minutes": spec.metrics["train_minutes"], "curve": spec.metrics["curve"]}
            save_report()
    if "eval" in stages:
        for name in report["plans"]:
            entry = report["plans"][name]
            if resume and "val" in entry and "test" in entry:
                continue
            plan = load_plan(out / TASK / name, backbone)
            entry["val"] = evaluate_llava_plan(runtime, plan, data["val"])
            entry["test"] = evaluate_llava_plan(runtime, plan, data["test"])
            log(f"eval {name}: val {entry['val']['accuracy']} {entry['val']['ci95']}, "
                f"test {entry['test']['accuracy']} {entry['test']['ci95']}")
            save_report()
            _write_plan_metrics(out / TASK / name, backbone, entry)
        full = report.setdefault("full", {})
        if not (resume and "test" in full):
            full["val"] = evaluate_llava_plan(runtime, _full_plan(backbone), data["val"])
            full["test"] = evaluate_llava_plan(runtime, _full_plan(backbone), data["test"])
            log(f"eval full (no adapters): val {full['val']['accuracy']}, test {full['test']['accuracy']}")
            save_report()
        _write_store(out, report)
    if "speed" in stages:
        for name in [*report["plans"], "full"]:
            entry = report["plans"].get(name) or report.setdefault("full", {})
            if resume and "speed" in entry and "speed" not in redo:
                continue
            plan = _full_plan(backbone) if name == "full" else load_plan(out / TASK / name, backbone)
            entry["speed"] = measure_speed(runtime, plan, data["test"], config.speed_requests, config.speed_new_tokens,
                                           config.speed_repeats)
            entry["speed"]["threads"] = torch.get_num_threads()
            entry["speed"]["load_average"] = round(os.getloadavg()[0], 2)  # the machine is shared: how busy it was
            log(f"speed {name}: {entry['speed']}")
            save_report()
    if "report" in stages:
        pretrain_summary = json.loads((backbone_dir / "training.json").read_text())
        write_results(out, report, pretrain_summary, backbone)
    report["minutes_this_run"] = round((time.time() - t_start) / 60, 1)
    save_report()
    return report


def _full_plan(backbone: LlavaBackbone):
    from models.das.plan import builtin_full_plan  # light; only the full-model rows need it

    return builtin_full_plan(backbone, TASK)


def _write_plan_metrics(plan_dir: Path, backbone: LlavaBackbone, entry: dict[str, Any]) -> None:
    """Put the evaluation into plan.json's metrics (the weights are rewritten unchanged)."""
    plan = load_plan(plan_dir, backbone)
    metrics = dict(plan.spec.metrics)
    metrics.update({"vqa_exact": entry["val"]["accuracy"], "vqa_exact_ci95": entry["val"]["ci95"],
                    "eval_split": "val", "eval_n": entry["val"]["n"], "by_type": entry["val"]["by_type"],
                    "test": {"vqa_exact": entry["test"]["accuracy"], "ci95": entry["test"]["ci95"],
                             "n": entry["test"]["n"], "by_type": entry["test"]["by_type"]}})
    metrics.pop("curve", None)
    metrics["curve"] = entry.get("curve", [])
    spec = replace(plan.spec, metrics=metrics, weights_sha256=None, created_at=plan.spec.created_at)
    save_plan(plan_dir, spec, plan.modules, overwrite=True)


def store_plans_from_metrics(store: Path) -> dict[str, dict[str, Any]]:
    """What choose_active reads, from the plans' own plan.json (val accuracy, FLOPs per request)."""
    out = {}
    for plan_json in sorted((store / TASK).glob("*/plan.json")):
        metrics = json.loads(plan_json.read_text())["metrics"]
        out[plan_json.parent.name] = {"val_accuracy": metrics["vqa_exact"], "flops_reduced": metrics["flops_reduced"]}
    return out


def _write_store(out: Path, report: dict[str, Any]) -> None:
    plans = {name: {"val_accuracy": p["val"]["accuracy"], "flops_reduced": p["flops_reduced"]}
             for name, p in report["plans"].items() if "val" in p}
    state = {"loaded": {TASK: sorted(plans)}, "active": {TASK: choose_active(plans)}, "history": {}}
    (out / STORE_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    report["active"] = state["active"][TASK]


def _fmt_ci(result: dict[str, Any]) -> str:
    low, high = result["ci95"]
    return f"{result['accuracy']:.3f} [{low:.3f}, {high:.3f}] (n={result['n']})"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_results(out: Path, report: dict[str, Any], pretrain: dict[str, Any], backbone: LlavaBackbone) -> Path:
    """plans/llava/RESULTS.md from the pipeline's report."""
    lines = ["# Embedded tiny LLaVA: plans and results", "",
             "Written by `das llava pipeline` (`make plans-llava`) from `build/llava/report.json`.", ""]
    size = pretrain["size"]
    lines += ["## The backbone", "",
              f"CLIP {size['vision_hidden']} wide x {size['vision_layers']} layers at {size['image_size']} px "
              f"({size['patch_size']} px patches, {(size['image_size'] // size['patch_size']) ** 2} image tokens), "
              f"projector, Llama {size['hidden']} wide x {size['layers']} blocks ({size['heads']} heads, "
              f"{size['kv_heads']} KV heads, MLP {size['intermediate']}); {pretrain['params']:,} parameters, stored "
              f"as {pretrain['save_dtype']} ({_dir_size(out / STORE_BACKBONE_DIR) / 1e6:.2f} MB; computed in float32).",
              "",
              f"Pre-trained from scratch (every weight) for {pretrain['steps']} steps of {pretrain['batch_size']} "
              f"examples in {pretrain['minutes']} min on a shared 2-core CPU (stop: {pretrain['stop']}): VQA "
              "(question -> short answer) and captions (\"describe the image.\" -> caption), loss on the answer "
              f"tokens only, world seed {pretrain['data']['seed']} (train split).", "",
              "Validation curve (world seed 0, val split; exact match from teacher-forced argmax = what greedy "
              "decoding returns):", "",
              "| step | minutes | train loss | val loss | val exact (all) | val exact (VQA) | captions |",
              "|---|---|---|---|---|---|---|"]
    for p in pretrain["curve"]:
        lines.append(f"| {p['step']} | {p['minutes']} | {p['train_loss']} | {p['val_loss']} | {p['val_exact']} | "
                     f"{p['val_vqa_exact']} | {p['by_kind'].get('caption', '-')} |")
    reference = next(iter(report["plans"].values())).get("reference_input", {})
    lines += ["", "## Plans", "",
              f"Selection on world seed {pretrain['data']['eval_seed']}'s val split, report on its test split "
              "(scenes never seen in training); accuracy = generated answer (greedy) equals the truth, with a 95 % "
              f"bootstrap interval. FLOPs per VQA request: one {reference.get('image_size')} px image, a prompt of "
              f"{reference.get('text_len')} text tokens (plus the image tokens) and {reference.get('new_tokens')} "
              "generated tokens (the answer word and end-of-sequence), as plan.json's reference_input.", "",
              "| plan | skipped blocks | val accuracy | test accuracy | MFLOPs / request | FLOPs saved | "
              "trainable params | tokens/s | TTFT ms |", "|---|---|---|---|---|---|---|---|---|"]
    rows = list(report["plans"].items())
    for name, p in rows:
        speed = p.get("speed", {})
        saved = 1 - p["flops_reduced"] / p["flops_full"]
        active = " (active)" if report.get("active") == name else ""
        lines.append(f"| {name}{active} | {p['skipped'] or '-'} | {_fmt_ci(p['val'])} | {_fmt_ci(p['test'])} | "
                     f"{p['flops_reduced'] / 1e6:.2f} | {100 * saved:.1f}% | {p['trainable_params']:,} | "
                     f"{speed.get('tokens_per_s', '-')} | {speed.get('ttft_ms', '-')} |")
    if "full" in report and "test" in report["full"]:
        f = report["full"]
        speed = f.get("speed", {})
        first = rows[0][1]
        lines.append(f"| full (built-in, no adapters) | - | {_fmt_ci(f['val'])} | {_fmt_ci(f['test'])} | "
                     f"{first['flops_full'] / 1e6:.2f} | 0.0% | 0 | {speed.get('tokens_per_s', '-')} | "
                     f"{speed.get('ttft_ms', '-')} |")
    search_minutes = sum(float(x.get("minutes", 0)) for x in report["search"].values())
    plan_minutes = sum(float(p.get("train_minutes", 0)) for _, p in rows)
    lines += ["", f"Time on the shared 2-core CPU: pre-training {pretrain['minutes']} min, search {search_minutes:.1f} "
              f"min ({len(report['search'])} levels), plan training {plan_minutes:.1f} min ({len(rows)} plans of "
              f"{report.get('plan_steps', '?')} steps), evaluation and speed about a minute."]
    lines += ["", "Test accuracy per question type:", "",
              "| plan | " + " | ".join(QUESTION_TYPES) + " |", "|---|" + "---|" * len(QUESTION_TYPES)]
    for name, p in rows + ([("full", report["full"])] if "full" in report else []):
        cells = [f"{p['test']['by_type'][t]['accuracy']:.3f} ({p['test']['by_type'][t]['n']})"
                 if t in p["test"]["by_type"] else "-" for t in QUESTION_TYPES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Search (DAS bandit, gates per decoder block; higher = more skippable):", "",
              "| K | gates | ranking | skip set | minutes |", "|---|---|---|---|---|"]
    for k, s in report["search"].items():
        lines.append(f"| {k} | {s['gates']} | {s['ranking']} | {s['skip_set']} | {s.get('minutes', '-')} |")
    speed_note = next((p["speed"] for _, p in rows if "speed" in p), None)
    average = f"{speed_note['tokens'] / max(1, speed_note['requests']):.1f}" if speed_note else "?"
    lines += ["", "tokens/s: captions (\"describe the image.\", greedy, "
              f"{average} tokens on average) "
              f"at batch 1, {speed_note['requests'] if speed_note else '?'} requests one after another (the best of {speed_note.get('repeats', 1) if speed_note else '?'} rounds), float32 on CPU "
              f"({speed_note.get('threads', '?') if speed_note else '?'} torch threads) on a machine shared with other "
              f"jobs (1-minute load average {speed_note.get('load_average', '?') if speed_note else '?'} when measured): "
              "compare the plans with each other, not with other machines. TTFT: median time to the first "
              "token (image encoding and prefill).", "",
              f"Active plan (store.json): **{report.get('active')}**, the cheapest plan whose val accuracy is at least "
              f"{KEEP_FRACTION:.0%} of adapters-only's.", "",
              f"Store size: {_dir_size(out) / 1e6:.2f} MB.", "",
              "## Commands", "", "```", "make plans-llava            # = the two commands below, resumable",
              "python -m models.cli.main llava pipeline --out plans/llava --work build/llava",
              "python -m models.cli.main llava pipeline --out plans/llava --work build/llava --stages speed,report "
              "--redo-speed   # speed again, in a quiet moment", "```", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


__all__ = [
    "LlavaSize", "MICRO", "DataConfig", "PretrainConfig", "PlanTrainConfig", "SearchConfig", "PipelineConfig",
    "Example", "ExampleSet", "Encoder", "build_examples", "pretrain_llava", "search_skips", "train_decoder_plan",
    "evaluate_llava_plan", "measure_speed", "run_llava_pipeline", "choose_active", "store_plans_from_metrics",
    "world_words",
]
