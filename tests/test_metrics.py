"""cdiff.metrics against torchmetrics (what the release computes its tables with) and known values."""

import math

import pytest
import torch

from cdiff import metrics

torchmetrics_image = pytest.importorskip("torchmetrics.functional.image")

SHAPES = {"rgb-square": (3, 3, 64, 64), "rgb-odd": (2, 3, 37, 50), "grey-small": (2, 1, 16, 16)}


def pair(shape, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g)
    return (target + noise * torch.randn(shape, generator=g)).clamp(0, 1), target


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("noise", [0.02, 0.3])
def test_metrics_equal_torchmetrics(shape, noise):
    pred, target = pair(shape, noise)
    reference = {
        "psnr": lambda p, t: torchmetrics_image.peak_signal_noise_ratio(p, t, data_range=1.0),
        "ssim": lambda p, t: torchmetrics_image.structural_similarity_index_measure(p, t, data_range=1.0),
        "scc": lambda p, t: torchmetrics_image.spatial_correlation_coefficient(p, t),
    }
    ours = metrics.image_metrics(pred, target)
    for name, fn in reference.items():
        expected = torch.stack([fn(pred[i : i + 1], target[i : i + 1]) for i in range(shape[0])])
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_psnr_of_a_known_error():
    target = torch.zeros(2, 3, 8, 8)
    pred = target + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)  # MSE 1e-2 and 1e-4
    torch.testing.assert_close(metrics.psnr(pred, target), torch.tensor([20.0, 40.0]))


def test_identical_images_score_perfectly():
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert math.isinf(metrics.psnr(image, image)[0].item())
    torch.testing.assert_close(metrics.ssim(image, image), torch.ones(2))
    torch.testing.assert_close(metrics.scc(image, image), torch.ones(2))


def test_scores_are_per_image_not_pooled():
    good, target = pair((1, 3, 32, 32), 0.01)
    bad, _ = pair((1, 3, 32, 32), 0.5)
    batch = metrics.psnr(torch.cat([good, bad]), torch.cat([target, target]))
    torch.testing.assert_close(batch, torch.cat([metrics.psnr(good, target), metrics.psnr(bad, target)]))


def test_to_unit_scalings():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    torch.testing.assert_close(metrics.to_unit(x), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(metrics.to_unit(x, paper_scaling=True), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize(
    "pred, target, word",
    [
        (torch.rand(3, 8, 8), torch.rand(3, 8, 8), "(B, C, H, W)"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9), "target shape"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float"),
    ],
)
def test_bad_input(pred, target, word):
    for fn in (metrics.psnr, metrics.ssim, metrics.scc):
        with pytest.raises(ValueError, match=word.replace("(", r"\(").replace(")", r"\)")):
            fn(pred, target)
