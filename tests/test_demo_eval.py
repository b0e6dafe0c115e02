"""The measures behind studies/synthetic/synthetic_report.md, on cases whose answer is known by hand."""

import math

import numpy as np
import pytest
import torch

from cdiff.metrics import ssim, ssim_map
from cdiff.testing import tiny_pipeline
from studies.synthetic.hallucination import OBJECT_COLOURS, hallucination_scores
from studies.synthetic.measures import (
    across_runs, auroc, best_constant_variance, bootstrap_auroc, gaussian_nll, hallucinated_objects, label_objects,
    latent_mask, level_auroc, masked_scores, one_step, permutation_p, reliability_bins, spurious_object_pixels,
    spurious_objects,
)


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


# -- masked scores, objects and hallucinations ---------------------------------------------------


def test_masked_scores_psnr_and_ssim_over_the_mask_only():
    target = torch.full((2, 3, 32, 32), 0.5, dtype=torch.float64)
    pred = target.clone()
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[0, 4:12, 4:12] = True
    pred[0, :, 4:12, 4:12] += 0.1  # error 0.1 inside the mask: MSE 0.01, 20 dB
    pred[0, :, 20:, 20:] += 0.3  # outside the mask: must not count
    scores = masked_scores(pred, target, mask)
    assert scores["psnr"][0].item() == pytest.approx(20.0, abs=1e-9)
    assert torch.isnan(scores["psnr"][1]) and torch.isnan(scores["ssim"][1])  # empty mask
    outside = masked_scores(pred, target, ~mask)
    assert outside["ssim"][1].item() == pytest.approx(1.0, abs=1e-12)  # identical images: SSIM 1 everywhere
    assert outside["psnr"][0].item() == pytest.approx(10 * math.log10(1 / (0.09 * 144 / (1024 - 64))), abs=1e-9)


def test_ssim_map_averages_to_ssim():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 3, 24, 24, generator=gen), torch.rand(2, 3, 24, 24, generator=gen)
    torch.testing.assert_close(ssim_map(pred, target).flatten(1).mean(1), ssim(pred, target), rtol=0, atol=0)


def test_label_objects_is_four_connected():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:2, 0:3] = True  # object 1
    mask[2, 3] = True  # touches object 1 only at a corner: a second object
    mask[5:8, 6] = True  # object 3
    objects = label_objects(mask)
    assert [int(o.sum()) for o in objects] == [6, 1, 3]
    assert objects[1][2, 3] and not objects[0][2, 3]
    assert np.array_equal(sum(o.astype(int) for o in objects), mask.astype(int))


def test_hallucinated_objects_by_hand():
    clean = np.zeros((16, 16, 3), dtype=np.float32)
    target = clean.copy()
    target[2:4, 2:6] = [0.9, 0.1, 0.1]  # a red vehicle, EO only
    target[10:14, 10:12] = [0.9, 0.9, 0.9]  # a white ship, EO only
    eo_only = np.any(target != clean, axis=-1)
    pred = clean.copy()
    pred[2:4, 2:6] = [0.6, 0.1, 0.1]  # closer to the vehicle (0.09) than to the clean ground (0.36): painted
    pred[10:14, 10:12] = [0.3, 0.3, 0.3]  # closer to the ground: not painted
    assert hallucinated_objects(pred, target, clean, eo_only) == [True, False]
    assert hallucinated_objects(target, target, clean, eo_only) == [True, True]
    assert hallucinated_objects(clean, target, clean, eo_only) == [False, False]


# -- calibration -----------------------------------------------------------------------------------


def test_reliability_bins_by_hand():
    variance = torch.tensor([5.0, 1, 9, 3, 7, 2, 10, 4, 8, 6])
    bins = reliability_bins(variance, 2 * variance, bins=2)
    assert bins == [{"count": 5, "variance": 3.0, "squared_error": 6.0}, {"count": 5, "variance": 8.0, "squared_error": 16.0}]
    uneven = reliability_bins(torch.arange(11.0), torch.zeros(11), bins=3)  # 11 cells: 4, 4, 3
    assert [b["count"] for b in uneven] == [4, 4, 3]
    assert [b["variance"] for b in uneven] == [1.5, 5.5, 9.0]
    with pytest.raises(ValueError, match="bins must be"):
        reliability_bins(variance, variance, bins=11)


