"""Benchmark of the U-Net's attention backends and gradient checkpointing: time and peak memory.

    python benchmarks/bench_unet.py                     # SD 2.1 (C-DiffSET 8-in/5-out) on a GPU
    python benchmarks/bench_unet.py --preset tiny       # what runs on a CPU

Two measurements, each with random weights (seeded) and random inputs:

1. Inference at SD 2.1-768's size (96x96 latents, 77-token context, batch 2) in ``--dtype``
   (fp16 by default): SDPA against the math path, which materialises fp32 L x L scores (what
   ``upcast_attention`` used to force on every layer). Reports ms, peak memory, and the max
   abs error of each against the same model in fp32 (SDPA), over the fp32 output's max abs.
2. One training step (forward + backward of a sum) at 64x64 latents (512-px crops), batch
   ``--batch``, in bf16 autocast: gradient checkpointing off and on. Reports ms and peak memory.

Times are medians over ``--repeats`` after warm-up, synchronised (CUDA events). No targets:
issue 11 asks for the switch and its equality (tests/test_unet_changes.py), this measures its cost.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cdiff.attention import attention_backend  # noqa: E402
from cdiff.config import UNetConfig  # noqa: E402
from cdiff.unet import UNet  # noqa: E402
from tools.random_sd21 import randomize_  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def measure(step, device, repeats: int) -> tuple[float, float]:
    """(median ms, peak memory in GiB above the starting allocation) of ``step()``."""
    for _ in range(2):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("sd21", "tiny"), default=None, help="default: sd21 on a GPU, tiny on a CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="inference dtype (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="training batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("sd21" if device.type == "cuda" else "tiny")
    config = UNetConfig.cdiffset() if preset == "sd21" else UNetConfig.tiny(in_channels=8, out_channels=5)
    side, train_side = (96, 64) if preset == "sd21" else (32, 16)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    print(f"{name}; Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"U-Net {preset} 8-in/5-out, median of {args.repeats}")

    gen = torch.Generator().manual_seed(0)
    unet = randomize_(UNet(config), 0).to(device).eval()
    sample = torch.randn(2, 8, side, side, generator=gen).to(device)
    context = torch.randn(2, 77, config.context_dim, generator=gen).to(device)
    t = torch.tensor([10, 900], device=device)
    with torch.no_grad():
        reference = unet(sample, t, context).double()
        dtype = DTYPES[args.dtype]
        half = unet.to(dtype)
        print(f"\n1. inference, {side}x{side} latents, batch 2, {args.dtype}")
        print("| backend | ms | peak GiB | max abs err / max abs (vs fp32) |\n|---|---|---|---|")
        for backend in ("sdpa", "math"):
            with attention_backend(backend):
                ms, peak = measure(lambda: half(sample.to(dtype), t, context.to(dtype)), device, args.repeats)
                out = half(sample.to(dtype), t, context.to(dtype)).double()
            err = ((out - reference).abs().max() / reference.abs().max()).item()
            print(f"| {backend} | {ms:.1f} | {peak:.2f} | {err:.2e} |")
    del half, reference

    unet = unet.float().train()
    sample = torch.randn(args.batch, 8, train_side, train_side, generator=gen).to(device)
    context = torch.randn(args.batch, 6, config.context_dim, generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)

    def train_step():
        unet.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = unet(sample, t, context)
        out.float().square().mean().backward()

    print(f"\n2. training step, {train_side}x{train_side} latents, batch {args.batch}, bf16 autocast, SDPA")
    print("| gradient checkpointing | ms | peak GiB |\n|---|---|---|")
    for enabled in (False, True):
        unet.gradient_checkpointing(enabled)
        ms, peak = measure(train_step, device, args.repeats)
        print(f"| {'on' if enabled else 'off'} | {ms:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
