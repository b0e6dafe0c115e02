"""cdiff.metrics against torchmetrics (what the release computes its tables with) and known values."""

import math

import numpy as np
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


# --- the Fréchet distance of FID ------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians():
    # Commuting covariances: tr((A B)^(1/2)) = sum sqrt(a_i b_i), so the distance is
    # |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mean_a, mean_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 1 + 0 + 9 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert metrics.frechet_distance(mean_a, torch.diag(var_a), mean_b, torch.diag(var_b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_non_commuting_2d_gaussians():
    # For 2 x 2 M = A B with non-negative eigenvalues l1, l2: tr(M^(1/2)) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr M + 2 sqrt(det M)). A and B here do not commute.
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    assert not torch.allclose(a @ b, b @ a)
    m = a @ b
    cross = math.sqrt(m.trace().item() + 2 * math.sqrt(torch.det(m).item()))
    mean_a, mean_b = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 2.0])
    expected = 0.25 + 9.0 + a.trace().item() + b.trace().item() - 2 * cross
    assert metrics.frechet_distance(mean_a, a, mean_b, b) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_one_gaussian_is_zero_and_symmetric():
    features = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    mean, cov = metrics.feature_statistics(features)
    assert abs(metrics.frechet_distance(mean, cov, mean, cov)) < 1e-10
    other_mean, other_cov = metrics.feature_statistics(features[:25] * 2 + 1)
    forward = metrics.frechet_distance(mean, cov, other_mean, other_cov)
    assert forward == pytest.approx(metrics.frechet_distance(other_mean, other_cov, mean, cov), rel=1e-10)


def test_feature_statistics_equal_numpy_and_the_distance_equals_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(40, 16, generator=g), torch.randn(30, 16, generator=g) * 1.5 + 0.2
    (mean_r, cov_r), (mean_f, cov_f) = metrics.feature_statistics(real), metrics.feature_statistics(fake)
    np.testing.assert_allclose(cov_r.numpy(), np.cov(real.double().numpy(), rowvar=False), rtol=1e-12, atol=1e-14)
    expected = fid_score.calculate_frechet_distance(mean_r.numpy(), cov_r.numpy(), mean_f.numpy(), cov_f.numpy())
    assert metrics.frechet_distance(mean_r, cov_r, mean_f, cov_f) == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("shapes", [((3,), (3, 3), (4,), (4, 4)), ((3,), (3, 4), (3,), (3, 4))])
def test_frechet_distance_refuses_mismatched_statistics(shapes):
    with pytest.raises(ValueError, match="two Gaussians"):
        metrics.frechet_distance(*(torch.zeros(s) for s in shapes))


def test_feature_statistics_needs_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.feature_statistics(torch.zeros(1, 4))
