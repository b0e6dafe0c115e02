"""Benchmark of one C-DiffSET training step: cdiff's, with its speed switches, and the official
release's on the same weights.

    python -m benchmarks.bench_train                         # GPU: full SD 2.1 U-Net, 256 px, batch 64 (or the largest that fits), bf16
    python -m benchmarks.bench_train --batch 32 --precision fp32
    python -m benchmarks.bench_train --tiny --size 64        # CPU: cdiff's tiny U-Net (the default without a GPU)

Every implementation trains the 8-in/5-out U-Net (SD 2.1 sizes with seeded random weights, as
cdiff/testing.py makes them; --tiny: cdiff's tiny preset) on latents of --size px images
(--size / 8 per side), with the fixed 6-token prompt embedding and the same autocast precision:

- ``release``: diffusers' UNet2DConditionModel with the release's eager loss written out
  (softplus variance, beta-NLL with var.detach() ** sqrt(alpha_bar)), torch's default AdamW, no
  clipping, as train.py of the release does it;
- ``cdiff``: the training loop's own step (cdiff.train.loop.Loop._step on a CDiffSETTask):
  per-sample seeded noise and timesteps, cdiff's U-Net on SDPA, cdiff.confidence_nll (the fused
  Triton kernel on CUDA), the non-finite check, gradient clipping at 1.0, fused AdamW, the lr
  schedule; latents given, as read from the latent cache;
- ``cdiff-cl``: the same with ``model.channels_last = true`` (NHWC weights and activations);
- ``cdiff-ckpt``: the same with ``model.gradient_checkpointing = true`` (the memory switch);
- on a GPU also ``cdiff-cl-fused``: channels-last, attention on SDPA's fused kernels only and
  the Triton GroupNorm+SiLU (CDIFF_GROUP_NORM=triton).

Timing: blocks of --steps steps after --warmup, the implementations' blocks interleaved over
--rounds rounds; on a GPU only the implementation being timed is on the device (the others'
weights and optimiser states wait in host memory), so its peak memory is its own. Reports
ms/step (median), images/s, peak memory (CUDA: max allocated; CPU: the process's peak resident
set, the same for all), TFLOP/s and the fraction of the device's peak (FLOPs of forward and
backward counted once). Target, checked on a GPU: the fastest cdiff >= 1.3x
the release's images/s at no more peak memory; the exit status is 1 when missed.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import cdiff
from benchmarks import common
from benchmarks.bench_unet import environment
from cdiff.attention import use_attention_backend
from cdiff.layouts.diffusers import UNET as UNET_TABLE
from cdiff.testing import SD21_UNET, randomize_, tiny_configs
from cdiff.train.configfile import load_config

TARGET_SPEEDUP = 1.3
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLEMENTATIONS = ("release", "cdiff", "cdiff-cl", "cdiff-ckpt", "cdiff-cl-fused")


class Step:
    """A training step (a closure) and what it keeps on the device: modules and optimisers."""

    def __init__(self, run, modules, optimizers, scope=None):
        self.run, self.modules, self.optimizers, self.scope = run, modules, optimizers, scope

    def __call__(self):
        if self.scope is None:
            return self.run()
        with self.scope():
            return self.run()

    def to(self, device) -> None:
        """Move the weights, gradients and optimiser states (off the device between its blocks)."""
        for module in self.modules:
            module.to(device)
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        state[key] = value.to(device)


def diffusers_unet(tiny: bool, device="cpu"):
    """The release's U-Net: diffusers' UNet2DConditionModel, 8-in/5-out, seeded random weights
    drawn on ``device``."""
    import diffusers

    config = dict(tiny_configs()[0] if tiny else SD21_UNET, in_channels=8, out_channels=5)
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**config)
    return randomize_(model.to_empty(device=device), seed=0)


def release_step(unet, latents: torch.Tensor, context: torch.Tensor, autocast_dtype, lr: float) -> Step:
    """The release's training step (its train.py), as a closure over fresh random draws."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    process = cdiff.DDPM()
    alphas_cumprod = process.alphas_cumprod.float().to(latents.device)
    offset = math.log(math.expm1(1 - 1e-6))
    sar_latents, eo_latents = latents.chunk(2)

    def step():
        t = torch.randint(0, 1000, (eo_latents.shape[0],), device=eo_latents.device)
        noise = torch.randn_like(eo_latents)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * eo_latents + (1 - a).sqrt() * noise
        with torch.autocast(latents.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = unet(torch.cat([sar_latents, noisy], 1), t, context).sample
            noise_pred, raw = out[:, :-1], out[:, -1:]
            var = torch.clamp(F.softplus(raw + offset) + 1e-6, 1e-6, 10).expand_as(noise)
            nll = -0.5 * ((noise - noise_pred) ** 2 / var + torch.log(var) + math.log(2 * math.pi))
            loss = -torch.mean(nll * var.detach() ** a.sqrt())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return Step(step, [unet], [optimizer])


def cdiff_step(state: dict, tiny: bool, latents: torch.Tensor, context: torch.Tensor, precision: str, lr: float,
               options: tuple[str, ...] = (), scope=None) -> Step:
    """cdiff's training step: the loop's own, on a CDiffSETTask holding the same weights.

    ``options``: extra ``--set`` overrides (model.channels_last=true, ...); ``scope``: a context
    manager factory the step runs in (attention backend, GroupNorm kernel)."""
    from cdiff.train.cdiffset import CDiffSETTask
    from cdiff.train.distributed import World
    from cdiff.train.logs import Log
    from cdiff.train.loop import Loop
    from cdiff.train.rundir import RunDir

    device = latents.device
    unet_config = cdiff.UNetConfig.tiny(in_channels=8, out_channels=5) if tiny else cdiff.UNetConfig.cdiffset()
    with torch.device("meta"):
        unet = cdiff.UNet(unet_config)
    unet.load_state_dict(UNET_TABLE.rename({k: v.clone() for k, v in state.items()}, to="cdiff"), assign=True)
    vae = cdiff.VAE(cdiff.VAEConfig.tiny())  # not used by the step: the latents are given
    pipeline = cdiff.Pipeline(unet, vae, context[0].cpu())
    batch = latents.shape[0] // 2
    config = load_config(None, ["model.init=in-memory", f"train.precision={precision}", f"train.batch_size={batch}",
                                f"optim.lr={lr}", "val.every=0", "optim.warmup_steps=0", *options])
    task = CDiffSETTask(config, device, pipeline=pipeline)
    folder = tempfile.mkdtemp(prefix="bench_train.")
    loop = Loop(task, config, RunDir(folder), World(0, 1, device), Log(Path(folder) / "log.jsonl", enabled=False))
    sar_latents, eo_latents = latents.chunk(2)
    positions = iter(range(10**9))

    def step():
        micro = {"sar_latent": sar_latents, "eo_latent": eo_latents,
                 "position": torch.tensor([next(positions) for _ in range(batch)])}
        loop._step([micro])

    return Step(step, [task.unet, task.vae], list(task.optimizers.values()), scope)


def fused_scope():
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(use_attention_backend("fused"))
    stack.enter_context(environment("CDIFF_GROUP_NORM", "triton"))
    return stack


def build_steps(names, state: dict, model, tiny: bool, latents, context, precision: str) -> dict[str, Step]:
    autocast_dtype = PRECISIONS[precision]
    makers = {
        "release": lambda: release_step(model, latents, context, autocast_dtype, 3e-5),
        "cdiff": lambda: cdiff_step(state, tiny, latents, context, precision, 3e-5),
        "cdiff-cl": lambda: cdiff_step(state, tiny, latents, context, precision, 3e-5, ("model.channels_last=true",)),
        "cdiff-ckpt": lambda: cdiff_step(state, tiny, latents, context, precision, 3e-5,
                                         ("model.gradient_checkpointing=true",)),
        "cdiff-cl-fused": lambda: cdiff_step(state, tiny, latents, context, precision, 3e-5,
                                             ("model.channels_last=true",), fused_scope),
    }
    steps = {}
    for name in names:
        steps[name] = makers[name]()
        if latents.device.type == "cuda":
            steps[name].to("cpu")  # on the device only while its block runs
    return steps


def measure(steps: dict[str, Step], device, warmup: int, count: int, rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds per step, peak memory MiB): blocks interleaved over ``rounds``."""
    times = {name: [] for name in steps}
    peaks = {name: 0.0 for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                step.to(device)
                torch.cuda.empty_cache()
            for _ in range(warmup):
                step()
            common.sync(device)
            common.reset_peak_memory(device)
            times[name] += [common.time_once(step, device) for _ in range(count)]
            if device.type == "cuda":
                peaks[name] = max(peaks[name], common.peak_memory_mb(device))
                step.to("cpu")
            else:
                peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


def run(args, device, batch: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    side = args.size // 8
    latents = torch.randn(2 * batch, 4, side, side, generator=gen).to(device)  # [SAR | EO] latents
    context = torch.randn(1, 6, 1024, generator=gen).expand(batch, -1, -1).to(device)
    model = diffusers_unet(args.tiny, device).train()
    state = model.state_dict()  # cdiff's copies are cloned from these before any step
    names = args.impls or [n for n in IMPLEMENTATIONS if device.type == "cuda" or n != "cdiff-cl-fused"]
    steps = build_steps(names, state, model, args.tiny, latents, context, args.precision)
    del state, model  # on a GPU, memory that no step's peak should count (the release's step holds its own)
    counted = steps.get("cdiff") or next(iter(steps.values()))
    if device.type == "cuda":
        counted.to(device)
    flops = common.count_flops(counted)  # forward + backward (+ an optimiser step, whose work is not counted)
    if device.type == "cuda":
        counted.to("cpu")
    return dict(results=measure(steps, device, args.warmup, args.steps, args.rounds), flops=flops)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    common.add_common_arguments(parser, warmup=2 if cuda else 1)
    parser.add_argument("--tiny", action="store_true", default=not cuda, help="cdiff's tiny U-Net (default on the CPU)")
    parser.add_argument("--full", dest="tiny", action="store_false", help="the full SD 2.1 U-Net (default on a GPU)")
    parser.add_argument("--size", type=int, default=256 if cuda else 64, help="image side in px (latent: size / 8)")
    parser.add_argument("--batch", type=int, default=64 if cuda else 4,
                        help="batch; on a GPU halved until it fits (default: %(default)s)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16" if cuda else "fp32")
    parser.add_argument("--steps", type=int, default=5 if cuda else 3, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of interleaved blocks (default: %(default)s)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=None,
                        help="implementations (default: all; cdiff-cl-fused on a GPU only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    common.apply_threads(args)
    if args.size % 64:
        parser.error("--size must be a multiple of 64 (the U-Net's latent side must divide by 8)")

    batch = args.batch
    while True:
        try:
            measured = run(args, device, batch)
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            gc.collect()
            torch.cuda.empty_cache()
            print(f"out of memory: trying batch {batch}")

    results, flops = measured["results"], measured["flops"]
    dtype = PRECISIONS[args.precision] or torch.float32
    print(common.header(device, f"Training step, {'tiny' if args.tiny else 'SD 2.1'} 8-in/5-out U-Net, {args.size} px "
                                f"(latent {args.size // 8}x{args.size // 8}), batch {batch}, {args.precision}; median of "
                                f"{args.rounds} x {args.steps} steps, blocks interleaved"))
    print(f"{flops / 1e12:.3f} TFLOP per step (forward + backward)")
    print(f"{'step':16s} {'ms/step':>9s} {'images/s':>9s} {'peak MB':>9s} {'vs release':>10s} {'TFLOP/s':>8s} {'of peak':>8s}")
    report, rows = {"batch": batch}, []
    release = results.get("release")
    for impl, (seconds, peak) in results.items():
        achieved, fraction, share = common.fraction_of_peak(flops, seconds, device, dtype)
        speedup = release[0] / seconds if release else float("nan")
        report[impl] = {"ms": seconds * 1e3, "images_per_s": batch / seconds, "peak_mb": peak, "speedup": speedup}
        print(f"{impl:16s} {seconds * 1e3:9.1f} {batch / seconds:9.2f} {peak:9.0f} {speedup:10.2f} {achieved:8.2f} {share:>8s}")
        rows.append(dict(figure="train_step", impl=impl, device=common.device_name(device), dtype=args.precision,
                         settings=f"preset={'tiny' if args.tiny else 'sd21'} size={args.size} batch={batch}",
                         ms=seconds * 1e3, ratio=speedup, tflops=achieved, peak_fraction=fraction,
                         peak_memory_mb=peak if device.type == "cuda" else None, cpu_load=common.cpu_load()))
    common.append_csv(args.csv, rows, __file__)
    if release and "cdiff" in results:
        report.update(speedup=report["cdiff"]["speedup"], memory_ratio=report["cdiff"]["peak_mb"] / release[1])
        fastest = max((k for k in results if k.startswith("cdiff")), key=lambda k: report[k]["images_per_s"])
        print(f"cdiff / release: {report['speedup']:.2f}x images/s, {report['memory_ratio']:.2f}x peak memory; "
              f"fastest cdiff: {fastest}, {report[fastest]['speedup']:.2f}x")
        if device.type == "cuda":
            met = report[fastest]["speedup"] >= TARGET_SPEEDUP and report[fastest]["peak_mb"] <= release[1]
            print(f"target ({TARGET_SPEEDUP}x images/s at no more memory): {'met' if met else 'MISSED'}")
            report["target_met"] = met
        else:
            print("CPU run: the target is checked on a GPU only; the CPU peak is the process's (all models)")
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result.get("target_met", True) else 1)
