"""Benchmark of a whole translation (VAE encode, DDIM, VAE decode): cdiff's Pipeline against the
same work on diffusers' modules.

    python -m benchmarks.bench_translate                       # GPU: SD 2.1 sizes, 512 px, 50 steps, fp16, batches 1 8 16
    python -m benchmarks.bench_translate --batches 1 --impls diffusers cdiff-cl-graph
    python -m benchmarks.bench_translate --preset tiny --size 64 --steps 5   # what runs on a CPU (the default there)

Both sides hold the same seeded random weights (cdiff/testing.py's; the C-DiffSET 8-in/5-out
U-Net and the SD 2.1 VAE), in ``--dtype``, start from the same noise and see the same 6-token
prompt embedding; attention is SDPA on both. One translation of ``--batches`` images of
``--size`` px with ``--steps`` DDIM steps is timed, interleaved:

- ``diffusers``: the release's inference loop on diffusers' modules: AutoencoderKL.encode (the
  posterior mean, scaled), DDIMScheduler (SD 2.1's settings) stepping on UNet2DConditionModel's
  noise prediction, AutoencoderKL.decode;
- ``cdiff``, ``cdiff-cl``: ``Pipeline.translate``, NCHW and channels-last (``Pipeline.to(memory_format=)``);
- on a GPU also ``cdiff-cl-graph`` (``cuda_graph=True``: the sampling loop replayed as one CUDA
  graph), ``cdiff-cl-fused-graph`` (+ attention on SDPA's fused kernels only and the Triton
  GroupNorm+SiLU) and ``cdiff-cl-compiled-graph`` (+ torch.compile of the U-Net).

Reports ms per translation, images/s, the speed ratio against diffusers (> 1: cdiff is faster),
TFLOP/s and the fraction of the device's peak (FLOPs counted once: encoder + steps x U-Net +
decoder). Targets, checked on a GPU (exit status 1 when missed): at batch 1, the
fastest cdiff >= 2x diffusers, and under 0.3 s on an H100; at batch 16, >= 30% of the device's
fp16 peak. Rows go to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys

import torch

from benchmarks import common
from benchmarks.bench_unet import environment
from cdiff.attention import use_attention_backend
from cdiff.pipeline import Pipeline

CL = torch.channels_last
IMPLEMENTATIONS = ("diffusers", "cdiff", "cdiff-cl", "cdiff-cl-graph", "cdiff-cl-fused-graph", "cdiff-cl-compiled-graph")
H100_SECONDS, SPEEDUP, PEAK_SHARE = 0.3, 2.0, 0.30


def diffusers_translation(unet, vae, steps: int):
    """The release's loop on diffusers' modules: (sar, context, noise) -> EO images."""
    import diffusers

    from cdiff.testing import SD21_SCHEDULER

    scheduler = diffusers.DDIMScheduler(**SD21_SCHEDULER)
    scale = vae.config.scaling_factor

    def translate(sar, context, noise):
        sar_latent = vae.encode(sar).latent_dist.mode() * scale
        scheduler.set_timesteps(steps)
        latent = noise
        for t in scheduler.timesteps:
            out = unet(torch.cat([sar_latent, latent], dim=1), t, context).sample
            latent = scheduler.step(out[:, :4], t, latent).prev_sample
        return vae.decode(latent / scale).sample

    return translate


def implementations(theirs, ours, context, device, dtype, steps, wanted, compile_options: dict | None = None) -> dict:
    """(name -> translate(sar, noise) for the names in ``wanted`` (None: all that run here), the
    NCHW pipeline). ``compile_options``: torch.compile's keyword arguments for the compiled one."""
    theirs_unet, theirs_vae = (m.to(device, dtype) for m in theirs)
    names = list(IMPLEMENTATIONS if device.type == "cuda" else IMPLEMENTATIONS[:3]) if wanted is None else wanted
    ours = [m.to(device, dtype) for m in ours]
    nchw = Pipeline(*ours, context.to(device, dtype))
    pipelines = {}

    def channels_last(kind: str) -> Pipeline:  # a pipeline of its own per kind (compile marks it)
        if kind not in pipelines:
            pipe = Pipeline(*copy.deepcopy(ours), context.to(device, dtype)).to(memory_format=CL)
            pipelines[kind] = pipe.compile(**(compile_options or {})) if kind == "compiled" else pipe
        return pipelines[kind]

    def fused():
        stack = contextlib.ExitStack()
        stack.enter_context(use_attention_backend("fused"))
        stack.enter_context(environment("CDIFF_GROUP_NORM", "triton"))
        return stack

    def cdiff(pipe, scope=contextlib.nullcontext, **options):
        def translate(sar, noise):
            with scope():
                return pipe.translate(sar, steps=steps, latents=noise, **options).eo
        return translate

    reference = diffusers_translation(theirs_unet, theirs_vae, steps)
    expanded = context.to(device, dtype)[None]
    makers = {
        "diffusers": lambda: lambda sar, noise: reference(sar, expanded.expand(len(sar), -1, -1), noise.to(dtype)),
        "cdiff": lambda: cdiff(nchw),
        "cdiff-cl": lambda: cdiff(channels_last("eager")),
        "cdiff-cl-graph": lambda: cdiff(channels_last("eager"), cuda_graph=True),
        "cdiff-cl-fused-graph": lambda: cdiff(channels_last("eager"), fused, cuda_graph=True),
        "cdiff-cl-compiled-graph": lambda: cdiff(channels_last("compiled"), cuda_graph=True),
    }
    return {name: makers[name]() for name in names}, nchw


