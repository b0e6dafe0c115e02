"""Regenerate studies/synthetic/synthetic_report.md: the C-DiffSET paper's claims measured where the truth is known.

    python -m studies.synthetic.report                    # the bundled model, the l2 arm's file, the S2O-NPDE JSON
    python -m studies.synthetic.report --train-ablation   # first (re)train the l2 arm (~30-40 min on the CPU)

(from the repository's root folder, or with cdiff installed).

Inputs: the bundled demo model (weights/cdiff-demo-tiny.safetensors, C-Diff loss); the Table-3
arm, the same recipe with plain L2 (``tools/train_demo.py --loss mse --vae <bundled model>``,
default weights/cdiff-demo-tiny-l2.safetensors, git-ignored: ``--train-ablation`` makes it);
the S2O-NPDE entry (studies/synthetic/npde_synthetic.json, from tools/train_npde_demo.py).
Outputs: the report, its numbers as JSON beside it, the reliability diagram and a panel of
example scenes (PNGs, drawn with PIL).

Everything is measured on held-out scenes ``make_pair(HELDOUT_SEED + i)``, i < scenes
(HELDOUT_SEED = 1,000,000; training used seeds below 2,000), and every random draw is seeded:
the same command on the same machine and thread count writes the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cdiff.data.imageio import to_uint8, write_png
from cdiff.data.synth import _SHIP_COLOUR, _VEHICLE_COLOURS, ROAD, WATER, make_pair, redraw_eo
from cdiff.demo import DEMO_MODEL, HELDOUT_SEED, Protocol, eo_batch, heldout_pairs, mean_eo_image, sar_batch, translate
from cdiff.files import write_text
from cdiff.load import load_pipeline
from cdiff.metrics import image_metrics, to_unit
from studies.synthetic.markdown import render
from studies.synthetic.measures import (
    auroc, best_constant_variance, bootstrap_auroc, gaussian_nll, hallucinated_objects, latent_mask, masked_scores,
    one_step, reliability_bins, spurious_object_pixels,
)
from studies.synthetic.reliability_plot import draw_reliability
from tools.train_npde_demo import eight_bit

ROOT = Path(__file__).resolve().parents[2]
STUDY = Path(__file__).resolve().parent  # the report, its numbers and pictures, the S2O-NPDE entry
ABLATION_MODEL = ROOT / "weights" / "cdiff-demo-tiny-l2.safetensors"
ARMS = ("C-Diff", "l2")  # the bundled model, the Table-3 arm
COUNTS = ("hallucinated", "eo_only_objects", "spurious_pixels", "spurious_looked_at")  # summed over scenes, not averaged
OBJECT_COLOURS = np.concatenate([_VEHICLE_COLOURS, _SHIP_COLOUR[None]])  # (5, 3) in [0, 1]: what synth paints objects with
PAIRED = ("psnr", "ssim", "scc", "psnr_inside", "psnr_outside", "ssim_inside", "ssim_outside", "psnr_eo_only", "psnr_sar_only")


@dataclass(frozen=True)
class ReportProtocol:
    """How every number of the report is measured."""

    scenes: int = 64  # held-out scenes, seeds HELDOUT_SEED .. HELDOUT_SEED + scenes - 1
    size: int = 128  # scene side in px (the training size)
    steps: int = 20  # DDIM steps (eta 0) of the translations, as `cdiff demo`
    seed: int = 0  # the translations' starting noise (cdiff.demo.translate), the same for both arms
    confidence_t: int = 500  # Figure 7: the EO latent noised to t = T/2, one U-Net call
    calibration_t: tuple[int, ...] = (100, 300, 500, 700, 900)  # one U-Net call per scene at each
    noise_seed: int = 7  # the one-call protocols' noise: seed noise_seed + t
    mean_scenes: int = 1200  # training scenes averaged into the mean-EO-image baseline (the U-Net's data.count)
    bins: int = 10  # reliability bins, equal counts
    resamples: int = 200  # bootstrap resamples of scenes for the AUROC interval
    speed_scenes: int = 8  # batch-1 translations timed for images/s (after one warm-up)
    object_margin: int = 3  # px kept clear around the true objects when looking for spurious ones
    oracle_draws: int = 32  # redrawn EO images per scene averaged into the oracle's posterior mean (claim 1's ceiling)
    oracle_seed: int = 11  # their generator's seed
    model_samples: int = 8  # translations (noise seeds seed .. seed + model_samples - 1) averaged per scene
    coverage: tuple[float, ...] = (0.125, 0.25)  # claim 2 by object coverage: positives cover more than this of a cell


def heldout(protocol: ReportProtocol) -> dict:
    """The held-out scenes: SAR, EO (B, 3, H, W) in [-1, 1], the masks (B, H, W) bool, and the
    EO of each scene without its injected objects (B, H, W, 3) numpy, for the hallucination measure."""
    pairs = heldout_pairs(Protocol(scenes=protocol.scenes, size=protocol.size))
    clean = [make_pair(HELDOUT_SEED + i, size=protocol.size, discrepancies=0).eo for i in range(protocol.scenes)]
    masks = {name: torch.from_numpy(np.stack([getattr(p, name) for p in pairs]))
             for name in ("discrepancy", "eo_only", "sar_only", "misregistration")}
    # Where objects could stand (roads, water) but none does: object_margin px away from every injected one.
    margin = protocol.object_margin
    near_object = F.max_pool2d(masks["discrepancy"].float()[:, None], 2 * margin + 1, 1, margin)[:, 0] > 0
    open_ground = torch.from_numpy(np.stack([np.isin(p.landcover, (ROAD, WATER)) for p in pairs]))
    return {"sar": sar_batch(pairs), "eo": eo_batch(pairs), "clean": np.stack(clean), **masks,
            "object_free": open_ground & ~near_object}


def summary(values) -> dict[str, float]:
    """Mean and standard error over scenes (NaN entries, e.g. scenes with an empty mask, left out)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"),
            "n": int(len(v))}


