"""The training data stream: which sample each process reads at each step, and its augmentation.

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
from cdiff.train.config import DataConfig
from cdiff.train.seeds import derive_seed, generator

DEFAULT_CROPS = {"sar2opt": 512, "spacenet6": 512}  # the release's crop sides; other datasets are used whole
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


def image_pairs(data: DataConfig, split: str, count: int | None = None) -> Dataset:
    """The un-augmented pairs of ``split`` ("train" or "test"; "test" centre-cropped); at most ``count``."""
    if data.kind == "synthetic":
        if split == "train":
            return SyntheticPairs(data.count, size=data.size, seed=0)
        return SyntheticPairs(count or 1, size=data.size, seed=data.count)  # the pairs after the training ones
    crop = data.crop or DEFAULT_CROPS.get(data.kind)
    list_file = (data.train_list if split == "train" else data.test_list) or None
    transform = CenterCrop(crop) if split == "test" and crop else None
    pairs = open_dataset(data.kind, data.root, split=split, list_file=list_file, transform=transform)
    return Subset(pairs, range(min(count, len(pairs)))) if count is not None else pairs


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
