"""`cdiff demo` with the bundled model (weights/cdiff-demo-tiny.safetensors): its outputs, its
recorded scores reproduced, and the user's own image."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cdiff.cli import main
from cdiff.data.synth import make_pair
from cdiff.demo import DEMO_MODEL, DEMO_RECORD, SCORE_PROTOCOLS, SYNTHETIC_ONLY, Protocol, load_demo_model, measure
from cdiff.native import native_prediction
from cdiff.testing import one_thread

ROW = re.compile(r"^\| (.+?) +\| +([-\d.]+) \| ([-\d.]+) \| +([-\d.]+) \|$")


def printed_rows(text: str) -> dict[str, tuple[float, float, float]]:
    rows = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = tuple(float(v) for v in match.groups()[1:])
    return rows


def torchmetrics_scores(prediction_png, target_png) -> tuple[float, float, float]:
    """(PSNR, SSIM, SCC) of two 8-bit PNGs scaled to [0, 1], by torchmetrics; grey repeated to RGB."""
    from torchmetrics.functional import image as reference

    def read(path):
        array = np.asarray(Image.open(path), dtype=np.float32) / 255
        array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
        return torch.from_numpy(array).permute(2, 0, 1)[None]  # (1, 3, H, W)

    p, t = read(prediction_png), read(target_png)
    return (float(reference.peak_signal_noise_ratio(p, t, data_range=1.0)),
            float(reference.structural_similarity_index_measure(p, t, data_range=1.0)),
            float(reference.spatial_correlation_coefficient(p, t)))


def assert_scores_close(printed, expected, what: str) -> None:
    # 8-bit rounding moved PSNR by <= 0.003 dB, SSIM by <= 0.0011, SCC (a correlation near 0.05) by <= 0.0045.
    for label, value, want, tolerance in zip(("PSNR", "SSIM", "SCC"), printed, expected, (0.01, 2e-3, 0.01)):
        assert value == pytest.approx(want, abs=tolerance), f"{what} {label}: printed {value}, torchmetrics {want:.4f}"


def test_demo_writes_scenes_panel_and_table(tmp_path, capsys):
    out = tmp_path / "cdiff-demo"
    assert main(["demo", "--out", str(out)]) == 0  # the README's first command, into a temporary folder
    printed = capsys.readouterr().out
    first = printed.splitlines()[:3]  # what the model is comes first, before any number
    assert "synthetic scenes only" in first[0] and "from scratch" in first[0] and "tiny" in first[0]
    assert "random" in first[1] and "seeded" in first[1]
    assert first[2] == "objective: the noise (epsilon) and a variance, with the C-Diff loss: the paper's objective"
    names = [f"synth_{1_000_000 + i}" for i in range(4)]
    expected = {f"{n}_{kind}.png" for n in names for kind in ("sar", "eo", "target", "confidence")}
    assert {p.name for p in out.iterdir()} == expected | {"panel.png", "metrics.md", "metrics.json"}
    assert Image.open(out / "panel.png").size == (4 * 128, 4 * 128)  # 4 columns, a row per scene
    for name in names:  # the target is the held-out scene itself; the prediction is an RGB image of its size
        target = np.asarray(Image.open(out / f"{name}_target.png"))
        assert np.array_equal(target, np.rint((make_pair(int(name[6:]), size=128).eo + 1) * 127.5).astype(np.uint8))
        assert np.asarray(Image.open(out / f"{name}_eo.png")).shape == (128, 128, 3)
        assert np.asarray(Image.open(out / f"{name}_confidence.png")).shape == (128, 128)

    rows = printed_rows(printed)
    assert list(rows) == [*names, "mean", "baseline: SAR as RGB", "baseline: mean training EO"]
    saved = json.loads((out / "metrics.json").read_text())["rows"]
    for name, (psnr, ssim, scc) in rows.items():  # the printed table is the saved one, rounded
        assert psnr == pytest.approx(saved[name]["psnr"], abs=0.006)
        assert ssim == pytest.approx(saved[name]["ssim"], abs=6e-4) and scc == pytest.approx(saved[name]["scc"], abs=6e-4)
    # The scores themselves, recomputed by torchmetrics from the images the demo wrote (8-bit
    # rounding moves them by less than the tolerances; another scaling or metric would not).
    reference = {name: torchmetrics_scores(out / f"{name}_eo.png", out / f"{name}_target.png") for name in names}
    sar_baseline = [torchmetrics_scores(out / f"{name}_sar.png", out / f"{name}_target.png") for name in names]
    for name in names:
        assert_scores_close(rows[name], reference[name], name)
    assert_scores_close(rows["mean"], np.mean([reference[n] for n in names], axis=0), "mean")
    assert_scores_close(rows["baseline: SAR as RGB"], np.mean(sar_baseline, axis=0), "SAR baseline")
    description, header, table, verdict = (out / "metrics.md").read_text().split("\n\n")
    assert description.splitlines() == first
    assert "held-out" in header and f"{Protocol().steps} DDIM steps" in header and table in printed
    # The claim names only the metrics where the mean beats both baselines, from the printed table.
    beaten = [m for i, m in enumerate(("PSNR", "SSIM", "SCC"))
              if rows["mean"][i] > max(rows["baseline: SAR as RGB"][i], rows["baseline: mean training EO"][i])]
    assert verdict.startswith(f"On these 4 scenes the model beats both baselines in {' and '.join(beaten)}")
    assert verdict.strip() in printed
    for metric in {"PSNR", "SSIM", "SCC"} - set(beaten):
        assert f"; not in {metric} (" in verdict


def test_bundled_model_predicts_the_noise():
    """The bundled model has the paper's objective: the file's metadata (what sampling reads) and its record."""
    record = json.loads(DEMO_RECORD.read_text())
    assert native_prediction(DEMO_MODEL) == "epsilon"
    assert record["objective"] == {"prediction": "epsilon", "variance": True,
                                   "loss": "C-Diff (confidence-guided beta-NLL)"}
    assert record["training"]["config"]["model"]["prediction"] == "epsilon"
    assert record["training"]["config"]["model"]["loss"] == "cdiff"
    assert load_demo_model().unet.config.out_channels == 5  # 4 noise channels + the variance


@pytest.mark.parametrize("name", ["demo", "heldout"])
def test_bundled_model_reproduces_its_recorded_scores(name):
    """The scores the record holds (written when the model was trained) come out again, measured now:
    the demo's 4 scenes and the 64 held-out scenes of the claim."""
    entry = json.loads(DEMO_RECORD.read_text())["scores"][name]
    protocol = Protocol(**entry["protocol"])
    assert protocol == SCORE_PROTOCOLS[name]  # "demo": the protocol `cdiff demo` prints
    assert DEMO_MODEL.stat().st_size < 20 * 2**20  # a few MB, committed
    with one_thread():
        scores = measure(load_demo_model(), protocol)
    assert scores["psnr"] == pytest.approx(entry["model"]["psnr"], abs=0.1)
    assert scores["ssim"] == pytest.approx(entry["model"]["ssim"], abs=0.005)
    assert scores["scc"] == pytest.approx(entry["model"]["scc"], abs=0.01)


