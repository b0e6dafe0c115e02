"""What ``cdiff translate`` runs for each model kind: same-sized SAR scenes in, uint8 EO images
(and grey confidence maps) out.

- C-DiffSET (``open_cdiffset``): a Pipeline sampled with ``Sampling``. Image ``name`` (its path
  relative to INPUT, without suffix) starts from noise drawn with the seed
  ``image_seed(seed, name)``, the first 63 bits of sha256("<seed>:<name>"). It does not depend on
  the other images, their order, the shard or the batch, so a rerun, a resumed run or a sharded
  run draws the same noise as a single run, and at batch size 1 gives the same bits on the same
  device (larger batches agree to float rounding: batched convolutions may sum in another order).
  With eta > 0, DDIM draws fresh noise every step from the image's generator, which a batch would
  share: batch size 1 is required then, as for the consistency sampler ("lcm") of a distilled
  student. Steps and sampler left unset are the model's own: a distilled student's recorded ones
  (cdiff.native), else DDIM-50; ``cache_interval`` is DeepCache's (cdiff.stepcache).
- S2O-NPDE (``open_s2o_npde``): one generator pass (cdiff.npde.inference). There are no steps, no
  noise and no confidence map, so the sampling options (steps, eta, sampler, seed), a prompt, a
  confidence folder and the C-DiffSET speed switches are refused for it; batch size, tiles, dtype
  and device apply as for C-DiffSET.

Sides are reflect-padded to the model's multiple and cropped back; images larger than a tile go
through overlapping tiles (cdiff.tiling). Which opener serves a model file is the table of kinds,
cdiff.train.kinds.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cdiff.confidence_map import release_grey
from cdiff.config import DTYPES
from cdiff.data.imageio import to_uint8
from cdiff.geo import SarScene
from cdiff.samplers import SAMPLERS, draws_fresh_noise
from cdiff.tiling import Tiling, crop, pad_to_multiple

# (scenes, names, sampling, show_progress) -> [(EO uint8 (H, W, 3), confidence grey uint8 (H, W) or None)]
Translator = Callable[..., list[tuple[np.ndarray, np.ndarray | None]]]


def image_seed(seed: int, name: str) -> int:
    """The noise seed of image ``name``: the first 63 bits of sha256("<seed>:<name>")."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Sampling:
    """How every image is sampled (defaults: the model's own sampler and steps, eta 0, no caching)."""

    steps: int | None = None  # None: the model's own (a distilled student's recorded count, else 50)
    eta: float = 0.0
    seed: int = 0  # with the image's name, the seed of its starting noise (image_seed)
    batch_size: int = 1  # same-sized images per pipeline call
    tiling: Tiling | None = Tiling()  # None: images of any size are translated whole
    sampler: str | None = None  # one of cdiff.samplers.SAMPLERS; None: the model's own (else "ddim")
    cache_interval: int = 1  # DeepCache: a whole U-Net pass every this many steps (cdiff.stepcache); 1: none

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.cache_interval < 1:
            raise ValueError(f"--cache-interval must be at least 1 (1: no caching), got {self.cache_interval}")
        if self.sampler is not None:
            self.check_batch(self.sampler)

    def check_batch(self, sampler: str) -> None:
        """Refuse a batch for a sampler that draws fresh noise (an image's result would depend on its batch)."""
        if self.batch_size > 1 and draws_fresh_noise(sampler, self.eta):
            what = "--eta > 0" if self.eta > 0 else f"the {sampler} sampler"
            raise ValueError(
                f"{what} draws fresh noise every step from one generator per batch, so an image's "
                "result would depend on its batch: use --batch-size 1"
            )


def _sar_batch(scenes: list[SarScene]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(s.sar).permute(2, 0, 1) for s in scenes])  # (B, 3, H, W)


