"""Validation, the same for every model: mean PSNR, SSIM and SCC on held-out pairs, and the
columns of the validation grid (cdiff.train.logs.write_grid)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from cdiff.metrics import image_metrics, to_unit


def stretch(images: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> per image min-max to [-1, 1], for display (as the release shows its
    confidence maps)."""
    flat = images.float().flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (images.float() - low) / (high - low).clamp_min(1e-12) * 2 - 1


@torch.no_grad()
def score_pairs(pairs: Dataset, predict: Callable, batch_size: int, grid_images: int,
                device: torch.device) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Mean PSNR, SSIM, SCC of ``predict`` over ``pairs``, and the grid columns of the first
    ``grid_images``: SAR | prediction | target [| the model's extra map, stretched per image].

    ``predict(index, sar)``: batch ``index``'s SAR (B, 3, H, W) in [-1, 1] on ``device`` ->
    (prediction (B, 3, H, W) in [-1, 1], extra map (B, C, h, w) or None).
    """
    scores, columns = {}, []
    # A generator of its own: a DataLoader without one draws its base seed from torch's global RNG,
    # whose state the checkpoints record (a run resumed in a new process would then differ).
    batches = DataLoader(pairs, batch_size=batch_size, generator=torch.Generator().manual_seed(0))
    for index, batch in enumerate(batches):
        sar, eo = batch["sar"].to(device), batch["eo"].to(device)
        prediction, extra = predict(index, sar)
        prediction = prediction.float()
        for name, values in image_metrics(to_unit(prediction), to_unit(eo)).items():
            scores.setdefault(name, []).append(values.cpu())
        shown = sum(len(c) for c in columns[0]) if columns else 0
        if shown < grid_images:
            images = [sar, prediction, eo] + ([stretch(extra)] if extra is not None else [])
            columns = columns or [[] for _ in images]
            for column, image in zip(columns, images):
                column.append(image[: grid_images - shown].cpu())
    metrics = {name: float(torch.cat(v).double().mean()) for name, v in scores.items()}
    return metrics, [torch.cat(c) for c in columns]
