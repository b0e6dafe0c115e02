"""The field's protocol (cdiff.protocol): one batched pass over the matched images that feeds
every metric network, then the set-level numbers.

Each batch of predictions and their ground truths (and SAR images) is read once and given, on
the chosen device, to PSNR/SSIM (per image, ``data_range = 1``), LPIPS (VGG, ``x * 2 - 1``),
DISTS, DINO and the FID Inception (predictions and ground truths in one call); the ground truths
of test items without a prediction are read afterwards for the FID/KID reference only. FID and
KID compare the predictions' 2048-d Inception features with every test item's ground truth.

A metric whose network weights (or library) are missing is left out with one line saying what
is missing and how to get it, unless it was asked for by name: then it is an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cdiff import metrics as formulas
from cdiff.data.imageio import read_image, to_unit_range
from cdiff.matching import Matching, centre_crop
from cdiff.progress import progress
from cdiff.protocol import METRICS, check_size

log = logging.getLogger(__name__)

PER_IMAGE_FORMULAS = {"psnr": formulas.psnr, "ssim": formulas.ssim, "scc": formulas.scc}


@dataclass(frozen=True)
class NetworkFiles:
    """Where each metric network's weights are; None: the default lookup (cdiff.perceptual)."""

    lpips_vgg: str | os.PathLike | None = None
    fid_weights: str | os.PathLike | None = None
    dists_weights: str | os.PathLike | None = None
    dino: str | os.PathLike | None = None


@dataclass
class Scores:
    """What one pass measured: per-image rows, the set-level numbers, and the metrics left out."""

    size: tuple[int, int]  # (H, W) of every prediction
    per_image: list[dict] = field(default_factory=list)  # {"name", a float per per-image metric}
    totals: dict[str, float] = field(default_factory=dict)  # fid, kid, identity
    skipped_metrics: dict[str, str] = field(default_factory=dict)  # metric -> the one line why
    skipped_items: list[str] = field(default_factory=list)  # "name: reason" with skip_bad
    identity_parts: tuple[float, float] | None = None  # mean|gen - SAR|, mean|gen - GT|


class Networks:
    """The networks ``metrics`` need, loaded once on ``device``. A network whose files or
    library are missing is recorded in ``skipped`` (metric -> one line), or raises when one of
    its metrics is in ``required`` or its file was given (a wrong path is a mistake to report)."""

    def __init__(self, metrics: tuple[str, ...], files: NetworkFiles, device=None, required: tuple[str, ...] = ()):
        from cdiff import networks, perceptual

        loaders = {
            "lpips": lambda: perceptual.load_lpips(files.lpips_vgg, device),
            "dists": lambda: networks.load_dists(files.dists_weights, files.lpips_vgg, device),
            "inception": lambda: perceptual.load_fid_inception(files.fid_weights, device),
            "dino": lambda: networks.load_dino(files.dino, device),
        }
        given = {"lpips": files.lpips_vgg, "dists": files.dists_weights, "inception": files.fid_weights,
                 "dino": files.dino}
        self.loaded: dict[str, torch.nn.Module] = {}
        self.skipped: dict[str, str] = {}
        for name, load in loaders.items():
            users = [m for m in metrics if METRICS[m].network == name]
            if not users:
                continue
            try:
                self.loaded[name] = load()
            except (FileNotFoundError, ImportError) as err:
                if given[name] is not None or any(m in required for m in users):
                    raise
                for metric in users:
                    self.skipped[metric] = f"{METRICS[metric].label} left out: {err}"

    def get(self, name: str):
        return self.loaded.get(name)


def check_networks(metrics: tuple[str, ...], files: NetworkFiles) -> None:
    """Find (not load) the weight files ``metrics`` need; a missing one raises, naming it and
    how to get it. For commands that work for hours before they score (``translate --target``)."""
    from cdiff import networks, perceptual

    needed = {METRICS[m].network for m in metrics}
    if "lpips" in needed:
        perceptual.find_weights(perceptual.LPIPS_VGG, files.lpips_vgg)
    if "inception" in needed:
        perceptual.find_weights(perceptual.FID_INCEPTION, files.fid_weights)
    if "dists" in needed:
        perceptual.find_weights(perceptual.DISTS_ALPHA_BETA, files.dists_weights)
    if "dino" in needed:
        networks.find_dino(files.dino)


def read_unit(path: Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: 8-bit files as ``file / 255`` (GeoSET's reading), other
    depths with the dataset readers' stretch (cdiff.data.imageio); grey repeated to RGB."""
    array = read_image(path)
    if array.dtype == np.uint8:
        unit = array.astype(np.float32) / 255.0
    else:
        unit = (to_unit_range(array, path) + 1) / 2
    if unit.shape[2] == 1:
        unit = np.repeat(unit, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1)))


def evaluation_size(matching: Matching, size: int | None) -> tuple[int, int]:
    """(H, W) every prediction must have: ``size`` x ``size`` for a benchmark (GeoSET), else the
    first prediction's (ReFlowSET)."""
    if size is not None:
        return size, size
    from cdiff.data.imageio import image_size

    return image_size(matching.items[0].pred)


