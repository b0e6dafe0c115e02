"""The U-Net on the tiny preset: parity with a diffusers twin, shapes, dtypes, timestep forms,
gradients, torch.compile, and input validation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from cdiff.attention import use_attention_backend
from cdiff.config import UNetConfig
from cdiff.layouts.diffusers import UNET
from cdiff.testing import assert_parity, randomize_, relative_error
from cdiff.unet import UNet

# diffusers settings equal to UNetConfig.tiny(), written out (not derived from the config).
TINY_DIFFUSERS = dict(
    block_out_channels=[32, 64, 64, 64],
    attention_head_dim=[2, 4, 4, 4],  # head counts: channels / 16
    norm_num_groups=8,
    cross_attention_dim=1024,
    layers_per_block=2,
    use_linear_projection=True,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    sample_size=16,
)
LAYOUTS = {"8in5out": (8, 5), "4in4out": (4, 4)}


def tiny_unet(in_channels: int = 8, out_channels: int = 5, seed: int = 0) -> UNet:
    return randomize_(UNet(UNetConfig.tiny(in_channels=in_channels, out_channels=out_channels)), seed).eval()


def inputs(unet: UNet, batch: int = 3, height: int = 16, width: int = 24, context_len: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, height, width, generator=gen)
    context = torch.randn(batch, context_len, unet.config.context_dim, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return sample, t, context


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def test_tiny_parameter_count(unet):
    count = sum(p.numel() for p in unet.parameters())
    print(f"\ntiny U-Net (8in/5out): {count / 1e6:.2f}M parameters, {4 * count / 2**20:.1f} MiB in fp32")
    assert count < 20e6


@pytest.mark.slow  # diffusers' U-Net is built and run beside cdiff's: about 30 s per layout
@pytest.mark.parametrize("layout", list(LAYOUTS))
@torch.no_grad()
def test_tiny_matches_diffusers(layout):
    diffusers = pytest.importorskip("diffusers")
    in_channels, out_channels = LAYOUTS[layout]
    theirs = diffusers.UNet2DConditionModel(**TINY_DIFFUSERS, in_channels=in_channels, out_channels=out_channels)
    randomize_(theirs, seed=5).eval()
    ours = UNet(UNetConfig.tiny(in_channels=in_channels, out_channels=out_channels)).eval()
    ours.load_state_dict(UNET.rename(theirs.state_dict(), to="cdiff"), strict=True)
    assert set(UNET.rename(ours.state_dict(), to="foreign")) == set(theirs.state_dict())
    for context_len in (77, 6):
        sample, t, context = inputs(ours, batch=2, context_len=context_len)
        expected = theirs(sample, t, encoder_hidden_states=context).sample
        for backend in ("sdpa", "math"):
            with use_attention_backend(backend):
                out = ours(sample, t, context)
            assert_parity(out, expected, f"tiny {layout} {context_len}-token {backend}")


def test_norm_eps_and_groups_match_diffusers():
    """Every GroupNorm/LayerNorm has the eps and group count of its diffusers counterpart
    (found through the rename table). Random-weight parity cannot see eps at unit-scale activations."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**TINY_DIFFUSERS, in_channels=8, out_channels=5)
        ours = UNet(UNetConfig.tiny())
    checked = 0
    for name, module in ours.named_modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            twin = theirs.get_submodule(UNET.to_foreign(name + ".weight").removesuffix(".weight"))
            assert isinstance(twin, nn.GroupNorm) == isinstance(module, nn.GroupNorm), name
            assert module.eps == twin.eps, f"{name}: eps {module.eps} != diffusers {twin.eps}"
            assert getattr(module, "num_groups", None) == getattr(twin, "num_groups", None), name
            checked += 1
    assert checked == 2 * 22 + 1 + 16 + 3 * 16  # 22 res blocks, output norm, 16 transformers of 3 LayerNorms


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside diffusers' own imports
@torch.no_grad()
def test_spatial_transformer_matches_diffusers_on_small_activations():
    """At activations ~1e-3 (variance ~1e-6) the GroupNorm eps (1e-6) and LayerNorm eps (1e-5)
    change the output, so this pins both numerically."""
    diffusers = pytest.importorskip("diffusers")
    from cdiff.unet import SpatialTransformer

    theirs = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8,
                                cross_attention_dim=1024, use_linear_projection=True)
    randomize_(theirs, seed=9).eval()
    theirs.norm.weight.mul_(1e-3)  # tokens entering the LayerNorms are then ~1e-3 too
    theirs.norm.bias.mul_(1e-3)
    theirs.proj_in.bias.mul_(1e-3)
    ours = SpatialTransformer(32, UNetConfig.tiny()).eval()
    prefix = UNET.to_foreign("mid.attn") + "."  # a transformer's keys sit under this prefix
    ours.load_state_dict({UNET.to_cdiff(prefix + k).removeprefix("mid.attn."): v
                          for k, v in theirs.state_dict().items()}, strict=True)
    gen = torch.Generator().manual_seed(4)
    sample = 1e-3 * torch.randn(2, 32, 8, 12, generator=gen)
    context = torch.randn(2, 6, 1024, generator=gen)
    expected = theirs(sample, encoder_hidden_states=context).sample
    assert_parity(ours(sample, context) - sample, expected - sample, "spatial transformer at 1e-3 scale (residual)")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("height,width", [(16, 16), (16, 24), (32, 8)])
