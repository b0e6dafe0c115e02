"""The machinery of studies/synthetic/report.py on tiny random models and two scenes (not the real run)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cdiff.translators
from cdiff.cli import main as cdiff_main
from cdiff.native import save_native
from cdiff.testing import tiny_pipeline
from studies.synthetic import ablation_seeds
from studies.synthetic.measures import auroc, one_step
from studies.synthetic.report import (
    ReportProtocol, ceiling, compare_arms, describe_model, heldout, main, measure, user_confidence, write_report,
)

# One torch thread inside each test, and the count the suite had restored after it (the report's
# main() sets its own --threads).
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ReportProtocol(scenes=2, steps=2, map_steps=(2, 3), calibration_t=(300, 700), mean_scenes=2, bins=4, resamples=5,
                      speed_scenes=1, oracle_draws=2, model_samples=2, error_draws=2, hallucination_scenes=2,
                      ablation_seeds=(0, 1))


def reference_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """torchmetrics' AUROC (the area under the ROC curve it traces), for scores and boolean labels."""
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(scores.flatten().double(), labels.flatten().long()))


def save_model(path, unet_seed: int, vae_seed: int = 0, variance: bool = True):
    """A native tiny model: the U-Net of tiny_pipeline(unet_seed), the VAE and prompt of tiny_pipeline(vae_seed);
    without ``variance`` the variance channel stays at its zero start (variance 1), as plain l2 leaves it."""
    unet, base = tiny_pipeline(unet_seed).unet, tiny_pipeline(vae_seed)
    if not variance:
        with torch.no_grad():
            unet.conv_out.weight[4:].zero_()
            unet.conv_out.bias[4:].zero_()
    return save_native(path, unet, base.vae, base.context)


def fake_run(runs, arm: str, seed: int, psnr: float):
    """A finished ablation run: a tiny model file and a record holding its held-out scores."""
    save_model(runs / f"{arm}-seed{seed}.safetensors", 10 + seed + 5 * (arm == "l2"), variance=arm == "cdiff")
    record = {"objective": {"prediction": "epsilon"},
              "scores": {"heldout": {"model": {"psnr": psnr, "ssim": psnr / 40, "scc": 0.01 * seed}}},
              "training": {"command": f"train {arm} {seed}", "cpu_seconds": 100, "vae_cpu_seconds": 0, "threads": 1}}
    (runs / f"{arm}-seed{seed}.json").write_text(json.dumps(record))


