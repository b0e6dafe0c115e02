"""``cdiff evaluate``: the paper's five metrics over a folder of predictions and one of targets.

The protocol is the release's (its utils.py and test.py):
- PSNR, SSIM, SCC and LPIPS are computed per image (batch size 1) and averaged over images;
- FID is pytorch-fid's, on the two sets of images (2048-d Inception pool features);
- predictions and targets are read from their files: uint8 images map to [-1, 1] as
  ``x / 127.5 - 1`` (other dtypes with the dataset readers' stretch, cdiff.data.imageio),
  grey images are repeated to RGB;
- PSNR, SSIM, SCC and LPIPS see ``to_unit(x)`` = ``(x + 1) / 2`` (the default), or, with
  ``paper_scaling``, the release's ``(x + 0.5).clamp(0, 1)`` that its published numbers were
  computed with (cdiff.metrics.to_unit; for LPIPS see cdiff.perceptual.lpips_distance);
- FID reads the files as they are, ``(x + 1) / 2`` (pytorch-fid divides by 255): the release
  computes it from image folders, so the scaling option does not change it.

Pairs are matched by their path relative to each folder, without the suffix
(``pred/a/b.png`` with ``target/a/b.jpg``; cdiff.imagefiles); both folders must hold the same names.
What to score and how: ``EvaluationOptions``, the same for ``cdiff evaluate`` and ``cdiff
translate --target``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cdiff import metrics as image_metrics
from cdiff.data.imageio import read_image, to_unit_range
from cdiff.files import write_text
from cdiff.imagefiles import list_images, skip_or_raise
from cdiff.progress import progress

METRICS = ("psnr", "ssim", "scc", "lpips", "fid")
PER_IMAGE = ("psnr", "ssim", "scc", "lpips")
LABELS = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "scc": "SCC ↑", "lpips": "LPIPS ↓", "fid": "FID ↓"}
SCALINGS = {False: "(x + 1) / 2", True: "(x + 0.5).clamp(0, 1), the release's (--paper-scaling)"}
REPORT_NAMES = ("evaluation.json", "evaluation.md")
SCORES = {"psnr": image_metrics.psnr, "ssim": image_metrics.ssim, "scc": image_metrics.scc}


@dataclass(frozen=True)
class ImagePair:
    name: str  # relative path without suffix, e.g. "scene/0001"
    pred: Path
    target: Path


@dataclass(frozen=True)
class EvaluationOptions:
    """What ``cdiff evaluate`` (and ``cdiff translate --target``) computes, and how (module docstring)."""

    metrics: tuple[str, ...] = METRICS  # in METRICS' order (parse_metrics)
    paper_scaling: bool = False  # score on the release's (x + 0.5).clamp(0, 1) instead of (x + 1) / 2
    lpips_vgg: str | None = None  # torchvision's VGG16 file for LPIPS (cdiff.perceptual.find_weights)
    fid_weights: str | None = None  # pytorch-fid's Inception file for FID
    skip_bad: bool = False  # log and count pairs that cannot be read or whose sizes differ, instead of stopping
    report_dir: str | None = None  # where evaluation.json / .md go; None: the prediction folder

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"--metrics: unknown metric {unknown[0] if unknown else self.metrics!r}; "
                             f"choose from {','.join(METRICS)}")

    def check_networks(self) -> None:
        """Fail now, not after hours of translation, when a network's weights are missing."""
        Networks.check(self.metrics, self.lpips_vgg, self.fid_weights)


