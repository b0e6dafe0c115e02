"""Paired transforms: both images (and masks) of a pair get the same crop, flips and rotation."""

import pytest
import torch

from cdiff.data import CenterCrop, PairAugment, default_transform


def sample(h=12, w=10):
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w).expand(3, h, w).clone()  # unique per pixel
    return {"sar": x, "eo": x.clone(), "mask": x[:1].clone(), "name": "s"}


def dihedral(x):
    """The 8 flips/rotations of a (C, H, W) tensor."""
    out = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        out += [r, r.flip(-1)]
    return out


def test_pair_stays_equal_and_is_a_window():
    t = PairAugment(crop_size=6)
    seen = set()
    for seed in range(64):
        out = t(sample(), torch.Generator().manual_seed(seed))
        assert out["name"] == "s"
        assert torch.equal(out["sar"], out["eo"]) and torch.equal(out["sar"][:1], out["mask"])
        assert out["sar"].shape == (3, 6, 6)
        # Undo: the top-left-most value of the window gives (top, left); the output is one of
        # the 8 dihedral images of that window.
        v = int(out["sar"].min())
        top, left = divmod(v, 10)
        window = sample()["sar"][:, top : top + 6, left : left + 6]
        matches = [i for i, d in enumerate(dihedral(window)) if torch.equal(d, out["sar"])]
        assert len(matches) == 1
        seen.add((top, left, matches[0]))
    # All 8 orientations occur, and several crop positions.
    assert {m for _, _, m in seen} == set(range(8))
    assert len({(t_, l_) for t_, l_, _ in seen}) > 10


def test_deterministic_with_generator_and_options_off():
    t = PairAugment(crop_size=5)
    a = t(sample(), torch.Generator().manual_seed(3))
    b = t(sample(), torch.Generator().manual_seed(3))
    assert torch.equal(a["sar"], b["sar"])
    outs = {tuple(t(sample(), torch.Generator().manual_seed(s))["sar"].flatten().tolist()) for s in range(8)}
    assert len(outs) > 1
    # With flips and rotations off, only the crop is left: the window is unrotated.
    plain = PairAugment(crop_size=5, hflip=False, vflip=False, rot90=False)
    out = plain(sample(), torch.Generator().manual_seed(11))["sar"]
    top, left = divmod(int(out.min()), 10)
    assert torch.equal(out, sample()["sar"][:, top : top + 5, left : left + 5])
    # No crop keeps the full (square) image.
    full = PairAugment()(sample(8, 8), torch.Generator().manual_seed(0))
    assert full["sar"].shape == (3, 8, 8) and torch.equal(full["sar"], full["eo"])


def test_center_crop():
    out = CenterCrop(3)(sample(5, 7))
    torch.testing.assert_close(out["sar"], sample(5, 7)["sar"][:, 1:4, 2:5])
    assert torch.equal(out["eo"], out["sar"]) and out["mask"].shape == (1, 3, 3)


def test_transform_errors():
    with pytest.raises(ValueError, match="smaller than the crop size 13"):
        PairAugment(crop_size=13)(sample())
    with pytest.raises(ValueError, match="smaller than the crop size 11"):
        CenterCrop(11)(sample())
    bad = sample()
    bad["eo"] = bad["eo"][:, :5]
    with pytest.raises(ValueError, match="differ in size"):
        PairAugment(crop_size=4)(bad)
    with pytest.raises(ValueError, match="crop_size"):
        PairAugment(crop_size=0)


def test_default_transforms():
    assert default_transform("train", 512) == PairAugment(crop_size=512)
    assert default_transform("train", None) == PairAugment(crop_size=None)
    assert default_transform("test", 512) == CenterCrop(512)
    assert default_transform("test", None) is None and default_transform(None, 512) is None
