"""The machinery of studies/synthetic/report.py on tiny random models and two scenes (not the real run)."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cdiff.native import save_native
from cdiff.testing import tiny_pipeline
from studies.synthetic.measures import one_step
from studies.synthetic.report import ReportProtocol, ceiling, describe_model, heldout, main, measure, write_report

# One torch thread inside each test, and the count the suite had restored after it (the report's
# main() sets its own --threads).
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ReportProtocol(scenes=2, steps=2, calibration_t=(300, 700), mean_scenes=2, bins=4, resamples=5, speed_scenes=1,
                      oracle_draws=2, model_samples=2)


def reference_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """torchmetrics' AUROC (the area under the ROC curve it traces), for scores and boolean labels."""
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(scores.flatten().double(), labels.flatten().long()))


def test_report_machinery_end_to_end(tmp_path):
    pipelines = {"C-Diff": tiny_pipeline(0), "l2": tiny_pipeline(1)}
    with torch.no_grad():  # the l2 arm's variance channel stays at its start: variance 1
        pipelines["l2"].unet.conv_out.weight[4:].zero_()
        pipelines["l2"].unet.conv_out.bias[4:].zero_()
    model = save_native(tmp_path / "a.safetensors", pipelines["C-Diff"].unet, pipelines["C-Diff"].vae, pipelines["C-Diff"].context)
    npde = {"psnr": 17.0, "ssim": 0.44, "scc": 0.03, "images_per_s": 18.0, "parameters": 157318, "parameters_training": 315835,
            "baseline_mean_colour": {"psnr": 15.6, "ssim": 0.47, "scc": 0.0}, "heldout": {"first_seed": 1_000_000, "count": 2, "size": 128},
            "training": {"scenes": 10, "crop": 64, "steps": 5, "seconds": 1.0}, "device": "cpu, 1 thread(s)"}
    data = heldout(TINY)
    assert data["sar"].shape == data["eo"].shape == (2, 3, 128, 128) and data["clean"].shape == (2, 128, 128, 3)
    results = measure(pipelines, data, TINY, npde)

    assert results["same_vae"] is False  # two seeds, two VAEs
    objects = int(data["eo_only"].any((1, 2)).sum())
    assert sum(results["translation"]["C-Diff"]["eo_only_objects"]) >= objects
    assert results["confidence"]["l2"]["discrepancy"]["auroc"] == 0.5  # constant variance: chance
    # The AUROC of the C-Diff arm's variance against the cells the injected objects touch, by torchmetrics.
    touched = F.max_pool2d(data["discrepancy"].float()[:, None], 8)[:, 0] > 0  # (B, h, w) latent cells
    variance = results["confidence"]["C-Diff"]["variance"]
    assert variance.shape == touched.shape == (2, 16, 16) and 0 < touched.sum() < touched.numel()
    assert results["confidence"]["C-Diff"]["discrepancy"]["auroc"] == pytest.approx(reference_auroc(variance, touched),
                                                                                      abs=1e-6)
    assert results["calibration"]["l2"]["nll_model"] == pytest.approx(results["calibration"]["l2"]["nll_unit"])
    assert sum(b["count"] for b in results["calibration"]["C-Diff"]["bins"]) == 2 * len(TINY.calibration_t) * 16 * 16
    assert set(results["ceiling"]) == {"oracle sample", "oracle sample through the VAE", "oracle mean", "model, mean of samples"}
    assert all(len(v["psnr"]) == 2 for v in results["ceiling"].values())
    assert results["confidence"]["l2"]["by_coverage"]  # these two scenes have cells their objects cover more than 1/8 of
    assert all(v["auroc"] == 0.5 for v in results["confidence"]["l2"]["by_coverage"].values())  # chance, as above
    alone = ceiling(pipelines["C-Diff"], data, replace(TINY, model_samples=1), results["predictions"]["C-Diff"])
    for name, values in alone["model, mean of samples"].items():  # the mean of one sample is that sample
        assert values == results["translation"]["C-Diff"][name]
    # The error's AUROC: the U-Net's squared error at the same call, scored the same way.
    out = one_step(pipelines["C-Diff"], data["sar"], data["eo"], TINY.confidence_t, TINY.noise_seed + TINY.confidence_t)
    error = (out["prediction"] - out["target"]).square().mean(1)  # (B, h, w)
    assert results["confidence"]["C-Diff"]["error_auroc"] == pytest.approx(reference_auroc(error, touched), abs=1e-6)
    assert results["difference"]["psnr"] == pytest.approx([a - b for a, b in zip(results["translation"]["C-Diff"]["psnr"],
                                                                                results["translation"]["l2"]["psnr"])])

    out = tmp_path / "report" / "synthetic_report.md"
    out.parent.mkdir()
    sources = {arm: describe_model(model) for arm in ("C-Diff", "l2")}
    write_report(out, data, results, TINY, sources, threads=1, seconds=1.0)
    text = out.read_text()
    for heading in ("## Summary", "## 1.", "### The ceiling", "## 2.", "Where the limit lies", "## 3.", "## 4.", "## 5.", "## 6.",
                    "synthetic_report_reliability.png"):
        assert heading in text
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["translation"]["C-Diff"]["psnr"]["n"] == 2
    assert numbers["npde"]["cdiffset_8bit"]["psnr"] > 0
    for png in ("synthetic_report_reliability.png", "synthetic_report_examples.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_ablation_names_the_file_and_the_fix(tmp_path):
    model = tmp_path / "a.safetensors"
    pipeline = tiny_pipeline(0)
    save_native(model, pipeline.unet, pipeline.vae, pipeline.context)
    with pytest.raises(SystemExit, match="l2.safetensors: not found .*--train-ablation"):
        main(["--model", str(model), "--ablation", str(tmp_path / "l2.safetensors"), "--out", str(tmp_path / "r.md")])