def match_pairs(pred_dir, target_dir, names: list[str] | None = None) -> list[ImagePair]:
    """Pairs of same-named predictions and targets. With ``names``, only those predictions
    (each must have a target); without, both folders must hold exactly the same names."""
    targets = list_images(target_dir, "target")
    preds = list_images(pred_dir, "prediction")
    if names is not None:
        unknown = [n for n in names if n not in preds]
        if unknown:
            raise ValueError(f"prediction folder {pred_dir}: no image named {unknown[0]!r}")
        preds = {n: preds[n] for n in names}
    no_target = [n for n in preds if n not in targets]
    if no_target:
        raise ValueError(
            f"{len(no_target)} predictions have no target of the same name in {target_dir}, "
            f"e.g. {preds[no_target[0]]} (expected {Path(target_dir) / no_target[0]}.*)"
        )
    if names is None:
        no_pred = [n for n in targets if n not in preds]
        if no_pred:
            raise ValueError(
                f"{len(no_pred)} targets have no prediction of the same name in {pred_dir}, e.g. {targets[no_pred[0]]}"
            )
    return [ImagePair(n, preds[n], targets[n]) for n in sorted(preds)]


def read_metric_image(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1]; grey repeated to RGB. Unreadable files raise naming it."""
    array = read_image(path)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    unit = to_unit_range(array, path)
    return torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1)[None]


def read_pair(pair: ImagePair) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = read_metric_image(pair.pred), read_metric_image(pair.target)
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction {pair.pred} is {pred.shape[-1]}x{pred.shape[-2]} but its target {pair.target} "
            f"is {target.shape[-1]}x{target.shape[-2]}"
        )
    return pred, target


@dataclass
class Evaluation:
    """Per-image scores, their means and FID, with the protocol they were computed under."""

    pred_dir: str
    target_dir: str
    metrics: tuple[str, ...]
    paper_scaling: bool
    per_image: list[dict] = field(default_factory=list)  # {"name", and a float per per-image metric}
    fid: float | None = None
    skipped: list[str] = field(default_factory=list)  # "path: reason" of pairs left out (--skip-bad)

    @property
    def count(self) -> int:
        return len(self.per_image)

    @property
    def means(self) -> dict[str, float]:
        """The mean of each per-image metric over images, and FID."""
        out = {m: float(np.mean([row[m] for row in self.per_image])) for m in self.metrics if m in PER_IMAGE}
        if "fid" in self.metrics:
            out["fid"] = self.fid
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "pred": self.pred_dir,
                "target": self.target_dir,
                "images": self.count,
                "scaling": SCALINGS[self.paper_scaling],
                "paper_scaling": self.paper_scaling,
                "means": self.means,
                "skipped": self.skipped,
                "per_image": self.per_image,
            },
            indent=2,
        ) + "\n"

    def table(self) -> str:
        """The means as a plain-text table, for the terminal."""
        rows = [(LABELS[m], f"{v:.4f}") for m, v in self.means.items()]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value:>10}" for label, value in rows]
        lines.append(f"{self.count} images; metric scaling {SCALINGS[self.paper_scaling]}")
        if self.skipped:
            lines.append(f"{len(self.skipped)} pairs skipped (unreadable or mismatched)")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = [
            "# cdiff evaluation",
            "",
            f"Predictions `{self.pred_dir}`, targets `{self.target_dir}`: {self.count} image pairs.",
            f"PSNR, SSIM, SCC and LPIPS are per-image means on images scaled by `{SCALINGS[self.paper_scaling]}`;",
            "FID (pytorch-fid, 2048-d pool features) is computed on the image files as they are.",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {LABELS[m]} | {v:.4f} |" for m, v in self.means.items()]
        if self.skipped:
            lines += ["", f"{len(self.skipped)} pairs were skipped:", ""] + [f"- {s}" for s in self.skipped]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """Write evaluation.json and evaluation.md into ``folder`` (atomically); their paths."""
        paths = [Path(folder) / name for name in REPORT_NAMES]
        write_text(paths[0], self.to_json())
        write_text(paths[1], self.to_markdown())
        return paths


class Networks:
    """The pretrained networks the chosen metrics need, loaded once (cdiff.perceptual)."""

    def __init__(self, metrics: tuple[str, ...], device=None, lpips_vgg=None, fid_weights=None):
        from cdiff import perceptual

        self.lpips = perceptual.load_lpips(lpips_vgg, device) if "lpips" in metrics else None
        self.inception = perceptual.load_fid_inception(fid_weights, device) if "fid" in metrics else None

    @staticmethod
    def check(metrics: tuple[str, ...], lpips_vgg=None, fid_weights=None) -> None:
        """Fail now, not after hours of translation, when a network's weights are missing."""
        from cdiff import perceptual

        if "lpips" in metrics:
            perceptual.find_weights(perceptual.LPIPS_VGG, lpips_vgg)
        if "fid" in metrics:
            perceptual.find_weights(perceptual.FID_INCEPTION, fid_weights)


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"psnr,ssim"`` -> ("psnr", "ssim"), in the canonical order; unknown names raise."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown metric {unknown[0] if unknown else text!r}; choose from {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def evaluate(
    pairs: list[ImagePair],
    pred_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    options: EvaluationOptions = EvaluationOptions(),
    device=None,
    show_progress: bool = True,
) -> Evaluation:
    """Score every pair (module docstring for the protocol). A pair that cannot be read or
    whose sizes differ raises, naming the file; with ``options.skip_bad`` it is logged, counted in
    ``Evaluation.skipped`` and left out."""
    paper_scaling, skip_bad = options.paper_scaling, options.skip_bad
    result = Evaluation(str(pred_dir), str(target_dir), options.metrics, paper_scaling)
    networks = Networks(result.metrics, device, options.lpips_vgg, options.fid_weights)
    fid_pred, fid_target = [], []
    for pair in progress(pairs, desc="evaluate", enabled=show_progress):
        try:
            pred, target = read_pair(pair)
        except ValueError as err:
            skip_or_raise(err, pair.name, skip_bad, result.skipped)
            continue
        row = {"name": pair.name}
        unit_pred, unit_target = image_metrics.to_unit(pred, paper_scaling), image_metrics.to_unit(target, paper_scaling)
        for name, fn in SCORES.items():
            if name in result.metrics:
                row[name] = float(fn(unit_pred, unit_target)[0])
        if networks.lpips is not None:
            from cdiff.perceptual import lpips_distance

            row["lpips"] = float(lpips_distance(networks.lpips, pred, target, paper_scaling)[0])
        if networks.inception is not None:
            fid_pred.append(image_metrics.to_unit(pred))
            fid_target.append(image_metrics.to_unit(target))
        result.per_image.append(row)
    if not result.per_image:
        raise ValueError(f"no image pair of {pred_dir} and {target_dir} could be evaluated")
    if networks.inception is not None:
        result.fid = _fid(networks.inception, fid_pred, fid_target)
    return result


def _fid(inception, preds: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    if len(preds) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(preds)}; leave fid out of --metrics")
    from cdiff.perceptual import inception_features

    def features(images: list[torch.Tensor]) -> torch.Tensor:
        # One image at a time through the resize: the images may differ in size.
        return torch.cat([inception_features(inception, image) for image in images])  # (N, 2048)

    mean_p, cov_p = image_metrics.feature_statistics(features(preds))
    mean_t, cov_t = image_metrics.feature_statistics(features(targets))
    return image_metrics.frechet_distance(mean_t, cov_t, mean_p, cov_p)


def run_evaluate(pred_dir, target_dir, options: EvaluationOptions = EvaluationOptions(), device=None,
                 names: list[str] | None = None) -> Evaluation:
    """The ``cdiff evaluate`` command: match, score, print the table, write the reports.
    ``names``: only these predictions (``cdiff translate --target``: the ones it wrote)."""
    options.check_networks()
    pairs = match_pairs(pred_dir, target_dir, names=names)
    result = evaluate(pairs, pred_dir, target_dir, options, device)
    print(result.table())
    for path in result.write(options.report_dir or pred_dir):
        print(f"  {path}")
    return result
