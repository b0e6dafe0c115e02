"""cdiff.vae on the tiny preset: shapes, precision, posterior, scaling, gradients, compile, errors.

The reference throughout is diffusers' AutoencoderKL built with the tiny config's numbers
and the same seeded weights, so every expected value comes from outside cdiff.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from cdiff.attention import use_attention_backend
from cdiff.config import VAEConfig
from cdiff.layouts.diffusers import VAE as VAE_TABLE
from cdiff.testing import assert_parity, randomize_
from cdiff.vae import VAE

TINY = VAEConfig.tiny()


def _images(batch, height, width, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1  # [-1, 1]


def _latent(batch, height, width, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, height, width, generator=gen)


@pytest.fixture(scope="module")
def models():
    """(cdiff tiny VAE, diffusers AutoencoderKL with the same config and weights)."""
    from diffusers import AutoencoderKL

    levels = len(TINY.block_channels)
    ref = AutoencoderKL(
        in_channels=TINY.image_channels,
        out_channels=TINY.image_channels,
        block_out_channels=TINY.block_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=TINY.layers_per_block,
        latent_channels=TINY.latent_channels,
        norm_num_groups=TINY.norm_groups,
        act_fn="silu",
        scaling_factor=0.18215,
    ).eval()
    randomize_(ref, seed=0)
    vae = VAE(TINY).eval()
    vae.load_state_dict(VAE_TABLE.rename(ref.state_dict(), to="cdiff"), strict=True)
    yield vae, ref
    del vae, ref
    gc.collect()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("batch,height,width", [(1, 32, 32), (3, 64, 40)], ids=["square", "batch3-nonsquare"])
def test_matches_diffusers(models, backend, batch, height, width):
    vae, ref = models
    images = _images(batch, height, width)
    latent = _latent(batch, height // 8, width // 8)
    with torch.no_grad(), use_attention_backend(backend):
        posterior, expected = vae.encode(images), ref.encode(images).latent_dist
        assert_parity(posterior.mean, expected.mean, f"tiny encode mean {batch}x{height}x{width} ({backend})")
        assert_parity(posterior.logvar, expected.logvar, f"tiny encode logvar ({backend})")
        assert_parity(posterior.std, expected.std, f"tiny posterior std ({backend})")
        decoded, expected_decoded = vae.decode(latent), ref.decode(latent).sample
        assert_parity(decoded, expected_decoded, f"tiny decode {batch}x{height}x{width} ({backend})")


@pytest.mark.parametrize("batch,height,width", [(1, 16, 16), (2, 48, 24)])
def test_shapes(models, batch, height, width):
    vae, _ = models
    with torch.no_grad():
        posterior = vae.encode(_images(batch, height, width))
        latent_shape = (batch, 4, height // 8, width // 8)
        for name in ("mean", "logvar", "std", "var"):
            assert getattr(posterior, name).shape == latent_shape, name
        assert posterior.mode().shape == latent_shape
        assert vae.decode(posterior.mean).shape == (batch, 3, height, width)
        assert vae(_images(batch, height, width)).shape == (batch, 3, height, width)


def test_logvar_is_clamped_like_the_reference():
    # Push the logvar half of quant_conv's output far outside [-30, 20] through its bias.
    vae = randomize_(VAE(TINY), seed=3).eval()
    with torch.no_grad():
        vae.quant_conv.bias[4:] = torch.tensor([1e3, -1e3, 1e3, -1e3])
        posterior = vae.encode(_images(1, 16, 16))
    assert torch.equal(posterior.logvar[:, 0::2], torch.full_like(posterior.logvar[:, 0::2], 20.0))
    assert torch.equal(posterior.logvar[:, 1::2], torch.full_like(posterior.logvar[:, 1::2], -30.0))
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar), rtol=0, atol=0)
    torch.testing.assert_close(posterior.var, torch.exp(posterior.logvar), rtol=0, atol=0)


def test_channels_last_input_equals_contiguous(models):
    vae, _ = models
    images, latent = _images(2, 32, 24), _latent(2, 4, 3)
    with torch.no_grad():
        mean = vae.encode(images).mean
        mean_cl = vae.encode(images.contiguous(memory_format=torch.channels_last)).mean
        decoded = vae.decode(latent)
        decoded_cl = vae.decode(latent.contiguous(memory_format=torch.channels_last))
    # Only the convolution algorithm may differ: 1e-5 of the largest value.
    assert_parity(mean_cl, mean, "channels-last encode mean", rel_tol=1e-5)
    assert_parity(decoded_cl, decoded, "channels-last decode", rel_tol=1e-5)


# Measured errors (relative to max|fp32|): fp16 ~2e-3, bf16 ~1.7e-2 (8 mantissa bits through
# ~20 layers). Tolerances are a few times that.
@pytest.mark.parametrize("dtype,rel_tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)], ids=["fp16", "bf16"])
def test_half_precision_is_finite_and_close(models, dtype, rel_tol):
    vae, _ = models
    half = copy.deepcopy(vae).to(dtype)
    images, latent = _images(1, 32, 32), _latent(1, 4, 4)
    big_latent = 100 * latent  # residual-stream activations in the hundreds
    with torch.no_grad():
        expected = (vae.encode(images).mean, vae.decode(latent), vae.decode(big_latent))
        got = (half.encode(images.to(dtype)).mean, half.decode(latent.to(dtype)), half.decode(big_latent.to(dtype)))
    for name, g, e in zip(("encode mean", "decode", "decode of 100x latent"), got, expected):
        assert g.dtype == dtype
        assert torch.isfinite(g).all(), f"{dtype} {name} has non-finite values"
        assert_parity(g.float(), e, f"{dtype} {name} vs fp32", rel_tol=rel_tol)
    del half
    gc.collect()


def test_posterior_sample_is_seeded_mean_plus_std_times_noise(models):
    vae, ref = models
    images = _images(2, 32, 32)
    with torch.no_grad():
        posterior = vae.encode(images)
        first = posterior.sample(torch.Generator().manual_seed(7))
        again = posterior.sample(torch.Generator().manual_seed(7))
        other = posterior.sample(torch.Generator().manual_seed(8))
        expected_ref = ref.encode(images).latent_dist.sample(torch.Generator().manual_seed(7))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    torch.testing.assert_close(first, posterior.mean + posterior.std * noise, rtol=0, atol=0)
    assert_parity(first, expected_ref, "posterior sample vs diffusers, same generator")
    assert torch.equal(posterior.mode(), posterior.mean)


def test_encode_latent_and_decode_latent_apply_the_scaling_factor(models):
    vae, ref = models
    assert vae.config.scaling_factor == ref.config.scaling_factor == 0.18215
    images = _images(2, 32, 32)
    scaled = _latent(2, 4, 4)
    with torch.no_grad():
        reference = ref.encode(images).latent_dist
        assert_parity(vae.encode_latent(images), reference.mean * 0.18215, "encode_latent (mean)")
        sampled = vae.encode_latent(images, generator=torch.Generator().manual_seed(5), sample=True)
        expected = reference.sample(torch.Generator().manual_seed(5)) * 0.18215
        assert_parity(sampled, expected, "encode_latent (sample)")
        assert_parity(vae.decode_latent(scaled), ref.decode(scaled / 0.18215).sample, "decode_latent")


def test_gradients_reach_every_decoder_parameter(models):
    vae, ref = models
    latent = _latent(2, 4, 4).requires_grad_(True)
    weights = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    vae.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    (vae.decode(latent) * weights).sum().backward()
    (ref.decode(latent.detach()).sample * weights).sum().backward()
    ref_params = dict(ref.named_parameters())
    decoder_params = [(n, p) for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    assert len(decoder_params) > 50
    for name, p in decoder_params:
        assert p.grad is not None, f"no gradient reaches {name}"
        if name.endswith("attn.to_k.bias"):
            # A key bias adds the same q.b to every score of a query row, which softmax ignores:
            # its true gradient is zero, so only rounding noise may reach it.
            scale = dict(decoder_params)[name.replace("bias", "weight")].grad.abs().max()
            assert p.grad.abs().max() <= 1e-5 * scale, f"{name}: gradient should vanish"
            continue
        assert p.grad.abs().sum() > 0, f"zero gradient at {name}"
        assert_parity(p.grad, ref_params[VAE_TABLE.to_foreign(name)].grad, f"grad {name}", rel_tol=1e-4)
    assert latent.grad is not None and torch.isfinite(latent.grad).all()
    vae.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def test_compiled_decode_matches_eager(models):
    vae, _ = models
    latent = _latent(2, 4, 4)
    compiled = torch.compile(vae.decode, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_parity(compiled(latent), vae.decode(latent), "compiled decode vs eager", rel_tol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "method,shape,message",
    [
        ("encode", (3, 32, 32), r"images must be images of shape \(B, 3, H, W\), got 3 dims"),
        ("encode", (1, 4, 32, 32), r"images must have 3 channels"),
        ("encode", (1, 1, 32, 32), r"images must have 3 channels"),
        ("encode", (1, 3, 36, 32), r"images: height and width must be divisible by 8"),
        ("encode", (1, 3, 32, 20), r"images: height and width must be divisible by 8"),
        ("encode_latent", (1, 3, 12, 16), r"images: height and width must be divisible by 8"),
        ("decode", (1, 3, 4, 4), r"latent must have 4 channels"),
        ("decode", (4, 4, 4), r"latent must be an unscaled latent of shape \(B, 4, H, W\), got 3 dims"),
        ("decode", (1, 1, 4, 4, 4), r"latent must be .* got 5 dims"),
        ("decode_latent", (1, 8, 4, 4), r"latent must have 4 channels"),
    ],
)
def test_bad_input_raises_a_clear_value_error(models, method, shape, message):
    vae, _ = models
    with pytest.raises(ValueError, match=message):
        getattr(vae, method)(torch.zeros(shape))