def image_scores(prediction: torch.Tensor, data: dict) -> dict:
    """Per-scene scores of a prediction (B, 3, H, W) in [-1, 1] against the held-out targets."""
    pred, target = to_unit(prediction.float()), to_unit(data["eo"])
    scores = {name: v.tolist() for name, v in image_metrics(pred, target).items()}
    regions = {"inside": data["discrepancy"], "outside": ~data["discrepancy"], "eo_only": data["eo_only"],
               "sar_only": data["sar_only"]}
    for region, mask in regions.items():
        for name, v in masked_scores(pred, target, mask).items():
            scores[f"{name}_{region}"] = v.tolist()
    pred_hwc = prediction.float().permute(0, 2, 3, 1).numpy()
    target_hwc = data["eo"].permute(0, 2, 3, 1).numpy()
    verdicts = [hallucinated_objects(p, t, c, m.numpy()) for p, t, c, m in zip(pred_hwc, target_hwc, data["clean"], data["eo_only"])]
    scores["hallucinated"] = [sum(v) for v in verdicts]
    scores["eo_only_objects"] = [len(v) for v in verdicts]
    spurious = [spurious_object_pixels((p + 1) / 2, (c + 1) / 2, a, OBJECT_COLOURS)
                for p, c, a in zip(pred_hwc, data["clean"], data["object_free"].numpy())]
    scores["spurious_pixels"], scores["spurious_looked_at"] = [s[0] for s in spurious], [s[1] for s in spurious]
    return scores


def confidence_scores(pipeline, data: dict, protocol: ReportProtocol) -> dict:
    """Claim 2: AUROC of the predicted variance at t = T/2 (low confidence) against the object masks."""
    out = one_step(pipeline, data["sar"], data["eo"], protocol.confidence_t, protocol.noise_seed + protocol.confidence_t)
    variance = out["variance"][:, 0]  # (B, h, w)
    result = {}
    for name in ("discrepancy", "eo_only", "sar_only", "misregistration"):
        labels = latent_mask(data[name])
        result[name] = {"auroc": auroc(variance, labels), "interval": bootstrap_auroc(variance, labels, protocol.resamples),
                        "positive_cells": int(labels.sum()), "cells": labels.numel()}
    # The same, with misregistered cells left out of the negatives: do objects stand out from well-registered ground?
    labels = latent_mask(data["discrepancy"])
    keep = ~latent_mask(data["misregistration"]) | labels
    result["discrepancy_vs_registered"] = {"auroc": auroc(variance[keep], labels[keep])}
    # How far the variance could go: the AUROC of the U-Net's actual squared error at the same call (a variance
    # that predicted each cell's error exactly would score this), and both by how much of a cell the objects cover.
    error = (out["prediction"] - out["target"]).square().mean(1)  # (B, h, w)
    result["error_auroc"] = auroc(error, labels)
    coverage = F.avg_pool2d(data["discrepancy"].float()[:, None], 8)[:, 0]  # (B, h, w): the share of each cell
    result["by_coverage"] = {}
    for share in protocol.coverage:
        positive, negative = coverage > share, coverage == 0
        if positive.any():
            result["by_coverage"][str(share)] = {
                "cells": int(positive.sum()), "auroc": auroc(variance[positive | negative], positive[positive | negative]),
                "error_auroc": auroc(error[positive | negative], positive[positive | negative])}
    result["variance"] = variance
    return result


