"""Estimate the GPU-hours of ``cdiff distill`` at SD 2.1 size from FLOP counts, for each configs/distill-*.toml,
and write them to configs/distill-gpu-hours.md (beside the configs).

    python -m tools.distill_cost

No GPU figure of a distillation step exists yet, so this is an estimate, made so: the FLOPs of one U-Net
forward and of one forward + backward of the C-DiffSET U-Net (SD 2.1, 8-in/5-out, 6-token prompt) at the
config's latent size are counted with torch.utils.flop_counter.FlopCounterMode on the meta device (matrix
products and convolutions, attention included, 2 FLOPs per multiply-add; elementwise work not counted). A
distillation step per sample is the teacher's forward, the target network's forward (consistency) or a
second teacher forward (progressive; a third one after its first round for the variance), and the
student's forward + backward; the VAE is not counted (train from a latent cache: ``cdiff cache-latents``).
Hours = steps x batch x FLOPs per sample / (dense bf16 peak x an assumed model-FLOPs utilisation), for
30% and 50% utilisation (the range reported for well-tuned U-Net training; cdiff's own training step has no
GPU figure yet either: benchmarks/README.md), on an H100 SXM (989.5 TFLOP/s dense bf16) and an A100
(312). The same count for the teacher's own fine-tuning (forward + backward per sample) is given beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GPUS = {"H100 SXM": 989.5e12, "A100": 312e12}  # dense bf16 peaks (benchmarks/common.py's PEAK_TFLOPS)
UTILISATIONS = (0.3, 0.5)
LATENT_SIDES = {"qxs": 256, "sar2opt": 512, "spacenet6": 512}  # image side of each dataset's crop (configs/*.toml)


def unet_flops(side: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of the SD 2.1-sized C-DiffSET U-Net per sample at a latent side."""
    from torch.utils.flop_counter import FlopCounterMode

    from cdiff.config import UNetConfig
    from cdiff.unet import UNet

    with torch.device("meta"):
        unet = UNet(UNetConfig.cdiffset())
        x, t, context = torch.zeros(1, 8, side, side), torch.tensor([500]), torch.zeros(1, 6, 1024)
    counts = []
    for train in (False, True):
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(train):
            out = unet(x, t, context)
            if train:
                out.float().square().mean().backward()
        counts.append(counter.get_total_flops())
    return counts[0], counts[1]


def estimate(config_path: Path) -> dict:
    from cdiff.train import load_config

    config = load_config(config_path)
    model, train = config.model, config.train
    image = config.data.crop or LATENT_SIDES.get(config.data.kind, config.data.size)
    forward, both = unet_flops(image // 8)
    forwards = 2 if model.method == "consistency" else 2 + (model.confidence == "variance") * (model.rounds > 1)
    per_sample = forwards * forward + both
    samples = train.steps * train.batch_size * train.accumulation
    total = samples * per_sample
    hours = {gpu: [total / (peak * u) / 3600 for u in UTILISATIONS] for gpu, peak in GPUS.items()}
    return {"config": config_path.name, "method": model.method, "image": image, "batch": train.batch_size * train.accumulation,
            "steps": train.steps, "forward_gflop": forward / 1e9, "sample_gflop": per_sample / 1e9,
            "total_pflop": total / 1e15, "hours": hours, "teacher_step_gflop": both / 1e9}


def render(rows: list[dict]) -> str:
    lines = [
        "# GPU-hours of `cdiff distill` at SD 2.1 size: an estimate from FLOP counts",
        "",
        "Written by `python -m tools.distill_cost` (its docstring says how). **No GPU has run a distillation "
        "step yet: these hours are an estimate**, from counted FLOPs and an assumed utilisation of the GPU's "
        "dense bf16 peak (30% and 50%), not a measurement. The configs' own step counts and batches; the VAE "
        "not counted (train from a latent cache).",
        "",
        "| config | method | image px | global batch | steps | U-Net forward GFLOP / sample | distillation "
        "GFLOP / sample | total PFLOP | H100 SXM hours (50% / 30%) | A100 hours (50% / 30%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h100, a100 = r["hours"]["H100 SXM"], r["hours"]["A100"]
        lines.append(f"| `{r['config']}` | {r['method']} | {r['image']} | {r['batch']} | {r['steps']:,} | "
                     f"{r['forward_gflop']:.0f} | {r['sample_gflop']:.0f} | {r['total_pflop']:,.0f} | "
                     f"{h100[1]:.2g} / {h100[0]:.2g} | {a100[1]:.2g} / {a100[0]:.2g} |")
    lines += [
        "",
        "For scale: one fine-tuning step of the teacher costs forward + backward, "
        + ", ".join(f"{r['teacher_step_gflop']:.0f} GFLOP per sample at {r['image']} px" for r in rows[:1])
        + "; a consistency distillation step costs about 5/3 of it per sample (two more forwards). LCM (Luo et "
        "al. 2023) reports about 32 A100-hours for its 4,000 iterations at 768 px.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "configs" / "distill-gpu-hours.md"), help="(default: %(default)s)")
    args = parser.parse_args(argv)
    configs = [p for p in sorted((ROOT / "configs").glob("distill-*.toml")) if "tiny" not in p.name]
    rows = [estimate(p) for p in configs]
    text = render(rows)
    from cdiff.files import write_text

    write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
