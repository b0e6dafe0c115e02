"""Benchmark of one C-DiffSET training step: cdiff's, and the official release's on the same weights.

    python benchmarks/bench_train.py                         # GPU: full SD 2.1 U-Net, 256 px, batch 16, bf16
    python benchmarks/bench_train.py --batch 32 --precision fp32
    python benchmarks/bench_train.py --tiny --size 64        # CPU: cdiff's tiny U-Net (the default without a GPU)

Both steps train the 8-in/5-out U-Net (SD 2.1 sizes with seeded random weights, as
tools/random_sd21.py makes them; --tiny: cdiff's tiny preset) on latents of --size px images
(--size / 8 per side), with the fixed 6-token prompt embedding, and the same autocast precision:

- cdiff: the training loop's own step (cdiff.train.loop.Loop._step on a CDiffSETTask): per-sample
  noise and timesteps, cdiff's U-Net, cdiff.confidence_nll (the fused Triton kernel on CUDA),
  the non-finite check, gradient clipping at 1.0, fused AdamW, the lr schedule;
- release: diffusers' UNet2DConditionModel with the release's eager loss written out (softplus
  variance, beta-NLL with var.detach() ** sqrt(alpha_bar)), torch's default AdamW, no clipping,
  as train.py of the release does it.

The VAE is not part of either step (cdiff reads latents from its cache; the release encodes
images with a frozen VAE in both cases alike). Reports images/s (median of --steps timed steps
after --warmup) and the peak memory allocated during the steps (CUDA; the process's peak resident
memory on the CPU, which includes the model built first). Target of issue 9, checked on a GPU:
cdiff >= 1.3x the release's images/s at no more peak memory; the exit status is 1 when missed.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import cdiff  # noqa: E402
from cdiff.layouts.diffusers import UNET as UNET_TABLE  # noqa: E402
from cdiff.train.config import load_config  # noqa: E402
from tools.random_sd21 import SD21_UNET, randomize_, tiny_configs  # noqa: E402

TARGET_SPEEDUP = 1.3
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per step, peak memory MB during the timed steps)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak_mb(device)


def diffusers_unet(tiny: bool):
    """The release's U-Net: diffusers' UNet2DConditionModel, 8-in/5-out, seeded random weights."""
    import diffusers

    config = dict(tiny_configs()[0] if tiny else SD21_UNET, in_channels=8, out_channels=5)
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**config)
    return randomize_(model.to_empty(device="cpu"), seed=0)


def release_step(unet, latents: torch.Tensor, context: torch.Tensor, autocast_dtype, lr: float):
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

    return step


def cdiff_step(state: dict, tiny: bool, latents: torch.Tensor, context: torch.Tensor, precision: str, lr: float):
    """cdiff's training step: the loop's own, on a CDiffSETTask holding the same weights."""
    from cdiff.train.cdiffset import CDiffSETTask
    from cdiff.train.logs import Log
    from cdiff.train.loop import Loop
    from cdiff.train.rundir import RunDir
    from cdiff.train.distributed import World

    device = latents.device
    unet_config = cdiff.UNetConfig.tiny(in_channels=8, out_channels=5) if tiny else cdiff.UNetConfig.cdiffset()
    with torch.device("meta"):
        unet = cdiff.UNet(unet_config)
    unet.load_state_dict(UNET_TABLE.rename(state, to="cdiff"), assign=True)
    vae = cdiff.VAE(cdiff.VAEConfig.tiny())  # not used by the step: the latents are given
    pipeline = cdiff.Pipeline(unet, vae, context[0].cpu())
    batch = latents.shape[0] // 2
    config = load_config(None, ["model.init=in-memory", f"train.precision={precision}", f"train.batch_size={batch}",
                                f"optim.lr={lr}", "val.every=0", "optim.warmup_steps=0"])
    task = CDiffSETTask(config, device, pipeline=pipeline)
    folder = tempfile.mkdtemp(prefix="bench_train.")
    loop = Loop(task, config, RunDir(folder), World(0, 1, device), Log(Path(folder) / "log.jsonl", enabled=False))
    sar_latents, eo_latents = latents.chunk(2)
    positions = iter(range(10**9))

    def step():
        micro = {"sar_latent": sar_latents, "eo_latent": eo_latents,
                 "position": torch.tensor([next(positions) for _ in range(batch)])}
        loop._step([micro])

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tiny", action="store_true", default=not cuda, help="cdiff's tiny U-Net (default on the CPU)")
    parser.add_argument("--full", dest="tiny", action="store_false", help="the full SD 2.1 U-Net (default on a GPU)")
    parser.add_argument("--size", type=int, default=256 if cuda else 64, help="image side in px (latent: size / 8)")
    parser.add_argument("--batch", type=int, default=16 if cuda else 4)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16" if cuda else "fp32")
    parser.add_argument("--steps", type=int, default=10 if cuda else 5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.size % 64:
        parser.error("--size must be a multiple of 64 (the U-Net's latent side must divide by 8)")

    gen = torch.Generator().manual_seed(0)
    side = args.size // 8
    latents = torch.randn(2 * args.batch, 4, side, side, generator=gen).to(device)  # [SAR | EO] latents
    context = torch.randn(1, 6, 1024, generator=gen).expand(args.batch, -1, -1).to(device)
    autocast_dtype = PRECISIONS[args.precision]
    results = {}

    # The release first: its weights are the reference; cdiff gets a renamed copy of them.
    model = diffusers_unet(args.tiny)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(device).train()
    results["release"] = _time(release_step(model, latents, context, autocast_dtype, 3e-5), device, args.warmup,
                               args.steps)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["cdiff"] = _time(cdiff_step(state, args.tiny, latents, context, args.precision, 3e-5), device,
                             args.warmup, args.steps)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"device {name}; python {platform.python_version()}, torch {torch.__version__}; "
          f"{'tiny' if args.tiny else 'SD 2.1'} 8-in/5-out U-Net, {args.size} px (latent {side}x{side}), "
          f"batch {args.batch}, {args.precision}; median of {args.steps} steps after {args.warmup}")
    print(f"{'step':10s} {'ms/step':>9s} {'images/s':>9s} {'peak MB':>9s}")
    report = {}
    for impl, (seconds, peak) in results.items():
        report[impl] = {"ms": seconds * 1e3, "images_per_s": args.batch / seconds, "peak_mb": peak}
        print(f"{impl:10s} {seconds * 1e3:9.1f} {args.batch / seconds:9.2f} {peak:9.0f}")
    speedup = report["cdiff"]["images_per_s"] / report["release"]["images_per_s"]
    memory = report["cdiff"]["peak_mb"] / report["release"]["peak_mb"]
    report.update(speedup=speedup, memory_ratio=memory)
    print(f"cdiff / release: {speedup:.2f}x images/s, {memory:.2f}x peak memory")
    if device.type == "cuda":
        met = speedup >= TARGET_SPEEDUP and memory <= 1.0
        print(f"target ({TARGET_SPEEDUP}x images/s at no more memory): {'met' if met else 'MISSED'}")
        report["target_met"] = met
    else:
        print("CPU run: the target is checked on a GPU only; the CPU peak is the process's (both models)")
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result.get("target_met", True) else 1)
