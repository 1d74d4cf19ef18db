"""Task data as ``torch.utils.data`` Datasets, and the batch order of a (possibly distributed) run.

A :class:`TaskDataset` holds only the example records (paths, texts, targets); each item is decoded
from disk when it is asked for and dropped after its batch, so memory stays bounded whatever the size
of the data set (no cache of decoded images). The :class:`Collate` function runs the backbone's own
preprocessing (its ``preprocess``: the checkpoint's processor) on a list of items; with
``DataLoader(num_workers=N)`` decoding and preprocessing both run in the worker processes.

Everything random about an item is drawn from the run's seed, the epoch and the item's index (a
retrieval example's positive caption and its negatives, a pre-training pair's negative caption), so
the data of a step does not depend on the number of worker processes or of ranks.

:class:`StepBatches` is the batch order: epoch ``e`` is a permutation of the data set drawn from
``seed + e`` (``DistributedSampler``'s own), cut into global batches; rank ``r`` of ``W`` reads the
``r``-th of every ``W`` positions of the permutation (``DistributedSampler``'s shard), so the union of
the ranks' batches of step ``s`` is the global batch of step ``s`` of a one-process run. It starts at
any step, which is what a resumed run needs.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models.producer.world.export import load_scenes
from models.producer.world.language import hard_negative_captions


def open_rgb(path: str | Path) -> Image.Image:
    """Decode one image (RGB); nothing is kept once the caller lets it go."""
    with Image.open(path) as opened:
        return opened.convert("RGB")


def item_rng(seed: int, epoch: int, index: int, what: str = "") -> random.Random:
    """The random numbers of one item of one epoch: a function of the seed, epoch and index only."""
    return random.Random(f"{seed}:{epoch}:{index}:{what}")


# ---------------------------------------------------------------------------------------------
# Items and batches
# ---------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One example, decoded: ``pairs`` (image, text) to preprocess (NLVR2: left then right; retrieval
    training: the positive then the negatives), and the target."""

    index: int
    pairs: list[tuple[Image.Image, str]]
    target: Any = None


@dataclass
class TaskBatch:
    """A collated batch: ``inputs`` are backbone batches (NLVR2: [left, right]; otherwise one),
    ``targets`` a tensor, ``indices`` the examples' positions in the split."""

    inputs: list[Any]
    targets: torch.Tensor | None
    indices: list[int]
    group: int = 1  # pairs per example in inputs[0] (retrieval training: 1 + negatives)

    def __len__(self) -> int:
        return len(self.indices)


