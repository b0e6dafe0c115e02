"""Claim 2 as a user meets it: the confidence maps ``cdiff translate --conf-dir`` writes.

A user who wants the confidence maps of the held-out scenes writes the scenes with ``cdiff synth
OUT --seed 1000000 --size 128`` (8-bit grey PNGs named ``pair_name(seed)``) and runs ``cdiff
translate MODEL --input OUT/sar --output eo --conf-dir conf``. The same happens here, without
the files: each scene's SAR goes through 8 bits and ``cdiff.geo.sar_to_rgb``, as ``read_sar``
reads a grey PNG, and translate's own translator (``cdiff.translate.open_model``; for a C-DiffSET
file ``cdiff.translators.translate_scenes``) samples it from pure noise, one scene per call
(translate's default batch size; a scene's noise depends only on the seed and its name) and
returns the grey map translate would write: 1 / the variance the U-Net predicts at the first
step with t <= T/2, min-max normalised per image, resized to the image, 8 bits
(``cdiff.confidence_map.release_grey``). tests/test_synthetic_report.py checks that these maps
are the PNGs ``cdiff translate --conf-dir`` writes, bit for bit.

The maps are scored per pixel, against the pixel masks of the injected objects: low confidence
(a dark pixel, 255 - grey) is the score of "an object is here".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdiff.data.imageio import to_uint8
from cdiff.data.synth import SynthPair, pair_name
from cdiff.geo import SarScene, sar_to_rgb
from studies.synthetic.measures import level_auroc

MASKS = ("discrepancy", "eo_only", "sar_only", "misregistration")


def user_scenes(pairs: list[SynthPair], seeds: list[int]) -> tuple[list[SarScene], list[str]]:
    """The scenes and names ``cdiff translate`` reads from the PNGs ``cdiff synth`` writes of these pairs."""
    names = [pair_name(seed) for seed in seeds]
    scenes = [SarScene(sar_to_rgb(to_uint8(p.sar)[..., None], name), None, None) for p, name in zip(pairs, names)]
    return scenes, names


def translate_maps(model: str | Path, scenes: list[SarScene], names: list[str], steps: int, seed: int = 0,
                   progress=None) -> np.ndarray:
    """(N, H, W) uint8: the grey confidence maps ``cdiff translate --model MODEL --steps STEPS --seed
    SEED --conf-dir`` writes for these scenes (fp32 on the CPU, batch size 1, DDIM, eta 0)."""
    from cdiff.translate import open_model
    from cdiff.translators import Sampling

    sampling = Sampling(steps=steps, seed=seed)
    # conf_dir is only checked there (a model without a variance has no map and is refused); nothing is written.
    translator, _ = open_model(model, sampling, conf_dir="conf", device="cpu", dtype="fp32", prompt=None)
    maps = []
    for i, (scene, name) in enumerate(zip(scenes, names)):
        (_, grey), = translator([scene], [name], sampling)
        maps.append(grey)
        if progress is not None:
            progress(i + 1, len(scenes))
    return np.stack(maps)


def map_confidence(grey: np.ndarray, masks: dict[str, np.ndarray], resamples: int) -> dict:
    """Per mask (B, H, W) bool: the AUROC of low confidence (255 - grey) against its pixels, pooled
    over every pixel of every scene, with the 95% interval of ``resamples`` bootstrap resamples of
    scenes (``level_auroc``)."""
    low = 255 - grey  # uint8: dark = low confidence = high score
    return {name: level_auroc(low, np.asarray(masks[name], dtype=bool), resamples) for name in MASKS}