def calibration(pipeline, data: dict, protocol: ReportProtocol) -> dict:
    """Claim 4: predicted variance against the squared error of the U-Net's prediction (the noise, or
    the clean latent for an x0-predicting U-Net: what its loss compares), per latent cell.

    The squared error of a cell is the mean over its 4 latent channels (which share one variance),
    so the per-cell Gaussian NLL equals the per-element one.
    """
    variances, errors, per_t = [], [], {}
    for t in protocol.calibration_t:
        out = one_step(pipeline, data["sar"], data["eo"], t, protocol.noise_seed + t)
        error = (out["prediction"] - out["target"]).square().mean(1).double()  # (B, h, w)
        variance = out["variance"][:, 0].double()
        constant = best_constant_variance(error)
        per_t[t] = {"nll_model": gaussian_nll(error, variance), "nll_constant": gaussian_nll(error, constant),
                    "constant": constant, "mean_variance": float(variance.mean())}
        variances.append(variance)
        errors.append(error)
    variance, error = torch.cat(variances), torch.cat(errors)
    constant = best_constant_variance(error)
    # The per-timestep constants together: a baseline that knows t but not the scene.
    nll_per_t = float(np.mean([gaussian_nll(e, best_constant_variance(e)) for e in errors]))
    return {"bins": reliability_bins(variance, error, protocol.bins), "nll_model": gaussian_nll(error, variance),
            "nll_constant": gaussian_nll(error, constant), "constant": constant, "nll_constant_per_t": nll_per_t,
            "nll_unit": gaussian_nll(error, 1.0), "per_t": per_t}


@torch.no_grad()
def vae_bound(pipeline, data: dict) -> dict:
    """Claim 5: the VAE's reconstruction of the held-out EO targets (posterior mean, decoded)."""
    reconstruction = pipeline.vae.decode_latent(pipeline.vae.encode_latent(data["eo"])).clamp(-1, 1)
    return {name: v.tolist() for name, v in image_metrics(to_unit(reconstruction), to_unit(data["eo"])).items()}


@torch.no_grad()
def ceiling(pipeline, data: dict, protocol: ReportProtocol, prediction: torch.Tensor) -> dict:
    """Claim 1's ceiling: what a perfect translator could score on these scenes, and the model's own mean.

    A perfect model given the SAR can at best know the scene's layout; the rest of the EO (roof and field
    colours, tone, texture, noise) it must draw. ``cdiff.data.synth.redraw_eo`` makes such draws, so:
    - "oracle sample": one redrawn EO image per scene, the score of a single sample from the true
      distribution given the layout (in expected squared error, an upper bound for any model whose samples
      follow the EO's distribution given the SAR: the SAR shows less than the layout);
    - "oracle sample through the VAE": the same, encoded and decoded by the model's VAE, as any
      translation of this model is;
    - "oracle mean": the mean of ``oracle_draws`` redraws, about the best single image (the posterior mean);
    - "model, mean of samples": the mean of ``model_samples`` translations (noise seeds seed, seed + 1, ...;
      ``prediction`` is the first), the model's own estimate of that mean.
    """
    rng = np.random.default_rng(protocol.oracle_seed)
    seeds = [HELDOUT_SEED + i for i in range(len(data["eo"]))]
    size = protocol.size

    def images(draws: list[np.ndarray]) -> torch.Tensor:  # (B, H, W, 3) numpy -> (B, 3, H, W) tensor
        return torch.from_numpy(np.stack(draws)).permute(0, 3, 1, 2).float()

    sample = images([redraw_eo(s, size, rng) for s in seeds])
    mean = images([np.mean([redraw_eo(s, size, rng) for _ in range(protocol.oracle_draws)], axis=0) for s in seeds])
    through_vae = pipeline.vae.decode_latent(pipeline.vae.encode_latent(sample)).clamp(-1, 1)
    samples = [prediction] + [translate(pipeline, data["sar"], Protocol(scenes=len(seeds), size=size, steps=protocol.steps,
                                                                         seed=protocol.seed + k)).eo.float()
                              for k in range(1, protocol.model_samples)]
    scored = {"oracle sample": sample, "oracle sample through the VAE": through_vae, "oracle mean": mean,
              "model, mean of samples": torch.stack(samples).mean(0)}
    return {name: {k: v.tolist() for k, v in image_metrics(to_unit(x), to_unit(data["eo"])).items()} for name, x in scored.items()}


