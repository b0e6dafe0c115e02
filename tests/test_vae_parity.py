"""cdiff.vae.VAE (SD 2.1 config) against diffusers' AutoencoderKL with the same random weights.

fp32 on CPU, one 256x256 image and one 32x32 latent; the reference runs once, cdiff runs with
both attention backends. Batch > 1 and non-square inputs are checked on the tiny config
(tests/test_vae.py), where they are cheap.
"""

from __future__ import annotations

import gc

import pytest
import torch

from cdiff.attention import use_attention_backend
from cdiff.config import VAEConfig
from cdiff.layouts.diffusers import VAE as VAE_TABLE
from cdiff.testing import SD21_VAE, assert_parity, randomize_
from cdiff.vae import VAE


@pytest.fixture(scope="module")
def parity():
    """The diffusers reference's outputs, and a cdiff VAE loaded with its weights."""
    from diffusers import AutoencoderKL

    ref = randomize_(AutoencoderKL(**SD21_VAE).eval(), seed=0)
    foreign_state = {k: v.clone() for k, v in ref.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1
    latent = torch.randn(1, 4, 32, 32, generator=gen)
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        expected = {"mean": posterior.mean, "logvar": posterior.logvar, "decoded": ref.decode(latent).sample}
    del ref, posterior
    gc.collect()

    vae = VAE(VAEConfig.sd21()).eval()
    vae.load_state_dict(VAE_TABLE.rename(foreign_state, to="cdiff"), strict=True)
    yield {"vae": vae, "foreign_state": foreign_state, "images": images, "latent": latent, **expected}
    del vae, foreign_state
    gc.collect()


def test_sd21_preset_is_the_reference_config():
    config = VAEConfig.sd21()
    assert config.image_channels == SD21_VAE["in_channels"]
    assert config.block_channels == tuple(SD21_VAE["block_out_channels"])
    assert config.layers_per_block == SD21_VAE["layers_per_block"]
    assert config.latent_channels == SD21_VAE["latent_channels"]
    assert config.norm_groups == SD21_VAE["norm_num_groups"]
    assert config.scaling_factor == 0.18215
    assert config.norm_eps == 1e-6
    assert config.downsample_factor == 8


def test_rename_table_round_trips_every_key(parity):
    foreign_keys = list(parity["foreign_state"])
    cdiff_keys = list(parity["vae"].state_dict())
    as_cdiff = VAE_TABLE.rename(dict.fromkeys(foreign_keys), to="cdiff")
    assert sorted(as_cdiff) == sorted(cdiff_keys)  # one-to-one onto cdiff's names
    assert list(VAE_TABLE.rename(as_cdiff, to="foreign")) == foreign_keys
    as_foreign = VAE_TABLE.rename(dict.fromkeys(cdiff_keys), to="foreign")
    assert list(VAE_TABLE.rename(as_foreign, to="cdiff")) == cdiff_keys
    # A few names written out, so a table that renames consistently but wrongly fails too.
    skip = VAE_TABLE.to_foreign("encoder.down.1.res.0.skip.weight")
    assert skip == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert VAE_TABLE.to_foreign("decoder.mid.attn.to_out.bias") == "decoder.mid_block.attentions.0.to_out.0.bias"
    assert VAE_TABLE.to_foreign("decoder.up.2.upsample.conv.weight") == "decoder.up_blocks.2.upsamplers.0.conv.weight"
    assert VAE_TABLE.to_cdiff("encoder.mid_block.attentions.0.group_norm.weight") == "encoder.mid.attn.norm.weight"


def test_loaded_weights_are_the_reference_weights(parity):
    ours = parity["vae"].state_dict()
    for foreign_key, value in parity["foreign_state"].items():
        assert torch.equal(ours[VAE_TABLE.to_cdiff(foreign_key)], value), foreign_key


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_encode_matches_diffusers(parity, backend):
    with torch.no_grad(), use_attention_backend(backend):
        posterior = parity["vae"].encode(parity["images"])
    assert_parity(posterior.mean, parity["mean"], f"SD 2.1 VAE encode mean ({backend})")
    assert_parity(posterior.logvar, parity["logvar"], f"SD 2.1 VAE encode logvar ({backend})")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_decode_matches_diffusers(parity, backend):
    with torch.no_grad(), use_attention_backend(backend):
        decoded = parity["vae"].decode(parity["latent"])
    assert_parity(decoded, parity["decoded"], f"SD 2.1 VAE decode ({backend})")
