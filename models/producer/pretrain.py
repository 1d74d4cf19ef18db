"""Pre-training a small ViLT or METER from scratch with ViLT's / METER's own objectives, for the
embedded defaults.

Objectives: image-text matching (ITM: a caption or a random other image's caption, binary loss on
the pooled vector; the ITM head is saved as the retrieval head ``rank_output``) and masked language
modelling (MLM: content words, BERT's 80/10/10 rule). Data: image-caption pairs from any retrieval
dataset in the Flickr30K layout, plus, for synthetic data sets (``das data synth`` writes
``scenes.jsonl``), captions of every other task's *train* images, written from their scenes. Where the
scene is known, half of the ITM negatives are hard: the true caption with one attribute changed, which
is what teaches fine-grained grounding (colour, shape, relation) rather than "some caption of some
other picture". The forward pass is the runtime's own (the backbone's ``encode`` and
``sequence_output`` with an empty plan), trained end to end, every part of it.

The architecture is ``PretrainConfig.arch``:

* ``vilt``: saved in the Hugging Face layout as a ``ViltForImageAndTextRetrieval`` checkpoint with its
  processor (a WordPiece vocabulary built from the data's words);
* ``meter``: CLIP-style vision and RoBERTa-style text encoders (``vision_layers`` / ``text_layers``
  deep) and ``num_layers`` co-attention fusion layers per stream, saved in ``models/backbones/meter/convert``'s
  layout with a byte-level BPE tokenizer built from the data's words. MLM predicts the masked words from
  the text stream's fusion output; ITM reads both poolers. METER itself starts from pre-trained CLIP and
  RoBERTa; here nothing pre-trained exists, so the encoders are trained from scratch with the rest.

Both load like any checkpoint (``models.backbones.base.load_backbone``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import ViltConfig, ViltForImageAndTextRetrieval
from transformers.models.vilt.modeling_vilt import ViltMLMHead

from models.backbones.meter.configuration import MeterConfig
from models.backbones.meter.convert import build_roberta_tokenizer, write_meter_directory
from models.backbones.meter.modeling import MeterBackbone
from models.backbones.meter.modeling import retrieval_head as meter_retrieval_head
from models.backbones.vilt.checkpoint import build_processor
from models.backbones.vilt.modeling import ViltBackbone, conv_stem_channels, install_conv_stem
from models.das.adapters import PlanModules
from models.producer.datasets import read_task
from models.producer.data import Item, StepBatches, item_rng, loader, open_rgb
from models.producer.engine import (RunError, all_reduce_sum, autocast, check_precision, check_resumable, grad_scaler,
                                    init_world, load_checkpoint, resolve_run_device, rng_state, save_checkpoint,
                                    set_rng_state, wrap_ddp)
from models.producer.runs import TrainingStopped
from models.producer.train import one_cycle
from models.producer.world.export import load_scenes
from models.producer.world.language import hard_negative_captions, scene_captions
from models.producer.world.scenes import PATCH_ATTRIBUTES, Scene, patch_labels, patch_objects

ARCHS = ("vilt", "meter")


@dataclass
class PretrainConfig:
    arch: str = "vilt"  # see ARCHS
    hidden_size: int = 128
    num_layers: int = 8  # ViLT: encoder layers; METER: fusion layers per stream (2x this many DAS arms)
    vision_layers: int = 2  # METER only: the uni-modal encoders' depth
    text_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    image_size: int = 64
    patch_size: int = 16
    # a convolutional stem of these widths in place of the linear patch embedding (ViLT's, or METER's vision
    # encoder's; models/backbones/conv_stem.py; log2(patch_size) of them); () = the linear embedding
    conv_stem_channels: tuple[int, ...] = ()
    max_text_len: int = 32
    epochs: float = 4.0
    batch_size: int = 48
    lr: float = 1e-3
    weight_decay: float = 0.01
    mlm_probability: float = 0.3  # of the content tokens (see content_token_mask)
    hard_negative_fraction: float = 0.5  # of the ITM negatives, where the image's scene is known
    # patch shape classification, weight in the loss; 0 = off. Each image patch token of the MLM pass that
    # an object covers predicts that object's shape, where the image's scene is known: the analogue of
    # LXMERT's and UNITER's masked region classification, with labels drawn from the scene (background
    # patches, ~90% of them, are left out: they would teach object-vs-background, not shapes)
    patch_shape_weight: float = 0.0
    # patch colour classification, the same way: each object patch predicts its object's colour. The linear
    # part of a convolutional stem keeps colour, but nothing asks the encoder's patch tokens for it
    patch_color_weight: float = 0.0
    # a backbone directory (ViLT) to go on from, with its vocabulary and ITM head; None: random weights
    init_from: str | None = None
    captions_per_scene: int = 5  # for images of other tasks' data sets, captioned from their scenes
    seed: int = 0
    # how to run (models/producer/engine.py), as TrainConfig's
    device: str = "cpu"  # auto | cpu | cuda
    precision: str = "fp32"
    workers: int = 0
    checkpoint_every: int | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    stop_after: int | None = None  # test hook


def words_in(texts: Iterable[str]) -> list[str]:
    """Distinct lower-case words (and punctuation) in order of first appearance."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def task_texts(task: str, data_dir: Path) -> list[str]:
    texts: list[str] = []
    for split in ("train", "val", "test"):
        try:
            dataset = read_task(task, data_dir, split)
        except (FileNotFoundError, ValueError):
            continue
        for example in dataset.examples:
            texts += list(getattr(example, "captions", ()))
            texts += [t for t in (getattr(example, "question", None), getattr(example, "statement", None)) if t]
            texts += list(getattr(example, "answer_scores", {}))
        texts += list(getattr(dataset, "answer_vocab", []))
    return texts