def test_gaussian_nll_and_the_best_constant_by_hand():
    log_2pi = math.log(2 * math.pi)
    assert gaussian_nll(torch.tensor([1.0]), 1.0) == pytest.approx(0.5 * (1 + log_2pi), abs=1e-12)
    assert gaussian_nll(torch.tensor([4.0]), torch.tensor([2.0])) == pytest.approx(0.5 * (2 + math.log(2) + log_2pi), abs=1e-12)
    errors = torch.tensor([1.0, 3.0])
    best = best_constant_variance(errors)
    assert best == 2.0
    assert gaussian_nll(errors, best) == pytest.approx(0.5 * (1 + math.log(2) + log_2pi), abs=1e-12)
    for other in (1.8, 2.2):  # and it is the minimum
        assert gaussian_nll(errors, other) > gaussian_nll(errors, best)


def test_bootstrap_auroc_of_a_perfect_score_is_one():
    labels = torch.zeros(6, 4, dtype=torch.bool)
    labels[:, 0] = True
    assert bootstrap_auroc(labels.double(), labels, resamples=20) == (1.0, 1.0)


def test_one_step_reads_the_variance_of_one_call():
    pipeline = tiny_pipeline(0)
    with torch.no_grad():  # the surgery's start: raw variance 0, variance exactly 1
        pipeline.unet.conv_out.weight[4:].zero_()
        pipeline.unet.conv_out.bias[4:].zero_()
    sar, eo = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    out = one_step(pipeline, sar, eo, t=500, seed=3)
    assert out["prediction"].shape == out["target"].shape == (2, 4, 8, 8)
    torch.testing.assert_close(out["target"], torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(out["variance"], torch.ones(2, 1, 8, 8), rtol=0, atol=1e-6)


def test_one_step_of_an_x0_model_compares_with_the_clean_latent():
    pipeline = tiny_pipeline(0)
    unet = pipeline.unet
    pipeline.prediction_type = "sample"
    sar, eo = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    out = one_step(pipeline, sar, eo, t=300, seed=1)
    with torch.no_grad():
        clean = pipeline.vae.encode_latent(eo)
        torch.testing.assert_close(out["target"], clean)
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([300])
        raw = unet(torch.cat([pipeline.vae.encode_latent(sar), pipeline.process.add_noise(clean, noise, t)], 1), t,
                   pipeline.context[None])
    torch.testing.assert_close(out["prediction"], raw[:, :4])  # the x0 estimate itself, not the noise derived from it


def test_spurious_object_pixels_by_hand():
    clean = np.full((4, 4, 3), 0.32, dtype=np.float32)  # a road
    colours = np.array([[0.75, 0.10, 0.10], [0.92, 0.92, 0.92]], dtype=np.float32)
    pred = clean.copy()
    pred[0, 0] = [0.7, 0.15, 0.1]  # a red vehicle's colour
    pred[0, 1] = [0.8, 0.8, 0.8]  # nearer white (0.05) than the road (0.69)
    pred[0, 2] = [0.45, 0.45, 0.45]  # a lighter road: nearer the road
    pred[0, 3] = [0.70, 0.70, 0.70]  # nearer white (0.15) than the road (0.43), but too far from white to be one
    allowed = np.ones((4, 4), dtype=bool)
    assert spurious_object_pixels(pred, clean, allowed, colours) == (2, 16)
    allowed[0, 0] = False  # a true object stands there: not looked at
    assert spurious_object_pixels(pred, clean, allowed, colours) == (1, 15)


def test_spurious_objects_count_groups_of_the_smallest_object_size():
    clean = np.full((16, 16, 3), 0.32, dtype=np.float32)  # a road
    pred = clean.copy()
    pred[1:3, 1:5] = [0.92, 0.92, 0.92]  # a white 2 x 4 vehicle where none is: 8 px, one object
    pred[8:10, 8:10] = [0.75, 0.10, 0.10]  # 4 red pixels: fewer than the smallest object
    pred[12:15, 2:5] = [0.90, 0.80, 0.10]  # a yellow 3 x 3: one object
    allowed = np.ones((16, 16), dtype=bool)
    assert spurious_objects(pred, clean, allowed, OBJECT_COLOURS) == 2
    assert spurious_objects(pred, clean, allowed, OBJECT_COLOURS, min_pixels=4) == 3
    allowed[12:15, 2:5] = False  # a true object stands there
    assert spurious_objects(pred, clean, allowed, OBJECT_COLOURS) == 1


def test_hallucination_scores_count_objects_by_hand():
    """Two scenes: three EO-only objects, the prediction paints one of them and one object where none is."""
    clean = np.full((2, 32, 32, 3), 0.3, dtype=np.float32) * 2 - 1  # (B, H, W, 3) in [-1, 1]: grey ground
    target = clean.copy()
    target[0, 2:4, 2:6] = np.array([0.75, 0.10, 0.10]) * 2 - 1  # a red vehicle, EO only
    target[0, 20:24, 20:22] = np.array([0.92, 0.92, 0.92]) * 2 - 1  # a white vehicle, EO only
    target[1, 10:13, 5:9] = np.array([0.10, 0.20, 0.60]) * 2 - 1  # a blue one, EO only
    eo_only = torch.from_numpy(np.any(target != clean, axis=-1))
    prediction = clean.copy()
    prediction[0, 2:4, 2:6] = target[0, 2:4, 2:6]  # painted: the red vehicle
    prediction[1, 25:28, 25:28] = np.array([0.92, 0.92, 0.92]) * 2 - 1  # a white 3 x 3 on open road: spurious
    object_free = torch.zeros(2, 32, 32, dtype=torch.bool)
    object_free[:, 16:, 16:] = True  # road away from the objects (the white EO-only vehicle's place excluded below)
    object_free[0, 18:26, 18:24] = False
    data = {"eo": torch.from_numpy(target).permute(0, 3, 1, 2), "clean": clean, "eo_only": eo_only,
            "discrepancy": eo_only, "object_free": object_free}
    scores = hallucination_scores(torch.from_numpy(prediction).permute(0, 3, 1, 2), data)
    assert (scores["hallucinated"], scores["eo_only_objects"], scores["spurious_objects"]) == (1, 3, 1)
    assert scores["spurious_pixels"] == pytest.approx(1000 * 9 / int(object_free.sum()))
    perfect = hallucination_scores(data["eo"], data)
    assert (perfect["hallucinated"], perfect["spurious_objects"]) == (3, 0)


# -- across training runs, and 8-bit maps --------------------------------------------------------


def test_across_runs_and_the_permutation_p_value_by_hand():
    assert across_runs([17.0, 17.5, 18.0]) == {"mean": 17.5, "std": 0.5, "n": 3, "values": [17.0, 17.5, 18.0]}
    assert across_runs([16.0])["std"] is None and across_runs([])["mean"] is None
    assert permutation_p([3, 4, 5], [0, 1, 2]) == pytest.approx(0.1)  # disjoint: 2 of the 20 splits as extreme
    # Overlapping: a split of {0, 1, 2, 3, 4, 6} whose first three sum to S differs by |2 S - 16| / 3; the observed
    # S = 10 gives 4 / 3, reached by the 12 of the 20 splits with S <= 6 or S >= 10 (counted by hand).
    assert permutation_p([1, 3, 6], [0, 2, 4]) == pytest.approx(0.6)
    assert permutation_p([1, 2], []) is None


def test_level_auroc_equals_auroc_and_its_bootstrap():
    gen = np.random.default_rng(0)
    labels = gen.random((7, 12, 12)) < 0.1
    levels = np.clip(gen.integers(0, 200, (7, 12, 12)) + 40 * labels, 0, 255).astype(np.uint8)  # many ties
    result = level_auroc(levels, labels, resamples=30, seed=3)
    scores, truth = torch.from_numpy(levels.astype(np.int64)), torch.from_numpy(labels)
    assert result["auroc"] == pytest.approx(auroc(scores, truth), abs=1e-12)
    assert result["interval"] == pytest.approx(bootstrap_auroc(scores, truth, resamples=30, seed=3), abs=1e-12)
    assert (result["positives"], result["cells"]) == (int(labels.sum()), labels.size)