class TaskDataset(Dataset):
    """The examples of one split of one task (records from ``models.producer.datasets``).

    ``dataset[i]`` or ``dataset[(epoch, i)]`` decodes example ``i``. For VQA the target is the soft
    score vector over ``labels``; NLVR2 a 0/1 label; retrieval (``train=True``) the positive caption
    and ``negatives`` negatives, the first one a hard negative (one attribute changed) where the data
    set records its scenes, the others captions of other images, all drawn from (seed, epoch, index).
    """

    def __init__(self, task: str, examples: Sequence, *, labels: Sequence[str] | None = None, seed: int = 0,
                 negatives: int = 3, scenes: dict[Path, Any] | None = None, train: bool = True) -> None:
        self.task, self.examples, self.seed, self.negatives, self.train = task, list(examples), seed, negatives, train
        self.label_index = {label: i for i, label in enumerate(labels)} if labels is not None else None
        self.scenes = scenes or {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        example = self.examples[index]
        if self.task == "vqa":
            target = torch.zeros(len(self.label_index or ()))
            for answer, score in example.answer_scores.items():
                if self.label_index is not None and answer in self.label_index:
                    target[self.label_index[answer]] = score
            return Item(index, [(open_rgb(example.image_path), example.question)], target)
        if self.task == "nlvr2":
            return Item(index, [(open_rgb(example.left_image_path), example.statement),
                                (open_rgb(example.right_image_path), example.statement)], int(example.label))
        if self.task == "retrieval":
            image = open_rgb(example.image_path)
            if not self.train:
                return Item(index, [(image, example.captions[0])])
            return Item(index, [(image, caption) for caption in self.candidates(epoch, index)], 0)
        raise ValueError(f"unknown task {self.task!r}")

    def candidates(self, epoch: int, index: int) -> list[str]:
        """The positive caption, then the negatives, of retrieval example ``index`` in ``epoch``."""
        example, rng = self.examples[index], item_rng(self.seed, epoch, index, "retrieval")
        candidates = [rng.choice(example.captions)]
        scene = self.scenes.get(Path(example.image_path).resolve())
        if self.negatives > 1 and scene is not None:
            hard = hard_negative_captions(scene, k=1, rng=rng)
            candidates += hard[:1]
        if len(self.examples) < 2:
            raise ValueError("retrieval training needs at least two images (negatives are other images' captions)")
        while len(candidates) < self.negatives + 1:
            other = self.examples[rng.randrange(len(self.examples))]
            if other.image_id != example.image_id:
                candidates.append(rng.choice(other.captions))
        return candidates


def scenes_of(data_dir: str | Path) -> dict[Path, Any]:
    """The scenes a synthetic data set records (by resolved image path); {} for real data sets."""
    data_dir = Path(data_dir)
    try:
        return {(data_dir / k).resolve(): v for k, v in load_scenes(data_dir).items()}
    except FileNotFoundError:
        return {}


class Collate:
    """Items -> a :class:`TaskBatch`, preprocessed by ``preprocess`` (the backbone's own). Runs in the
    DataLoader's worker processes when there are any."""

    def __init__(self, preprocess: Callable[[Sequence[Image.Image], Sequence[str]], Any], task: str) -> None:
        self.preprocess, self.task = preprocess, task

    def __call__(self, items: Sequence[Item]) -> TaskBatch:
        indices = [item.index for item in items]
        if self.task == "nlvr2":
            left = self.preprocess([i.pairs[0][0] for i in items], [i.pairs[0][1] for i in items])
            right = self.preprocess([i.pairs[1][0] for i in items], [i.pairs[1][1] for i in items])
            targets = torch.tensor([i.target for i in items], dtype=torch.long)
            return TaskBatch([left, right], targets, indices)
        pairs = [pair for item in items for pair in item.pairs]
        inputs = [self.preprocess([p[0] for p in pairs], [p[1] for p in pairs])]
        if self.task == "vqa":
            return TaskBatch(inputs, torch.stack([i.target for i in items]), indices)
        group = len(items[0].pairs) if items else 1
        if any(len(i.pairs) != group for i in items):
            raise ValueError("retrieval items of one batch must have the same number of candidates")
        targets = torch.zeros(len(items), dtype=torch.long) if items and items[0].target is not None else None
        return TaskBatch(inputs, targets, indices, group=group)


# ---------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------
class StepBatches:
    """The batches one rank reads, step by step: ``batch(step)`` is a list of (epoch, index) keys.

    ``global_batch`` examples per step over all ranks (it must divide by ``world_size``); an epoch has
    ``len(dataset) // global_batch`` steps (the tail is dropped); iterating yields the steps from
    ``start`` up to ``stop`` (None: for ever)."""

    def __init__(self, size: int, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, stop: int | None = None) -> None:
        if global_batch % world_size:
            raise ValueError(f"the global batch size {global_batch} must be a multiple of the number of "
                             f"processes ({world_size})")
        if size < global_batch:
            raise ValueError(f"{size} examples are fewer than one global batch of {global_batch}")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world_size, self.start, self.stop = rank, world_size, start, stop
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = size // global_batch
        self._epoch: int | None = None
        self._order: list[int] = []
        self._sampler = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=seed, drop_last=True)

    def _shard(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            self._sampler.set_epoch(epoch)
            self._order, self._epoch = list(iter(self._sampler)), epoch
        return self._order

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._shard(epoch)
        chunk = order[position * self.local_batch:(position + 1) * self.local_batch]
        return [(epoch, index) for index in chunk]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an endless batch order has no length")
        return max(0, self.stop - self.start)


def _context():
    # fork: the workers inherit the dataset and the preprocessing (the backbone's processor) without
    # pickling the model; they only ever touch CPU tensors
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def loader(dataset: Dataset, collate: Collate, *, workers: int = 0, batch_sampler=None, batch_size: int | None = None,
           pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose ``workers`` processes decode and preprocess (none: in this process)."""
    kwargs: dict[str, Any] = dict(num_workers=workers, collate_fn=collate, pin_memory=pin_memory)
    if workers:
        kwargs.update(multiprocessing_context=_context(), prefetch_factor=2)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)


class RetrievalRows(Dataset):
    """Retrieval evaluation: row ``i`` pairs image ``i`` with the first caption of every image of the
    gallery (so one item is one row of the image x caption score matrix)."""

    def __init__(self, examples: Sequence) -> None:
        self.examples = list(examples)
        self.captions = [e.captions[0] for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Item:
        image = open_rgb(self.examples[index].image_path)
        return Item(index, [(image, caption) for caption in self.captions])