def images_per_second(pipeline, data: dict, protocol: ReportProtocol) -> float:
    """Batch-1 translations (``steps`` DDIM steps, VAE included): one over the median seconds, after a warm-up."""
    seconds = []
    for i in range(-1, min(protocol.speed_scenes, len(data["sar"]))):
        start = time.perf_counter()
        pipeline.translate(data["sar"][max(i, 0)][None], steps=protocol.steps, generator=torch.Generator().manual_seed(0))
        if i >= 0:
            seconds.append(time.perf_counter() - start)
    return 1 / statistics.median(seconds)


def npde_comparison(prediction: torch.Tensor, data: dict, npde: dict) -> dict:
    """C-DiffSET scored as tools/train_npde_demo.py scores S2O-NPDE: 8-bit images, its held-out count."""
    count = npde["heldout"]["count"]
    scores = image_metrics(eight_bit(prediction[:count]), eight_bit(data["eo"][:count]))
    return {name: float(v.double().mean()) for name, v in scores.items()}


def measure(pipelines: dict, data: dict, protocol: ReportProtocol, npde: dict | None) -> dict:
    """Every number of the report, for ``pipelines`` {"C-Diff": bundled, "l2": ablation arm}."""
    sampling = Protocol(scenes=protocol.scenes, size=protocol.size, steps=protocol.steps, seed=protocol.seed)
    predictions = {arm: translate(pipe, data["sar"], sampling).eo.float() for arm, pipe in pipelines.items()}
    mean_image = mean_eo_image(protocol.mean_scenes, protocol.size)
    results = {
        "translation": {arm: image_scores(p, data) for arm, p in predictions.items()},
        "baselines": {"mean EO image": image_scores(mean_image.expand_as(data["eo"]), data),
                      "SAR as RGB": image_scores(data["sar"], data)},
        "confidence": {arm: confidence_scores(pipe, data, protocol) for arm, pipe in pipelines.items()},
        "calibration": {arm: calibration(pipe, data, protocol) for arm, pipe in pipelines.items()},
        "vae": vae_bound(pipelines["C-Diff"], data),
        "ceiling": ceiling(pipelines["C-Diff"], data, protocol, predictions["C-Diff"]),
        "speed": {"images_per_s": images_per_second(pipelines["C-Diff"], data, protocol),
                  "parameters_unet": sum(p.numel() for p in pipelines["C-Diff"].unet.parameters()),
                  "parameters": sum(p.numel() for m in (pipelines["C-Diff"].unet, pipelines["C-Diff"].vae) for p in m.parameters())},
    }
    results["predicts"] = {arm: "clean latent (x0)" if pipe.prediction_type == "sample" else "noise"
                           for arm, pipe in pipelines.items()}
    vaes = [pipe.vae.state_dict() for pipe in pipelines.values()]
    results["same_vae"] = all(torch.equal(vaes[0][k], other[k]) for other in vaes[1:] for k in vaes[0])
    results["difference"] = {name: [a - b for a, b in zip(results["translation"]["C-Diff"][name], results["translation"]["l2"][name])]
                             for name in results["translation"]["C-Diff"] if name in PAIRED}
    if npde is not None:
        results["npde"] = {"entry": npde, "cdiffset_8bit": npde_comparison(predictions["C-Diff"], data, npde)}
    results["predictions"] = predictions
    return results


def summarize(scores: dict) -> dict:
    """Per-scene lists -> mean and standard error; the object counts -> totals."""
    return {name: sum(v) if name in COUNTS else summary(v) for name, v in scores.items()}


