"""The synthetic generator: determinism, masks that cover exactly the injected problems
(checked against a clean twin of the same scene), speckle statistics, the Dataset, and the
files written by ``cdiff synth``. (Its speed is not a test's business: no wall-time bound.)"""

import numpy as np
import pytest
import torch

from cdiff.cli import main
from cdiff.data import PairAugment, SyntheticPairs, csv_pairs, folder_pairs, make_pair, to_uint8, write_synthetic
from cdiff.data.imageio import read_image, write_png
from cdiff.data.synth import (
    _EO_COLOUR, _FIELD_COLOURS, _ROOF_COLOURS, BUILDING, CLASSES, FIELDS, VEGETATION, WATER, _eo_shadow, _scene, redraw_eo,
)
from cdiff.files import atomic_path

SEEDS = range(6)


def test_deterministic_and_seed_dependent():
    a, b, c = make_pair(7, 64), make_pair(7, 64), make_pair(8, 64)
    for field in ("sar", "eo", "discrepancy", "misregistration", "shift", "landcover"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not np.array_equal(a.sar, c.sar) and not np.array_equal(a.eo, c.eo)
    assert a.sar.shape == (64, 64) and a.eo.shape == (64, 64, 3)
    assert a.sar.dtype == np.float32 and a.eo.dtype == np.float32
    assert a.sar.min() >= -1 and a.sar.max() <= 1 and a.eo.min() >= -1 and a.eo.max() <= 1
    assert make_pair(1, (40, 72)).eo.shape == (40, 72, 3)


def _layout(seed: int, size: int):
    return _scene(np.random.default_rng(np.random.SeedSequence(seed).spawn(7)[0]), size, size)


@pytest.mark.parametrize("seed", SEEDS)
def test_eo_colours_follow_the_final_land_cover(seed):
    # Roads and water drawn over a field parcel once kept the field's colour: the EO showed a field
    # where the SAR shows water, a disagreement no mask recorded.
    landcover, colour, _, _, group = _layout(seed, 128)
    own = (landcover != FIELDS) & (landcover != BUILDING)
    assert np.array_equal(colour[own], _EO_COLOUR[landcover[own]])
    assert np.array_equal(group >= 0, ~own)  # a colour group for every field and roof pixel, none elsewhere
    for gid in np.unique(group[group >= 0]):
        members = group == gid
        assert len(np.unique(landcover[members])) == 1 and len(np.unique(colour[members], axis=0)) == 1
        palette = _ROOF_COLOURS if landcover[members][0] == BUILDING else _FIELD_COLOURS
        assert (palette == colour[members][0]).all(1).any()


def test_redraw_eo_keeps_the_layout_and_redraws_what_the_sar_cannot_show():
    seed, size, draws = 3, 64, 300
    landcover, colour, height, stripe, group = _layout(seed, size)
    assert np.array_equal(landcover, make_pair(seed, size).landcover)
    assert (landcover == BUILDING).any() and (landcover == FIELDS).any()  # this scene has both kinds of group
    rng = np.random.default_rng(0)
    images = np.stack([(redraw_eo(seed, size, rng) + 1) / 2 for _ in range(draws)])  # (draws, H, W, 3) in [0, 1]
    assert images.shape == (draws, size, size, 3) and images.dtype == np.float32
    assert np.array_equal(redraw_eo(seed, size, np.random.default_rng(5)), redraw_eo(seed, size, np.random.default_rng(5)))
    # Tone and texture have mean 1 and the noise mean 0, so the mean image is the palette's mean colour
    # on roofs and fields (x the field rows), and the class's own colour elsewhere (out of shadow).
    mean = images.mean(0)
    sunny = ~_eo_shadow(height)
    for gid in np.unique(group[group >= 0]):
        members = (group == gid) & sunny
        roof = landcover[group == gid][0] == BUILDING
        palette = _ROOF_COLOURS if roof else _FIELD_COLOURS
        rows = 1.0 if roof else (0.85 + 0.15 * stripe[members])[:, None]
        np.testing.assert_allclose((mean[members] / rows).mean(0), palette.mean(0), atol=0.03)
        # and the colour is drawn afresh: every palette colour shows up on this group
        per_draw = images[:, members].mean(1) / np.mean(rows)  # (draws, 3): the group's colour in each draw
        nearest = np.abs(per_draw[:, None] - palette[None]).sum(-1).argmin(1)
        assert len(np.unique(nearest)) == len(palette)
    water = (landcover == WATER) & sunny
    assert water.any()
    np.testing.assert_allclose(mean[water].mean(0), _EO_COLOUR[WATER], atol=0.01)


@pytest.mark.parametrize("seed", SEEDS)
def test_discrepancy_mask_is_exactly_the_injected_objects(seed):
    with_objects = make_pair(seed, 128, looks=None, discrepancies=6)
    clean = make_pair(seed, 128, looks=None, discrepancies=0)
    eo_changed = (with_objects.eo != clean.eo).any(-1)
    sar_changed = with_objects.sar != clean.sar
    assert with_objects.discrepancy.any()
    assert np.array_equal(eo_changed, with_objects.eo_only)
    assert np.array_equal(sar_changed, with_objects.sar_only)
    assert np.array_equal(with_objects.discrepancy, with_objects.sar_only | with_objects.eo_only)
    assert not (with_objects.sar_only & with_objects.eo_only).any()
    assert not clean.discrepancy.any()
    # With speckle the SAR cannot change outside the mask either.
    speckled, speckled_clean = make_pair(seed, 128, discrepancies=6), make_pair(seed, 128, discrepancies=0)
    assert not ((speckled.sar != speckled_clean.sar) & ~speckled.sar_only).any()


def test_objects_land_on_water_or_roads_and_both_sides_occur():
    sides = set()
    for seed in SEEDS:
        p = make_pair(seed, 128, discrepancies=6)
        on = p.landcover[p.discrepancy]
        assert np.isin(on, (WATER, CLASSES.index("road"))).all()
        sides |= {"sar"} if p.sar_only.any() else set()
        sides |= {"eo"} if p.eo_only.any() else set()
    assert sides == {"sar", "eo"}


@pytest.mark.parametrize("seed", SEEDS)
def test_misregistration_mask_and_shift(seed):
    moved = make_pair(seed, 128, looks=None, discrepancies=0, misregistrations=3, max_shift=3)
    still = make_pair(seed, 128, looks=None, discrepancies=0, misregistrations=0)
    assert np.array_equal(moved.eo, still.eo)
    assert moved.misregistration.any() and not still.misregistration.any()
    assert not ((moved.sar != still.sar) & ~moved.misregistration).any()
    dy, dx = moved.shift.astype(int)
    assert np.array_equal((dy != 0) | (dx != 0), moved.misregistration)
    assert np.abs(dy).max() <= 3 and np.abs(dx).max() <= 3
    # Inside the mask, SAR pixel (y, x) shows the registered scene at (y + dy, x + dx).
    yy, xx = np.nonzero(moved.misregistration)
    src_y, src_x = np.clip(yy + dy[yy, xx], 0, 127), np.clip(xx + dx[yy, xx], 0, 127)
    assert np.array_equal(moved.sar[yy, xx], still.sar[src_y, src_x])
    assert (moved.sar != still.sar).any()


def test_speckle_is_unit_mean_gamma_of_the_given_looks():
    looks = 4.0
    p = make_pair(3, 256, looks=looks, discrepancies=0, misregistrations=0)
    intensity = 10 ** (((p.sar + 1) / 2 * 40 - 30) / 10)  # undo the dB mapping
    ok = (p.sigma0 > 0.01) & (p.sigma0 < 0.5)  # far from the clipping bounds
    ratio = intensity[ok] / p.sigma0[ok]
    assert ok.sum() > 20000
    assert abs(ratio.mean() - 1) < 0.02, ratio.mean()
    assert abs(ratio.var() - 1 / looks) < 0.025, ratio.var()
    single = make_pair(3, 256, looks=1.0, discrepancies=0, misregistrations=0)
    intensity1 = 10 ** (((single.sar + 1) / 2 * 40 - 30) / 10)
    assert abs((intensity1[ok] / single.sigma0[ok]).var() - 1.0) < 0.1


def test_backscatter_model_orders_classes():
    seen = set()
    for seed in SEEDS:
        p = make_pair(seed, 256, looks=None, discrepancies=0, misregistrations=0)
        seen |= set(np.unique(p.landcover).tolist())
        if (p.landcover == WATER).any() and (p.landcover == BUILDING).any():
            water = np.median(p.sar[p.landcover == WATER])
            veg = np.median(p.sar[p.landcover == VEGETATION])
            building = np.median(p.sar[p.landcover == BUILDING])
            assert water < veg < building
    assert seen == set(range(len(CLASSES)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="size must be at least 16"):
        make_pair(0, 8)
    with pytest.raises(ValueError, match="seed must be a non-negative"):
        make_pair(-1, 32)
    with pytest.raises(ValueError, match="looks must be positive"):
        make_pair(0, 32, looks=0)
    with pytest.raises(ValueError, match="count must be"):
        SyntheticPairs(0)


def test_dataset_samples_and_shared_augmentation():
    ds = SyntheticPairs(3, size=64, seed=10, transform=None)
    s = ds[2]
    p = make_pair(12, 64)
    assert s["name"] == "synth_000012" and len(ds) == 3
    assert s["sar"].shape == (3, 64, 64) and s["eo"].shape == (3, 64, 64) and s["discrepancy"].shape == (1, 64, 64)
    for c in range(3):
        assert torch.equal(s["sar"][c], torch.from_numpy(p.sar))
    assert torch.equal(s["eo"], torch.from_numpy(p.eo).permute(2, 0, 1))
    assert torch.equal(s["discrepancy"][0].bool(), torch.from_numpy(p.discrepancy))
    assert torch.equal(s["misregistration"][0].bool(), torch.from_numpy(p.misregistration))
    # An augmentation moves the masks with the images.
    aug = SyntheticPairs(3, size=64, seed=10, transform=lambda x: PairAugment(32)(x, torch.Generator().manual_seed(5)))[2]
    ref = PairAugment(32)(s, torch.Generator().manual_seed(5))
    for key in ("sar", "eo", "discrepancy", "misregistration"):
        assert torch.equal(aug[key], ref[key])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["sar"].shape == (3, 3, 64, 64) and batch["name"] == ["synth_000010", "synth_000011", "synth_000012"]
    with pytest.raises(IndexError):
        ds[3]


def test_cli_writes_a_readable_dataset(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["synth", str(out), "--count", "3", "--size", "64", "--seed", "4"]) == 0
    assert capsys.readouterr().out == (f"cdiff synth: 3 pairs of 64x64 (seeds 4..6) -> {out}: sar/, eo/, "
                                       "discrepancy/, misregistration/, pairs.csv, synth.json\n")
    names = [f"synth_{k:06d}" for k in (4, 5, 6)]
    for sub in ("sar", "eo", "discrepancy", "misregistration"):
        assert sorted(p.stem for p in (out / sub).iterdir()) == names
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    ds = folder_pairs(out)
    assert len(ds) == 3 and len(csv_pairs(out / "pairs.csv")) == 3
    for i, k in enumerate((4, 5, 6)):
        p = make_pair(k, 64)
        s = ds[i]
        assert s["name"] == names[i]
        # 8-bit files: what was written is the generator's output rounded to 1/127.5 steps.
        torch.testing.assert_close(s["sar"][1], torch.from_numpy(to_uint8(p.sar) / 127.5 - 1).float(), rtol=0, atol=1e-6)
        assert (s["sar"][0] - torch.from_numpy(p.sar)).abs().max() <= 1 / 127.5 + 1e-6
        torch.testing.assert_close(s["eo"], torch.from_numpy(to_uint8(p.eo) / 127.5 - 1).permute(2, 0, 1).float(), rtol=0, atol=1e-6)
        mask = read_image(out / "discrepancy" / f"{names[i]}.png")[..., 0]
        assert np.array_equal(mask == 255, p.discrepancy) and set(np.unique(mask)) <= {0, 255}
        mis = read_image(out / "misregistration" / f"{names[i]}.png")[..., 0]
        assert np.array_equal(mis == 255, p.misregistration)
    assert main(["synth", str(tmp_path / "bad"), "--size", "8"]) == 2
    assert not (tmp_path / "bad").exists()


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")

    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def synth(out, *args) -> int:
    return main(["synth", str(out), "--size", "64", *[str(a) for a in args]])


def pair_names(out):
    return {sub: sorted(p.stem for p in (out / sub).iterdir()) for sub in ("sar", "eo", "discrepancy", "misregistration")}


def test_synth_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "syn"
    assert synth(out, "--count", "3") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A rerun would mix old and new pairs while pairs.csv lists only the new: refused.
    assert synth(out, "--count", "2", "--seed", "10") == 2
    assert "is a folder that is not empty; pass --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert synth(out, "--count", "2", "--seed", "10", "--overwrite") == 0
    names = ["synth_000010", "synth_000011"]
    assert pair_names(out) == {sub: names for sub in ("sar", "eo", "discrepancy", "misregistration")}
    assert (out / "pairs.csv").read_text().count("\n") == 3 and len(csv_pairs(out / "pairs.csv")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temporary or old copy left
    (tmp_path / "empty").mkdir()
    assert synth(tmp_path / "empty", "--count", "1") == 0  # an empty folder is fine


def test_synth_dataset_appears_complete_or_not_at_all(tmp_path, monkeypatch):
    # Ctrl-C (KeyboardInterrupt) in the middle of the third pair's files.
    real_write, written = write_png, []

    def interrupted(path, array):
        written.append(path)
        if len(written) == 9:
            raise KeyboardInterrupt
        real_write(path, array)

    monkeypatch.setattr("cdiff.data.synth.write_png", interrupted)
    assert synth(tmp_path / "syn", "--count", "5") == 130  # the command reports the interrupt, no traceback
    assert list(tmp_path.iterdir()) == []  # nothing half-made, no temporary folder
    # Interrupting a rerun with --overwrite keeps the old dataset whole.
    monkeypatch.setattr("cdiff.data.synth.write_png", real_write)
    assert synth(tmp_path / "syn", "--count", "2") == 0
    old = {p: p.read_bytes() for p in (tmp_path / "syn").rglob("*") if p.is_file()}
    written.clear()
    monkeypatch.setattr("cdiff.data.synth.write_png", interrupted)
    assert synth(tmp_path / "syn", "--count", "5", "--seed", "7", "--overwrite") == 130
    assert {p: p.read_bytes() for p in (tmp_path / "syn").rglob("*") if p.is_file()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


@pytest.mark.parametrize("size", [32, 96, 100, 0])
def test_synth_refuses_sizes_the_pipeline_cannot_take(tmp_path, capsys, size):
    assert main(["synth", str(tmp_path / "syn"), "--size", str(size)]) == 2
    assert "--size must be a positive multiple of 64" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="multiple of 64"):
        write_synthetic(tmp_path / "syn", 1, size=(64, size))