def test_demo_translates_a_file_with_a_warning(tmp_path, capsys):
    sar = np.random.default_rng(0).integers(0, 256, (64, 128), dtype=np.uint8)
    Image.fromarray(sar).save(tmp_path / "mine.png")
    out = tmp_path / "out"
    assert main(["demo", "--sar", str(tmp_path / "mine.png"), "--out", str(out), "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert SYNTHETIC_ONLY in captured.err
    assert "synthetic scenes only" in captured.out.splitlines()[0] and "objective: the noise" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["mine_confidence.png", "mine_eo.png"]
    assert np.asarray(Image.open(out / "mine_eo.png")).shape == (64, 128, 3)
    assert np.asarray(Image.open(out / "mine_confidence.png")).shape == (64, 128)


def test_demo_reads_a_geotiff_with_nan_nodata_as_translate_does(tmp_path, capsys):
    """One reader for both commands (cdiff.geo.read_sar): NaN pixels are nodata, left out of the
    stretch, and black in the output."""
    rasterio = pytest.importorskip("rasterio")
    bands = np.random.default_rng(0).gamma(2.0, 0.05, (64, 64)).astype(np.float32)
    bands[:, :8] = np.nan  # the swath edge
    with rasterio.open(tmp_path / "scene.tif", "w", driver="GTiff", height=64, width=64, count=1, dtype="float32",
                       nodata=float("nan")) as f:
        f.write(bands[None])
    out = tmp_path / "out"
    assert main(["demo", "--sar", str(tmp_path / "scene.tif"), "--out", str(out), "--steps", "1"]) == 0
    eo = np.asarray(Image.open(out / "scene_eo.png"))
    assert eo.shape == (64, 64, 3) and (eo[:, :8] == 0).all() and eo[:, 8:].std() > 0


@pytest.mark.parametrize("argv, words", [
    (["--sar", "{tmp}/missing.png"], ["missing.png"]),
    (["--sar", "{tmp}/odd.png"], ["--sar", "odd.png", "60x64"]),
    (["--model", "{tmp}/none.safetensors"], ["none.safetensors"]),
    (["--scenes", "0"], ["--scenes"]),
])
def test_demo_errors_name_the_argument_or_file(tmp_path, capsys, argv, words):
    Image.fromarray(np.arange(60 * 64, dtype=np.uint8).reshape(60, 64)).save(tmp_path / "odd.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("cdiff: error: ") and all(w in err for w in words), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
