"""Rename tables between cdiff and the diffusers folder layout (``unet/``, ``vae/``)."""

from __future__ import annotations

from cdiff.layouts import RenameTable

# --- U-Net: cdiff.unet.UNet <-> diffusers UNet2DConditionModel -----------------------------
UNET = RenameTable("diffusers U-Net", rules=())

# --- VAE: cdiff.vae.VAE <-> diffusers AutoencoderKL ---------------------------------------
VAE = RenameTable("diffusers VAE", rules=())
