"""The fused Triton GroupNorm (+ SiLU) kernel against the PyTorch reference (Triton's CPU interpreter here).

tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, so these run the real kernel code on CPU
tensors; with a GPU they run on it. Shapes are small because the interpreter is slow.
"""

import pytest
import torch

pytest.importorskip("triton")  # the test extra installs it; without it there is no kernel to test

from cdiff.config import UNetConfig, VAEConfig  # noqa: E402
from cdiff.kernels.group_norm_silu import group_norm_silu, group_norm_stats  # noqa: E402
from cdiff.layers import group_norm_reference  # noqa: E402
from cdiff.testing import one_thread, randomize_  # noqa: E402
from cdiff.unet import UNet  # noqa: E402
from cdiff.vae import VAE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (rtol, atol as a fraction of max |expected|), by the input's dtype. Both paths compute
# the statistics in fp32; in fp16/bf16 the reference rounds the normalised value before its SiLU
# (and SiLU's gradient is computed in that dtype), the kernel rounds once at the end, so the two
# differ by about one unit in the last place of the 16-bit format; the fp32 weight and bias
# gradients inherit that difference, summed over the batch and pixels in different orders.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

# Labelled shapes: (B, C, H, W), groups, pixels per program (None: the launcher's choice), layout.
SHAPES = {
    "minimal": ((1, 4, 1, 3), 2, None, "contiguous"),  # one row of 3 pixels, 6 values per group
    "non-aligned": ((2, 30, 5, 7), 3, 16, "channels_last"),  # 10 channels/group; 35 pixels: 3 chunks, last partial
    "three-per-group": ((2, 24, 4, 5), 8, 8, "contiguous"),
    "unet-level-0": ((1, 320, 6, 6), 32, None, "channels_last"),  # SD's 320 channels, 10 per group
    "unet-mid": ((1, 1280, 2, 2), 32, None, "contiguous"),  # 40 per group, padded to 64 lanes
    "vae-decoder": ((1, 128, 8, 8), 32, 32, "channels_last"),  # 4 per group, 2 chunks
}
# Every shape in fp32; the half-precision dtypes on the shapes that differ in layout and blocking.
CASES = [(shape, "fp32") for shape in SHAPES] + [
    (shape, dtype) for shape in ("non-aligned", "unet-level-0") for dtype in ("fp16", "bf16")
]


def make_input(shape, dtype, layout, seed=0, offset=0.0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale + offset
    weight = 1 + 0.2 * torch.randn(shape[1], generator=gen)
    bias = 0.5 * torch.randn(shape[1], generator=gen)
    grad = torch.randn(shape, generator=gen)
    x, grad = x.to(DEVICE, dtype), grad.to(DEVICE, dtype)
    if layout == "channels_last":
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    return x, weight.to(DEVICE), bias.to(DEVICE), grad


def run(fn, x, weight, bias, grad, **kw):
    """(y, dx, dweight, dbias); inputs become fresh leaves."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y = fn(x, kw.pop("groups"), weight, bias, 1e-5, **kw)
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), grad)
    return y.detach(), dx, dweight, dbias


def assert_matches(actual, expected, what, dtype=None):
    rtol, atol_frac = TOL[dtype or expected.dtype]
    atol = atol_frac * expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    print(f"{what}: max abs error {err:.2e} (max |ref| {expected.abs().max().item():.2e})")


def assert_all_match(ours, ref, label):
    """Each of (y, dx, dweight, dbias) within the tolerance of the input's dtype (y's)."""
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{label} {name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert_matches(a, b, f"{label} {name}", ref[0].dtype)


@pytest.mark.parametrize("shape_name, dtype_name", CASES)
def test_kernel_matches_reference(shape_name, dtype_name):
    check_kernel(shape_name, dtype_name, SHAPES[shape_name][3])


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (the interpreter runs the cases above, a subset, for time)")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_kernel_matches_reference_on_cuda_every_shape_layout_and_dtype(shape_name, dtype_name, layout):
    check_kernel(shape_name, dtype_name, layout)


def check_kernel(shape_name, dtype_name, layout):
    """The kernel's output and gradients against the reference's, on one labelled shape, in one
    dtype and layout (the shape's own block size)."""
    shape, groups, block, _ = SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    case = make_input(shape, dtype, layout, seed=len(shape_name), offset=0.5)
    ours = run(group_norm_silu, *case, groups=groups, silu=True, block_p=block)
    ref = run(group_norm_reference, *case, groups=groups, silu=True)
    assert_all_match(ours, ref, f"{shape_name}/{dtype_name}/{layout}")
    if layout == "channels_last":  # the result and the input gradient stay where x lies
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_without_silu(layout):
    case = make_input((2, 30, 5, 7), torch.float32, layout, seed=3)
    ours = run(group_norm_silu, *case, groups=3, silu=False, block_p=16)
    ref = run(group_norm_reference, *case, groups=3, silu=False)
    assert_all_match(ours, ref, f"no SiLU/{layout}")


def test_statistics_are_stable_on_large_offsets():
    # Activations of mean 1e3 and spread 1: E[x^2] - E[x]^2 in fp32 would lose most of the
    # variance's digits; the chunked two-level split does not. The expected values are fp64.
    # (PyTorch's own CPU kernel for channels-last input loses them: an error of ~0.7 on this
    # input, against 7e-5 for NCHW input, torch 2.14; so the reference here is fp64, not it.)
    x, weight, bias, grad = make_input((2, 16, 9, 9), torch.float32, "channels_last", seed=4, offset=1e3)
    mean, rstd = group_norm_stats(x, 4, 1e-5, block_p=16)
    groups = x.double().reshape(2, 4, -1)
    torch.testing.assert_close(mean.double(), groups.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), (groups.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    ours = run(group_norm_silu, x, weight, bias, grad, groups=4, silu=True, block_p=16)
    exact = run(group_norm_reference, x.double(), weight.double(), bias.double(), grad.double(), groups=4, silu=True)
    # The fp32 input itself is only known to 6e-5 at 1e3 (its ulp), so y to about 1e-4 x |w|/std.
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), ours, exact):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-4 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


