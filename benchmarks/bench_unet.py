"""Benchmark of the U-Net: the forward pass against diffusers', the attention backends, and
gradient checkpointing.

    python -m benchmarks.bench_unet                              # GPU: SD 2.1 sizes, fp16, all three parts
    python -m benchmarks.bench_unet --part forward --batches 1 16
    python -m benchmarks.bench_unet --preset tiny --side 32      # what runs on a CPU (the default there)

The C-DiffSET U-Net (8-in/5-out) with seeded random weights (cdiff/testing.py's), the same
weights in cdiff's U-Net and in diffusers' UNet2DConditionModel, a 6-token context (the
release's unpadded prompt).

1. forward (the headline figure): one forward at a ``--side`` latent (64 = 512-px images) and
   each of ``--batches``, in ``--dtype``, both on SDPA attention, timed interleaved:
   - ``diffusers``, ``diffusers-cl``: diffusers' U-Net, NCHW and channels-last;
   - ``cdiff``, ``cdiff-cl``: cdiff's, NCHW and channels-last;
   - on a GPU also ``cdiff-cl-fused`` (attention on SDPA's fused kernels only, GroupNorm+SiLU on
     the Triton kernel) and ``cdiff-cl-compiled`` (torch.compile of the channels-last U-Net).
   ``--impls`` picks some; ``diffusers-again`` (only when named) times diffusers a second time, a
   control whose ratio against ``diffusers`` shows the measurement's noise. Reports ms, the speed ratio against diffusers in the same layout (> 1: cdiff is faster),
   TFLOP/s and the fraction of the device's peak (GPU). The CPU target is cdiff's
   fp32 forward no slower than diffusers' (ratio >= 1.0).
2. attention: SD 2.1-768's size (96x96 latents, batch 2, 77 tokens) in ``--dtype``:
   SDPA against the math path, which materialises fp32 L x L scores; ms, peak memory and the
   error against the fp32 model.
3. checkpointing: one training step (forward + backward, bf16 autocast) at 64x64
   latents, batch ``--train-batch``, gradient checkpointing off and on: ms and peak memory.

Every figure is appended to benchmarks/results.csv (``--csv``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os

import torch

from benchmarks import common
from cdiff.attention import use_attention_backend
from cdiff.config import UNetConfig
from cdiff.testing import randomize_
from cdiff.unet import UNet

CL = torch.channels_last
PARTS = ("forward", "attention", "checkpointing")
IMPLEMENTATIONS = ("diffusers", "diffusers-cl", "cdiff", "cdiff-cl", "cdiff-cl-fused", "cdiff-cl-compiled", "diffusers-again")


@contextlib.contextmanager
def environment(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def forward_implementations(theirs, ours, device, dtype, wanted, compile_options: dict | None = None) -> dict:
    """name -> (callable module, input memory format, context manager factory), for the names in
    ``wanted`` (None: every one that runs on this device). ``compile_options``: torch.compile's
    keyword arguments for ``cdiff-cl-compiled``."""
    theirs, ours = theirs.to(device, dtype), ours.to(device, dtype)
    names = list(IMPLEMENTATIONS[:6] if device.type == "cuda" else IMPLEMENTATIONS[:4]) if wanted is None else wanted
    plain = contextlib.nullcontext
    channels_last = {}

    def cl(model):  # one channels-last copy per model, made only when asked for
        if id(model) not in channels_last:
            channels_last[id(model)] = copy.deepcopy(model).to(memory_format=CL)
        return channels_last[id(model)]

    def fused():
        stack = contextlib.ExitStack()
        stack.enter_context(use_attention_backend("fused"))
        stack.enter_context(environment("CDIFF_GROUP_NORM", "triton"))
        return stack

    makers = {
        "diffusers": lambda: (lambda x, t, c: theirs(x, t, c).sample, torch.contiguous_format, plain),
        "diffusers-again": lambda: (lambda x, t, c: theirs(x, t, c).sample, torch.contiguous_format, plain),
        "diffusers-cl": lambda: ((lambda m: lambda x, t, c: m(x, t, c).sample)(cl(theirs)), CL, plain),
        "cdiff": lambda: (ours, torch.contiguous_format, plain),
        "cdiff-cl": lambda: (cl(ours), CL, plain),
        "cdiff-cl-fused": lambda: (cl(ours), CL, fused),
        "cdiff-cl-compiled": lambda: (torch.compile(cl(ours), **(compile_options or {})), CL, plain),
    }
    return {name: makers[name]() for name in names}


def forward_calls(impls: dict, ours: UNet, batch: int, side: int, device, dtype, gen: torch.Generator):
    """(name -> a no-argument call of one forward, FLOPs of one forward) for a ``batch`` of
    ``side`` x ``side`` latents, a 6-token context and random timesteps drawn from ``gen``."""
    sample = torch.randn(batch, 8, side, side, generator=gen).to(device, dtype)
    context = torch.randn(batch, 6, ours.config.context_dim, generator=gen).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    inputs = {fmt: sample.contiguous(memory_format=fmt) for fmt in (torch.contiguous_format, CL)}

    def call(impl):
        module, fmt, scope = impl

        def run():
            with torch.no_grad(), scope():
                return module(inputs[fmt], t, context)
        return run

    with torch.no_grad():
        flops = common.count_flops(lambda: ours(sample, t, context))
    return {name: call(impl) for name, impl in impls.items()}, flops


def same_layout_baseline(name: str) -> str:
    return "diffusers-cl" if "-cl" in name else "diffusers"


def part_forward(args, device, dtype, tiny: bool) -> list[dict]:
    theirs, ours = common.load_diffusers_twins(tiny)
    impls = forward_implementations(theirs[0], ours[0], device, dtype, args.impls)
    rows = []
    print(f"\n1. U-Net forward, {args.side}x{args.side} latent, {args.dtype}, SDPA; "
          f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up calls")
    print("| batch | impl | ms | ratio vs diffusers (same layout) | TFLOP/s | of peak |\n|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        calls, flops = forward_calls(impls, ours[0], batch, args.side, device, dtype, gen)
        seconds = common.interleaved(calls, device, args.warmup, args.repeats)
        for name, sec in seconds.items():
            baseline = seconds.get(same_layout_baseline(name))
            ratio = baseline / sec if baseline else float("nan")
            achieved, fraction, share = common.fraction_of_peak(flops, sec, device, dtype)
            print(f"| {batch} | {name} | {sec * 1e3:.2f} | {ratio:.3f} | {achieved:.2f} | {share} |")
            rows.append(dict(figure="unet_forward", impl=name, device=common.device_name(device), dtype=args.dtype,
                             settings=f"preset={'tiny' if tiny else 'sd21'} side={args.side} batch={batch} context=6 "
                                      f"attention=sdpa", ms=sec * 1e3, ratio=ratio, tflops=achieved,
                             peak_fraction=fraction, cpu_load=common.cpu_load()))
        best_ours = min((v for k, v in seconds.items() if k.startswith("cdiff")), default=float("nan"))
        best_theirs = min((v for k, v in seconds.items() if k.startswith("diffusers")), default=float("nan"))
        print(f"batch {batch}: {flops / 1e12:.4f} TFLOP per forward; fastest cdiff vs fastest diffusers: "
              f"{best_theirs / best_ours:.3f}x")
    return rows


def part_attention(args, device, dtype, tiny: bool) -> list[dict]:
    config = UNetConfig.tiny(in_channels=8, out_channels=5) if tiny else UNetConfig.cdiffset()
    side = 32 if tiny else 96
    gen = torch.Generator().manual_seed(0)
    unet = randomize_(UNet(config), 0).to(device).eval()
    sample = torch.randn(2, 8, side, side, generator=gen).to(device)
    context = torch.randn(2, 77, config.context_dim, generator=gen).to(device)
    t = torch.tensor([10, 900], device=device)
    rows = []
    print(f"\n2. attention backends, {side}x{side} latents, batch 2, 77 tokens, {args.dtype}")
    print("| backend | ms | peak MiB | max abs err / max abs (vs fp32) |\n|---|---|---|---|")
    with torch.no_grad():
        reference = unet(sample, t, context).double()
        half = unet.to(dtype)
        for backend in ("sdpa", "math"):
            def run():
                with use_attention_backend(backend):
                    return half(sample.to(dtype), t, context.to(dtype))
            common.reset_peak_memory(device)
            sec = common.interleaved({backend: run}, device, args.warmup, args.repeats)[backend]
            peak = common.peak_memory_mb(device)
            err = ((run().double() - reference).abs().max() / reference.abs().max()).item()
            print(f"| {backend} | {sec * 1e3:.1f} | {peak:.0f} | {err:.2e} |")
            rows.append(dict(figure="unet_attention_backend", impl=backend, device=common.device_name(device),
                             dtype=args.dtype, settings=f"side={side} batch=2 context=77", ms=sec * 1e3,
                             peak_memory_mb=peak, cpu_load=common.cpu_load()))
    return rows


def part_checkpointing(args, device, tiny: bool) -> list[dict]:
    config = UNetConfig.tiny(in_channels=8, out_channels=5) if tiny else UNetConfig.cdiffset()
    side, batch = (16 if tiny else 64), args.train_batch
    gen = torch.Generator().manual_seed(0)
    unet = randomize_(UNet(config), 0).to(device).train()
    sample = torch.randn(batch, 8, side, side, generator=gen).to(device)
    context = torch.randn(batch, 6, config.context_dim, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def train_step():
        unet.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = unet(sample, t, context)
        out.float().square().mean().backward()

    rows = []
    print(f"\n3. training step, {side}x{side} latents, batch {batch}, bf16 autocast, SDPA")
    print("| gradient checkpointing | ms | peak MiB |\n|---|---|---|")
    for enabled in (False, True):
        unet.gradient_checkpointing(enabled)
        common.reset_peak_memory(device)
        sec = common.interleaved({"step": train_step}, device, args.warmup, args.repeats)["step"]
        peak = common.peak_memory_mb(device)
        print(f"| {'on' if enabled else 'off'} | {sec * 1e3:.1f} | {peak:.0f} |")
        rows.append(dict(figure="unet_checkpointing", impl="on" if enabled else "off", device=common.device_name(device),
                         dtype="bf16-autocast", settings=f"side={side} batch={batch}", ms=sec * 1e3,
                         peak_memory_mb=peak, cpu_load=common.cpu_load()))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    common.add_common_arguments(parser, repeats=10 if cuda else 5, warmup=3 if cuda else 1)
    parser.add_argument("--part", choices=PARTS + ("all",), default="all" if cuda else "forward")
    parser.add_argument("--preset", choices=("sd21", "tiny"), default=None, help="default: sd21 on a GPU, tiny on a CPU")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default=None, help="default: fp16 on a GPU, fp32 on a CPU")
    parser.add_argument("--side", type=int, default=None, help="latent side of part 1 (default: 64 on a GPU, 32 on a CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batches of part 1 (default: 1 16; CPU: 1 4)")
    parser.add_argument("--train-batch", type=int, default=4, help="batch of part 3 (default: %(default)s)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=None,
                        help="implementations of part 1 (default: all; on a CPU the first four)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    common.apply_threads(args)
    on_gpu = device.type == "cuda"
    args.dtype = args.dtype or ("fp16" if on_gpu else "fp32")
    args.side = args.side or (64 if on_gpu else 32)
    args.batches = args.batches or ([1, 16] if on_gpu else [1, 4])
    tiny = (args.preset or ("sd21" if on_gpu else "tiny")) == "tiny"
    dtype = common.DTYPES[args.dtype]
    print(common.header(device, f"U-Net benchmark, {'tiny' if tiny else 'SD 2.1'} 8-in/5-out"))
    if not on_gpu:
        print("CPU run: ratios only (no peak table for CPUs); memory figures are GPU-only")
    rows = []
    if args.part in ("forward", "all"):
        rows += part_forward(args, device, dtype, tiny)
    if args.part in ("attention", "all"):
        rows += part_attention(args, device, dtype, tiny)
    if args.part in ("checkpointing", "all"):
        rows += part_checkpointing(args, device, tiny)
    common.append_csv(args.csv, rows, __file__)
    return rows


if __name__ == "__main__":
    main()
