"""Train a tiny S2O-NPDE on the demo model's synthetic data and score it on the held-out pairs.

    python -m tools.train_npde_demo                        # 4,000 steps: about 10 minutes on one CPU thread
    python -m tools.train_npde_demo --steps 200 --heldout 10 --out /tmp/npde.json   # a quick look

Writes a small JSON (default studies/synthetic/npde_synthetic.json) for the report entry "S2O-NPDE vs
the tiny C-DiffSET" of studies/synthetic/synthetic_report.md: PSNR, SSIM, SCC, images/s and parameters.

Data, the same as the bundled demo C-DiffSET model's (tools/demo_vae.py): training scene i is
``make_pair(i)`` for i in 0 .. scenes - 1, held-out scene j is ``make_pair(HELDOUT_SEED + j)``,
128 px, with cdiff.SyntheticPairs' defaults (speckle, discrepancies, misregistrations), SAR
repeated to 3 channels.

Training: `cdiff train`'s own machinery (cdiff.train.train) on configs/s2o_npde-synthetic-tiny.toml:
the tiny preset (8 base channels, the paper's structure), random CROP-px windows and horizontal
flips, batch 1, Adam(0.5, 0.999) with the lr constant for half the steps then linearly to 0, no
perceptual loss (no VGG weights can be downloaded here), seed 2025, one thread: the same run
gives the same weights on the same machine.

Scores: the last checkpoint's generator on the held-out scenes at full size, batch 1, through
cdiff.npde.translate_image. PSNR, SSIM and SCC are computed as `cdiff evaluate` computes them from
the 8-bit PNGs `cdiff translate` writes (prediction and target rounded to 8 bits, (x + 1) / 2
scaling) and averaged over the scenes. images/s: the median over the held-out scenes of one
generator pass each, after one warm-up pass, on the training thread count. Parameters: the
generator (what translation runs) and all four networks (what training updates). For scale,
``baseline_mean_colour`` scores one constant image, the mean training EO colour.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cdiff.data.synth import make_pair
from cdiff.demo import HELDOUT_SEED  # the demo's first held-out scene, far above any training seed
from cdiff.metrics import image_metrics
from cdiff.npde import load_generator, load_model, translate_image
from cdiff.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "s2o_npde-synthetic-tiny.toml"


def heldout_pair(index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(SAR (1, 3, size, size), EO (1, 3, size, size)) of held-out scene ``index``, in [-1, 1]."""
    pair = make_pair(HELDOUT_SEED + index, size=size)
    sar = torch.from_numpy(pair.sar)[None, None].expand(1, 3, -1, -1)
    eo = torch.from_numpy(pair.eo.transpose(2, 0, 1).copy())[None]
    return sar, eo


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the [0, 1] values of the 8-bit PNG `cdiff translate` writes (cdiff.data.to_uint8)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255) / 255


def score(model_file: Path, count: int, size: int) -> dict:
    """Mean PSNR, SSIM, SCC over held-out scenes 0 .. count - 1, and the generator's images/s."""
    generator = load_generator(model_file)
    sums, seconds = {}, []
    translate_image(generator, heldout_pair(0, size)[0])  # warm-up
    for index in range(count):
        sar, eo = heldout_pair(index, size)
        start = time.perf_counter()
        prediction = translate_image(generator, sar)
        seconds.append(time.perf_counter() - start)
        for name, value in image_metrics(eight_bit(prediction), eight_bit(eo)).items():
            sums[name] = sums.get(name, 0.0) + float(value.sum())
    return {**{name: total / count for name, total in sums.items()}, "images_per_s": 1 / statistics.median(seconds)}


def mean_colour_baseline(count: int, size: int, scenes: int = 100) -> dict:
    """The scores of one constant image, the mean EO colour of the first ``scenes`` training scenes:
    what a model that has learnt nothing from the SAR gets."""
    colour = sum(torch.from_numpy(make_pair(i, size=size).eo).mean((0, 1)) for i in range(scenes)) / scenes
    sums = {}
    for index in range(count):
        eo = heldout_pair(index, size)[1]
        for name, value in image_metrics(eight_bit(colour.view(1, 3, 1, 1).expand_as(eo)), eight_bit(eo)).items():
            sums[name] = sums.get(name, 0.0) + float(value.sum())
    return {name: round(total / count, 4) for name, total in sums.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4000, help="optimiser steps of batch 1 (default: %(default)s)")
    parser.add_argument("--scenes", type=int, default=1000,
                        help="training scenes, seeds 0 .. N - 1 (default: %(default)s)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out scenes scored (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="scene side in px (default: %(default)s, the demo's)")
    parser.add_argument("--crop", type=int, default=64, help="training window side in px (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam lr of both sides (default: %(default)s, the paper's)")
    parser.add_argument("--channels", type=int, default=8,
                        help="base channels of the generators and discriminators (default: %(default)s, the tiny preset)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--run-dir", help="keep the training run here (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "studies" / "synthetic" / "npde_synthetic.json"),
                        help="the JSON to write (default: %(default)s)")
    a = parser.parse_args(argv)

    torch.set_num_threads(a.threads)
    sets = [f"model.base_channels={a.channels}", f"model.disc_channels={a.channels}", f"data.count={a.scenes}", f"data.size={a.size}", f"data.crop={a.crop}", f"optim.lr={a.lr}",
            f"train.steps={a.steps}", f"train.save_every={a.steps}", f"train.log_every={max(1, a.steps // 20)}",
            "val.every=0"]
    config = load_config(CONFIG, sets)
    with tempfile.TemporaryDirectory(prefix="npde-demo-") as scratch:
        run_dir = Path(a.run_dir) if a.run_dir else Path(scratch) / "run"
        start = time.perf_counter()
        done = train(config, run_dir)
        train_seconds = time.perf_counter() - start
        model_file = done.checkpoint / "model.safetensors"
        scores = score(model_file, a.heldout, a.size)
        model = load_model(model_file)
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    last = [r for r in log if r["kind"] == "train"][-1]
    result = {
        "model": "S2O-NPDE, tiny preset (configs/s2o_npde-synthetic-tiny.toml)",
        "psnr": round(scores["psnr"], 3), "ssim": round(scores["ssim"], 4), "scc": round(scores["scc"], 4),
        "images_per_s": round(scores["images_per_s"], 2),
        "parameters": sum(p.numel() for p in model.generator.parameters()),
        "parameters_training": sum(p.numel() for p in model.parameters()),
        "baseline_mean_colour": mean_colour_baseline(a.heldout, a.size),
        "heldout": {"first_seed": HELDOUT_SEED, "count": a.heldout, "size": a.size},
        "training": {"scenes": a.scenes, "crop": a.crop, "steps": a.steps, "batch_size": 1, "lr": a.lr,
                     "seconds": round(train_seconds, 1), "last_pixel_loss": round(last["pixel"], 4)},
        "protocol": "8-bit outputs and targets, (x + 1) / 2 scaling, batch 1, means over scenes",
        "device": f"cpu, {a.threads} thread(s), {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