def test_report_machinery_end_to_end(tmp_path, monkeypatch):
    model = save_model(tmp_path / "bundled.safetensors", 0)
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setattr(ablation_seeds, "DEMO_RECORD", tmp_path / "none.json")  # C-Diff seed 0 is a run of its own here
    for arm, seed, psnr in (("cdiff", 0, 17.0), ("cdiff", 1, 17.5), ("l2", 0, 16.0)):  # l2 seed 1 not done yet
        fake_run(runs, arm, seed, psnr)
    npde = {"psnr": 17.0, "ssim": 0.44, "scc": 0.03, "images_per_s": 18.0, "parameters": 157318, "parameters_training": 315835,
            "baseline_mean_colour": {"psnr": 15.6, "ssim": 0.47, "scc": 0.0}, "heldout": {"first_seed": 1_000_000, "count": 2, "size": 128},
            "training": {"scenes": 10, "crop": 64, "steps": 5, "seconds": 1.0}, "device": "cpu, 1 thread(s)"}
    data = heldout(TINY)
    assert data["sar"].shape == data["eo"].shape == (2, 3, 128, 128) and data["names"] == ["synth_1000000", "synth_1000001"]
    results = measure({"bundled": model}, runs, data, TINY, npde)

    # The teacher-forced diagnostic: the variance of one call per latent cell, by torchmetrics.
    pipeline = tiny_pipeline(0)
    out = one_step(pipeline, data["sar"], data["eo"], TINY.confidence_t, TINY.noise_seed + TINY.confidence_t)
    touched = F.max_pool2d(data["discrepancy"].float()[:, None], 8)[:, 0] > 0  # (B, h, w) latent cells
    assert 0 < touched.sum() < touched.numel()
    tf = results["teacher_forced"]["bundled"]
    assert tf["discrepancy"]["auroc"] == pytest.approx(reference_auroc(out["variance"][:, 0], touched), abs=1e-6)
    error = (out["prediction"] - out["target"]).square().mean(1)  # (B, h, w): one draw
    second = one_step(pipeline, data["sar"], data["eo"], TINY.confidence_t, TINY.noise_seed + TINY.confidence_t + 1)
    expected = (error + (second["prediction"] - second["target"]).square().mean(1)) / 2  # two draws averaged
    assert tf["error_auroc"] == pytest.approx(reference_auroc(error, touched), abs=1e-6)
    assert tf["expected_error_auroc"] == pytest.approx(reference_auroc(expected, touched), abs=1e-6)

    # The ablation: across runs, not scenes; the missing run named; the l2 arm has no map.
    a = results["ablation"]
    assert a["missing"] == ["l2-seed1"] and a["same_vae"] is True
    assert a["arms"]["cdiff"]["heldout"]["psnr"] == {"mean": 17.25, "std": pytest.approx(np.std([17.0, 17.5], ddof=1)),
                                                     "n": 2, "values": [17.0, 17.5]}
    assert a["arms"]["l2"]["heldout"]["psnr"]["std"] is None  # one run: no spread
    assert a["compare"]["heldout"]["psnr"]["p"] is None  # one l2 run: the arms are not compared across runs
    assert a["arms"]["cdiff"]["map_auroc"]["n"] == 2 and all("map_auroc" not in r for r in a["runs"] if r["arm"] == "l2")
    assert a["baselines"]["target"]["hallucinated"] == a["baselines"]["target"]["eo_only_objects"] > 0

    alone = ceiling(pipeline, data, replace(TINY, model_samples=1), results["predictions"]["bundled"])
    for name, values in alone["model, mean of samples"].items():  # the mean of one sample is that sample
        assert values == results["translation"]["bundled"][name]

    out = tmp_path / "report" / "synthetic_report.md"
    out.parent.mkdir()
    write_report(out, data, results, TINY, {"bundled": describe_model(model)}, threads=1, seconds=1.0, runs=str(runs))
    text = out.read_text()
    for heading in ("## Summary", "## 1.", "## 2.", "**No ceiling is quoted.**", "## 3.", "## 4.", "## 5.", "## 6.",
                    "PARTIAL: 3 of 4 training runs done", "synthetic_report_reliability.png"):
        assert heading in text
    assert text.index("## Summary") < text.index("## Protocol")
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["confidence"]["bundled"]["2"]["discrepancy"]["auroc"] == results["confidence"]["bundled"][2]["discrepancy"]["auroc"]
    for png in ("synthetic_report_reliability.png", "synthetic_report_examples.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_headline_auroc_is_that_of_the_maps_cdiff_translate_writes(tmp_path, monkeypatch):
    """The report's headline AUROC goes through translate's own function (a spy counts the calls), and equals
    the AUROC of the grey PNGs that `cdiff synth` + `cdiff translate --conf-dir` write for the same scenes."""
    model = save_model(tmp_path / "model.safetensors", 3)
    protocol = replace(TINY, map_steps=(2,))
    calls = []
    original = cdiff.translators.translate_scenes

    def spy(pipeline, scenes, names, sampling, show_progress=False):
        calls.append((list(names), sampling.steps))
        return original(pipeline, scenes, names, sampling, show_progress)

    monkeypatch.setattr(cdiff.translators, "translate_scenes", spy)
    data = heldout(protocol)
    ours = user_confidence(model, data, protocol)
    assert calls == [(["synth_1000000"], 2), (["synth_1000001"], 2)]  # translate's function, one scene per call

    assert cdiff_main(["synth", str(tmp_path / "synth"), "--count", "2", "--size", "128", "--seed", "1000000"]) == 0
    assert cdiff_main(["translate", "--model", str(model), "--input", str(tmp_path / "synth" / "sar"), "--output",
                       str(tmp_path / "eo"), "--conf-dir", str(tmp_path / "conf"), "--steps", "2"]) == 0
    names = ["synth_1000000", "synth_1000001"]
    written = np.stack([np.asarray(Image.open(tmp_path / "conf" / f"{n}.png")) for n in names])  # (2, 128, 128) uint8
    masks = np.stack([np.asarray(Image.open(tmp_path / "synth" / "discrepancy" / f"{n}.png")) > 0 for n in names])
    assert np.array_equal(ours["grey"], written)  # the maps themselves, bit for bit
    assert np.array_equal(masks, data["discrepancy"].numpy())
    low = torch.from_numpy(255 - written.astype(np.int64))
    assert ours[2]["discrepancy"]["auroc"] == pytest.approx(auroc(low, torch.from_numpy(masks)), abs=1e-12)


def test_missing_runs_folder_names_the_command(tmp_path):
    model = save_model(tmp_path / "a.safetensors", 0)
    with pytest.raises(SystemExit, match="no such folder.*studies.synthetic.ablation_seeds --runs"):
        main(["--model", str(model), "--x0", "", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md")])


def test_compare_arms_run_against_run():
    disjoint = compare_arms([17.3, 17.1, 17.2], [16.8, 16.9, 17.0], higher_is_better=True)
    assert disjoint == {"difference": pytest.approx(0.3), "p": pytest.approx(0.1), "cdiff_better_in_every_pair": True,
                        "l2_better_in_every_pair": False}
    fewer = compare_arms([2, 3, 1], [5, 4, 6], higher_is_better=False)  # counts of hallucinations: fewer is better
    assert fewer["cdiff_better_in_every_pair"] is True and fewer["difference"] == pytest.approx(-3)
    overlap = compare_arms([17.3, 16.7, 17.2], [16.8, 16.9, 17.0], higher_is_better=True)
    assert not overlap["cdiff_better_in_every_pair"] and not overlap["l2_better_in_every_pair"] and overlap["p"] > 0.1
    assert compare_arms([17.0], [16.0, 16.5], higher_is_better=True)["p"] is None  # one run: no spread to compare
