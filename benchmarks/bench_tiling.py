"""Tiled translation of large scenes: peak memory and time against scene size, with and
without tiles, and the error that tiling introduces.

Each configuration runs in a fresh process, so that its peak memory is its own: on a GPU
``torch.cuda.max_memory_allocated``, on the CPU the process's peak resident set size
(VmHWM, its counter reset just before) less the resident set before the run. The weights are seeded random
(no pretrained weights can be downloaded here): the error figures describe the tiling
arithmetic on this architecture, not the pretrained VAE and U-Net.

    python -m benchmarks.bench_tiling --preset tiny --sizes 256 512 1024 2048 --tile 256 --overlap 64
    python -m benchmarks.bench_tiling --preset sd21 --device cuda --sizes 1024 2048 4096 --tile 1024 --overlap 256
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from cdiff import VAE, Pipeline, UNet, UNetConfig, VAEConfig, tiling
from cdiff.config import DTYPES
from cdiff.data.synth import make_pair
from cdiff.tiling import Tiling

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str, device, unet_dtype) -> Pipeline:
    torch.manual_seed(0)
    with torch.device(device):
        if preset == "sd21":
            unet, vae = UNet(UNetConfig.cdiffset()), VAE(VAEConfig.sd21())
        else:
            unet, vae = UNet(UNetConfig.tiny(in_channels=8, out_channels=5)), VAE(VAEConfig.tiny())
    # The VAE stays fp32: SD's VAE overflows in fp16.
    return Pipeline(unet.eval().to(unet_dtype), vae.eval(), torch.randn(6, 1024, device=device))


def scene(size: int, device) -> torch.Tensor:
    return torch.from_numpy(make_pair(0, size=size).sar)[None, None].repeat(1, 3, 1, 1).to(device)


def translate(pipe, sar, steps, setting, seed=0):
    latents = torch.randn(1, 4, sar.shape[-2] // 8, sar.shape[-1] // 8, generator=torch.Generator().manual_seed(seed))
    return pipe.translate(sar, steps=steps, latents=latents, tiling=setting).eo


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).square().mean().sqrt() / expected.float().square().mean().sqrt()).item()


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS counter (Linux: 5 > clear_refs); the current RSS in GiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_gib("VmRSS")


def measure_one(args) -> dict:
    """One translation in this process: its time and peak memory."""
    device = torch.device(args.device)
    pipe = build(args.preset, device, DTYPES[args.dtype])
    sar = scene(args.one, device)
    setting = Tiling(args.tile, args.overlap, batch=args.tile_batch) if args.mode == "tiled" else None
    before = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    translate(pipe, sar, args.steps, setting)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = _status_gib("VmHWM") - before
    tiles = len(tiling.latent_grid(args.one // 8, args.one // 8, setting).boxes) if setting and args.one > args.tile else 1
    return {"seconds": time.perf_counter() - start, "peak_gib": peak, "tiles": tiles}


def errors(args) -> str:
    """Tiled against untiled at ``--error-size`` with ``--error-tile`` tiles (a quarter overlap)."""
    device = torch.device(args.device)
    pipe = build(args.preset, device, DTYPES[args.dtype])
    size, tile = args.error_size, args.error_tile
    setting = Tiling(tile, tile // 4, batch=args.tile_batch)
    sar = scene(size, device)
    with torch.no_grad():
        latent = pipe.vae.encode_latent(sar)
        encode = rel_rms(tiling.encode(pipe.vae, sar, setting), latent)
        decode = rel_rms(tiling.decode(pipe.vae, latent, setting), pipe.vae.decode_latent(latent))
    untiled = translate(pipe, sar, args.steps, None)
    unet_only = rel_rms(translate(pipe, sar, args.steps, Tiling(tile, tile // 4, vae=False)), untiled)
    both = rel_rms(translate(pipe, sar, args.steps, setting), untiled)
    other_seed = rel_rms(translate(pipe, sar, args.steps, None, seed=1), untiled)
    return (f"relative RMS error at {size} px, tiles {tile}/{tile // 4}: VAE encode {encode:.4f}, VAE decode "
            f"{decode:.4f}; translation with tiled U-Net {unet_only:.4f}, tiled U-Net and VAE {both:.4f} "
            f"(another seed, untiled: {other_seed:.4f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("tiny", "sd21"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the U-Net's dtype (the VAE stays fp32)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048], help="scene sides, pixels")
    parser.add_argument("--untiled-max", type=int, default=1024, help="largest side also run untiled")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--tile-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="sampler steps per run")
    parser.add_argument("--error-size", type=int, default=512)
    parser.add_argument("--error-tile", type=int, default=256)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one run, print JSON
    parser.add_argument("--mode", choices=("tiled", "untiled"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args)))
        return 0

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    print(f"{args.preset} preset on {args.device} ({where}, {threads} threads), Python {platform.python_version()}, torch {torch.__version__}; U-Net {args.dtype}, "
          f"VAE fp32, {args.steps} DDIM steps, seeded random weights")
    print("\n| scene px | mode | tiles | peak memory GiB | seconds |\n|---|---|---|---|---|")
    for size in args.sizes:
        for mode in ("tiled", "untiled") if size <= args.untiled_max else ("tiled",):
            # A fresh process per run, so that each peak memory is its own (run from the root, as this one).
            command = [sys.executable, "-m", "benchmarks.bench_tiling", "--one", str(size), "--mode", mode] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("preset", "device", "dtype", "tile", "overlap", "tile_batch", "steps")]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(f"| {size} | {mode} | | failed: {done.stderr.strip().splitlines()[-1]} | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            label = f"tiled {args.tile}/{args.overlap}" if mode == "tiled" else "untiled"
            print(f"| {size} | {label} | {r['tiles']} | {r['peak_gib']:.2f} | {r['seconds']:.1f} |", flush=True)
    print("\n" + errors(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
