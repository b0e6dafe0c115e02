"""Image-quality metrics of the paper, in plain PyTorch: PSNR, SSIM and SCC.

Every function takes ``pred`` and ``target`` of shape (B, C, H, W) with values in [0, 1] and
returns one score per image, (B,) float32 (fp64 inputs give fp64). The paper's tables are
means of per-image scores (the release evaluates with batch size 1), so average the (B,)
results over a test set, never pool the squared errors of several images.

The definitions follow the ones the release computes with (torchmetrics' PeakSignalNoiseRatio,
StructuralSimilarityIndexMeasure and SpatialCorrelationCoefficient with their defaults and
``data_range=1.0``); tests/test_metrics.py compares them with torchmetrics on the same images.

Images in [-1, 1] are mapped to [0, 1] by ``to_unit``: ``(x + 1) / 2`` by default, or, with
``paper_scaling=True``, the release's ``(x + 0.5).clamp(0, 1)`` that its published numbers were
computed with (it clips the darkest quarter of the range and shifts the rest).
LPIPS, DISTS and the Inception features of FID and KID need pretrained networks and live in
``cdiff.perceptual`` and ``cdiff.networks`` (optional extra). The set-level formulas on their
features are here, in plain PyTorch: the Fréchet distance that FID reports, KID's unbiased MMD²
over random subsets, and the identity-collapse ratio of ReFlowSET.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5  # Gaussian window of SSIM (Wang et al. 2004), 11 x 11 taps
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_MIN_SIDE = 6  # the 11-tap window is reflect-padded by 5 pixels, which needs 6 (as torchmetrics)
SCC_WINDOW = 8  # local window of the spatial correlation coefficient (Zhou et al. 1998)
# KID as GeoSET's scripts/evaluate.py computes it: 50 random subsets of min(500, n) features
# each side, drawn without replacement by numpy's default_rng(0), the predictions' subset first.
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 50, 500, 0
METRICS = ("psnr", "ssim", "scc")


def to_unit(images: torch.Tensor, paper_scaling: bool = False) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1]: ``(x + 1) / 2``, or the release's ``(x + 0.5).clamp(0, 1)``."""
    if paper_scaling:
        return (images + 0.5).clamp(0, 1)
    return ((images + 1) / 2).clamp(0, 1)


def _check(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if pred.ndim != 4:
        raise ValueError(f"{name}: pred must be (B, C, H, W), got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"{name}: pred and target must be float images in [0, 1], got {pred.dtype}, {target.dtype}")


def _compute_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.promote_types(pred.dtype, torch.float32)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE), per image: (B,)."""
    _check(pred, target, "psnr")
    dtype = _compute_dtype(pred)
    mse = (pred.to(dtype) - target.to(dtype)).square().flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(data_range**2 / mse)  # identical images give +inf, as torchmetrics


def _gaussian_window(sigma: float, channels: int, dtype, device) -> torch.Tensor:
    """(C, 1, k, k) normalised Gaussian, k = 2 * int(3.5 sigma + 0.5) + 1 (11 for sigma 1.5)."""
    size = 2 * int(3.5 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity with an 11 x 11 Gaussian window (sigma 1.5), per image: (B,).

    Local means, variances and covariance come from the window over reflect-padded images;
    the SSIM map (``ssim_map``) is averaged over every pixel and channel.
    """
    return ssim_map(pred, target, data_range).flatten(1).mean(1)


def ssim_map(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """The local SSIM of every pixel and channel, (B, C, H, W), whose mean is ``ssim``.

    For scores over a region (e.g. inside a mask): average the map over that region.
    """
    _check(pred, target, "ssim")
    height, width = pred.shape[-2:]
    if min(height, width) < SSIM_MIN_SIDE:
        raise ValueError(f"ssim: images must be at least {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} (the 11 x 11 window), "
                         f"got {width}x{height}")
    dtype = _compute_dtype(pred)
    pred, target = pred.to(dtype), target.to(dtype)
    batch, channels = pred.shape[:2]
    window = _gaussian_window(SSIM_SIGMA, channels, dtype, pred.device)
    pad = window.shape[-1] // 2
    stack = torch.cat([pred, target, pred * pred, target * target, pred * target])  # (5B, C, H, W)
    stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")
    mu_p, mu_t, pp, tt, pt = F.conv2d(stack, window, groups=channels).split(batch)  # each (B, C, H, W)
    var_p = (pp - mu_p**2).clamp_min(0)
    var_t = (tt - mu_t**2).clamp_min(0)
    cov = pt - mu_p * mu_t
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))


