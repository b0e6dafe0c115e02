"""The attention seam: backends per model and per module, custom functions, masks, captured
maps, and half precision on SDPA (no upcast flag: both paths accumulate in fp32)."""

from __future__ import annotations

import pytest
import torch

from cdiff.attention import (
    attention,
    capture_attention,
    math_attention,
    process_attention_backend,
    sdpa_attention,
    set_attention_backend,
    use_attention_backend,
)
from cdiff.config import UNetConfig, VAEConfig
from cdiff.layouts.diffusers_config import unet_config_from_diffusers
from cdiff.testing import SD21_UNET, assert_parity, randomize_, tiny_configs
from cdiff.unet import UNet
from cdiff.vae import VAE

BACKENDS = {"sdpa": sdpa_attention, "math": math_attention}


def qkv(batch=2, heads=3, q_len=5, k_len=7, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, d, generator=gen) for n in (q_len, k_len, k_len))


def reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v in fp64, written out here."""
    scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ v.double()


@pytest.fixture(scope="module")
def unet():
    return randomize_(UNet(UNetConfig.tiny(in_channels=8, out_channels=5)), 0).eval()


def unet_inputs(batch=2, side=16, context_len=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 8, side, side, generator=gen)
    context = torch.randn(batch, context_len, 1024, generator=gen)
    return sample, torch.tensor([10, 700])[:batch], context


CROSS_ATTENTIONS = 16  # tiny U-Net: 6 down + 1 mid + 9 up spatial transformers, one block each


def side_at(name: str, side: int, levels: int = 4) -> int:
    """The latent side where module ``name`` runs (up.0 is the deepest level, as is the mid block)."""
    kind, index = name.split(".")[:2]
    level = int(index) if kind == "down" else levels - 1 - int(index) if kind == "up" else levels - 1
    return side // 2**level


# --- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_mask_changes_exactly_the_masked_positions(backend):
    """Queries with no masked key are untouched; the others equal attention over their kept keys only."""
    q, k, v = qkv()
    mask = torch.ones(2, 3, 5, 7, dtype=torch.bool)
    mask[0, 1, 2, [0, 4]] = False  # query 2 of head 1, item 0 loses keys 0 and 4
    mask[1, :, 4, 6] = False  # query 4 of item 1 loses key 6 in every head
    plain, masked = BACKENDS[backend](q, k, v), BACKENDS[backend](q, k, v, mask)
    touched = ~mask.all(dim=-1)  # (B, heads, Lq)
    torch.testing.assert_close(masked[~touched], plain[~touched], rtol=0, atol=1e-6)
    for b, h, i in touched.nonzero().tolist():
        keep = mask[b, h, i]
        expected = reference(q[b, h, i : i + 1], k[b, h][keep], v[b, h][keep])[0]
        torch.testing.assert_close(masked[b, h, i].double(), expected, rtol=0, atol=1e-6)
        assert (masked[b, h, i] - plain[b, h, i]).abs().max() > 1e-3


def test_additive_mask_is_added_to_the_scores():
    q, k, v = qkv()
    bias = torch.randn(1, 1, 5, 7, generator=torch.Generator().manual_seed(3))
    for backend in BACKENDS.values():
        scores = q.double() @ k.double().transpose(-1, -2) / 8**0.5 + bias.double()
        torch.testing.assert_close(backend(q, k, v, bias).double(), scores.softmax(-1) @ v.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", list(BACKENDS))
@torch.no_grad()
def test_unet_context_mask_ignores_padding(unet, backend):
    """A context padded with junk and masked gives the output of the unpadded context."""
    sample, t, context = unet_inputs()
    junk = 5 * torch.randn(2, 71, 1024, generator=torch.Generator().manual_seed(2))
    padded = torch.cat([context, junk], dim=1)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[:, :6] = True
    with use_attention_backend(backend):
        expected = unet(sample, t, context)
        assert_parity(unet(sample, t, padded, context_mask=mask), expected, f"masked padding ({backend})", rel_tol=1e-5)
        assert (unet(sample, t, padded) - expected).abs().max() > 1e-3  # the padding matters unmasked


def test_unet_context_mask_is_checked(unet):
    sample, t, context = unet_inputs()
    with pytest.raises(ValueError, match=r"context_mask: expected a bool tensor of shape \(2, 6\)"):
        unet(sample, t, context, context_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"context_mask"):
        unet(sample, t, context, context_mask=torch.ones(2, 5, dtype=torch.bool))


# --- backends: process-wide, per model, per module, custom functions -------------------------


def test_custom_function_runs_on_split_heads():
    calls = []

    def mine(q, k, v, mask=None):
        calls.append((q.shape, k.shape, mask))
        return math_attention(q, k, v, mask)

    q, k, v = (torch.randn(2, 5, 12), torch.randn(2, 7, 12), torch.randn(2, 7, 12))
    out = attention(q, k, v, heads=3, backend=mine)
    assert calls == [(torch.Size([2, 3, 5, 4]), torch.Size([2, 3, 7, 4]), None)]
    torch.testing.assert_close(out, attention(q, k, v, heads=3, backend="math"), rtol=0, atol=0)
    with use_attention_backend(mine):
        attention(q, k, v, heads=3)
    assert len(calls) == 2


@torch.no_grad()
def test_backend_per_model_and_per_module(unet):
    sample, t, context = unet_inputs()
    with use_attention_backend("math"):
        expected = unet(sample, t, context)
    calls = []

    def counting(q, k, v, mask=None):
        calls.append(q.shape)
        return math_attention(q, k, v, mask)

    try:
        # One module: only that module calls the function.
        module = unet.mid.attn.blocks[0].cross_attn
        assert set_attention_backend(module, counting) == 1
        assert_parity(unet(sample, t, context), expected, "one module on a custom backend", rel_tol=1e-5)
        assert len(calls) == 1
        # The whole model: every attention (self and cross) calls it, even inside a process-wide block.
        calls.clear()
        assert set_attention_backend(unet, counting) == 2 * CROSS_ATTENTIONS
        with use_attention_backend("sdpa"):
            out = unet(sample, t, context)
        assert len(calls) == 2 * CROSS_ATTENTIONS
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    finally:
        set_attention_backend(unet, None)
    calls.clear()
    unet(sample, t, context)
    assert not calls  # None hands every module back to the process-wide choice


def test_vae_backend_and_bad_backends():
    vae = VAE(VAEConfig.tiny())
    assert set_attention_backend(vae, "math") == 2  # the encoder's and the decoder's mid attention
    with pytest.raises(ValueError, match=r"attention backend must be 'sdpa', 'math' or a function"):
        set_attention_backend(vae, "flash")
    with pytest.raises(ValueError, match=r"attention backend must be"):
        with use_attention_backend("xformers"):
            pass
    with pytest.raises(ValueError, match=r"Linear holds no attention module"):
        set_attention_backend(torch.nn.Linear(2, 2), "math")


# --- captured attention maps -----------------------------------------------------------------


@torch.no_grad()
def test_capture_attention_maps(unet):
    sample, t, context = unet_inputs(side=16, context_len=6)
    with use_attention_backend("math"):
        expected = unet(sample, t, context)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with capture_attention(unet) as maps:
        out = unet(sample, t, context)  # the default backend (SDPA) everywhere else
        unet(sample, t, context, context_mask=mask)
    assert_parity(out, expected, "output while capturing", rel_tol=1e-5)
    assert len(maps) == CROSS_ATTENTIONS and all(name.endswith(".cross_attn") for name in maps)
    for name, (first, masked) in maps.items():
        module = unet.get_submodule(name)
        assert first.shape == (2, module.heads, side_at(name, 16) ** 2, 6), name
        assert first.dtype == torch.float32
        torch.testing.assert_close(first.sum(dim=-1), torch.ones(first.shape[:-1]), rtol=0, atol=1e-6)
        assert not masked[1, ..., 4:].any() and masked[0, ..., 4:].min() > 0  # masked keys get nothing
        torch.testing.assert_close(masked.sum(dim=-1), torch.ones(masked.shape[:-1]), rtol=0, atol=1e-6)
    assert all(m.attention_backend is None for m in unet.modules() if hasattr(m, "attention_backend"))


@torch.no_grad()
def test_captured_map_equals_the_layer_attention():
    torch.manual_seed(0)
    layer = UNet(UNetConfig.tiny()).mid.attn.blocks[0].cross_attn
    tokens, context = torch.randn(2, 4, 64), torch.randn(2, 6, 1024)
    wrapper = torch.nn.Module()
    wrapper.cross_attn = layer
    with capture_attention(wrapper) as maps:
        layer(tokens, context)
    q = layer.to_q(tokens).reshape(2, 4, layer.heads, -1).transpose(1, 2)
    k = layer.to_k(context).reshape(2, 6, layer.heads, -1).transpose(1, 2)
    expected = (q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    torch.testing.assert_close(maps["cross_attn"][0].double(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"no attention module named \*to_q"):
        with capture_attention(wrapper, layers="to_q"):
            pass


# --- half precision: SDPA, no upcast flag ------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_half_precision_scores_beyond_fp16_range(backend, dtype, tol):
    """Scores of ~1e4 (q.k ~ 9e4 > fp16's 65504): scores computed in fp16 overflow, both backends
    accumulate in fp32 and match fp64."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, generator=gen) for n in (256, 77, 77))
    q[..., 0], k[..., 0] = 300.0, 300.0  # a large shared component; the rest spreads the softmax
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if dtype == torch.float16:
        assert not torch.isfinite(q @ k.transpose(-1, -2)).all()  # what an fp16 score matmul would do
    out = BACKENDS[backend](q, k, v)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=0, atol=tol)


