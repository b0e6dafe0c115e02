"""The measures of the few-step study: image scores, the blur check and the confidence AUROC.

Pure functions of tensors; the AUROC and the latent-cell labels are the synthetic study's
(studies.synthetic.measures), so the two studies score confidence maps the same way.
"""

from __future__ import annotations

import torch

from cdiff.metrics import image_metrics, psnr, to_unit
from studies.synthetic.measures import auroc, latent_mask

HF_CUTOFF = 1 / 16  # cycles per pixel: periods under 16 px, two latent cells of the SD VAE


def high_frequency_energy(images: torch.Tensor, cutoff: float = HF_CUTOFF) -> torch.Tensor:
    """(B,) the energy of (B, C, H, W) images at spatial frequencies of radius >= ``cutoff`` cycles/pixel:
    the sum over channels and those frequencies of |FFT2(x - its mean)|^2 (fp64)."""
    x = images.double() - images.double().mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square()  # (B, C, H, W)
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(x.shape[-1], dtype=torch.float64)[None, :]
    high = (fy.square() + fx.square()).sqrt() >= cutoff  # (H, W)
    return (power * high).sum((-3, -2, -1))


def hf_ratio(prediction: torch.Tensor, target: torch.Tensor, cutoff: float = HF_CUTOFF) -> float:
    """The blur check: the high-frequency energy of the predictions over the targets', pooled over images.

    prediction, target: (B, 3, H, W) in [-1, 1]. 1: as much fine detail as the targets; below 1:
    smoother. The synthetic targets hold fine texture no VAE decoder here reproduces, so the ratio
    is read against the teacher's DDIM-50 ratio, not against 1.
    """
    return float(high_frequency_energy(to_unit(prediction), cutoff).sum() / high_frequency_energy(to_unit(target), cutoff).sum())


def confidence_auroc(confidence: torch.Tensor, discrepancy: torch.Tensor) -> float:
    """AUROC of low confidence (the predicted variance, 1 / confidence) against the latent cells that the
    injected discrepancies touch. confidence: (B, 1, h, w); discrepancy: (B, H, W) bool pixel masks."""
    return auroc(confidence[:, 0].double().reciprocal(), latent_mask(discrepancy, discrepancy.shape[-1] // confidence.shape[-1]))


def scores(prediction: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM, SCC against the targets, the blur check, and the mean PSNR against ``reference``
    (the teacher's DDIM-50 images: how close a row comes to the release's setting; capped at 99 dB).
    All images (B, 3, H, W) in [-1, 1]."""
    out = {name: float(v.double().mean()) for name, v in image_metrics(to_unit(prediction), to_unit(target)).items()}
    out["hf_ratio"] = hf_ratio(prediction, target)
    out["psnr_vs_ddim50"] = float(psnr(to_unit(prediction), to_unit(reference)).clamp(max=99.0).double().mean())
    return out
