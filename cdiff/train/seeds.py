"""Random streams of a training run, and the process's global RNG states.

Every random number of the training step (data order, augmentation, noise, timesteps) comes
from a generator seeded by ``derive_seed(seed, purpose, *keys)``, keyed by what it is for and by
the sample's global position in the data stream. Nothing depends on how many numbers were drawn
before, so a resumed run, or a run on another number of processes, draws the same numbers for
the same sample. The global states (torch, CUDA, numpy, python) are saved and restored as well,
for code outside cdiff that may draw from them.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (ints and strings): the same parts give the same seed anywhere."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(*parts, device="cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def seed_globals(seed: int) -> None:
    """Seed numpy's and python's global RNGs from ``seed``, as torch's is already at start-up (with a
    fixed default). Nothing in cdiff draws from them; seeded, two runs of one config save equal
    RNG states, so that their checkpoints are equal tensor for tensor. torch's global state is left
    as it is: reseeding it would change what runs made before drew."""
    np.random.seed(derive_seed(seed, "numpy global") % 2**32)
    random.seed(derive_seed(seed, "python global"))


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able values) holding the global RNG states of torch, CUDA, numpy and python."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    values = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, values


def restore_rng(tensors: dict[str, torch.Tensor], values: dict) -> None:
    """Undo ``capture_rng``: set every global RNG state it saved."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = values["python"]
    random.setstate((version, tuple(internal), gauss_next))