@torch.no_grad()
def test_sd21_768_config_runs_sdpa(monkeypatch):
    """SD 2.1-768's config.json (upcast_attention: true) builds the same U-Net as 2.1 base, whose
    every attention goes to SDPA (before, upcast forced the fp32 math path for every layer)."""
    sd21_768 = dict(SD21_UNET, upcast_attention=True, sample_size=96)
    assert unet_config_from_diffusers(sd21_768) == UNetConfig.sd21()
    tiny_768 = unet_config_from_diffusers(dict(tiny_configs()[0], upcast_attention=True))
    assert tiny_768 == UNetConfig.tiny()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr("cdiff.attention.F.scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    model = UNet(tiny_768).to(torch.bfloat16)
    sample, t, context = unet_inputs()
    out = model(sample[:, :4].to(torch.bfloat16), t, context.to(torch.bfloat16))
    assert len(calls) == 2 * CROSS_ATTENTIONS and torch.isfinite(out).all()


def test_process_attention_backend_is_the_innermost_block_else_the_switch(monkeypatch):
    monkeypatch.setenv("CDIFF_ATTENTION", "math")
    assert process_attention_backend() == "math"
    with use_attention_backend("sdpa"):
        with use_attention_backend(math_attention):
            assert process_attention_backend() is math_attention
        assert process_attention_backend() == "sdpa"
    assert process_attention_backend() == "math"