def translate_scenes(pipeline, scenes: list[SarScene], names: list[str], sampling: Sampling,
                     show_progress: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Translate same-sized scenes in one batch: (EO uint8 (H, W, 3), confidence grey uint8
    (H, W) or None) per scene."""
    height, width = scenes[0].sar.shape[:2]
    sar = pad_to_multiple(_sar_batch(scenes), pipeline.size_multiple)
    scale = pipeline.vae.config.downsample_factor
    latent_shape = (1, pipeline.vae.config.latent_channels, sar.shape[-2] // scale, sar.shape[-1] // scale)
    generators = [torch.Generator().manual_seed(image_seed(sampling.seed, n)) for n in names]
    latents = torch.cat([torch.randn(latent_shape, generator=g) for g in generators])  # (B, 4, h, w) fp32, on the CPU
    result = pipeline.translate(sar, steps=sampling.steps, eta=sampling.eta, generator=generators[0], latents=latents,
                                sampler=sampling.sampler, show_progress=show_progress, tiling=sampling.tiling,
                                cache_interval=sampling.cache_interval)
    eo = crop(result.eo, height, width).float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    out = []
    for i in range(len(scenes)):
        grey = None if result.confidence is None else release_grey(result.confidence[i], height, width, scale)
        out.append((to_uint8(eo[i]), grey))
    return out


def translate_npde_scenes(generator, scenes: list[SarScene], names: list[str], sampling: Sampling,
                          show_progress: bool = False) -> list[tuple[np.ndarray, None]]:
    """``translate_scenes`` for an S2O-NPDE generator: one pass, no noise, no confidence map."""
    from cdiff.npde import translate_image

    eo = translate_image(generator, _sar_batch(scenes), sampling.tiling)  # (B, 3, H, W)
    eo = eo.float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [(to_uint8(eo[i]), None) for i in range(len(scenes))]


def open_cdiffset(path: Path, sampling: Sampling, conf_dir, device, dtype: str, prompt: str | None,
                  channels_last: bool = False, compile_unet: bool = False) -> Translator:
    """A C-DiffSET model (anything cdiff.load_pipeline reads) for ``cdiff translate``.
    ``channels_last`` / ``compile_unet``: the speed switches (Pipeline.to(memory_format=),
    Pipeline.compile()), same results as without them."""
    from cdiff.load import load_pipeline
    from cdiff.pipeline import RELEASE_SAMPLING

    pipeline = load_pipeline(path, prompt=prompt, device=device)
    sampling.check_batch(sampling.sampler or (pipeline.sampling or RELEASE_SAMPLING)[0])
    if conf_dir is not None and pipeline.unet.config.out_channels <= pipeline.vae.config.latent_channels:
        raise ValueError(f"{path}: its U-Net predicts no variance ({pipeline.unet.config.out_channels} outputs), "
                         "so there is no confidence map: leave out --conf-dir")
    # The SD VAE overflows in fp16, so --dtype applies to the U-Net; the VAE stays fp32.
    pipeline.unet.to(DTYPES[dtype])
    if channels_last:
        pipeline.to(memory_format=torch.channels_last)
    if compile_unet:
        pipeline.compile()
    return functools.partial(translate_scenes, pipeline)


def open_s2o_npde(path: Path, sampling: Sampling, conf_dir, device, dtype: str, prompt: str | None,
                  channels_last: bool = False, compile_unet: bool = False) -> Translator:
    """An S2O-NPDE model file's generator for ``cdiff translate``; the options it has no use for are refused."""
    from cdiff.npde import load_generator

    defaults = Sampling()
    given = [f"--{key.replace('_', '-')}" for key in ("steps", "eta", "sampler", "seed", "cache_interval")
             if getattr(sampling, key) != getattr(defaults, key)]
    given += ["--prompt"] * (prompt is not None) + ["--conf-dir"] * (conf_dir is not None)
    given += ["--channels-last"] * channels_last + ["--compile"] * compile_unet
    if given:
        raise ValueError(f"{path}: an S2O-NPDE model translates in one generator pass, with no sampler, noise, "
                         f"prompt or confidence map: leave out {', '.join(given)}")
    return functools.partial(translate_npde_scenes, load_generator(path, device, DTYPES[dtype]))
