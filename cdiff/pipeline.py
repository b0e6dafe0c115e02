"""C-DiffSET inference: a SAR image in, an EO image and a confidence map out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdiff.loss import confidence_from_raw
from cdiff.schedulers import DDIM, DDPM

DEFAULT_PROMPT = "electro-optical image"


@dataclass
class Translation:
    eo: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    confidence: torch.Tensor | None  # (B, 1, H/8, W/8) = 1 / variance at the midpoint step; None for a 4-out U-Net


class Pipeline:
    """The U-Net, the VAE and the fixed prompt embedding of a C-DiffSET model.

    context: (L, context_dim) prompt embedding (the release's unpadded prompt has L of about 6).
    """

    def __init__(self, unet, vae, context: torch.Tensor, prompt: str = DEFAULT_PROMPT, process: DDPM | None = None):
        if context.ndim != 2 or context.shape[1] != unet.config.context_dim:
            raise ValueError(
                f"context must be (L, {unet.config.context_dim}) for this U-Net, got {tuple(context.shape)}"
            )
        if unet.config.in_channels != 2 * vae.config.latent_channels:
            raise ValueError(
                f"a C-DiffSET U-Net takes [SAR latent | EO latent] = {2 * vae.config.latent_channels} channels, "
                f"this one takes {unet.config.in_channels}"
            )
        self.unet, self.vae, self.context, self.prompt = unet, vae, context, prompt
        self.process = process or DDPM()

    def to(self, device=None, dtype=None) -> "Pipeline":
        self.unet.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        self.context = self.context.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def translate(
        self,
        sar: torch.Tensor,
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        show_progress: bool = False,
    ) -> Translation:
        """Translate SAR images (B, 3, H, W) in [-1, 1] (H, W multiples of 8) into EO images.

        DDIM from pure noise, conditioned on the SAR latent (the VAE posterior mean). The
        confidence map is the one the U-Net predicts at the midpoint step (t near T/2), as
        the release saves it.
        """
        param = next(self.unet.parameters())
        sar = sar.to(device=param.device, dtype=param.dtype)
        sar_latent = self.vae.encode_latent(sar)  # (B, 4, h, w), scaled
        context = self.context.to(param.dtype).expand(sar.shape[0], -1, -1)  # (B, L, context_dim)
        ddim = DDIM(self.process, num_steps=steps, eta=eta)
        midpoint = ddim.timesteps[len(ddim.timesteps) // 2]
        latent_channels = sar_latent.shape[1]
        captured = {}

        def predict_noise(eo_latent: torch.Tensor, t: int) -> torch.Tensor:
            output = self.unet(torch.cat([sar_latent, eo_latent], dim=1), t, context)
            if t == midpoint and output.shape[1] > latent_channels:
                captured["raw"] = output[:, latent_channels:]
            return output[:, :latent_channels]

        # Draw on the generator's device so a seed gives the same image on CPU and GPU.
        noise_device = generator.device if generator is not None else sar.device
        noise = torch.randn(sar_latent.shape, generator=generator, device=noise_device).to(sar.device, sar.dtype)
        eo_latent = ddim.sample(predict_noise, noise, generator=generator, show_progress=show_progress)
        eo = self.vae.decode_latent(eo_latent).clamp(-1, 1)
        confidence = confidence_from_raw(captured["raw"].float()) if "raw" in captured else None
        return Translation(eo=eo, confidence=confidence)
