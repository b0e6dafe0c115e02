"""Regenerate studies/synthetic/synthetic_report.md: the C-DiffSET paper's claims measured where the truth is known.

    nice -n 10 python -m studies.synthetic.report          # about a quarter of an hour of one CPU thread

(from the repository's root folder, or with cdiff installed).

Inputs: the bundled demo model (weights/cdiff-demo-tiny.safetensors: the U-Net predicts the noise
and a variance, C-Diff loss); its x0 variant (weights/cdiff-demo-tiny-x0.safetensors, reported
only where labelled); the loss ablation's training runs (``--runs``, default the git-ignored
runs-ablation/ that ``python -m studies.synthetic.ablation_seeds`` fills: the C-Diff and plain-L2
arms of the demo recipe, seeds 0-2, the bundled model standing for C-Diff seed 0); the S2O-NPDE
entry (studies/synthetic/npde_synthetic.json, from tools/train_npde_demo.py). Outputs: the
report, its numbers as JSON beside it, the reliability diagram and a panel of example scenes.

Everything is measured on held-out scenes ``make_pair(HELDOUT_SEED + i)``, i < scenes
(HELDOUT_SEED = 1,000,000; training used seeds below 2,000), and on the hallucination set
(studies/synthetic/hallucination.py, seeds from 2,000,000); every random draw is seeded: the same
command on the same machine and thread count writes the same numbers.
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

from cdiff.confidence_map import release_grey
from cdiff.data.imageio import to_uint8, write_png
from cdiff.data.synth import redraw_eo
from cdiff.demo import DEMO_MODEL, HELDOUT_SEED, SCORE_PROTOCOLS, Protocol, eo_batch, heldout_pairs, mean_eo_image, sar_batch, translate
from cdiff.files import write_text
from cdiff.load import load_pipeline
from cdiff.metrics import image_metrics, to_unit
from cdiff.pipeline import confidence_step
from cdiff.samplers import make_sampler
from cdiff.schedulers import DDPM
from studies.synthetic import ablation_seeds
from studies.synthetic.hallucination import MEASURES, hallucination_scores, hallucination_set, object_free
from studies.synthetic.markdown import render
from studies.synthetic.measures import (
    across_runs, auroc, best_constant_variance, bootstrap_auroc, gaussian_nll, latent_mask, one_step, permutation_p,
    reliability_bins,
)
from studies.synthetic.reliability_plot import draw_reliability
from studies.synthetic.user_confidence import map_confidence, translate_maps, user_scenes
from tools.train_npde_demo import eight_bit

ROOT = Path(__file__).resolve().parents[2]
STUDY = Path(__file__).resolve().parent  # the report, its numbers and pictures, the S2O-NPDE entry
X0_MODEL = ROOT / "weights" / "cdiff-demo-tiny-x0.safetensors"
RUNS = ROOT / "runs-ablation"  # ablation_seeds' default
MODELS = ("bundled", "x0 variant")  # the bundled epsilon model; the x0 variant, labelled wherever it appears
ARMS = {"cdiff": "C-Diff", "l2": "l2"}  # ablation_seeds' arms, as the report names them
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "scc": True, "psnr_objects": True, "psnr_eo_only": True,
                    "hallucinated": False, "spurious_pixels": False, "spurious_objects": False}


@dataclass(frozen=True)
class ReportProtocol:
    """How every number of the report is measured."""

    scenes: int = 64  # held-out scenes, seeds HELDOUT_SEED .. HELDOUT_SEED + scenes - 1
    size: int = 128  # scene side in px (the training size)
    steps: int = 20  # DDIM steps (eta 0) of the translations, as `cdiff demo`
    seed: int = 0  # the translations' starting noise (cdiff.demo.translate), the same for every model
    map_steps: tuple[int, ...] = (20, 50)  # claim 2's headline: translate's confidence maps at these DDIM step counts
    map_seed: int = 0  # translate's --seed for them (each scene's noise: that and the scene's name)
    confidence_t: int = 500  # the teacher-forced diagnostic: the EO latent noised to t = T/2, one U-Net call
    error_draws: int = 16  # noise draws averaged into the expected squared error at that call (noise seeds noise_seed + t + k)
    calibration_t: tuple[int, ...] = (100, 300, 500, 700, 900)  # one U-Net call per scene at each
    noise_seed: int = 7  # the one-call protocols' noise: seed noise_seed + t
    mean_scenes: int = 1200  # training scenes averaged into the mean-EO-image baseline (the U-Net's data.count)
    bins: int = 10  # reliability bins, equal counts
    resamples: int = 200  # bootstrap resamples of scenes for the AUROC intervals
    speed_scenes: int = 8  # batch-1 translations timed for images/s (after one warm-up)
    object_margin: int = 3  # px kept clear around the true objects when looking for spurious ones
    oracle_draws: int = 32  # redrawn EO images per scene averaged into the oracle's posterior mean (claim 1's ceiling)
    oracle_seed: int = 11  # their generator's seed
    model_samples: int = 8  # translations (noise seeds seed .. seed + model_samples - 1) averaged per scene
    coverage: tuple[float, ...] = (0.125, 0.25)  # claim 2 by object coverage: positives cover more than this of a cell
    hallucination_scenes: int = 64  # scenes of the hallucination set (studies/synthetic/hallucination.py)
    ablation_seeds: tuple[int, ...] = (0, 1, 2)  # training seeds per arm


def log(message: str) -> None:
    print(f"synthetic_report: {message}", file=sys.stderr, flush=True)


def heldout(protocol: ReportProtocol) -> dict:
    """The held-out scenes: SAR, EO (B, 3, H, W) in [-1, 1], the masks (B, H, W) bool, and the
    scenes and names ``cdiff translate`` would read from ``cdiff synth``'s PNGs of them."""
    pairs = heldout_pairs(Protocol(scenes=protocol.scenes, size=protocol.size))
    masks = {name: torch.from_numpy(np.stack([getattr(p, name) for p in pairs]))
             for name in ("discrepancy", "eo_only", "sar_only", "misregistration")}
    scenes, names = user_scenes(pairs, [HELDOUT_SEED + i for i in range(protocol.scenes)])
    return {"sar": sar_batch(pairs), "eo": eo_batch(pairs), **masks, "scenes": scenes, "names": names,
            "object_free": object_free(pairs, protocol.object_margin)}