def score(
    matching: Matching,
    metrics: tuple[str, ...],
    networks: Networks,
    size: tuple[int, int],
    batch_size: int = 16,
    device=None,
    skip_bad: bool = False,
    show_progress: bool = True,
) -> Scores:
    """Score the matched items (module docstring); ``metrics`` minus ``networks.skipped``."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    scores = Scores(size=size, skipped_metrics=dict(networks.skipped))
    wanted = tuple(m for m in metrics if m not in networks.skipped)
    check_size(wanted, *size, matching.items[0].pred)  # every prediction has this size (or is refused)
    inception = networks.get("inception") if ("fid" in wanted or "kid" in wanted) else None
    pred_features, target_features = [], {}
    to_sar, to_target = [], []
    items = matching.items
    bar = progress(range(0, len(items), batch_size), desc="evaluate", enabled=show_progress)
    for start in bar:
        batch, preds, targets, sars = _read_batch(items[start:start + batch_size], size, skip_bad, scores)
        if not batch:
            continue
        x, y = torch.stack(preds).to(device), torch.stack(targets).to(device)  # (B, 3, H, W) in [0, 1]
        rows = [{"name": item.name} for item in batch]
        columns = _per_image(wanted, networks, x, y)
        for metric, values in columns.items():
            for row, value in zip(rows, values.tolist()):
                row[metric] = float(value)
        if inception is not None:
            from cdiff.perceptual import inception_features

            both = inception_features(inception, torch.cat([x, y]))  # (2B, 2048) float64
            pred_features.append(both[: len(batch)])
            target_features.update({item.target: f for item, f in zip(batch, both[len(batch):])})
        if "identity" in wanted:
            s = torch.stack(sars).to(device)
            to_sar.append(formulas.mean_absolute_difference(x, s).cpu())
            to_target.append(formulas.mean_absolute_difference(x, y).cpu())
        scores.per_image.extend(rows)
    if not scores.per_image:
        raise ValueError("no prediction could be scored")
    if inception is not None:
        reference = _reference_features(matching.reference, target_features, inception, size, batch_size, device,
                                        skip_bad, scores)
        _set_level(scores, wanted, torch.cat(pred_features), reference)
    if "identity" in wanted:
        gen_sar, gen_gt = torch.cat(to_sar), torch.cat(to_target)
        scores.identity_parts = (float(gen_sar.mean()), float(gen_gt.mean()))
        scores.totals["identity"] = formulas.identity_ratio(gen_sar, gen_gt)
    return scores


def _read_batch(items, size, skip_bad: bool, scores: Scores):
    """The batch's images, predictions checked against ``size``, the others centre-cropped."""
    kept, preds, targets, sars = [], [], [], []
    for item in items:
        try:
            pred = read_unit(item.pred)
            if tuple(pred.shape[-2:]) != tuple(size):
                raise ValueError(f"prediction {item.pred} is {pred.shape[-1]}x{pred.shape[-2]}; every prediction "
                                 f"must be {size[1]}x{size[0]} (the evaluation size)")
            target = centre_crop(read_unit(item.target), *size, item.target)
            sar = centre_crop(read_unit(item.sar), *size, item.sar) if item.sar is not None else None
        except ValueError as err:
            if not skip_bad:
                raise
            log.warning("skipped %s: %s", item.name, err)
            scores.skipped_items.append(f"{item.name}: {err}")
            continue
        kept.append(item)
        preds.append(pred)
        targets.append(target)
        sars.append(sar)
    return kept, preds, targets, sars


@torch.no_grad()
def _per_image(wanted, networks: Networks, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each per-image metric of the batch, (B,) on the CPU, for x, y (B, 3, H, W) in [0, 1]."""
    out = {m: fn(x, y).cpu() for m, fn in PER_IMAGE_FORMULAS.items() if m in wanted}
    if "lpips" in wanted:
        out["lpips"] = networks.get("lpips")(x * 2 - 1, y * 2 - 1).flatten().float().cpu()
    if "dists" in wanted:
        out["dists"] = networks.get("dists")(x, y).float().cpu()
    if "dino" in wanted:
        from cdiff.networks import dino_similarity

        out["dino"] = dino_similarity(networks.get("dino"), x, y).float().cpu()
    return out


def _reference_features(reference: list[Path], known: dict, inception, size, batch_size: int, device,
                        skip_bad: bool, scores: Scores) -> torch.Tensor:
    """Inception features (M, 2048) of every reference image, centre-cropped to ``size``; the
    ones the pass already computed are reused."""
    from cdiff.perceptual import inception_features

    todo = [p for p in reference if p not in known]
    for start in range(0, len(todo), batch_size):
        paths, images = [], []
        for path in todo[start:start + batch_size]:
            try:
                images.append(centre_crop(read_unit(path), *size, path))
                paths.append(path)
            except ValueError as err:
                if not skip_bad:
                    raise
                log.warning("left out of the FID/KID reference: %s", err)
                scores.skipped_items.append(f"reference {path.name}: {err}")
        if paths:
            known.update(zip(paths, inception_features(inception, torch.stack(images).to(device))))
    return torch.stack([known[p] for p in reference if p in known])


def _set_level(scores: Scores, wanted, pred: torch.Tensor, reference: torch.Tensor) -> None:
    """FID and KID, or a line saying why not (they need two images on each side)."""
    if min(pred.shape[0], reference.shape[0]) < 2:
        for metric in ("fid", "kid"):
            if metric in wanted:
                scores.skipped_metrics[metric] = (f"{METRICS[metric].label} left out: it needs at least 2 "
                                                  f"predictions and 2 reference images, got {pred.shape[0]} and "
                                                  f"{reference.shape[0]}")
        return
    if "fid" in wanted:
        scores.totals["fid"] = formulas.fid_from_features(pred, reference)
    if "kid" in wanted:
        scores.totals["kid"] = formulas.kid(pred, reference)
