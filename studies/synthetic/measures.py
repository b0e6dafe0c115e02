"""Measures of the paper's claims on synthetic pairs, where the truth is known.

Used by studies/synthetic/report.py; each function states its protocol. The measures are pure
functions of tensors (tested by hand in tests/test_demo_eval.py); ``one_step`` is the one that
runs a model.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from cdiff.loss import LOG_2PI, variance_from_raw
from cdiff.metrics import ssim_map


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive) for boolean ``labels``, exactly.

    The Mann-Whitney statistic: the probability that a random positive scores above a random
    negative, ties counting one half (average ranks). Any shapes; both flattened.
    """
    scores, labels = scores.detach().double().flatten(), labels.bool().flatten()
    if scores.numel() != labels.numel():
        raise ValueError(f"auroc: {scores.numel()} scores for {labels.numel()} labels")
    positives = int(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        raise ValueError("auroc: needs at least one positive and one negative label")
    order = torch.argsort(scores)
    _, group, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()  # 1-based rank of each tie group's last member
    average = last - (counts.double() - 1) / 2  # the group's average rank
    ranks = torch.empty_like(scores)
    ranks[order] = average[group]
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def bootstrap_auroc(scores: torch.Tensor, labels: torch.Tensor, resamples: int = 200, seed: int = 0) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of ``auroc`` over scenes resampled with replacement.

    scores, labels: (N, ...) with one scene per row; scenes, not cells, are the independent
    draws. Resamples without a positive or a negative cell are skipped.
    """
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        index = torch.randint(0, len(scores), (len(scores),), generator=generator)
        picked = labels[index]
        if picked.any() and not picked.all():
            values.append(auroc(scores[index], picked))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def latent_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """A pixel mask (B, H, W) on the latent grid (B, H/f, W/f): a cell is True when any of its f x f pixels is.

    The confidence map has one value per latent cell; a cell that an object touches is one
    where the two images disagree.
    """
    return F.max_pool2d(mask.float()[:, None], factor)[:, 0] > 0


def masked_scores(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """PSNR (dB) and SSIM of each image over the pixels of ``mask`` only: {"psnr", "ssim"}, each (B,).

    pred, target: (B, C, H, W) in [0, 1]; mask: (B, H, W) bool. PSNR from the mean squared
    error over the masked pixels (all channels); SSIM as the mean of cdiff.metrics.ssim_map over
    them (each local SSIM still sees its 11 x 11 window around the pixel). NaN for an image
    whose mask is empty: average with nanmean.
    """
    weight = mask[:, None].expand_as(pred).double()  # (B, C, H, W)
    pixels = weight.flatten(1).sum(1)  # (B,); 0 gives NaN below
    local = ssim_map(pred.double(), target.double())
    return {"psnr": masked_psnr(pred, target, mask), "ssim": (local * weight).flatten(1).sum(1) / pixels}


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_scores``' PSNR alone (B,): from the mean squared error over the masked pixels, NaN for an empty mask."""
    if mask.shape != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(f"masked_scores: mask must be (B, H, W) = {(pred.shape[0], *pred.shape[2:])}, got {tuple(mask.shape)}")
    weight = mask[:, None].expand_as(pred).double()  # (B, C, H, W)
    mse = ((pred.double() - target.double()).square() * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)
    return 10 * torch.log10(1 / mse)


def label_objects(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a bool (H, W) mask, each a bool (H, W) mask, in raster order.

    Objects of cdiff.data.synth never overlap but may touch; two touching objects count as one.
    """
    labels = np.zeros(mask.shape, dtype=np.int32)
    objects = []
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        objects.append(len(objects) + 1)
        labels[start], stack = objects[-1], [start]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = objects[-1]
                    stack.append((ny, nx))
    return [labels == k for k in objects]


def hallucinated_objects(pred: np.ndarray, target: np.ndarray, clean: np.ndarray, eo_only: np.ndarray) -> list[bool]:
    """For each object that exists only in the EO target: did the prediction paint it?

    pred, target, clean: (H, W, 3) images; ``clean`` is the target's scene without the injected
    objects (cdiff.data.synth: ``make_pair(seed, discrepancies=0)``, equal to the target outside
    ``eo_only``). eo_only: bool (H, W). An object (a 4-connected component of ``eo_only``)
    counts as hallucinated when, over its footprint, the prediction's mean squared RGB distance
    to the target (object painted) is below its distance to the clean scene (object absent).
    The SAR holds no trace of these objects, so the object can only come from the model's
    prior. Returns one bool per object.
    """
    verdicts = []
    for footprint in label_objects(eo_only):
        to_object = np.square(pred[footprint] - target[footprint]).sum(-1).mean()
        to_clean = np.square(pred[footprint] - clean[footprint]).sum(-1).mean()
        verdicts.append(bool(to_object < to_clean))
    return verdicts


def spurious_mask(pred: np.ndarray, clean: np.ndarray, allowed: np.ndarray, colours: np.ndarray,
                  tolerance: float = 0.06) -> np.ndarray:
    """Where objects are painted but none stands: bool (H, W).

    pred, clean: (H, W, 3) in [0, 1]; ``clean`` is the scene without injected objects. allowed:
    bool (H, W), where objects could stand but none does (roads and water away from the true
    objects). colours: (K, 3) the object colours in [0, 1]. A pixel counts when the prediction is
    within ``tolerance`` (squared RGB distance; 0.06 admits the generator's tone of 0.85-1.15
    on its objects) of some object colour, and closer to it than to the object-free scene there.
    """
    to_clean = np.square(pred - clean).sum(-1)  # (H, W)
    to_object = np.square(pred[..., None, :] - colours).sum(-1).min(-1)  # (H, W): the nearest object colour
    return allowed & (to_object < to_clean) & (to_object < tolerance)


def spurious_object_pixels(pred: np.ndarray, clean: np.ndarray, allowed: np.ndarray, colours: np.ndarray,
                           tolerance: float = 0.06) -> tuple[int, int]:
    """Objects painted where there are none: (pixels that look like an object (``spurious_mask``),
    pixels looked at)."""
    return int(spurious_mask(pred, clean, allowed, colours, tolerance).sum()), int(allowed.sum())


SMALLEST_OBJECT = 8  # px: cdiff.data.synth's smallest object, a 4 x 2 vehicle


def spurious_objects(pred: np.ndarray, clean: np.ndarray, allowed: np.ndarray, colours: np.ndarray,
                     min_pixels: int = SMALLEST_OBJECT, tolerance: float = 0.06) -> int:
    """Objects painted where there are none, counted as objects: the 4-connected components of
    ``spurious_mask`` with at least ``min_pixels`` pixels (the generator's smallest object), so
    that a few stray pixels of an object's colour do not count as one."""
    mask = spurious_mask(pred, clean, allowed, colours, tolerance)
    return sum(int(component.sum()) >= min_pixels for component in label_objects(mask))


# -- scores over several training runs --------------------------------------------------------------


def across_runs(values) -> dict:
    """Mean and sample standard deviation over training runs (one value per run): the spread a
    new run of the recipe would show, not the spread over scenes. std is None for one run."""
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None, "n": len(values), "values": values}


def permutation_p(a, b) -> float | None:
    """Exact two-sided permutation p-value of the difference of the means of runs ``a`` and ``b``:
    the share of all ways to split the pooled runs into groups of their sizes whose difference is
    at least as large (in absolute value) as the observed one. None when either group is empty.
    With 3 runs per group the smallest possible is 2 / 20 = 0.1 (the groups do not overlap)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if not a or not b:
        return None
    pooled, observed = a + b, abs(np.mean(a) - np.mean(b))
    splits = [abs(np.mean([pooled[i] for i in chosen]) - np.mean([pooled[i] for i in range(len(pooled)) if i not in chosen]))
              for chosen in itertools.combinations(range(len(pooled)), len(a))]
    return float(np.mean([d >= observed - 1e-12 for d in splits]))


# -- AUROC of 8-bit maps ------------------------------------------------------------------------------


def level_histograms(levels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives): per scene, how many cells of each level 0..255 are labelled
    positive and negative, two (N, 256) int64 arrays. levels: (N, ...) uint8; labels: (N, ...) bool."""
    if levels.dtype != np.uint8 or levels.shape != labels.shape:
        raise ValueError(f"level_histograms: uint8 levels and bool labels of one shape, got {levels.dtype} "
                         f"{levels.shape} and {labels.shape}")
    flat, positive = levels.reshape(len(levels), -1), labels.reshape(len(labels), -1).astype(bool)
    pos = np.stack([np.bincount(f[p], minlength=256) for f, p in zip(flat, positive)]).astype(np.int64)
    neg = np.stack([np.bincount(f[~p], minlength=256) for f, p in zip(flat, positive)]).astype(np.int64)
    return pos, neg


def histogram_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """``auroc`` from the level histograms of the positives and negatives ((256,) counts each):
    each positive against the negatives below its level, ties counting one half."""
    below = np.cumsum(neg) - neg  # negatives strictly below each level
    pairs = float(pos.sum()) * float(neg.sum())
    if pairs == 0:
        raise ValueError("auroc: needs at least one positive and one negative label")
    return float((pos.astype(np.float64) * (below + 0.5 * neg)).sum() / pairs)


def level_auroc(levels: np.ndarray, labels: np.ndarray, resamples: int = 200, seed: int = 0) -> dict:
    """``auroc`` and ``bootstrap_auroc``'s interval (the same resampled scenes, drawn the same
    way) of 8-bit scores: levels (N, ...) uint8, higher = more positive; labels (N, ...) bool. Counts
    per level instead of sorting, so a million pixels and their bootstrap take milliseconds."""
    pos, neg = level_histograms(levels, labels)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        index = torch.randint(0, len(levels), (len(levels),), generator=generator).numpy()
        p, n = pos[index].sum(0), neg[index].sum(0)
        if p.sum() and n.sum():
            values.append(histogram_auroc(p, n))
    low, high = np.percentile(values, [2.5, 97.5])
    return {"auroc": histogram_auroc(pos.sum(0), neg.sum(0)), "interval": (float(low), float(high)),
            "positives": int(pos.sum()), "cells": int(pos.sum() + neg.sum())}


def reliability_bins(variance: torch.Tensor, squared_error: torch.Tensor, bins: int = 10) -> list[dict[str, float]]:
    """The reliability diagram's points: cells sorted by predicted variance, cut into ``bins``
    groups of equal count (the first ``N mod bins`` one larger), per group the count, the mean
    predicted variance and the mean squared error. Calibrated: the two means agree.

    variance, squared_error: any shape, same number of elements, one per cell.
    """
    variance, squared_error = variance.detach().double().flatten(), squared_error.detach().double().flatten()
    if variance.numel() != squared_error.numel():
        raise ValueError(f"reliability_bins: {variance.numel()} variances for {squared_error.numel()} squared errors")
    if not 1 <= bins <= variance.numel():
        raise ValueError(f"reliability_bins: bins must be in 1..{variance.numel()}, got {bins}")
    order = torch.argsort(variance, stable=True)
    return [
        {"count": len(group), "variance": float(variance[group].mean()), "squared_error": float(squared_error[group].mean())}
        for group in torch.tensor_split(order, bins)
    ]


def gaussian_nll(squared_error: torch.Tensor, variance: torch.Tensor | float) -> float:
    """Mean Gaussian negative log-likelihood in nats: 0.5 * (e^2 / var + log var + log 2 pi).

    The plain NLL (beta = 0), not the beta-weighted training loss; ``variance`` broadcasts.
    """
    variance = torch.as_tensor(variance, dtype=torch.float64)
    squared_error = squared_error.double()
    return float((0.5 * (squared_error / variance + variance.log() + LOG_2PI)).mean())


def best_constant_variance(squared_error: torch.Tensor) -> float:
    """The constant variance with the lowest Gaussian NLL on these errors: their mean (the MLE).

    Its NLL is 0.5 * (1 + log(mean e^2) + log 2 pi).
    """
    return float(squared_error.double().mean())


@torch.no_grad()
def one_step(pipeline, sar: torch.Tensor, eo: torch.Tensor, t: int, seed: int) -> dict[str, torch.Tensor]:
    """The paper's Figure 7 protocol: the ground-truth EO latent noised to timestep ``t``, one U-Net call.

    sar, eo: (B, 3, H, W) in [-1, 1]. Latents are the VAE's scaled posterior means; the noise
    is N(0, I) from ``seed``. Returns "target" and "prediction" (B, 4, h, w), the quantity whose
    error the variance describes, as ``pipeline.prediction_type`` says: the noise, the clean EO
    latent ("sample") or v; and "variance" (B, 1, h, w), the predicted variance (its inverse is the
    confidence map).
    """
    sar_latent, eo_latent = pipeline.vae.encode_latent(sar), pipeline.vae.encode_latent(eo)
    noise = torch.randn(eo_latent.shape, generator=torch.Generator().manual_seed(seed))
    timestep = torch.full((len(sar),), t, dtype=torch.long)
    noisy = pipeline.process.add_noise(eo_latent, noise, timestep)
    context = pipeline.context.expand(len(sar), -1, -1)  # (B, L, context_dim)
    out = pipeline.unet(torch.cat([sar_latent, noisy], dim=1), timestep, context)  # (B, 5, h, w)
    channels = eo_latent.shape[1]
    velocity = pipeline.process.velocity(eo_latent, noise, timestep)
    targets = {"epsilon": noise, "sample": eo_latent, "v_prediction": velocity}
    return {"target": targets[pipeline.prediction_type], "prediction": out[:, :channels].float(),
            "variance": variance_from_raw(out[:, channels:])}
