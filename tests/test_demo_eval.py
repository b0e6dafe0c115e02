"""The measures behind benchmarks/synthetic_report.md, on cases whose answer is known by hand."""

import pytest
import torch

from tools.synthetic_eval import auroc, latent_mask


def pairwise_auroc(scores, labels) -> float:
    """The definition: P(positive > negative) + P(tie) / 2 over every positive-negative pair."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def test_auroc_known_values():
    labels = torch.tensor([0, 0, 1, 1]).bool()
    assert auroc(torch.tensor([1.0, 2.0, 3.0, 4.0]), labels) == 1.0
    assert auroc(torch.tensor([4.0, 3.0, 2.0, 1.0]), labels) == 0.0
    assert auroc(torch.tensor([1.0, 1.0, 1.0, 1.0]), labels) == 0.5  # all tied
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels) == 0.75  # 3 of the 4 pairs ordered


@pytest.mark.parametrize("levels", [1000, 5], ids=["few ties", "many ties"])
def test_auroc_equals_the_pairwise_definition(levels):
    gen = torch.Generator().manual_seed(levels)
    labels = torch.rand(600, generator=gen) < 0.2
    scores = torch.randint(0, levels, (600,), generator=gen).double() + labels.double() * 0.7
    assert auroc(scores.view(20, 30), labels.view(20, 30)) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc(torch.rand(5), torch.zeros(5, dtype=torch.bool))


def test_latent_mask_marks_every_touched_cell():
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 7, 7] = True  # one pixel in cell (0, 0)
    mask[0, 9:11, 3:12] = True  # a strip over cells (1, 0) and (1, 1)
    expected = torch.tensor([[[True, False], [True, True]]])
    assert torch.equal(latent_mask(mask), expected)