def test_frozen_weights_and_a_second_backward():
    x, weight, bias, grad = make_input((2, 12, 4, 4), torch.float32, "channels_last", seed=5)
    x = x.detach().requires_grad_()
    y = group_norm_silu(x, 4, weight, bias, 1e-5)  # weight and bias frozen (no grad), as in the VAE
    first = torch.autograd.grad(y, x, grad, retain_graph=True)[0]
    second = torch.autograd.grad(y, x, grad)[0]
    assert torch.equal(first, second)
    assert_matches(first, run(group_norm_reference, x, weight, bias, grad, groups=4, silu=True)[1], "frozen dx")


def test_deterministic_and_split_independent():
    case = make_input((2, 30, 5, 7), torch.bfloat16, "channels_last", seed=6)
    first = run(group_norm_silu, *case, groups=3, silu=True, block_p=16)
    second = run(group_norm_silu, *case, groups=3, silu=True, block_p=16)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = run(group_norm_silu, *case, groups=3, silu=True, block_p=64)  # one chunk: other summation order
    assert_all_match(other, first, "block 64 vs 16")


def test_double_backward_and_bad_inputs_raise_clear_errors():
    x, weight, bias, _ = make_input((1, 4, 3, 3), torch.float32, "contiguous")
    x = x.requires_grad_()
    y = group_norm_silu(x, 2, weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="double backward.*CDIFF_GROUP_NORM=torch"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(ValueError, match="float64"):
        group_norm_silu(x.detach().double(), 2, weight, bias, 1e-5)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        group_norm_silu(x.detach(), 3, weight, bias, 1e-5)


def test_models_run_the_kernel_under_the_switch(monkeypatch):
    # The wiring: CDIFF_GROUP_NORM=triton sends every GroupNorm of the U-Net and the VAE through
    # the kernel; outputs and gradients equal the reference path's (channels-last models; the
    # kernel tests above cover both layouts).
    fmt = torch.channels_last
    unet = randomize_(UNet(UNetConfig.tiny(model_channels=16, channel_mult=(1,), norm_groups=4, num_res_blocks=1,
                                           attention_levels=(True,))), 0).to(memory_format=fmt)
    vae = randomize_(VAE(VAEConfig.tiny(block_channels=(8, 16), norm_groups=4)), 1).eval().to(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen).to(memory_format=fmt)
    context = torch.randn(2, 3, 1024, generator=gen)
    image = torch.randn(1, 3, 16, 16, generator=gen).to(memory_format=fmt)
    calls = []

    def run_models():
        unet.zero_grad()
        out = unet(sample, torch.tensor([3, 700]), context)
        out.square().mean().backward()
        return out.detach(), vae.encode(image).mean.detach(), [p.grad.clone() for p in unet.parameters()]

    import cdiff.kernels.group_norm_silu as kernel_module

    original = kernel_module.GroupNormSiLUFunction.apply

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    with one_thread():
        reference = run_models()
        monkeypatch.setenv("CDIFF_GROUP_NORM", "triton")
        monkeypatch.setattr(kernel_module.GroupNormSiLUFunction, "apply", counted)
        fused = run_models()
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in list(unet.modules()) + list(vae.encoder.modules()))
    assert len(calls) == norms  # every GroupNorm, once per forward
    names = ("U-Net output", "VAE latent") + tuple(f"grad {n}" for n, _ in unet.named_parameters())
    for name, a, b in zip(names, (fused[0], fused[1], *fused[2]), (reference[0], reference[1], *reference[2])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")