def summary(values) -> dict[str, float]:
    """Mean and standard error over scenes (NaN entries, e.g. scenes with an empty mask, left out)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"),
            "n": int(len(v))}


def image_scores(prediction: torch.Tensor, data: dict) -> dict:
    """Per-scene PSNR, SSIM and SCC of a prediction (B, 3, H, W) in [-1, 1] against the held-out targets."""
    return {name: v.tolist() for name, v in image_metrics(to_unit(prediction.float()), to_unit(data["eo"])).items()}


def user_confidence(model: Path, data: dict, protocol: ReportProtocol) -> dict:
    """Claim 2's headline: translate's grey confidence maps (studies/synthetic/user_confidence.py) at each of
    ``map_steps``, scored per pixel against each object mask; "grey" keeps the maps of the first step count."""
    masks = {name: data[name].numpy() for name in ("discrepancy", "eo_only", "sar_only", "misregistration")}
    result = {"t": {}}
    for steps in protocol.map_steps:
        log(f"{model.name}: translate's confidence maps, {steps} DDIM steps, {len(data['names'])} scenes")
        grey = translate_maps(model, data["scenes"], data["names"], steps, protocol.map_seed)
        result[steps] = map_confidence(grey, masks, protocol.resamples)
        result.setdefault("grey", grey)
        timesteps = make_sampler("ddim", DDPM(), steps, 0.0, "epsilon").timesteps
        result["t"][steps] = int(timesteps[confidence_step(timesteps, DDPM().num_train_timesteps)])  # the map's step
    return result


def teacher_forced(pipeline, data: dict, protocol: ReportProtocol) -> dict:
    """Claim 2's diagnostic (the paper's Figure 7 on training pairs): the ground-truth EO latent noised to
    t = T/2, one U-Net call; the variance per latent cell (low confidence) against the object masks, the
    same variance rendered as translate renders its maps and scored per pixel, and the AUROC of the U-Net's
    squared error at that call: of one noise draw, and averaged over ``error_draws`` draws (the expected error)."""
    t = protocol.confidence_t
    out = one_step(pipeline, data["sar"], data["eo"], t, protocol.noise_seed + t)
    variance = out["variance"][:, 0]  # (B, h, w)
    result = {}
    for name in ("discrepancy", "eo_only", "sar_only", "misregistration"):
        labels = latent_mask(data[name])
        result[name] = {"auroc": auroc(variance, labels), "interval": bootstrap_auroc(variance, labels, protocol.resamples),
                        "positive_cells": int(labels.sum()), "cells": labels.numel()}
    labels = latent_mask(data["discrepancy"])
    keep = ~latent_mask(data["misregistration"]) | labels  # misregistered cells out of the negatives
    result["discrepancy_vs_registered"] = {"auroc": auroc(variance[keep], labels[keep])}
    size = data["eo"].shape[-1]
    grey = np.stack([release_grey(1 / v, size, size) for v in variance])  # (B, H, W) uint8, as translate writes maps
    result["pixels"] = map_confidence(grey, {k: data[k].numpy() for k in ("discrepancy", "eo_only", "sar_only",
                                                                        "misregistration")}, protocol.resamples)
    error = (out["prediction"] - out["target"]).square().mean(1)  # (B, h, w)
    errors = [error] + [(o["prediction"] - o["target"]).square().mean(1) for o in
                        (one_step(pipeline, data["sar"], data["eo"], t, protocol.noise_seed + t + k)
                         for k in range(1, protocol.error_draws))]
    expected = torch.stack(errors).mean(0)  # (B, h, w): the squared error averaged over the noise draws
    result["error_auroc"] = auroc(error, labels)
    result["expected_error_auroc"] = auroc(expected, labels)
    result["expected_error_interval"] = bootstrap_auroc(expected, labels, protocol.resamples)
    coverage = F.avg_pool2d(data["discrepancy"].float()[:, None], 8)[:, 0]  # (B, h, w): the share of each cell
    result["by_coverage"] = {}
    for share in protocol.coverage:
        positive, negative = coverage > share, coverage == 0
        if positive.any():
            kept = positive | negative
            result["by_coverage"][str(share)] = {"cells": int(positive.sum()), "auroc": auroc(variance[kept], positive[kept]),
                                                 "expected_error_auroc": auroc(expected[kept], positive[kept])}
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


def ablation(runs: Path, data: dict, protocol: ReportProtocol, mean_image: torch.Tensor, bundled: Path,
             bundled_maps: dict) -> dict:
    """Claim 3, the paper's Table 3 over training seeds: every run of ``runs`` (ablation_seeds.summary: the
    records' PSNR / SSIM / SCC on the held-out scenes), translated on the hallucination set and scored there;
    the C-Diff runs' confidence maps as translate writes them (at ``protocol.steps``); per arm the mean and
    standard deviation across runs, and the arms compared run against run."""
    collected = ablation_seeds.summary(runs, list(protocol.ablation_seeds))
    hset = hallucination_set(protocol.hallucination_scenes, protocol.size, protocol.object_margin)
    sampling = Protocol(scenes=len(hset["sar"]), size=protocol.size, steps=protocol.steps, seed=protocol.seed)
    masks = {name: data[name].numpy() for name in ("discrepancy", "eo_only", "sar_only", "misregistration")}
    reference_vae = load_pipeline(bundled, dtype=torch.float32).vae.state_dict()
    per_run, same_vae = [], True
    for run in collected["runs"]:
        path = Path(run["file"]) if Path(run["file"]).is_absolute() else ROOT / run["file"]
        log(f"ablation: {run['arm']} seed {run['seed']} ({path.name}) on the hallucination set")
        pipeline = load_pipeline(path, dtype=torch.float32)
        vae = pipeline.vae.state_dict()
        same_vae &= vae.keys() == reference_vae.keys() and all(torch.equal(vae[k], reference_vae[k]) for k in vae)
        entry = {"arm": run["arm"], "seed": run["seed"], "file": run["file"], "heldout": run["heldout"],
                 "hallucination_set": hallucination_scores(translate(pipeline, hset["sar"], sampling).eo, hset)}
        if run["arm"] == "cdiff":  # the l2 arm's loss never trains the variance channel: it has no map
            maps = bundled_maps if path.resolve() == bundled.resolve() else map_confidence(
                translate_maps(path, data["scenes"], data["names"], protocol.steps, protocol.map_seed), masks, protocol.resamples)
            entry["map_auroc"] = maps["discrepancy"]["auroc"]
        per_run.append(entry)
    arms, compare = {}, {}
    for arm in ARMS:
        rows = [r for r in per_run if r["arm"] == arm]
        arms[arm] = {"seeds_done": [r["seed"] for r in rows],
                     "heldout": {m: across_runs([r["heldout"][m] for r in rows]) for m in ("psnr", "ssim", "scc")},
                     "hallucination_set": {m: across_runs([r["hallucination_set"][m] for r in rows]) for m in MEASURES}}
    arms["cdiff"]["map_auroc"] = across_runs([r["map_auroc"] for r in per_run if "map_auroc" in r])
    for group in ("heldout", "hallucination_set"):
        compare[group] = {m: compare_arms(arms["cdiff"][group][m]["values"], arms["l2"][group][m]["values"],
                                          HIGHER_IS_BETTER[m]) for m in arms["cdiff"][group]}
    return {"runs": per_run, "arms": arms, "compare": compare, "missing": collected["missing"], "same_vae": same_vae,
            "record_scenes": SCORE_PROTOCOLS["heldout"].scenes,  # the records' held-out scores: cdiff.demo's protocol
            "set": {"first_seed": hset["seeds"][0], "last_seed": hset["seeds"][1], "objects": hset["objects"],
                    "scenes": len(hset["sar"])},
            "baselines": {"mean EO image": hallucination_scores(mean_image.expand_as(hset["eo"]), hset),
                          "target": {k: v for k, v in hallucination_scores(hset["eo"], hset).items()
                                     if not k.startswith("psnr")}}}  # the target's PSNR is infinite


def compare_arms(cdiff: list[float], l2: list[float], higher_is_better: bool) -> dict:
    """C-Diff's runs against l2's: the difference of the means (C-Diff - l2), the exact permutation p-value,
    and whether every C-Diff run is better than every l2 run (the most three runs per arm can show)."""
    if len(cdiff) < 2 or len(l2) < 2:  # one run says nothing about the spread across runs
        return {"difference": float(np.mean(cdiff) - np.mean(l2)) if cdiff and l2 else None, "p": None,
                "cdiff_better_in_every_pair": None, "l2_better_in_every_pair": None}
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    return {"difference": float(np.mean(cdiff) - np.mean(l2)), "p": permutation_p(cdiff, l2),
            "cdiff_better_in_every_pair": all(better(c, l) for c in cdiff for l in l2),
            "l2_better_in_every_pair": all(better(l, c) for c in cdiff for l in l2)}


def measure(models: dict[str, Path], runs: Path, data: dict, protocol: ReportProtocol, npde: dict | None) -> dict:
    """Every number of the report, for ``models`` {"bundled": file, "x0 variant": file (optional)} and the
    ablation's ``runs`` folder."""
    pipelines = {name: load_pipeline(path, dtype=torch.float32) for name, path in models.items()}
    sampling = Protocol(scenes=protocol.scenes, size=protocol.size, steps=protocol.steps, seed=protocol.seed)
    log(f"translating {protocol.scenes} held-out scenes ({protocol.steps} DDIM steps) with {', '.join(models)}")
    predictions = {name: translate(pipe, data["sar"], sampling).eo.float() for name, pipe in pipelines.items()}
    mean_image = mean_eo_image(protocol.mean_scenes, protocol.size)
    bundled = pipelines["bundled"]
    results = {
        "translation": {name: image_scores(p, data) for name, p in predictions.items()},
        "baselines": {"mean EO image": image_scores(mean_image.expand_as(data["eo"]), data),
                      "SAR as RGB": image_scores(data["sar"], data)},
        "confidence": {name: user_confidence(path, data, protocol) for name, path in models.items()},
        "teacher_forced": {name: teacher_forced(pipe, data, protocol) for name, pipe in pipelines.items()},
    }
    log("calibration, the VAE's bound, the ceiling, speed")
    results.update({
        "calibration": calibration(bundled, data, protocol),
        "vae": vae_bound(bundled, data),
        "ceiling": ceiling(bundled, data, protocol, predictions["bundled"]),
        "speed": {"images_per_s": images_per_second(bundled, data, protocol),
                  "parameters_unet": sum(p.numel() for p in bundled.unet.parameters()),
                  "parameters": sum(p.numel() for m in (bundled.unet, bundled.vae) for p in m.parameters())},
        "predicts": {name: "clean latent (x0)" if pipe.prediction_type == "sample" else "noise"
                     for name, pipe in pipelines.items()},
    })
    results["ablation"] = ablation(runs, data, protocol, mean_image, models["bundled"],
                                   results["confidence"]["bundled"][protocol.steps])
    if npde is not None:
        results["npde"] = {"entry": npde, "cdiffset_8bit": npde_comparison(predictions["bundled"], data, npde)}
    results["predictions"] = predictions
    return results


