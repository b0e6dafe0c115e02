"""How much a few-step sampler can save at SD 2.1 size: FLOPs of one U-Net pass against the fixed work
of a translation (the VAE encoding the SAR image, the VAE decoding the result), counted with
torch.utils.flop_counter.FlopCounterMode on the meta device (nothing is computed or timed).

    python -m studies.fewstep.vae_share        # 256 and 512 px

The speed-up of S steps over 50 is at most (50 U + F) / (S U + F), U a pass and F the fixed work,
whatever the sampler: a bound by FLOPs, not a measured time.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cdiff.config import UNetConfig, VAEConfig
from cdiff.unet import UNet
from cdiff.vae import VAE

PROMPT_TOKENS = 6  # the release's unpadded "electro-optical image" prompt, as benchmarks/train_cost.py counts


def flops(side: int) -> dict[str, float]:
    """GFLOPs at ``side`` px, batch 1: one pass of SD 2.1's 8-in/5-out U-Net, the VAE encoder, the VAE decoder."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet(replace(UNetConfig.sd21(), in_channels=8, out_channels=5))
        vae = VAE(VAEConfig())
    image = torch.empty(1, 3, side, side, device="meta")  # (B, 3, H, W)
    latent = torch.empty(1, 8, side // 8, side // 8, device="meta")  # (B, [SAR | x_t], h, w)
    t = torch.zeros(1, dtype=torch.long, device="meta")
    context = torch.empty(1, PROMPT_TOKENS, unet.config.context_dim, device="meta")
    calls = {"unet": lambda: unet(latent, t, context), "encode": lambda: vae.encode_latent(image),
             "decode": lambda: vae.decode_latent(latent[:, :4])}
    out = {}
    with torch.no_grad():
        for name, call in calls.items():
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            out[name] = counter.get_total_flops() / 1e9
    return out


def main() -> None:
    print("| px | U-Net pass GFLOPs | VAE encode | VAE decode | fixed work in passes | 4 steps over 50: bound |")
    print("|---|---|---|---|---|---|")
    for side in (256, 512):
        f = flops(side)
        fixed = f["encode"] + f["decode"]
        bound = (50 * f["unet"] + fixed) / (4 * f["unet"] + fixed)
        print(f"| {side} | {f['unet']:.0f} | {f['encode']:.0f} | {f['decode']:.0f} | {fixed / f['unet']:.2f} | {bound:.2f}x |")


if __name__ == "__main__":
    main()