def _laplacian(images: torch.Tensor) -> torch.Tensor:
    """8-neighbour Laplacian high-pass per channel, edges mirrored including the edge pixel."""
    channels = images.shape[1]
    kernel = -torch.ones(3, 3, dtype=images.dtype, device=images.device)
    kernel[1, 1] = 8
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")  # a 1-pixel symmetric mirror repeats the edge
    return F.conv2d(padded, kernel.expand(channels, 1, 3, 3), groups=channels)


def scc(pred: torch.Tensor, target: torch.Tensor, window: int = SCC_WINDOW) -> torch.Tensor:
    """Spatial correlation coefficient, per image: (B,).

    The correlation of the Laplacian-filtered images in a ``window`` x ``window`` box around
    every pixel (zero padding), 0 where either local variance is 0, averaged over pixels and
    channels. It measures agreement of fine detail, and is small (about 0.01) for SAR-to-EO.
    """
    _check(pred, target, "scc")
    height, width = pred.shape[-2:]
    if not 0 < window <= min(height, width):
        raise ValueError(f"scc: window {window} must be in 1..{min(height, width)} for {height}x{width} images")
    dtype = _compute_dtype(pred)
    high_p, high_t = _laplacian(pred.to(dtype)), _laplacian(target.to(dtype))
    channels = pred.shape[1]
    box = torch.full((channels, 1, window, window), 1.0 / window**2, dtype=dtype, device=pred.device)
    before, after = math.ceil((window - 1) / 2), (window - 1) // 2

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (before, after, before, after)), box, groups=channels)

    mean_p, mean_t = local_mean(high_p), local_mean(high_t)
    var_p = (local_mean(high_p * high_p) - mean_p**2).clamp_min(0)
    var_t = (local_mean(high_t * high_t) - mean_t**2).clamp_min(0)
    cov = local_mean(high_p * high_t) - mean_p * mean_t
    denominator = var_p.sqrt() * var_t.sqrt()
    zero = denominator == 0
    scc_map = torch.where(zero, torch.zeros_like(cov), cov / torch.where(zero, torch.ones_like(denominator), denominator))
    return scc_map.flatten(1).mean(1)


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"psnr", "ssim", "scc"}: each (B,) for images in [0, 1] of shape (B, C, H, W)."""
    return {"psnr": psnr(pred, target), "ssim": ssim(pred, target), "scc": scc(pred, target)}


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of ``features`` (N, D), in float64, N >= 2.

    The covariance divides by N - 1, as ``numpy.cov`` in pytorch-fid does.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics: need (N, D) features with N >= 2, got shape {tuple(features.shape)}")
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative
    eigenvalues from rounding are clipped to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mean_a, cov_a) and N(mean_b, cov_b):

        |mean_a - mean_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2)).

    cov_a cov_b has the same eigenvalues as the symmetric PSD matrix S cov_b S with
    S = cov_a^(1/2), so the trace of its square root is the sum of the square roots of
    that matrix's eigenvalues: no non-symmetric matrix square root (and no imaginary
    rounding residue, which pytorch-fid strips with scipy) is needed. Computed in float64.
    """
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mean_a.numel(),) * 2:
        raise ValueError(
            f"frechet_distance: means {tuple(mean_a.shape)}, {tuple(mean_b.shape)} and covariances "
            f"{tuple(cov_a.shape)}, {tuple(cov_b.shape)} do not describe two Gaussians of one dimension"
        )
    mean_a, mean_b, cov_a, cov_b = (t.double() for t in (mean_a, mean_b, cov_a, cov_b))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def fid_from_features(pred: torch.Tensor, reference: torch.Tensor) -> float:
    """FID of prediction features (N, D) against reference features (M, D), N, M >= 2: the
    Fréchet distance of their Gaussian statistics (``feature_statistics``, ``frechet_distance``).

    With fewer samples than dimensions (a few hundred 2048-d Inception features) the covariances
    are low-rank, and the trace term is computed from the samples instead: with centred samples
    A (N, D) and B (M, D) scaled so that cov_a = A^T A and cov_b = B^T B, the non-zero
    eigenvalues of cov_a cov_b are those of (A B^T)(A B^T)^T, so tr((cov_a cov_b)^(1/2)) is the
    sum of the singular values of the N x M matrix A B^T. Same value, no D x D factorisation.
    """
    if pred.ndim != 2 or reference.ndim != 2 or pred.shape[1] != reference.shape[1]:
        raise ValueError(f"fid: need (N, D) and (M, D) features, got {tuple(pred.shape)} and {tuple(reference.shape)}")
    if max(pred.shape[0], reference.shape[0]) >= pred.shape[1]:
        return frechet_distance(*feature_statistics(reference), *feature_statistics(pred))
    mean_p, mean_r = feature_statistics(pred)[0], feature_statistics(reference)[0]
    a = (pred.double() - mean_p) / math.sqrt(pred.shape[0] - 1)  # (N, D), cov_p = a^T a
    b = (reference.double() - mean_r) / math.sqrt(reference.shape[0] - 1)  # (M, D)
    cross = torch.linalg.svdvals(a @ b.T).sum()
    return float((mean_p - mean_r).square().sum() + a.square().sum() + b.square().sum() - 2 * cross)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's kernel (x·y / d + 1)^3 between rows of (N, D) and (M, D): (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimate of MMD² between two samples of equal size m >= 2, (m, D) each,
    under ``polynomial_kernel``: the within-sample kernel means leave out the diagonal."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"mmd2_unbiased: need two samples of one size >= 2, got {x.shape[0]} and {y.shape[0]}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid(pred: torch.Tensor, reference: torch.Tensor, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> float:
    """Kernel Inception Distance: the mean of ``mmd2_unbiased`` over ``subsets`` random subsets
    of m = min(subset_size, N, M) rows of each feature set (N, D) and (M, D), in float64.

    The subsets are drawn as GeoSET's evaluator draws them (numpy ``default_rng(seed)``, without
    replacement, predictions then reference in each round), so the value is the same. When m
    is both set sizes, every subset is the whole set: the MMD² is computed once.
    """
    if pred.ndim != 2 or reference.ndim != 2 or pred.shape[1] != reference.shape[1]:
        raise ValueError(f"kid: need (N, D) and (M, D) features, got {tuple(pred.shape)} and {tuple(reference.shape)}")
    n, n_ref = pred.shape[0], reference.shape[0]
    m = min(subset_size, n, n_ref)
    if m < 2:
        raise ValueError(f"kid: needs at least 2 features on each side, got {n} and {n_ref}")
    pred, reference = pred.double(), reference.double()
    if m == n == n_ref:
        return mmd2_unbiased(pred, reference)  # the MMD² does not depend on the order of the rows
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        pick = torch.from_numpy(rng.choice(n, m, replace=False))
        pick_ref = torch.from_numpy(rng.choice(n_ref, m, replace=False))
        values.append(mmd2_unbiased(pred[pick], reference[pick_ref]))
    return float(np.mean(values))


def mean_absolute_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean |a - b| over pixels and channels, per image: (B,), for (B, C, H, W) in [0, 1]."""
    _check(a, b, "mean_absolute_difference")
    dtype = _compute_dtype(a)
    return (a.to(dtype) - b.to(dtype)).abs().flatten(1).mean(1)


def identity_ratio(to_sar: torch.Tensor, to_target: torch.Tensor) -> float:
    """ReFlowSET's identity-collapse ratio, mean|gen - SAR| / mean|gen - GT|, from the per-image
    means (N,) of ``mean_absolute_difference`` (images of one size, so the mean of the per-image
    means is the mean over every pixel). Below 1 the outputs are closer to their SAR inputs than
    to the ground truth: the model copies its input."""
    return float(to_sar.double().mean() / to_target.double().mean())
