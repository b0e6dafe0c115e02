"""GPU-hours of the dataset configs' training stages on one H100, ESTIMATED from FLOPs: no GPU figure
has been measured for them yet. Measure one with benchmarks/gpu_check.sh (its 256-px training step at
batch 64: images/s), then hours = steps x batch / images per second / 3600.

    python -m benchmarks.train_cost                                   # the four dataset configs
    python -m benchmarks.train_cost configs/sar2opt.toml --utilisation 0.3

How (the comment block at the top of each configs/<dataset>.toml quotes this script's output):
1. FLOPs of one training sample, counted with torch.utils.flop_counter.FlopCounterMode on the meta
   device (shapes only, no memory, seconds on a CPU), at the config's image side: the frozen VAE
   encoder's forward over the SAR and the EO image, and the full SD 2.1-base U-Net's (8-in/5-out,
   the 6-token prompt) forward and backward at side / 8. Products and convolutions count 2 per
   multiply-add, attention included; elementwise work, GroupNorm and the AdamW update are not
   counted (they are memory-bound; the utilisation below absorbs them). Stage 1's U-Net has one
   output channel fewer: < 0.01% of the FLOPs, so both stages cost the same per step.
2. Time per step = FLOPs x batch / (peak x utilisation), with the H100 SXM5's dense peaks (NVIDIA's
   data sheet, whose tensor figures are "with sparsity", twice the dense ones): bf16 989.5 TFLOP/s,
   TF32 494.7, FP32 67.0 (no tensor cores). "fp32" is PyTorch's default for fp32 training:
   convolutions on TF32 tensor cores (torch.backends.cudnn.allow_tf32 is True by default), matrix
   products (attention, projections) in full FP32 (torch.backends.cuda.matmul.allow_tf32 is False).
   "bf16" is cdiff's train.precision = "bf16" autocast: both on bf16 tensor cores.
3. The utilisation (--utilisation, default 0.4) is an ASSUMPTION, the same for every path: a round
   figure in the range reported for U-Net diffusion training on tensor cores. The real figure
   can be far from it either way; it is what gpu_check.sh measures.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("qxs-saropt", "sar2opt", "sar2eo", "spacenet6")
PROMPT_TOKENS = 6  # the release's unpadded "electro-optical image" prompt
# The image side each dataset kind trains at, before the crop (data.crop): its files' side.
IMAGE_SIDES = {"qxs": 256, "sar2opt": 600, "sar2eo": 256, "spacenet6_chips": 256, "spacenet6": 900}
# H100 SXM5, dense TFLOP/s (data sheet figures with sparsity, halved; FP32 has no tensor cores).
H100_BF16, H100_TF32, H100_FP32 = 989.5, 494.7, 67.0
CONVOLUTIONS = ("convolution", "convolution_backward")


@dataclass(frozen=True)
class SampleFlops:
    conv: float  # per training sample: convolutions, forward and backward
    matmul: float  # per training sample: matrix products and attention

    @property
    def total(self) -> float:
        return self.conv + self.matmul


@lru_cache(maxsize=None)
def sample_flops(side: int) -> SampleFlops:
    """FLOPs of one training sample at ``side`` px: VAE encoder forward of 2 images, U-Net forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from cdiff.config import UNetConfig, VAEConfig
    from cdiff.unet import UNet
    from cdiff.vae import VAE

    with torch.device("meta"):
        unet = UNet(replace(UNetConfig.sd21(), in_channels=8, out_channels=5))
        vae = VAE(VAEConfig())
    images = torch.empty(2, 3, side, side, device="meta")  # (SAR + EO, 3, H, W)
    latents = torch.empty(1, 8, side // 8, side // 8, device="meta")  # (B, [SAR | x_t], h, w)
    timesteps = torch.zeros(1, dtype=torch.long, device="meta")
    context = torch.empty(1, PROMPT_TOKENS, unet.config.context_dim, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            vae.encode_latent(images)
        unet(latents, timesteps, context).square().mean().backward()
    counts = counter.get_flop_counts()["Global"]
    conv = sum(v for k, v in counts.items() if str(k).split(".")[1] in CONVOLUTIONS)
    return SampleFlops(conv=conv, matmul=sum(counts.values()) - conv)


@dataclass(frozen=True)
class Estimate:
    name: str
    side: int
    batch: int
    steps: tuple[int, ...]  # per stage
    conv_per_step: float
    matmul_per_step: float
    seconds_fp32: float  # per step
    seconds_bf16: float

    @property
    def flops_per_step(self) -> float:
        return self.conv_per_step + self.matmul_per_step

    def hours(self, seconds: float) -> list[float]:
        return [seconds * n / 3600 for n in self.steps]


def estimate(config_path, utilisation: float = 0.4) -> Estimate:
    """The estimate for the run config at ``config_path``."""
    from cdiff.train.configfile import load_config

    config = load_config(config_path)
    data, model = config.data, config.model
    side = data.crop or IMAGE_SIDES[data.kind]
    batch = config.global_batch
    flops = sample_flops(side)
    stages = getattr(model, "stages", (2,))
    steps = tuple((model.stage1_steps or config.train.steps) if s == 1 else config.train.steps for s in stages)
    fp32 = batch * (flops.conv / (H100_TF32 * 1e12 * utilisation) + flops.matmul / (H100_FP32 * 1e12 * utilisation))
    bf16 = batch * flops.total / (H100_BF16 * 1e12 * utilisation)
    return Estimate(Path(config_path).stem, side, batch, steps, batch * flops.conv, batch * flops.matmul, fp32, bf16)


def report(estimates: list[Estimate], utilisation: float) -> str:
    lines = [f"H100 SXM5, {utilisation:.0%} of the dense peaks assumed (an estimate from FLOPs, not a measurement)",
             f"{'config':<12} {'side':>4} {'batch':>5} {'TFLOP/step (conv+matmul)':>25} {'s/step fp32':>11} "
             f"{'s/step bf16':>11}  GPU-hours per stage: fp32 | bf16"]
    for e in estimates:
        stages = "; ".join(f"stage {i + 1} ({n:,} steps): {h32:.1f} | {h16:.1f}"
                           for i, (n, h32, h16) in enumerate(zip(e.steps, e.hours(e.seconds_fp32),
                                                                  e.hours(e.seconds_bf16))))
        split = f"{e.flops_per_step / 1e12:.1f} ({e.conv_per_step / 1e12:.1f}+{e.matmul_per_step / 1e12:.1f})"
        lines.append(f"{e.name:<12} {e.side:>4} {e.batch:>5} {split:>25} {e.seconds_fp32:>11.3f} "
                     f"{e.seconds_bf16:>11.3f}  {stages}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="run configs (default: the four dataset configs)")
    parser.add_argument("--utilisation", type=float, default=0.4, help="fraction of the peaks assumed (default 0.4)")
    args = parser.parse_args(argv)
    paths = args.configs or [ROOT / "configs" / f"{name}.toml" for name in CONFIGS]
    print(report([estimate(p, args.utilisation) for p in paths], args.utilisation))


if __name__ == "__main__":
    main()
