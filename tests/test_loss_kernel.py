"""The fused Triton C-Diff loss kernel against the PyTorch reference (Triton's CPU interpreter here).

tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, so these run the real kernel code on CPU
tensors; with a GPU they run on it. Shapes are small because the interpreter is slow.
"""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # the test extra installs it; without it there is no kernel to test

from cdiff.kernels.confidence_nll import confidence_nll_grads, confidence_nll_mean, confidence_nll_triton  # noqa: E402
from cdiff.loss import confidence_nll, confidence_nll_reference  # noqa: E402

# Tolerances by the dtype of the compared result: (rtol, atol as a fraction of max |expected|).
# Both paths compute in fp32 from the same input values, so fp32 results (the loss, whatever the
# input dtype) differ by rounding only (exp/log implementations, summation order); fp16/bf16
# gradients are those fp32 values rounded to the input dtype, so they may differ by one ulp.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}

# Labelled shapes: (B, C, h, w), pixels per program (None: the launcher's choice), layout.
SHAPES = {
    "minimal-b1": ((1, 4, 5, 7), None, "contiguous"),  # B = 1; 35 pixels in one masked program
    "non-aligned": ((3, 4, 17, 23), 64, "contiguous"),  # 391 pixels: 7 programs/sample, last partial
    "channels-last": ((2, 4, 15, 13), 64, "channels_last"),
    "unet-slices": ((2, 4, 9, 11), 32, "slices"),  # views of one (B, 5, h, w) channels-last output
    "default-block": ((2, 4, 40, 51), None, "contiguous"),  # 2040 pixels, launcher's block (256)
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(shape, dtype, layout="contiguous", seed=0, target_dtype=None):
    """Inputs with every regime: raw around 0, raw up to +-30 (both clamp bounds), zero residuals."""
    gen = torch.Generator().manual_seed(seed)
    batch, channels, height, width = shape
    target = torch.randn(shape, generator=gen)
    eps_hat = torch.randn(shape, generator=gen)
    raw = 3.0 * torch.randn((batch, 1, height, width), generator=gen)
    wild = torch.rand(raw.shape, generator=gen) < 0.2
    raw[wild] = (torch.rand(raw.shape, generator=gen)[wild] * 60.0 - 30.0)
    raw.view(-1)[0], raw.view(-1)[-1] = -30.0, 30.0
    same = torch.rand(shape, generator=gen) < 0.1
    target[same] = eps_hat[same]  # zero residual there
    alpha_bar = torch.rand(batch, generator=gen) * 0.98 + 0.01
    target = target.to(DEVICE, target_dtype or dtype)
    eps_hat, raw, alpha_bar = eps_hat.to(DEVICE, dtype), raw.to(DEVICE, dtype), alpha_bar.to(DEVICE)
    if layout == "channels_last":
        target = target.to(memory_format=torch.channels_last)
        eps_hat = eps_hat.to(memory_format=torch.channels_last)
        raw = raw.to(memory_format=torch.channels_last)
        assert not eps_hat.is_contiguous()
    elif layout == "slices":
        out = torch.cat([eps_hat, raw], dim=1).to(memory_format=torch.channels_last)  # (B, 5, h, w)
        eps_hat, raw = out[:, :channels], out[:, channels:]
        assert not eps_hat.is_contiguous() and not raw.is_contiguous()
    return target, eps_hat, raw, alpha_bar


def run(fn, target, eps_hat, raw, alpha_bar, grad_out=None, **kw):
    """(loss, d loss/d eps_hat, d loss/d raw); inputs become fresh leaves, their storage kept."""
    eps_hat = eps_hat.detach().requires_grad_()
    raw = raw.detach().requires_grad_()
    value = fn(target, eps_hat, raw, alpha_bar, **kw)
    grad_out = torch.ones_like(value) if grad_out is None else grad_out
    d_eps_hat, d_raw = torch.autograd.grad(value, (eps_hat, raw), grad_out)
    return value.detach(), d_eps_hat, d_raw


def kernel(target, eps_hat, raw, alpha_bar, block=None, **kw):
    return confidence_nll_triton(target, eps_hat, raw, alpha_bar, block=block, **kw)


def assert_matches(actual, expected, what):
    rtol, atol_frac = TOL[expected.dtype]
    atol = atol_frac * expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    print(f"{what}: max abs error {err:.2e} (max |ref| {expected.abs().max().item():.2e})")


def assert_all_match(ours, ref, label):
    for name, a, b in zip(("loss", "d_eps_hat", "d_raw"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{label} {name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert_matches(a, b, f"{label} {name}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_kernel_matches_reference(shape_name, dtype_name):
    shape, block, layout = SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    case = make_case(shape, dtype, layout, seed=len(shape_name))
    ours = run(kernel, *case, block=block)
    ref = run(confidence_nll_reference, *case)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    assert_all_match(ours, ref, f"{shape_name}/{dtype_name}")
    assert (ours[2].view(-1)[-1] == 0).item()  # raw = +30: clamped at var_max, no gradient


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.37])
def test_constant_beta(beta, dtype_name):
    dtype = DTYPES[dtype_name]
    case = make_case((3, 4, 17, 23), dtype, seed=11)
    ours = run(kernel, *case, block=64, beta=beta)
    ref = run(confidence_nll_reference, *case, beta=beta)
    assert_all_match(ours, ref, f"beta={beta}/{dtype_name}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", ["minimal-b1", "channels-last", "unet-slices"])
def test_reduction_none(shape_name, dtype_name):
    shape, block, layout = SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    case = make_case(shape, dtype, layout, seed=21)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ours = run(kernel, *case, grad_out=grad_out, block=block, reduction="none")
    ref = run(confidence_nll_reference, *case, grad_out=grad_out, reduction="none")
    assert_all_match(ours, ref, f"none/{shape_name}/{dtype_name}")


def test_zero_residual_everywhere():
    target, eps_hat, raw, alpha_bar = make_case((2, 4, 9, 13), torch.float32, seed=3)
    ours = run(kernel, eps_hat.clone(), eps_hat, raw, alpha_bar, block=32)
    ref = run(confidence_nll_reference, eps_hat.clone(), eps_hat, raw, alpha_bar)
    assert torch.count_nonzero(ours[1]) == 0
    assert_all_match(ours, ref, "zero-residual")


def test_mixed_dtypes_as_under_autocast():
    # The true noise in fp32, the U-Net output in bf16.
    case = make_case((2, 4, 15, 13), torch.bfloat16, "slices", seed=4, target_dtype=torch.float32)
    ours = run(kernel, *case, block=64)
    ref = run(confidence_nll_reference, *case)
    assert_all_match(ours, ref, "mixed fp32 target / bf16 output")


def test_public_function_runs_the_kernel_when_forced(monkeypatch):
    case = make_case((2, 4, 9, 13), torch.float32, seed=5)
    monkeypatch.setenv("CDIFF_LOSS", "triton")
    forced_env = run(confidence_nll, *case)
    monkeypatch.delenv("CDIFF_LOSS")
    forced_arg = run(confidence_nll, *case, backend="triton")
    direct = run(kernel, *case)
    for a, b, c in zip(forced_env, forced_arg, direct):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_no_grad_path_and_target_gets_no_gradient():
    target, eps_hat, raw, alpha_bar = make_case((2, 4, 9, 13), torch.float32, seed=6)
    with torch.no_grad():
        value = kernel(target, eps_hat, raw, alpha_bar, block=32)  # the kernel without gradients
    assert_matches(value, confidence_nll_reference(target, eps_hat, raw, alpha_bar), "no-grad")
    target = target.clone().requires_grad_()
    eps_hat = eps_hat.clone().requires_grad_()
    kernel(target, eps_hat, raw, alpha_bar).backward()
    assert target.grad is None and eps_hat.grad is not None


def test_backward_scales_by_incoming_gradient():
    case = make_case((2, 4, 9, 13), torch.float32, seed=7)
    ours = run(kernel, *case, grad_out=torch.tensor(-2.5, device=DEVICE))
    ref = run(confidence_nll_reference, *case, grad_out=torch.tensor(-2.5, device=DEVICE))
    assert_all_match(ours, ref, "grad_out=-2.5")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_deterministic(dtype_name):
    case = make_case((3, 4, 17, 23), DTYPES[dtype_name], seed=8)
    grad_out = torch.tensor(3.0, device=DEVICE)
    first = (confidence_nll_mean(*case, block=64), *confidence_nll_grads(*case, grad_out, block=64))
    second = (confidence_nll_mean(*case, block=64), *confidence_nll_grads(*case, grad_out, block=64))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # A different program split changes only the summation order, i.e. rounding.
    other = (confidence_nll_mean(*case, block=256), *confidence_nll_grads(*case, grad_out, block=256))
    torch.testing.assert_close(other[0], first[0], rtol=1e-6, atol=0)
    assert torch.equal(other[1], first[1]) and torch.equal(other[2], first[2])


# --- loss scaling, and backward that leaves its saved tensors alone ----------------------


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_loss_scaling_keeps_small_gradients(dtype_name):
    # fp16 training multiplies the loss by a scale (65536) so that small gradients stay normal.
    # At 16 x 4 x 32 x 32 (a 256-px batch of 16), 1/N = 1.5e-5 is subnormal in fp16: a kernel
    # that rounds the 1/N-scaled gradients before applying the scale loses precision and flushes
    # some to zero (before the fix: median relative error 9e-4, 0.1% zeros; the reference 1.7e-4).
    dtype = DTYPES[dtype_name]
    target, eps_hat, raw, alpha_bar = make_case((16, 4, 32, 32), dtype, seed=12)
    # Variances near 1, as in training: var_min (raw = -30) would overflow fp16 at this scale,
    # which is GradScaler's business, not this test's.
    case = (target, eps_hat, raw.clamp(-3, 3), alpha_bar)
    grad_out = torch.tensor(65536.0, device=DEVICE)
    ours = run(kernel, *case, grad_out=grad_out)
    ref = run(confidence_nll_reference, *case, grad_out=grad_out)
    for name, a, b in zip(("d_eps_hat", "d_raw"), ours[1:], ref[1:]):
        flushed = ((a == 0) & (b != 0)).sum().item()
        assert flushed == 0, f"{dtype_name} {name}: {flushed} gradients flushed to zero"
        # Both round the same fp32 value once: one unit in the last place (the interpreter
        # truncates fp32 -> bf16 where a GPU rounds to nearest), no absolute slack above the
        # smallest normal number.
        rtol = TOL[dtype][0]
        torch.testing.assert_close(a, b, rtol=rtol, atol=torch.finfo(dtype).tiny, msg=lambda m: f"{name}: {m}")
        nonzero = b != 0
        rel = ((a.double() - b.double()).abs()[nonzero] / b.double().abs()[nonzero]).median().item()
        print(f"{dtype_name} {name}: median relative difference to the reference {rel:.1e}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_through_the_same_graph(reduction):
    case = make_case((2, 4, 9, 13), torch.float32, seed=13)
    target, eps_hat, raw, alpha_bar = case
    eps_hat, raw = eps_hat.detach().requires_grad_(), raw.detach().requires_grad_()
    value = kernel(target, eps_hat, raw, alpha_bar, reduction=reduction)
    grad_out = torch.full_like(value, 2.0)
    first = torch.autograd.grad(value, (eps_hat, raw), grad_out, retain_graph=True)
    second = torch.autograd.grad(value, (eps_hat, raw), grad_out)
    ref = run(confidence_nll_reference, *case, grad_out=grad_out, reduction=reduction)
    for a, b, expected in zip(first, second, ref[1:]):
        assert torch.equal(a, b)
        assert_matches(b, expected, f"second backward ({reduction})")


def test_double_backward_raises_a_clear_error():
    target, eps_hat, raw, alpha_bar = make_case((2, 4, 9, 13), torch.float32, seed=14)
    eps_hat = eps_hat.detach().requires_grad_()
    value = kernel(target, eps_hat, raw, alpha_bar)
    with pytest.raises(RuntimeError, match="double backward.*backend='torch'"):
        torch.autograd.grad(value, eps_hat, create_graph=True)


def test_float64_is_refused_by_the_kernel():
    case = make_case((1, 4, 5, 7), torch.float64, seed=9)
    with pytest.raises(ValueError, match="float64"):
        kernel(*case)


# --- The tolerances are tight enough to catch a wrong loss --------------------------------------


def wrong_loss(target, eps_hat, raw, alpha_bar, mistake):
    """The release's loss with one deliberate mistake (plain torch)."""
    target, eps_hat, raw = target.float(), eps_hat.float(), raw.float()
    var_min, var_max = 1e-6, 10.0
    var = torch.clamp(F.softplus(raw + math.log(math.expm1(1 - var_min))) + var_min, var_min, var_max)
    beta = alpha_bar.view(-1, 1, 1, 1) if mistake == "beta=alpha_bar" else alpha_bar.sqrt().view(-1, 1, 1, 1)
    weight = var**beta if mistake == "no stop-gradient" else var.detach() ** beta
    const = 0.0 if mistake == "no log(2pi)" else math.log(2 * math.pi)
    loss = weight * 0.5 * ((target - eps_hat) ** 2 / var + torch.log(var) + const)
    if mistake == "mean over pixels":
        return loss.sum(dim=1).mean()
    return loss.mean()


# Each mistake and the quantity it must spoil.
MISTAKES = {
    "no stop-gradient": "d_raw",
    "no log(2pi)": "loss",
    "mean over pixels": "d_eps_hat",
    "beta=alpha_bar": "loss",
}


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_tolerance_rejects_a_wrong_loss(mistake, dtype_name):
    dtype = DTYPES[dtype_name]
    case = make_case((2, 4, 15, 13), dtype, seed=10)
    ours = dict(zip(("loss", "d_eps_hat", "d_raw"), run(kernel, *case, block=64)))
    wrong = run(wrong_loss, *case, mistake=mistake)
    wrong = dict(zip(("loss", "d_eps_hat", "d_raw"), (w.to(o.dtype) for w, o in zip(wrong, ours.values()))))
    what = MISTAKES[mistake]
    err = (ours[what].double() - wrong[what].double()).abs().max().item()
    print(f"{mistake}/{dtype_name}: {what} off by {err:.2e} (max |value| {wrong[what].abs().max().item():.2e})")
    with pytest.raises(AssertionError):
        assert_matches(ours[what], wrong[what], f"{mistake}: {what}")