def panel(data: dict, results: dict, scenes: int = 4) -> np.ndarray:
    """Rows of SAR | target | C-Diff | l2 | confidence at T/2 (dark = low) | discrepancy mask, uint8 RGB."""
    size = data["eo"].shape[-1]
    rows = []
    for i in range(min(scenes, len(data["eo"]))):
        variance = results["confidence"]["C-Diff"]["variance"][i]
        confidence = (1 / variance).log()
        confidence = (confidence - confidence.min()) / (confidence.max() - confidence.min()).clamp_min(1e-12) * 2 - 1
        confidence = F.interpolate(confidence[None, None], size=(size, size), mode="nearest")[0, 0]
        tiles = [data["sar"][i], data["eo"][i], results["predictions"]["C-Diff"][i], results["predictions"]["l2"][i],
                 confidence.expand(3, -1, -1), data["discrepancy"][i].float().mul(2).sub(1).expand(3, -1, -1)]
        rows.append(np.concatenate([to_uint8(t.permute(1, 2, 0).numpy()) for t in tiles], axis=1))
    return np.concatenate(rows, axis=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="the C-Diff arm, a native file (default: %(default)s)")
    parser.add_argument("--ablation", default=str(ABLATION_MODEL),
                        help="the plain-L2 arm, a native file (default: %(default)s)")
    parser.add_argument("--train-ablation", action="store_true",
                        help="first train the L2 arm into --ablation: tools/train_demo.py --loss mse --vae MODEL")
    parser.add_argument("--npde", default=str(STUDY / "npde_synthetic.json"),
                        help="the S2O-NPDE entry of tools/train_npde_demo.py ('': none; default: %(default)s)")
    parser.add_argument("--scenes", type=int, default=ReportProtocol.scenes, help="held-out scenes (default: %(default)s)")
    parser.add_argument("--out", default=str(STUDY / "synthetic_report.md"), help="the report (default: %(default)s); "
                        "its .json and PNGs are written beside it")
    parser.add_argument("--note", default="", help="a paragraph to put under the report's title (e.g. which models it used and why)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; the numbers depend on it (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train_ablation:
        from tools.train_demo import main as train_demo

        train_demo(["--loss", "mse", "--vae", args.model, "--out", args.ablation, "--threads", str(args.threads)])
    for path, hint in ((args.model, "the bundled model"), (args.ablation, "make it with --train-ablation")):
        if not Path(path).is_file():
            raise SystemExit(f"synthetic_report: error: {path}: not found ({hint})")
    protocol = ReportProtocol(scenes=args.scenes)
    npde = json.loads(Path(args.npde).read_text()) if args.npde else None
    if npde is not None and (npde["heldout"]["count"] > protocol.scenes or npde["heldout"]["first_seed"] != HELDOUT_SEED):
        raise SystemExit(f"synthetic_report: error: {args.npde} scores {npde['heldout']['count']} scenes from seed "
                         f"{npde['heldout']['first_seed']}; this report has {protocol.scenes} from {HELDOUT_SEED}: "
                         "raise --scenes, or leave the entry out with --npde ''")
    pipelines = {arm: load_pipeline(path, dtype=torch.float32) for arm, path in zip(ARMS, (args.model, args.ablation))}
    start = time.perf_counter()
    data = heldout(protocol)
    results = measure(pipelines, data, protocol, npde)
    sources = {arm: describe_model(Path(p)) for arm, p in zip(ARMS, (args.model, args.ablation))}
    write_report(Path(args.out), data, results, protocol, sources, args.threads, time.perf_counter() - start, args.note)
    return 0


def describe_model(path: Path) -> dict:
    """The file's name, sha256 and, from its .json record, how it was trained."""
    record_path = path.with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    recorded = record.get("scores", {}).get("heldout", {})
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "command": record.get("training", {}).get("command"), "seconds": record.get("training", {}).get("seconds"),
            "recorded": {"protocol": recorded.get("protocol"), "scores": recorded.get("model")} if recorded else None}


def write_report(out: Path, data: dict, results: dict, protocol: ReportProtocol, sources: dict, threads: int, seconds: float,
                 note: str = "") -> None:
    """The markdown report, its numbers as JSON, the reliability diagram and the example panel, beside ``out``."""
    stem = out.with_suffix("")
    plot = Path(f"{stem}_reliability.png")
    examples = Path(f"{stem}_examples.png")
    calibration = results["calibration"]["C-Diff"]
    draw_reliability(plot, {"C-Diff model, t in " + ", ".join(map(str, protocol.calibration_t)): calibration["bins"]},
                     "Reliability of the predicted variance (held-out synthetic scenes)", reference=calibration["constant"])
    write_png(examples, panel(data, results))
    numbers = {key: value for key, value in results.items() if key not in ("predictions", "confidence")}
    numbers["translation"] = {arm: summarize(v) for arm, v in results["translation"].items()}
    numbers["baselines"] = {name: summarize(v) for name, v in results["baselines"].items()}
    numbers["difference"] = summarize(results["difference"])
    numbers["vae"] = summarize(results["vae"])
    numbers["ceiling"] = {name: summarize(v) for name, v in results["ceiling"].items()}
    numbers["confidence"] = {arm: {k: v for k, v in c.items() if k != "variance"} for arm, c in results["confidence"].items()}
    context = {"protocol": asdict(protocol), "models": sources, "threads": threads, "seconds": round(seconds),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "plot": plot.name, "examples": examples.name,
               "numbers_file": out.with_suffix(".json").name, "note": note}
    write_text(out.with_suffix(".json"), json.dumps({**context, **numbers}, indent=1) + "\n")
    write_text(out, render({**context, **numbers}))
    print(f"synthetic_report: {out}, {out.with_suffix('.json').name}, {plot.name}, {examples.name} ({seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
