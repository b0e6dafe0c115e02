"""Measures of the paper's claims on synthetic pairs, where the truth is known.

Used by tools/synthetic_report.py and tools/train_demo.py; each function states its protocol.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def latent_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """A pixel mask (B, H, W) on the latent grid (B, H/f, W/f): a cell is True when any of its f x f pixels is.

    The confidence map has one value per latent cell; a cell that an object touches is one
    where the two images disagree.
    """
    return F.max_pool2d(mask.float()[:, None], factor)[:, 0] > 0
