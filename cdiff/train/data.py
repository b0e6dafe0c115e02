"""The training data: the training list and the pairs held out of it for validation, the stream of
samples each process reads at each step, and its augmentation.

Validation never reads the test split: ``val.holdout`` pairs are taken out of the training list
(``holdout_indices``: a seeded choice that depends only on the list's length, so every run on
the list holds out the same pairs) and validated on; the rest is trained on.

The samples of a run form one endless stream of global positions g = 0, 1, 2, ...; position g
is dataset item ``order(g)``: epoch g // N is a seeded permutation of the N items. Process r of
W reads positions r, r + W, r + 2W, ... in micro-batches, so one optimiser step of every process
together covers the same positions as one step of a single process with a W times larger
batch, whatever W is. Augmentation of position g uses a generator seeded by (seed, g), and the
step draws its noise the same way (cdiff.train.seeds): the stream depends only on the seed, and
the position to restart from is just the number of samples read.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cdiff.data import CenterCrop, PairAugment, SyntheticPairs, open_dataset
from cdiff.data.datasets import FORCE_KINDS
from cdiff.train.config import DataConfig, ValConfig
from cdiff.train.seeds import derive_seed, generator

# The release's crop sides (random crops in training, the centre crop for validation: SAR2Opt's
# 600-px tiles at offset 44); other datasets are used whole.
DEFAULT_CROPS = {"sar2opt": 512, "spacenet6": 512}
KEEP = ("sar", "eo", "sar_latent", "eo_latent", "name")


class SampleOrder:
    """Global position -> dataset index: each epoch is a seeded permutation of the items."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._permutation = -1, None

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._permutation = torch.randperm(self.size, generator=generator(self.seed, "order", epoch))
            self._epoch = epoch
        return int(self._permutation[offset])


def positions(base: int, micro: int, batch: int, rank: int, world: int) -> list[int]:
    """Global positions of this process's micro-batch number ``micro`` counted from stream position ``base``."""
    first = micro * batch  # this process's own sample counter since base
    return [base + (first + j) * world + rank for j in range(batch)]


class MicroBatches:
    """``count`` micro-batches of positions from stream position ``base`` (a DataLoader batch_sampler)."""

    def __init__(self, base: int, count: int, batch: int, rank: int, world: int):
        self.base, self.count, self.batch, self.rank, self.world = base, count, batch, rank, world

    def __iter__(self):
        for micro in range(self.count):
            yield positions(self.base, micro, self.batch, self.rank, self.world)

    def __len__(self) -> int:
        return self.count


class StreamSamples(Dataset):
    """Item ``g`` is the stream's sample at global position g, augmented with generator (seed, g)."""

    def __init__(self, items: Dataset, seed: int, augment: Callable | None):
        if len(items) == 0:
            raise ValueError("the training set is empty")
        self.items, self.seed, self.augment = items, seed, augment
        self.order = SampleOrder(len(items), seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        sample = self.items[self.order(position)]
        if self.augment is not None:
            sample = self.augment(sample, generator(self.seed, "augment", position))
        out = {k: v for k, v in sample.items() if k in KEEP}
        out["position"] = position
        return out


@dataclass(frozen=True)
class ImageAugment:
    """The paired image augmentation: a random (or, ``centre``, the centre) crop of ``crop`` px, then
    random flips and 90-degree rotations (cdiff.data.PairAugment), from the given generator."""

    random: PairAugment
    centre: CenterCrop | None = None

    def __call__(self, sample: dict, gen: torch.Generator) -> dict:
        return self.random(self.centre(sample) if self.centre else sample, gen)


def image_augment(data: DataConfig) -> ImageAugment | None:
    """The augmentation ``data`` asks for, or None."""
    crop = data.crop or DEFAULT_CROPS.get(data.kind)
    random = PairAugment(crop_size=crop if data.random_crop else None, hflip=data.hflip, vflip=data.vflip,
                         rot90=data.rot90)
    centre = CenterCrop(crop) if crop and not data.random_crop else None
    if centre is None and random.crop_size is None and not (data.hflip or data.vflip or data.rot90):
        return None
    return ImageAugment(random, centre)


def image_pairs(data: DataConfig) -> Dataset:
    """The un-augmented pairs of the training list (``data.train_list``, else the dataset's: the
    field's frozen list where one exists, cdiff's split by scene otherwise), held-out ones included."""
    if data.kind == "synthetic":
        return SyntheticPairs(data.count, size=data.size, seed=0)
    force = {"force": data.force} if data.kind in FORCE_KINDS else {}
    return open_dataset(data.kind, data.root, split="train", list_file=data.train_list or None, transform=None,
                        **force)


def holdout_indices(size: int, count: int) -> list[int]:
    """The ``count`` indices of a training list of ``size`` pairs that validation holds out: a seeded
    choice that depends on ``size`` alone, in the list's order."""
    if not 0 < count < size:
        raise ValueError(f"val.holdout = {count}: the training list has {size} pairs; hold out fewer")
    chosen = torch.randperm(size, generator=generator("val.holdout", size))[:count]
    return sorted(chosen.tolist())


class _Transformed(Dataset):
    def __init__(self, items: Dataset, transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.items[index])


def training_split(data: DataConfig, val: ValConfig) -> tuple[Dataset, Dataset | None]:
    """(the pairs to train on, the first ``val.images`` of the ``val.holdout`` pairs held out of the
    training list, centre-cropped, or None when validation is off). Both are un-augmented."""
    pairs = image_pairs(data)
    if not val.holdout:
        return pairs, None
    held = holdout_indices(len(pairs), val.holdout)
    kept = sorted(set(range(len(pairs))) - set(held))
    if not val.every:
        return Subset(pairs, kept), None
    crop = data.crop or DEFAULT_CROPS.get(data.kind)
    validated = Subset(pairs, held[: val.images])
    return Subset(pairs, kept), (_Transformed(validated, CenterCrop(crop)) if crop else validated)


def latent_task_pairs(data: DataConfig, val: ValConfig) -> tuple[Dataset | None, Dataset | None]:
    """``training_split`` for a task that may train from a latent cache: opened at the start, so that
    a missing file is an error before any step, unless the cache replaces the images and validation
    is off (then (None, None)). Validation reads pairs held out of the training list, never the test split."""
    if data.latents and not val.every:
        return None, None
    return training_split(data, val)


def loader(samples: StreamSamples, batches: MicroBatches, workers: int, pin: bool, seed: int) -> DataLoader:
    """A DataLoader over ``batches``; its worker seeds come from its own generator, not torch's global one."""
    return DataLoader(
        samples, batch_sampler=batches, num_workers=workers, pin_memory=pin,
        generator=torch.Generator().manual_seed(derive_seed(seed, "loader")),
        worker_init_fn=_leave_ctrl_c_to_the_trainer if workers else None,
    )


def _leave_ctrl_c_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal: a worker ending on it would fail the batch in
    flight, while the trainer wants to finish its step and save (cdiff.signals)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