@dataclass(frozen=True)
class CaptionPair:
    image_path: Path
    caption: str
    scene: Any = None  # models.producer.world.scenes.Scene when the data set records it (hard negatives)


def pretraining_pairs(retrieval_data: Path, scene_dirs: Iterable[Path] = (), captions_per_scene: int = 5,
                      seed: int = 0) -> list[CaptionPair]:
    """Train-split image-caption pairs: the retrieval data set's own captions, then captions written
    from the scenes of the other synthetic data sets' train images (never their val/test images)."""
    retrieval_data = Path(retrieval_data)
    try:
        known = {(retrieval_data / k).resolve(): v for k, v in load_scenes(retrieval_data).items()}
    except FileNotFoundError:
        known = {}
    pairs = [CaptionPair(Path(e.image_path), c, known.get(Path(e.image_path).resolve()))
             for e in read_task("retrieval", retrieval_data, "train").examples for c in e.captions]
    for directory in scene_dirs:
        directory = Path(directory)
        if directory.resolve() == retrieval_data.resolve():
            continue
        with (directory / "scenes.jsonl").open() as fh:  # the split is needed here, so read it directly
            records = [json.loads(line) for line in fh if line.strip()]
        for record in records:
            if record["split"] != "train":
                continue
            scene = Scene.from_dict(record["scene"])
            rng = random.Random(f"{seed}:{record['image']}")
            pairs += [CaptionPair(directory / record["image"], c, scene)
                      for c in dict.fromkeys(scene_captions(scene, rng, captions_per_scene))]
    return pairs


# English function words: predictable from the caption's own grammar, so masking them teaches nothing
# about the image. (A document-frequency cut-off alone is wrong for small worlds: there "circle" is in
# ~45% of the captions and was never masked, and the model never learnt to tell shapes apart.)
FUNCTION_WORDS = frozenset(
    "a an the of and or to in on at with from by for is are was were be been there this that these those "
    "it its as into onto than then".split())