def translation_flops(pipe: Pipeline, sar, noise, steps: int) -> int:
    """Encoder + steps x U-Net + decoder, each counted once."""
    with torch.no_grad():
        sar_latent = pipe.vae.encode_latent(sar)
        context = pipe.context[None].expand(len(sar), -1, -1)
        unet_input = torch.cat([sar_latent, noise.to(sar_latent.dtype)], dim=1)
        encoder = common.count_flops(lambda: pipe.vae.encode(sar))
        unet = common.count_flops(lambda: pipe.unet(unet_input, torch.tensor(500, device=sar.device), context))
        decoder = common.count_flops(lambda: pipe.vae.decode_latent(sar_latent))
    return encoder + steps * unet + decoder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    common.add_common_arguments(parser, repeats=5 if cuda else 3, warmup=2 if cuda else 1)
    parser.add_argument("--preset", choices=("sd21", "tiny"), default=None, help="default: sd21 on a GPU, tiny on a CPU")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default=None, help="default: fp16 on a GPU, fp32 on a CPU")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default: 512 on a GPU, 64 on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50 on a GPU, 5 on a CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8 16 on a GPU, 1 2 on a CPU")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=None,
                        help="implementations (default: all; on a CPU the first three)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    common.apply_threads(args)
    on_gpu = device.type == "cuda"
    tiny = (args.preset or ("sd21" if on_gpu else "tiny")) == "tiny"
    args.dtype = args.dtype or ("fp16" if on_gpu else "fp32")
    size, steps = args.size or (512 if on_gpu else 64), args.steps or (50 if on_gpu else 5)
    batches = args.batches or ([1, 8, 16] if on_gpu else [1, 2])
    dtype = common.DTYPES[args.dtype]
    if size % 64:
        parser.error("--size must be a multiple of 64")

    print(common.header(device, f"Translation benchmark, {'tiny' if tiny else 'SD 2.1'} U-Net and VAE, {size} px, "
                                f"{steps} DDIM steps, {args.dtype}; median of {args.repeats} interleaved rounds"))
    theirs, ours = common.load_diffusers_twins(tiny, vae=True)
    context = torch.randn(6, ours[0].config.context_dim, generator=torch.Generator().manual_seed(0))
    impls, pipe = implementations(theirs, ours, context, device, dtype, steps, args.impls)
    gen = torch.Generator().manual_seed(1)
    rows, report, failures = [], {}, []
    print("| batch | impl | ms | images/s | ratio vs diffusers | TFLOP/s | of peak |\n|---|---|---|---|---|---|---|")
    for batch in batches:
        sar = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device, dtype)
        noise = torch.randn(batch, 4, size // 8, size // 8, generator=gen).to(device)
        flops = translation_flops(pipe, sar, noise, steps)
        if "diffusers" in impls and len(impls) > 1:  # the same work: the same images, up to rounding
            with torch.no_grad():
                outputs = [impls[name](sar, noise).float() for name in ("diffusers", next(n for n in impls if n != "diffusers"))]
            difference = ((outputs[1] - outputs[0].clamp(-1, 1)).abs().max() / outputs[0].abs().max()).item()
            print(f"batch {batch}: max |cdiff - diffusers| / max |diffusers| = {difference:.1e} (cdiff clamps to [-1, 1])")
            report[(batch, "difference")] = difference
        with torch.no_grad():
            seconds = common.interleaved({n: (lambda f: lambda: f(sar, noise))(f) for n, f in impls.items()},
                                         device, args.warmup, args.repeats)
        for name, sec in seconds.items():
            ratio = seconds["diffusers"] / sec if "diffusers" in seconds else float("nan")
            achieved, fraction, share = common.fraction_of_peak(flops, sec, device, dtype)
            print(f"| {batch} | {name} | {sec * 1e3:.1f} | {batch / sec:.2f} | {ratio:.3f} | {achieved:.2f} | {share} |")
            rows.append(dict(figure="translation", impl=name, device=common.device_name(device), dtype=args.dtype,
                             settings=f"preset={'tiny' if tiny else 'sd21'} size={size} steps={steps} batch={batch} "
                                      f"attention=sdpa", ms=sec * 1e3, ratio=ratio, tflops=achieved,
                             peak_fraction=fraction, cpu_load=common.cpu_load()))
            report[(batch, name)] = dict(seconds=sec, ratio=ratio, peak_fraction=fraction)
        print(f"batch {batch}: {flops / 1e12:.3f} TFLOP per translation")
        best = min((v for k, v in seconds.items() if k != "diffusers"), default=None)
        if on_gpu and best is not None and not tiny:
            if batch == 1 and "diffusers" in seconds and seconds["diffusers"] / best < SPEEDUP:
                failures.append(f"batch 1: fastest cdiff {seconds['diffusers'] / best:.2f}x diffusers (target >= {SPEEDUP}x)")
            if batch == 1 and "H100" in common.device_name(device) and best > H100_SECONDS:
                failures.append(f"batch 1: {best:.3f} s on an H100 (target < {H100_SECONDS} s)")
            peak = common.peak_tflops(device, dtype)
            if batch == 16 and peak and flops / best / 1e12 / peak < PEAK_SHARE:
                failures.append(f"batch 16: {flops / best / 1e12 / peak:.1%} of peak (target >= {PEAK_SHARE:.0%})")
    common.append_csv(args.csv, rows, __file__)
    if on_gpu and not tiny:
        print("targets: " + ("met" if not failures else "MISSED\n  " + "\n  ".join(failures)))
    else:
        print("targets: checked on a GPU at SD 2.1 sizes only")
    report["failures"] = failures
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
