"""Benchmark of GroupNorm + SiLU: the fused Triton kernel against PyTorch's ops, NCHW and channels-last.

    python -m benchmarks.bench_group_norm                    # GPU: fp16, the SD shapes below
    python -m benchmarks.bench_group_norm --dtype bf16 --backward

Shapes are the U-Net's and the VAE's largest GroupNorm inputs at 512 px, batch ``--batch``:
U-Net level 0 (320 ch, 64x64), level 1 (640 ch, 32x32), level 2 (1280 ch, 16x16); VAE decoder
last levels (256 ch, 256x256; 128 ch, 512x512). 32 groups, eps 1e-6, SiLU after.

Implementations, timed interleaved (median of ``--repeats`` after ``--warmup``):
- ``torch-nchw``: cdiff.layers.group_norm_reference on NCHW input (PyTorch's GroupNorm, SiLU);
- ``torch-cl``: the same on channels-last input (on CUDA, PyTorch copies it to NCHW and back);
- ``triton-nchw``, ``triton-cl``: the fused kernel (kernels/group_norm_silu.py) on each layout.
Forward only by default; ``--backward`` times forward + backward (input, weight and bias grads).

Reports ms and GB/s against a byte model: forward reads x twice (statistics, then normalisation)
and writes y once, 3 x numel x element size; forward + backward adds reading x and dy twice and
writing dx once, 5 x numel x element size more. The kernel is switched on by default
(CDIFF_GROUP_NORM=triton) only when this benchmark shows it faster on a GPU. Without a GPU it
times the PyTorch reference only (the kernel runs on the CPU only in Triton's interpreter).
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks import common
from cdiff.layers import group_norm_reference

CL = torch.channels_last
SHAPES = {  # (C, H, W) at 512 px
    "unet-level-0": (320, 64, 64),
    "unet-level-1": (640, 32, 32),
    "unet-level-2": (1280, 16, 16),
    "vae-decoder-256": (256, 256, 256),
    "vae-decoder-512": (128, 512, 512),
}
GROUPS, EPS = 32, 1e-6


def implementations(device, interpret: bool) -> dict:
    impls = {"torch-nchw": (group_norm_reference, torch.contiguous_format),
             "torch-cl": (group_norm_reference, CL)}
    if device.type == "cuda" or interpret:
        from cdiff.kernels.group_norm_silu import group_norm_silu

        impls["triton-nchw"] = (group_norm_silu, torch.contiguous_format)
        impls["triton-cl"] = (group_norm_silu, CL)
    return impls


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    common.add_common_arguments(parser, repeats=20 if cuda else 3, warmup=5 if cuda else 1)
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default=None, help="default: fp16 on a GPU, fp32 on a CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on a GPU, 1 on a CPU")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None, help="default: all on a GPU, the U-Net's on a CPU")
    parser.add_argument("--scale", type=int, default=1, help="divide H and W by this (small runs: tests)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    common.apply_threads(args)
    on_gpu = device.type == "cuda"
    interpret = not on_gpu and os.environ.get("TRITON_INTERPRET") == "1"
    dtype = common.DTYPES[args.dtype or ("fp16" if on_gpu else "fp32")]
    batch = args.batch or (2 if on_gpu else 1)
    shapes = args.shapes or (list(SHAPES) if on_gpu else ["unet-level-0", "unet-level-1", "unet-level-2"])
    impls = implementations(device, interpret)
    mode = "forward + backward" if args.backward else "forward"
    print(common.header(device, f"GroupNorm + SiLU benchmark, {mode}, {str(dtype).removeprefix('torch.')}, batch {batch}, "
                                f"{GROUPS} groups; median of {args.repeats} interleaved rounds"))
    if not on_gpu:
        print("no CUDA device: " + ("the kernel runs in Triton's interpreter (a correctness run, not a speed figure)"
                                    if interpret else "timing the PyTorch reference only"))
    peak = common.peak_gbps(common.device_name(device)) if on_gpu else None
    print("| shape | impl | ms | GB/s | of peak bandwidth |\n|---|---|---|---|---|")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape_name in shapes:
        channels, height, width = SHAPES[shape_name]
        height, width = max(1, height // args.scale), max(1, width // args.scale)
        x = torch.randn(batch, channels, height, width, generator=gen).to(device, dtype)
        weight = (1 + 0.1 * torch.randn(channels, generator=gen)).to(device, dtype)
        bias = (0.1 * torch.randn(channels, generator=gen)).to(device, dtype)
        grad = torch.randn_like(x)
        inputs = {fmt: (x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt))
                  for fmt in (torch.contiguous_format, CL)}

        def call(fn, fmt):
            xs, dy = inputs[fmt]
            if not args.backward:
                return lambda: fn(xs, GROUPS, weight, bias, EPS, silu=True)
            leaves = [t.detach().requires_grad_() for t in (xs, weight, bias)]
            return lambda: torch.autograd.grad(fn(leaves[0], GROUPS, leaves[1], leaves[2], EPS, silu=True), leaves, dy)

        calls = {name: call(fn, fmt) for name, (fn, fmt) in impls.items()}
        with torch.set_grad_enabled(args.backward):
            seconds = common.interleaved(calls, device, args.warmup, args.repeats)
        moved = (8 if args.backward else 3) * x.numel() * x.element_size()
        for name, sec in seconds.items():
            gbps = moved / sec / 1e9
            share = f"{gbps / peak:.0%}" if peak else "-"
            label = f"({batch}, {channels}, {height}, {width})"
            print(f"| {shape_name} {label} | {name} | {sec * 1e3:.3f} | {gbps:.1f} | {share} |")
            rows.append(dict(figure="group_norm_silu" + ("_backward" if args.backward else ""), impl=name,
                             device=common.device_name(device), dtype=str(dtype).removeprefix("torch."),
                             settings=f"shape={shape_name} {label} groups={GROUPS}", ms=sec * 1e3,
                             ratio=seconds["torch-cl"] / sec, cpu_load=common.cpu_load()))
    common.append_csv(args.csv, rows, __file__)
    return rows


if __name__ == "__main__":
    main()
