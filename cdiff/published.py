"""The published rows a run of ``cdiff evaluate --dataset NAME`` is printed beside.

One table, ``PUBLISHED``: C-DiffSET and its stage 1 (SD 2.1 fine-tuned without the confidence
channel, "SD2.1 FT") on GeoSET's four benchmarks, as GeoSET's ``MODEL_ZOO.md`` gives them
(Tables 2 and 3 of the GeoSET paper; every method retrained on the same splits and scored by
GeoSET's ``scripts/evaluate.py``, the protocol ``cdiff evaluate`` follows by default).
``BENCHMARKS`` holds each benchmark's evaluation size and test count from the same page.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = ("GeoSET MODEL_ZOO.md (github.com/KAIST-VICLab/GeoSET at commit 1e5a07e), Tables 2 and 3 of the "
          "GeoSET paper")
COLUMNS = ("fid", "dists", "kid", "dino", "lpips", "ssim", "psnr")  # the published order


@dataclass(frozen=True)
class Benchmark:
    title: str
    size: int  # the evaluation size: predictions are size x size, the ground truth centre-cropped to it
    test_pairs: int
    test_list: str  # the frozen list GeoSET scores (its splits/<dataset>/<list>.txt)
    reader: str  # the dataset's reader kind, whose shipped "test" list is that list (cdiff.data.frozen)


BENCHMARKS = {
    "qxs-saropt": Benchmark("QXS-SAROPT", 256, 3999, "test", "qxs"),
    "sar2opt": Benchmark("SAR2Opt", 512, 627, "test", "sar2opt"),  # 600-px tiles, centre 512 crop
    "sar2eo": Benchmark("SAR2EO", 256, 4000, "test_first4000", "sar2eo"),  # the first 4,000 of 21,260
    "spacenet6": Benchmark("SpaceNet6", 256, 495, "test", "spacenet6"),
}


def _row(fid, dists, kid, dino, lpips, ssim, psnr) -> dict[str, float]:
    return dict(zip(COLUMNS, (fid, dists, kid, dino, lpips, ssim, psnr)))


# benchmark -> method -> metric -> value, as printed (FID 1 decimal, KID 4, PSNR 2, others 3).
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "qxs-saropt": {
        "C-DiffSET": _row(19.9, 0.233, 0.0055, 0.522, 0.526, 0.380, 16.92),
        "SD2.1 FT (stage 1)": _row(19.1, 0.257, 0.0042, 0.489, 0.561, 0.348, 15.40),
    },
    "sar2opt": {
        "C-DiffSET": _row(78.1, 0.214, 0.0138, 0.601, 0.529, 0.314, 16.81),
        "SD2.1 FT (stage 1)": _row(71.8, 0.211, 0.0094, 0.600, 0.541, 0.293, 16.24),
    },
    "sar2eo": {
        "C-DiffSET": _row(64.0, 0.252, 0.0257, 0.527, 0.462, 0.512, 17.09),
        "SD2.1 FT (stage 1)": _row(67.7, 0.270, 0.0282, 0.511, 0.487, 0.459, 15.46),
    },
    "spacenet6": {
        "C-DiffSET": _row(132.3, 0.197, 0.0614, 0.611, 0.346, 0.520, 19.43),
        "SD2.1 FT (stage 1)": _row(124.7, 0.196, 0.0537, 0.612, 0.348, 0.513, 19.29),
    },
}


def benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; an unknown name raises, listing the known ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"--dataset: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
