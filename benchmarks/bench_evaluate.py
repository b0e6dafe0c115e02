"""Benchmark of `cdiff evaluate` under the field's protocol: images per second of the whole
evaluation, and the share of its time each metric takes.

    python -m benchmarks.bench_evaluate                        # CPU: 32 images of 64 px, one thread
    python -m benchmarks.bench_evaluate --device cuda --images 512 --size 256 --batch-size 32

Seeded random networks in the real layouts and sizes (torchvision's VGG16 for LPIPS and DISTS,
pytorch-fid's Inception for FID and KID, DISTS's alpha/beta) are written to a temporary folder
with random PNGs: predictions, and ground truths 8 px larger (centre-cropped). DINO is left out
unless --dino (a random DINOv3 ViT-L/16 at its real size, 300M parameters). The figure is
``cdiff.evaluate.run_evaluate`` end to end: matching, loading the networks, the batched pass,
FID and KID, the reports. The share of each metric comes from timers around each network's
forward (LPIPS, DISTS, Inception, DINO), the per-image formulas (PSNR, SSIM), the set-level
formulas (FID, KID), and the image reading; the rest (matching, loading, reports) is "other".
Each timer synchronises the GPU. On the CPU the clock is the thread's CPU time by default (with one
torch thread all the work runs on it; on a shared machine the wall clock also counts the time it
waited for a core): --clock wall for the wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import CLOCKS, append_csv, cpu_load, device_name


def write_inputs(folder: Path, images: int, size: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("pred", "target"):
        (folder / sub).mkdir(parents=True)
    for i in range(images):
        target = rng.integers(0, 256, (size + 8, size + 8, 3), dtype=np.uint8)
        Image.fromarray(target).save(folder / "target" / f"{i:05d}.png")
        pred = np.clip(target[4:-4, 4:-4] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pred).save(folder / "pred" / f"{i:05d}.png")


def write_networks(folder: Path, dino: bool) -> dict:
    """Random weights in each library's file layout; their EvaluationOptions fields."""
    import torchvision.models as models
    from torchvision.models import vgg

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in vgg.make_layers(vgg.cfgs["D"]).state_dict().items()}, folder / "vgg.pth")
    inception = models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for module in inception.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(inception.state_dict(), folder / "inception.pth")
    torch.save({k: torch.rand(1, 1475, 1, 1) * 0.2 + 0.01 for k in ("alpha", "beta")}, folder / "dists.pt")
    files = dict(lpips_vgg=str(folder / "vgg.pth"), fid_weights=str(folder / "inception.pth"),
                 dists_weights=str(folder / "dists.pt"))
    if dino:
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        # ViT-L/16 with 4 registers, DINOv3's large configuration.
        config = DINOv3ViTConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 num_register_tokens=4, patch_size=16)
        DINOv3ViTModel(config).save_pretrained(folder / "dino")
        files["dino"] = str(folder / "dino")
    return files


class Timers:
    """Seconds spent in each named part, summed over calls (nested calls are not expected)."""

    def __init__(self, device: torch.device, clock):
        self.device, self.clock, self.seconds = device, clock, defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = self.clock()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += self.clock() - start
            return out

        return timed


@contextlib.contextmanager
def instrumented(timers: Timers):
    """Timers around every part of the pass (module docstring), removed afterwards."""
    import lpips

    from cdiff import metrics, networks, perceptual, scoring

    patches = [
        (lpips.LPIPS, "forward", "LPIPS (VGG)"),
        (networks.DISTS, "forward", "DISTS"),
        (perceptual.FIDInception, "forward", "Inception (FID, KID features)"),
        (networks.DinoPatchTokens, "forward", "DINO"),
        (metrics, "fid_from_features", "FID formula"),
        (metrics, "kid", "KID formula"),
        (scoring, "read_unit", "reading images"),
    ]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    formulas = dict(scoring.PER_IMAGE_FORMULAS)
    try:
        for owner, attr, name in patches:
            setattr(owner, attr, timers.wrap(name, getattr(owner, attr)))
        for metric, fn in formulas.items():
            scoring.PER_IMAGE_FORMULAS[metric] = timers.wrap(metric.upper(), fn)
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
        scoring.PER_IMAGE_FORMULAS.update(formulas)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=32, help="predictions, each with its ground truth")
    parser.add_argument("--size", type=int, default=64, help="prediction side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up run")
    parser.add_argument("--clock", choices=tuple(CLOCKS), help="CPU clock (default: thread on the CPU, wall on a GPU)")
    parser.add_argument("--dino", action="store_true", help="also DINO, on a random ViT-L/16 (slow on a CPU)")
    parser.add_argument("--csv", default=str(Path(__file__).resolve().parent / "results.csv"),
                        help="append the figure here ('' for nowhere)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    clock_name = args.clock or ("thread" if device.type == "cpu" and args.threads == 1 else "wall")
    clock = CLOCKS[clock_name]
    from cdiff.evaluate import EvaluationOptions, run_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_inputs(folder, args.images, args.size)
        files = write_networks(folder, args.dino)

        def evaluate():
            with contextlib.redirect_stdout(io.StringIO()):
                options = EvaluationOptions(batch_size=args.batch_size, report_dir=str(folder), **files)
                return run_evaluate(folder / "pred", folder / "target", options, device=str(device), show_progress=False)

        result = evaluate()  # warm-up: first calls, allocator, caches
        totals, parts = [], Timers(device, clock)
        for _ in range(args.repeats):
            start = clock()
            with instrumented(parts):
                evaluate()
            totals.append(clock() - start)
    seconds = float(np.median(totals))
    per_run = {name: value / args.repeats for name, value in parts.seconds.items()}
    per_run["other (matching, loading the networks, reports)"] = max(0.0, float(np.mean(totals)) - sum(per_run.values()))
    name = device_name(device)
    print(f"cdiff evaluate, field protocol: {args.images} images of {args.size} px, batch {args.batch_size}, on {name}")
    print(f"metrics: {', '.join(result.means)}; left out: {', '.join(result.scores.skipped_metrics) or 'none'}")
    print(f"whole evaluation: {seconds:.2f} s, {args.images / seconds:.2f} images/s (median of {args.repeats}; "
          f"{clock_name} clock; load {cpu_load():.1f})")
    total = sum(per_run.values())
    for part, value in sorted(per_run.items(), key=lambda kv: -kv[1]):
        print(f"  {part:<48} {value:8.3f} s  {value / total:6.1%}")
    append_csv(args.csv, [{
        "figure": "evaluate", "impl": "cdiff", "device": name, "dtype": "fp32",
        "settings": f"images={args.images} size={args.size} batch={args.batch_size} dino={args.dino}",
        "ms": f"{seconds / args.images * 1e3:.3f}", "cpu_load": f"{cpu_load():.2f}", "clock": clock_name,
    }], __file__)
    return {"images_per_s": args.images / seconds, "parts": per_run, "means": result.means}


if __name__ == "__main__":
    main()