def content_token_mask(tokenizer, captions: list[str], max_document_frequency: float = 0.6) -> torch.Tensor:
    """Which vocabulary entries may be masked: word pieces (not special tokens, not punctuation) that are
    not :data:`FUNCTION_WORDS` and are not in more than ``max_document_frequency`` of the captions
    (near-constant words such as a fixed prefix). Masking only content words (colours, shapes, counts,
    relations) makes MLM answerable from the image alone, which is what teaches the model to look:
    the aim of ViLT's whole-word masking."""
    maskable = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token_id in range(len(tokenizer)):
        word = tokenizer.decode([token_id]).strip().lower().removeprefix("##")
        maskable[token_id] = bool(re.fullmatch(r"[a-z0-9]+", word)) and word not in FUNCTION_WORDS
    maskable[tokenizer.all_special_ids] = False
    counts = torch.zeros(len(tokenizer))
    for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]:
        counts[sorted(set(ids))] += 1
    maskable &= counts <= max_document_frequency * max(1, len(captions))
    return maskable


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, probability: float,
                generator: torch.Generator, maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns (masked input ids, labels with -100 where nothing is predicted).
    ``maskable`` (vocabulary-sized bool) limits which tokens may be chosen."""
    special = torch.tensor([[t in tokenizer.all_special_ids for t in row] for row in input_ids.tolist()])
    candidates = (attention_mask.bool()) & ~special
    if maskable is not None:
        candidates &= maskable[input_ids]
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    # every occurrence of a chosen token in its text is masked, so a repeated colour or shape can't
    # be copied from elsewhere in the caption: it has to come from the image
    same = input_ids[:, :, None] == input_ids[:, None, :]
    chosen = (same & chosen[:, None, :]).any(dim=-1) & candidates
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    randomise = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[randomise] = torch.randint(len(tokenizer), input_ids.shape, generator=generator)[randomise]
    return masked, labels


class PairDataset(Dataset):
    """Pre-training items: pair ``index`` of ``epoch`` is its caption (matched) or, with probability
    1/2, a negative (a hard one with ``hard_negative_fraction`` where the scene is known, else another
    pair's caption); all drawn from (seed, epoch, index), so a step's data do not depend on the number
    of processes. The image is decoded on demand (nothing cached)."""

    def __init__(self, pairs: list[CaptionPair], config: PretrainConfig) -> None:
        self.pairs, self.config = pairs, config

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        epoch, index = key
        pair, rng = self.pairs[index], item_rng(self.config.seed, epoch, index, "itm")
        caption = pair.caption
        if rng.random() >= 0.5:
            hard = (hard_negative_captions(pair.scene, k=1, rng=rng)
                    if pair.scene is not None and rng.random() < self.config.hard_negative_fraction else [])
            caption = hard[0] if hard else self.pairs[rng.randrange(len(self.pairs))].caption
        labels = None
        if patch_weights(self.config) and pair.scene is not None:
            grid = self.config.image_size // self.config.patch_size
            objects = patch_objects(pair.scene, grid, self.config.patch_size)
            labels = {attribute: patch_labels(pair.scene, objects, attribute) for attribute in patch_weights(self.config)}
        return Item(index, [(open_rgb(pair.image_path), caption)], (float(caption == pair.caption), epoch, labels))


def patch_weights(config: PretrainConfig) -> dict[str, float]:
    """The patch objectives that are on ({attribute in PATCH_ATTRIBUTES: loss weight})."""
    # PretrainConfig names each objective's weight patch_<attribute>_weight
    weights = {attribute: getattr(config, f"patch_{attribute}_weight") for attribute in PATCH_ATTRIBUTES}
    return {attribute: weight for attribute, weight in weights.items() if weight}


class PairCollate:
    """Items -> (batch, masked input ids, MLM labels, ITM targets, patch labels: {attribute: (B, patches)},
    per patch the index in PATCH_ATTRIBUTES[attribute] of the covering object's value, -100 for background
    or an unknown scene; one entry per objective that is on). Each
    row's masking is drawn from its own (seed, epoch, index) generator over its
    unpadded tokens, so it is the same in any batch."""

    def __init__(self, preprocess, tokenizer, config: PretrainConfig, maskable: torch.Tensor) -> None:
        self.preprocess, self.tokenizer, self.config, self.maskable = preprocess, tokenizer, config, maskable

    def __call__(self, items: list[Item]):
        batch = self.preprocess([i.pairs[0][0] for i in items], [i.pairs[0][1] for i in items])
        masked, labels = batch.input_ids.clone(), torch.full_like(batch.input_ids, -100)
        patches = max((rows * cols for rows, cols in batch.patch_grids), default=0)
        attribute_labels = {attribute: torch.full((len(items), patches), -100, dtype=torch.long)
                            for attribute in patch_weights(self.config)}
        for row, item in enumerate(items):
            length = int(batch.attention_mask[row].sum())
            generator = torch.Generator().manual_seed(
                int.from_bytes(f"{self.config.seed}:{item.target[1]}:{item.index}".encode(), "little") % (2**63))
            ids, mask = batch.input_ids[row:row + 1, :length], batch.attention_mask[row:row + 1, :length]
            row_masked, row_labels = mask_tokens(ids, mask, self.tokenizer, self.config.mlm_probability, generator,
                                                 self.maskable)
            masked[row, :length], labels[row, :length] = row_masked[0], row_labels[0]
            for attribute, known in (item.target[2] or {}).items():
                if len(known) == patches:
                    known = torch.from_numpy(known) - 1  # patch_labels: 0 is background, 1 + i value i
                    attribute_labels[attribute][row] = torch.where(known >= 0, known, -100)
        targets = torch.tensor([i.target[0] for i in items], dtype=torch.float32)
        return batch, masked, labels, targets, attribute_labels


class PretrainModel(nn.Module):
    """Backbone + MLM head + ITM head (+ patch attribute heads) as one module (what DDP wraps): ITM on the
    unmasked text, MLM and patch attributes on the masked one (as ViLT computes them in separate passes)."""

    def __init__(self, backbone, mlm_head: nn.Module, itm_head: nn.Module,
                 patch_heads: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.backbone, self.mlm_head, self.itm_head = backbone, mlm_head, itm_head
        self.patch_heads = nn.ModuleDict(patch_heads or {})

    def forward(self, batch, masked_ids: torch.Tensor, patches: int = 0):
        """(ITM logits (B,), MLM logits (B, text, vocab), {attribute: patch logits (B, patches, values)})."""
        empty_plan = PlanModules()
        itm_logits = self.itm_head(self.backbone.encode(batch, empty_plan))[:, 0]
        masked_batch = dataclasses.replace(batch, input_ids=masked_ids)
        sequence = self.backbone.sequence_output(masked_batch, empty_plan)
        text_len = masked_ids.shape[1]
        # every backbone's sequence_output puts the image [CLS] after the text, then the patches in raster order
        patch_tokens = sequence[:, text_len + 1: text_len + 1 + patches]
        patch_logits = {attribute: head(patch_tokens).float() for attribute, head in self.patch_heads.items()} if patches else {}
        return itm_logits.float(), self.mlm_head(sequence[:, :text_len]).float(), patch_logits


def pretrain_backbone(
    retrieval_data: str | Path,
    out_dir: str | Path,
    config: PretrainConfig,
    extra_text_dirs: dict[str, Path] | None = None,
    progress: bool = True,
    scene_dirs: Iterable[Path] = (),
) -> dict[str, float]:
    """Pre-train on the retrieval dataset's image-caption pairs (plus captioned train scenes of
    ``scene_dirs``, see :func:`pretraining_pairs`); save the checkpoint to ``out_dir``.
    ``extra_text_dirs`` ({task: dir}) adds those datasets' words to the vocabulary.

    Runs on ``config.device`` in ``config.precision``, with DataLoader workers, under torchrun as DDP
    (``config.batch_size`` is the global batch; rank 0 alone writes the checkpoint), and resumably
    (``checkpoint_every`` / ``resume``), as ``das train`` does."""
    retrieval_data, out_dir = Path(retrieval_data), Path(out_dir)
    texts = task_texts("retrieval", retrieval_data)
    for task, directory in (extra_text_dirs or {}).items():
        texts += task_texts(task, Path(directory))
    if config.arch not in ARCHS:
        raise ValueError(f"unknown architecture {config.arch!r} (use {', '.join(ARCHS)})")
    device = resolve_run_device(config.device)
    check_precision(config.precision, device)
    world = init_world(device)
    torch.manual_seed(config.seed)
    # every rank builds the same tokenizer; rank 0 alone writes it into out_dir
    scratch = tempfile.TemporaryDirectory(prefix="das-pretrain-") if not world.is_main else None
    target = out_dir if world.is_main else Path(scratch.name)
    if config.init_from and config.arch != "vilt":
        raise RunError(f"init_from: going on from a checkpoint is implemented for ViLT, not {config.arch}")
    if config.init_from:
        backbone, new_itm_head, save = _continued(config, target)
    else:
        backbone, new_itm_head, save = (_new_vilt if config.arch == "vilt" else _new_meter)(config, words_in(texts), target)
    tokenizer = backbone.tokenizer if config.arch == "meter" else backbone.processor.tokenizer
    backbone.requires_grad_(True).train()
    # ViLT's MLM head (dense, GELU, LayerNorm, decoder) reads only these four settings
    mlm_head = ViltMLMHead(ViltConfig(hidden_size=config.hidden_size, vocab_size=len(tokenizer), hidden_act="gelu",
                                      layer_norm_eps=1e-12))
    itm_head = new_itm_head()
    weights = patch_weights(config)
    patch_heads = {attribute: nn.Linear(config.hidden_size, len(PATCH_ATTRIBUTES[attribute])) for attribute in weights}
    model = PretrainModel(backbone, mlm_head, itm_head, patch_heads).to(device)
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    pairs = pretraining_pairs(retrieval_data, scene_dirs, config.captions_per_scene, config.seed)
    maskable = content_token_mask(tokenizer, [p.caption for p in pairs])
    steps = max(1, math.ceil(config.epochs * len(pairs) / config.batch_size))
    schedule = one_cycle(optimizer, config.lr, steps)
    scaler = grad_scaler(device, config.precision)
    history = {"itm_loss": [], "mlm_loss": [], "itm_accuracy": []}
    for attribute in weights:  # the shape objective's keys stay patch_loss / patch_accuracy
        history.update({f"{_patch_key(attribute)}_loss": [], f"{_patch_key(attribute)}_accuracy": []})
    run = {"task": "pretrain", "arch": config.arch, "examples": len(pairs), "batch_size": config.batch_size,
           "total_steps": steps, "seed": config.seed, "lr": config.lr, "precision": config.precision,
           # only when set: checkpoints of runs without them stay resumable
           **({"patch_shape_weight": config.patch_shape_weight} if config.patch_shape_weight else {}),
           **({"patch_color_weight": config.patch_color_weight} if config.patch_color_weight else {}),
           **({"init_from": config.init_from} if config.init_from else {}),
           **({"conv_stem_channels": list(config.conv_stem_channels)} if config.conv_stem_channels else {})}
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if (config.checkpoint_every or config.resume) and checkpoint_dir is None:
        raise RunError("checkpoints need a checkpoint directory (checkpoint_dir)")
    start = 0
    if config.resume and (saved := load_checkpoint(checkpoint_dir, device)) is not None:
        check_resumable(saved, run, checkpoint_dir)
        model.load_state_dict(saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        start, history = saved["step"], saved["extra"]["history"]

    dataset = PairDataset(pairs, config)
    order = StepBatches(len(pairs), min(config.batch_size, len(pairs) // world.world_size * world.world_size),
                        seed=config.seed, rank=world.rank, world_size=world.world_size, start=start, stop=steps)
    collate = PairCollate(backbone.preprocess, tokenizer, config, maskable)
    batches = loader(dataset, collate, workers=config.workers, batch_sampler=order, pin_memory=device.type == "cuda")
    ddp = wrap_ddp(model, world)
    global_batch = order.global_batch
    bar = tqdm(total=steps, initial=start, desc="pretrain", disable=not progress or not world.is_main)
    for step, (batch, masked_ids, mlm_labels, itm_target, attribute_labels) in enumerate(batches, start):
        batch = batch.to(device, torch.float32)
        masked_ids, mlm_labels, itm_target = masked_ids.to(device), mlm_labels.to(device), itm_target.to(device)
        attribute_labels = {attribute: labels.to(device) for attribute, labels in attribute_labels.items()}
        patches = next(iter(attribute_labels.values())).shape[1] if attribute_labels else 0
        # the MLM and patch losses are means over the global batch's labelled tokens: count them over every
        # rank first
        counts = all_reduce_sum(torch.stack([(mlm_labels != -100).sum()] + [
            (labels != -100).sum() for labels in attribute_labels.values()]).float(), world).clamp(min=1)
        masked_count, patch_counts = counts[0], dict(zip(attribute_labels, counts[1:]))
        with autocast(device, config.precision):
            itm_logits, mlm_logits, patch_logits = ddp(batch, masked_ids, patches)
        itm_sum = F.binary_cross_entropy_with_logits(itm_logits, itm_target, reduction="sum")
        mlm_sum = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]), mlm_labels.reshape(-1),
                                  ignore_index=-100, reduction="sum")
        loss = itm_sum / global_batch + mlm_sum / masked_count
        patch_totals = []  # per attribute: loss sum, correct patches
        for attribute, logits in patch_logits.items():
            labels = attribute_labels[attribute]
            patch_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                        reduction="sum")
            patch_totals += [patch_sum.detach(), ((logits.argmax(-1) == labels) & (labels != -100)).sum().float()]
            loss = loss + weights[attribute] * patch_sum / patch_counts[attribute]
        loss = loss * world.world_size
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        correct = ((itm_logits > 0).float() == itm_target).float().sum()
        totals = all_reduce_sum(torch.stack([itm_sum.detach(), mlm_sum.detach(), correct, *patch_totals]), world)
        history["itm_loss"].append(totals[0].item() / global_batch)
        history["mlm_loss"].append(totals[1].item() / masked_count.item())
        history["itm_accuracy"].append(totals[2].item() / global_batch)
        for i, attribute in enumerate(patch_logits):
            history[f"{_patch_key(attribute)}_loss"].append(totals[3 + 2 * i].item() / patch_counts[attribute].item())
            history[f"{_patch_key(attribute)}_accuracy"].append(totals[4 + 2 * i].item() / patch_counts[attribute].item())
        bar.update(1)
        bar.set_postfix(itm=f"{history['itm_loss'][-1]:.3f}", mlm=f"{history['mlm_loss'][-1]:.3f}",
                        **{f"{attribute}_acc": f"{history[_patch_key(attribute) + '_accuracy'][-1]:.2f}"
                           for attribute in patch_logits})
        done = step + 1
        if checkpoint_dir is not None and config.checkpoint_every and (done % config.checkpoint_every == 0 or done == steps):
            save_checkpoint(checkpoint_dir, {
                "run": run, "step": done, "trainable": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "extra": {"history": history}}, world)
        if config.stop_after is not None and done >= config.stop_after and done < steps:
            bar.close()
            raise TrainingStopped(f"stopped after {done} of {steps} steps (stop_after)")
    bar.close()
    if world.is_main:
        save(backbone.to("cpu"), itm_head.to("cpu"))
    if scratch is not None:
        scratch.cleanup()
    tail = max(1, steps // 10)
    summary: dict[str, Any] = {key: sum(values[-tail:]) / len(values[-tail:]) for key, values in history.items() if values}
    summary["steps"], summary["examples"] = steps, len(pairs)
    summary["curve"] = learning_curve(history)
    return summary


def _patch_key(attribute: str) -> str:
    """History key prefix of a patch objective: ``patch`` for shapes (as before colours were added)."""
    return "patch" if attribute == "shape" else f"patch_{attribute}"


def learning_curve(history: dict[str, list[float]], points: int = 50) -> dict[str, list[float]]:
    """The losses and ITM accuracy averaged over ``points`` equal spans of the run, with each span's last
    step (for a learning-curve plot)."""
    steps = len(history["itm_loss"])
    bounds = sorted({round(steps * (i + 1) / points) for i in range(points)} - {0})
    curve: dict[str, list[float]] = {"step": [float(b) for b in bounds]}
    for key, values in history.items():
        starts = [0] + bounds[:-1]
        curve[key] = [round(sum(values[a:b]) / max(1, b - a), 4) for a, b in zip(starts, bounds)]
    return curve


def _continued(config: PretrainConfig, out_dir: Path):
    """The ViLT backbone in ``config.init_from`` (its processor saved into ``out_dir``), a factory of a copy
    of its ITM head (``rank_output``; freshly initialised where the checkpoint has none), and how to save
    both: pre-training goes on from there. The MLM head starts afresh: a checkpoint directory keeps none."""
    # the backbone's own loader: any ViLT checkpoint layout, with or without a convolutional stem
    backbone = ViltBackbone.from_pretrained(config.init_from)
    vilt_config = backbone.config
    wanted = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
              "image_size": config.image_size, "patch_size": config.patch_size,
              "conv_stem_channels": tuple(config.conv_stem_channels)}
    found = {key: getattr(vilt_config, key) for key in wanted if key != "conv_stem_channels"}
    found["conv_stem_channels"] = conv_stem_channels(vilt_config)
    if found != wanted:
        raise RunError(f"init_from {config.init_from} is a ViLT of {found}, not the {wanted} asked for")
    backbone.processor.save_pretrained(str(out_dir))
    start_head = backbone.heads["retrieval"] if "retrieval" in backbone.heads else None
    backbone.heads = nn.ModuleDict()  # pre-training trains the ITM head apart (saved as the retrieval head)

    def itm_head() -> nn.Module:
        head = nn.Linear(config.hidden_size, 1)
        if start_head is not None:
            head.load_state_dict(start_head.state_dict())
        return head

    return backbone, itm_head, _vilt_saver(vilt_config, out_dir)


def _vilt_saver(vilt_config: ViltConfig, out_dir: Path):
    """How a pre-trained ViLT is saved: a ``ViltForImageAndTextRetrieval`` checkpoint whose retrieval
    head (``rank_output``) is the ITM head."""

    def save(trained: ViltBackbone, itm_head: nn.Module) -> None:
        model = ViltForImageAndTextRetrieval(vilt_config)
        install_conv_stem(model.vilt, vilt_config)
        model.vilt.load_state_dict(trained.vilt.state_dict())
        model.rank_output.load_state_dict(itm_head.state_dict())
        model.save_pretrained(str(out_dir))

    return save


def _new_vilt(config: PretrainConfig, words: list[str], out_dir: Path):
    """A fresh ViltBackbone (processor saved into ``out_dir``), a factory of its ITM head, and how to save both."""
    processor = build_processor(out_dir, words, shortest_edge=config.image_size, max_text_len=config.max_text_len)
    vilt_config = ViltConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size, image_size=config.image_size, patch_size=config.patch_size,
        max_position_embeddings=config.max_text_len, vocab_size=len(processor.tokenizer), max_image_length=-1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **({"conv_stem_channels": list(config.conv_stem_channels)} if config.conv_stem_channels else {}),
    )
    backbone = ViltBackbone(vilt_config, processor)
    with torch.no_grad():  # transformers leaves these at zero; ViLT initialises them like ViT
        embeddings = backbone.vilt.embeddings
        nn.init.trunc_normal_(embeddings.position_embeddings, std=0.02)
        nn.init.trunc_normal_(embeddings.cls_token, std=0.02)

    return backbone, lambda: nn.Linear(config.hidden_size, 1), _vilt_saver(vilt_config, out_dir)


def _new_meter(config: PretrainConfig, words: list[str], out_dir: Path):
    """A fresh MeterBackbone with a BPE tokenizer, a factory of its ITM head (METER's rank_output), and how
    to save both."""
    tokenizer = build_roberta_tokenizer(words, max_length=config.max_text_len)
    hidden, heads, intermediate = config.hidden_size, config.num_heads, config.intermediate_size
    meter_config = MeterConfig(
        vision=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=config.vision_layers,
                    num_attention_heads=heads, image_size=config.image_size, patch_size=config.patch_size,
                    num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    **({"conv_stem_channels": list(config.conv_stem_channels)} if config.conv_stem_channels else {})),
        # RoBERTa numbers positions from pad_token_id + 1, hence the two extra position embeddings
        text=dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=config.text_layers,
                  num_attention_heads=heads, intermediate_size=intermediate, hidden_act="gelu",
                  max_position_embeddings=config.max_text_len + 2, type_vocab_size=1, layer_norm_eps=1e-5,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0),
        hidden_size=hidden, num_fusion_layers=config.num_layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_text_len=config.max_text_len,
    )
    backbone = MeterBackbone(meter_config, tokenizer)
    fusion_parts = [backbone.text_projection, backbone.image_projection, backbone.token_type_embeddings,
                    backbone.text_fusion_layers, backbone.image_fusion_layers, backbone.pooler]
    for part in fusion_parts:  # BERT's initialisation, as METER's init_weights (torch's defaults are far wider)
        part.apply(_bert_init)

    def new_itm_head() -> nn.Module:
        head = meter_retrieval_head(hidden)
        head.apply(_bert_init)
        return head

    def save(trained: MeterBackbone, head: nn.Module) -> None:
        trained.heads["retrieval"] = head  # the ITM head is METER's retrieval head (rank_output)
        write_meter_directory(out_dir, meter_config, trained.state_dict(), tokenizer)

    return backbone, new_itm_head, save


def _bert_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
