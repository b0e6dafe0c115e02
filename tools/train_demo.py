"""Make the bundled demo model, weights/cdiff-demo-tiny.safetensors, on the CPU.

    python tools/train_demo.py [--out weights/cdiff-demo-tiny.safetensors] [--threads 2]

1. VAE (tools/demo_vae.py): the tiny VAE on synthetic EO and SAR windows, scaling_factor set
   so the scaled latents have unit standard deviation.
2. U-Net: the tiny C-DiffSET U-Net (8-in/5-out, the variance channel zero-initialised as the
   surgery does) on the latents of synthetic pairs with discrepancies and misregistrations,
   with the C-Diff loss. PROTOTYPE: tools/demo_unet.py's loop until `cdiff train` lands.
3. The model is written as one native file in fp16 (the demo loads it in fp32), and its
   scores on held-out scenes (cdiff.demo.Protocol) beside it, in a .json record.

Seeds: training scenes are 0 .. N - 1; held-out scenes start at cdiff.demo.HELDOUT_SEED
(1,000,000). Every random draw comes from seeded generators: the same thread count on the
same machine gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import cdiff  # noqa: E402
from cdiff.demo import DEMO_MODEL, PROMPT_TOKENS, Protocol, measure  # noqa: E402
from tools.demo_unet import UNetRecipe, train_unet  # noqa: E402
from tools.demo_vae import VAERecipe, train_vae, training_scenes  # noqa: E402

PAIRS = 3000  # U-Net training pairs: seeds 0 .. PAIRS - 1
CONTEXT_SEED = 0  # the fixed prompt embedding: seeded N(0, 1), (6, 1024); no text encoder in the demo


def start_unet(seed: int) -> cdiff.UNet:
    """The tiny 8-in/5-out U-Net with default init; its variance channel starts at exactly 1, as after the surgery."""
    torch.manual_seed(seed)
    unet = cdiff.UNet(cdiff.UNetConfig.tiny(in_channels=8, out_channels=5))
    with torch.no_grad():
        unet.conv_out.weight[4:].zero_()
        unet.conv_out.bias[4:].zero_()
    return unet


@torch.no_grad()
def encode_pairs(vae: cdiff.VAE, count: int, size: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior means (SAR, EO), each (count, 4, size/8, size/8), of training pairs 0 .. count - 1."""
    sar_latents, eo_latents = [], []
    for first in range(0, count, chunk):
        sar, eo = training_scenes(min(chunk, count - first), size, first_seed=first)
        sar_latents.append(vae.encode_latent(sar))
        eo_latents.append(vae.encode_latent(eo))
    return torch.cat(sar_latents), torch.cat(eo_latents)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEMO_MODEL), help="the native model file to write")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it; default 2)")
    parser.add_argument("--vae-steps", type=int, default=VAERecipe.steps)
    parser.add_argument("--unet-steps", type=int, default=UNetRecipe.steps)
    parser.add_argument("--pairs", type=int, default=PAIRS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    vae_recipe = VAERecipe(steps=args.vae_steps)
    vae = train_vae(vae_recipe)
    vae_seconds = time.perf_counter() - start
    print(f"VAE: {vae_seconds:.0f} s, scaling_factor {vae.config.scaling_factor}")

    sar_latents, eo_latents = encode_pairs(vae, args.pairs, vae_recipe.size)
    context = torch.randn(PROMPT_TOKENS, 1024, generator=torch.Generator().manual_seed(CONTEXT_SEED))
    unet_recipe = UNetRecipe(steps=args.unet_steps)
    unet = train_unet(start_unet(unet_recipe.seed), sar_latents, eo_latents, context, unet_recipe)
    train_seconds = time.perf_counter() - start

    out = Path(args.out)
    cdiff.save_native(out, unet.half(), vae.half(), context.half())
    protocol = Protocol()
    scores = measure(cdiff.load_pipeline(out, dtype=torch.float32), protocol)
    record = {
        "model": out.name,
        "protocol": asdict(protocol),
        "scores": scores,
        "training": {
            "seconds": round(train_seconds), "vae_seconds": round(vae_seconds), "threads": args.threads,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "pairs": args.pairs, "vae": asdict(vae_recipe), "unet": asdict(unet_recipe), "context_seed": CONTEXT_SEED,
        },
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