def panel(data: dict, results: dict, scenes: int = 4) -> np.ndarray:
    """Rows of SAR | target | bundled model | x0 variant (if measured) | translate's confidence map of the
    bundled model (dark = low) | object masks (white), uint8 RGB."""
    rows = []
    grey = results["confidence"]["bundled"]["grey"]
    for i in range(min(scenes, len(data["eo"]))):
        tiles = [data["sar"][i], data["eo"][i], *[results["predictions"][name][i] for name in MODELS
                                                   if name in results["predictions"]]]
        row = [to_uint8(t.permute(1, 2, 0).numpy()) for t in tiles]
        row.append(np.repeat(grey[i][..., None], 3, axis=2))
        row.append(np.repeat(data["discrepancy"][i].numpy()[..., None], 3, axis=2).astype(np.uint8) * 255)
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="the bundled model, a native file (default: %(default)s)")
    parser.add_argument("--x0", default=str(X0_MODEL),
                        help="the x0 variant, reported where labelled ('': leave it out; default: %(default)s)")
    parser.add_argument("--runs", default=str(RUNS), help="the loss ablation's training runs, as "
                        "'python -m studies.synthetic.ablation_seeds --runs DIR' writes them (default: %(default)s)")
    parser.add_argument("--npde", default=str(STUDY / "npde_synthetic.json"),
                        help="the S2O-NPDE entry of tools/train_npde_demo.py ('': none; default: %(default)s)")
    parser.add_argument("--scenes", type=int, default=ReportProtocol.scenes, help="held-out scenes (default: %(default)s)")
    parser.add_argument("--out", default=str(STUDY / "synthetic_report.md"), help="the report (default: %(default)s); "
                        "its .json and PNGs are written beside it")
    parser.add_argument("--note", default="", help="a paragraph to put under the report's title (e.g. which models it used and why)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; the numbers depend on it (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {"bundled": Path(args.model)} | ({"x0 variant": Path(args.x0)} if args.x0 else {})
    for name, path in models.items():
        if not path.is_file():
            raise SystemExit(f"synthetic_report: error: {path}: not found (the {name} model; --model / --x0)")
    if not Path(args.runs).is_dir():
        raise SystemExit(f"synthetic_report: error: --runs {args.runs}: no such folder; train the ablation's runs "
                         f"into it with: nice -n 10 python -m studies.synthetic.ablation_seeds --runs {args.runs}")
    protocol = ReportProtocol(scenes=args.scenes)
    npde = json.loads(Path(args.npde).read_text()) if args.npde else None
    if npde is not None and (npde["heldout"]["count"] > protocol.scenes or npde["heldout"]["first_seed"] != HELDOUT_SEED):
        raise SystemExit(f"synthetic_report: error: {args.npde} scores {npde['heldout']['count']} scenes from seed "
                         f"{npde['heldout']['first_seed']}; this report has {protocol.scenes} from {HELDOUT_SEED}: "
                         "raise --scenes, or leave the entry out with --npde ''")
    start = time.perf_counter()
    data = heldout(protocol)
    results = measure(models, Path(args.runs), data, protocol, npde)
    sources = {name: describe_model(path) for name, path in models.items()}
    runs = Path(args.runs).absolute()
    write_report(Path(args.out), data, results, protocol, sources, args.threads, time.perf_counter() - start, args.note,
                 str(runs.relative_to(ROOT)) if runs.is_relative_to(ROOT) else str(runs))
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
                 note: str = "", runs: str = "") -> None:
    """The markdown report, its numbers as JSON, the reliability diagram and the example panel, beside ``out``.
    The markdown is rendered from the JSON's numbers, read back: the JSON alone can rewrite it."""
    stem = out.with_suffix("")
    plot = Path(f"{stem}_reliability.png")
    examples = Path(f"{stem}_examples.png")
    calibration = results["calibration"]
    draw_reliability(plot, {"bundled model, t in " + ", ".join(map(str, protocol.calibration_t)): calibration["bins"]},
                     "Reliability of the predicted variance (held-out synthetic scenes)", reference=calibration["constant"])
    write_png(examples, panel(data, results))
    numbers = {key: value for key, value in results.items() if key not in ("predictions", "confidence")}
    numbers["translation"] = {name: summarize(v) for name, v in results["translation"].items()}
    numbers["baselines"] = {name: summarize(v) for name, v in results["baselines"].items()}
    numbers["vae"] = summarize(results["vae"])
    numbers["ceiling"] = {name: summarize(v) for name, v in results["ceiling"].items()}
    numbers["confidence"] = {name: {str(k): v for k, v in c.items() if k != "grey"} for name, c in results["confidence"].items()}
    context = {"protocol": asdict(protocol), "models": sources, "threads": threads, "seconds": round(seconds),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "plot": plot.name, "examples": examples.name, "runs": runs,
               "numbers_file": out.with_suffix(".json").name, "note": note}
    text = json.dumps({**context, **numbers}, indent=1) + "\n"
    write_text(out.with_suffix(".json"), text)
    write_text(out, render(json.loads(text)))
    print(f"synthetic_report: {out}, {out.with_suffix('.json').name}, {plot.name}, {examples.name} ({seconds:.0f} s)")


def summarize(scores: dict) -> dict:
    """Per-scene lists -> mean and standard error over scenes."""
    return {name: summary(v) for name, v in scores.items()}


if __name__ == "__main__":
    sys.exit(main())