@torch.no_grad()
def test_output_shape(layout, height, width):
    in_channels, out_channels = LAYOUTS[layout]
    unet = tiny_unet(in_channels, out_channels)
    out = unet(*inputs(unet, batch=3, height=height, width=width))
    assert out.shape == (3, out_channels, height, width)
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_batch_items_are_independent(unet):
    """Item 1 of a batch of 3 equals the same item run alone (no mixing across the batch)."""
    sample, t, context = inputs(unet)
    full = unet(sample, t, context)
    alone = unet(sample[1:2], t[1:2], context[1:2])
    assert_parity(alone, full[1:2], "batch item run alone")


@torch.no_grad()
def test_context_length_matters_and_is_free(unet):
    """Any context length works; padding the context changes the output (it is attended to)."""
    sample, t, context = inputs(unet, context_len=6)
    padded = torch.cat([context, torch.randn(3, 71, unet.config.context_dim)], dim=1)  # 77 tokens
    short, long = unet(sample, t, context), unet(sample, t, padded)
    assert short.shape == long.shape
    assert relative_error(short, long) > 1e-3


@torch.no_grad()
def test_channels_last_matches_contiguous(unet):
    sample, t, context = inputs(unet)
    expected = unet(sample, t, context)
    assert_parity(unet(sample.to(memory_format=torch.channels_last), t, context), expected, "channels-last input")
    model_cl = tiny_unet().to(memory_format=torch.channels_last)
    assert_parity(model_cl(sample.to(memory_format=torch.channels_last), t, context), expected,
                  "channels-last model and input")


# Half precision keeps ~3 (bf16) / ~4 (fp16) significant digits per op. Measured on this test:
# fp16 ~1e-3, bf16 ~9e-3 x max|fp32 output|; the bounds are ~3-5x that.
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@torch.no_grad()
def test_half_precision_close_to_fp32(unet, dtype, tol, backend):
    sample, t, context = inputs(unet)
    sample = 100 * sample  # large activations: the norms must keep fp32 statistics
    expected = unet(sample, t, context)
    half = tiny_unet().to(dtype)
    with use_attention_backend(backend):
        out = half(sample.to(dtype), t, context.to(dtype))
        # A 30x context gives attention scores in the thousands: finite, though no longer
        # comparable to fp32 (the softmax is then nearly one-hot and flips on rounding).
        sharp = half(sample.to(dtype), t, 30 * context.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(sharp).all()
    assert_parity(out.float(), expected, f"{dtype} vs fp32 ({backend})", rel_tol=tol)


@pytest.mark.slow  # one forward per timestep form and batch: about 35 s
@torch.no_grad()
def test_timestep_forms_agree(unet):
    sample, _, context = inputs(unet)
    as_batch = unet(sample, torch.full((3,), 417), context)
    assert torch.equal(unet(sample, 417, context), as_batch)
    assert torch.equal(unet(sample, 417.0, context), as_batch)
    assert torch.equal(unet(sample, torch.tensor(417), context), as_batch)
    assert torch.equal(unet(sample, torch.tensor(417.0), context), as_batch)
    assert relative_error(unet(sample, 418, context), as_batch) > 1e-6  # and t does matter


def test_gradients_reach_every_parameter():
    unet = tiny_unet()
    sample, t, context = inputs(unet)
    sample.requires_grad_(True)
    weights = torch.randn(3, 5, 16, 24, generator=torch.Generator().manual_seed(3))
    (unet(sample, t, context) * weights).sum().backward()
    dead = [name for name, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    assert sample.grad.abs().sum() > 0


@torch.no_grad()
def test_compile_fullgraph_matches_eager(unet):
    """fullgraph=True raises on any graph break, so this proves forward has no data-dependent branch."""
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    for t_form in ("tensor", "scalar"):
        sample, t, context = inputs(unet)
        t = t if t_form == "tensor" else 250
        assert_parity(compiled(sample, t, context), unet(sample, t, context), f"compiled vs eager (t {t_form})")
    torch._dynamo.reset()


BAD_INPUTS = {
    # name: (sample shape, t, context shape, words the message must contain)
    "sides not divisible by 8": ((2, 8, 16, 20), None, (2, 6, 1024), ["sample", "divisible by 8"]),
    "wrong channel count": ((2, 4, 16, 16), None, (2, 6, 1024), ["sample", "8"]),
    "sample not 4-d": ((8, 16, 16), None, (2, 6, 1024), ["sample"]),
    "context width 768": ((2, 8, 16, 16), None, (2, 6, 768), ["context", "1024"]),
    "context batch 1 for sample batch 2": ((2, 8, 16, 16), None, (1, 6, 1024), ["context"]),
    "context 2-d": ((2, 8, 16, 16), None, (6, 1024), ["context"]),
    "t batch 3 for sample batch 2": ((2, 8, 16, 16), torch.tensor([1, 2, 3]), (2, 6, 1024), ["t:", "(2,)"]),
    "t 2-d": ((2, 8, 16, 16), torch.ones(2, 1), (2, 6, 1024), ["t:"]),
    "t a string": ((2, 8, 16, 16), "10", (2, 6, 1024), ["t:"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error(unet, case):
    sample_shape, t, context_shape, words = BAD_INPUTS[case]
    t = torch.tensor([5, 6]) if t is None else t
    with pytest.raises(ValueError) as info:
        unet(torch.zeros(sample_shape), t, torch.zeros(context_shape))
    for word in words:
        assert word in str(info.value), f"{case}: {word!r} not in {info.value}"


def test_config_change_changes_architecture():
    """Numbers come from UNetConfig: transformer depth 2 gives two blocks per transformer."""
    deep = UNet(replace(UNetConfig.tiny(), transformer_depth=2))
    assert len(deep.down[0].attn[0].blocks) == 2 and deep.down[3].attn is None
    assert deep.time_embed[0].out_features == 4 * 32
