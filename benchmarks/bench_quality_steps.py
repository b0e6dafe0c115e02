"""Quality against sampler steps: DDIM and DPM-Solver++(2M) at a few step counts, against DDIM-50.

    python -m benchmarks.bench_quality_steps --model weights/cdiff-demo-tiny.safetensors
    python -m benchmarks.bench_quality_steps --model tiny --pairs 2 --size 64 --steps 2 5   # plumbing only

Protocol: ``--pairs`` held-out synthetic pairs (cdiff.data.SyntheticPairs from seed
``--first-seed``, by default cdiff.demo.HELDOUT_SEED, the demo's held-out scenes), ``--size`` px. Every pair starts
from the same noise (seeded by its index) under every sampler and step count, so the runs differ
only in how they integrate. For each sampler and step count: the mean PSNR (dB), SSIM and SCC of
the translation against the true EO image (cdiff.metrics, images in [0, 1]), the PSNR against
the DDIM-50 translation of the same pair and noise (how close it comes to the release's
setting), and seconds per image. ``--model tiny`` runs cdiff's tiny stack with seeded random
weights: the numbers then only show the script works. Rows go to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks import common
from cdiff.data.synth import SyntheticPairs
from cdiff.demo import HELDOUT_SEED
from cdiff.metrics import image_metrics, psnr, to_unit

REFERENCE = ("ddim", 50)


def load(model: str, device):
    if model == "tiny":
        from cdiff.testing import tiny_pipeline

        return tiny_pipeline(0).to(device)
    import cdiff

    if not Path(model).exists():
        raise SystemExit(f"bench_quality_steps: error: model file not found: {model}")
    # The file's own dtype (the demo model is stored in fp16) would run CPU half precision, slow
    # and not what a CPU user runs: fp32 on the CPU, fp16 on a GPU.
    return cdiff.load_pipeline(model, device=device, dtype=torch.float32 if device.type == "cpu" else torch.float16)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="weights/cdiff-demo-tiny.safetensors",
                        help="a model file cdiff.load_pipeline reads, or 'tiny' (seeded random weights)")
    common.add_common_arguments(parser)
    parser.add_argument("--pairs", type=int, default=16, help="held-out pairs (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="image side in px, a multiple of 64 (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=HELDOUT_SEED,
                        help="seed of the first held-out pair (default: %(default)s, the demo's held-out scenes)")
    parser.add_argument("--samplers", nargs="+", choices=("ddim", "dpmpp_2m"), default=["ddim", "dpmpp_2m"])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50], help="step counts (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per translate call (default: %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    common.apply_threads(args)
    if args.size % 64:
        parser.error("--size must be a multiple of 64")
    pipe = load(args.model, device)
    pairs = SyntheticPairs(args.pairs, size=args.size, seed=args.first_seed)
    sar = torch.stack([pairs[i]["sar"] for i in range(args.pairs)]).to(device)  # (N, 3, H, W) in [-1, 1]
    eo = torch.stack([pairs[i]["eo"] for i in range(args.pairs)]).to(device)
    side = args.size // 8
    noise = torch.stack([torch.randn(4, side, side, generator=torch.Generator().manual_seed(i)) for i in range(args.pairs)])

    def translate(sampler: str, steps: int) -> tuple[torch.Tensor, float]:
        outputs, start = [], time.perf_counter()
        for first in range(0, args.pairs, args.batch):
            chunk = slice(first, first + args.batch)
            outputs.append(pipe.translate(sar[chunk], steps=steps, sampler=sampler, latents=noise[chunk]).eo.float())
        common.sync(device)
        return torch.cat(outputs), (time.perf_counter() - start) / args.pairs

    print(common.header(device, f"Quality against steps, model {args.model}, {args.pairs} held-out synthetic pairs "
                                f"of {args.size} px from seed {args.first_seed}"))
    reference, _ = translate(*REFERENCE)
    print("| sampler | steps | PSNR dB | SSIM | SCC | PSNR vs DDIM-50 dB | s/image |\n|---|---|---|---|---|---|---|")
    rows, report = [], {}
    for sampler in args.samplers:
        for steps in args.steps:
            images, seconds = (reference, None) if (sampler, steps) == REFERENCE else translate(sampler, steps)
            scores = {k: v.mean().item() for k, v in image_metrics(to_unit(images), to_unit(eo)).items()}
            agreement = psnr(to_unit(images), to_unit(reference)).clamp(max=99.0).mean().item()
            timing = f"{seconds:.3f}" if seconds is not None else "(reference)"
            print(f"| {sampler} | {steps} | {scores['psnr']:.2f} | {scores['ssim']:.4f} | {scores['scc']:.4f} | "
                  f"{agreement:.2f} | {timing} |")
            report[(sampler, steps)] = dict(scores, psnr_vs_ddim50=agreement)
            rows.append(dict(figure="quality_steps", impl=f"{sampler}-{steps}", device=common.device_name(device),
                             dtype=str(next(pipe.unet.parameters()).dtype).removeprefix("torch."),
                             settings=f"model={Path(args.model).name} pairs={args.pairs} size={args.size} "
                                      f"psnr={scores['psnr']:.3f} ssim={scores['ssim']:.4f} scc={scores['scc']:.4f} "
                                      f"psnr_vs_ddim50={agreement:.3f}",
                             ms=seconds * 1e3 if seconds is not None else None, cpu_load=common.cpu_load()))
    common.append_csv(args.csv, rows, __file__)
    return report


if __name__ == "__main__":
    main()
