"""The C-Diff loss reference (cdiff.loss) against float64 gradcheck and the release's loss lines."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cdiff import loss as cdiff_loss
from cdiff.loss import (
    VAR_MAX,
    VAR_MIN,
    VAR_OFFSET,
    choose_backend,
    confidence_from_raw,
    confidence_nll,
    confidence_nll_reference,
    variance_from_raw,
)

ROOT = Path(__file__).resolve().parents[1]


def release_loss(target, eps_hat, raw, alpha_bar, beta=None, reduction="mean"):
    """The official release's training-loss lines, transcribed as plain torch (independent code)."""
    var_min, var_max = 1e-6, 10.0
    offset = math.log(math.exp(1 - var_min) - 1)
    var = F.softplus(raw + offset) + var_min
    var = torch.clamp(var, var_min, var_max)
    b = alpha_bar.sqrt().view(-1, 1, 1, 1) if beta is None else beta
    weight = var.detach() ** b
    nll = 0.5 * ((target - eps_hat) ** 2 / var + torch.log(var) + math.log(2 * math.pi))
    loss = weight * nll
    return loss.mean() if reduction == "mean" else loss


def make_inputs(shape=(3, 4, 9, 7), dtype=torch.float32, raw_scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, _, height, width = shape
    target = torch.randn(shape, generator=gen, dtype=dtype)
    eps_hat = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
    raw = (raw_scale * torch.randn((batch, 1, height, width), generator=gen, dtype=dtype)).requires_grad_()
    alpha_bar = torch.rand(batch, generator=gen, dtype=dtype) * 0.98 + 0.01
    return target, eps_hat, raw, alpha_bar


def loss_and_grads(fn, target, eps_hat, raw, alpha_bar, **kw):
    eps_hat = eps_hat.detach().requires_grad_()
    raw = raw.detach().requires_grad_()
    value = fn(target, eps_hat, raw, alpha_bar, **kw)
    d_eps_hat, d_raw = torch.autograd.grad(value.sum(), (eps_hat, raw))
    return value.detach(), d_eps_hat, d_raw


def test_constants():
    assert VAR_MIN == 1e-6 and VAR_MAX == 10.0
    assert VAR_OFFSET == pytest.approx(math.log(math.exp(1 - 1e-6) - 1), rel=1e-12)
    # r = 0 gives var = 1 (in float64 to rounding; fp32 to its rounding).
    assert variance_from_raw(torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(variance_from_raw(torch.zeros(2, 1, 3, 3)), torch.ones(2, 1, 3, 3), rtol=0, atol=1e-6)


def test_variance_and_confidence_bounds_and_clamp_gradient():
    raw = torch.tensor([-60.0, -30.0, 0.0, 5.0, 30.0, 40.0], dtype=torch.float64, requires_grad=True)
    var = variance_from_raw(raw)
    assert var[0].item() == VAR_MIN and var[-1].item() == VAR_MAX and var[-2].item() == VAR_MAX
    assert VAR_MIN < var[1].item() < 1.001e-6
    expected = (torch.log1p(torch.exp(raw.detach()[3] + VAR_OFFSET)) + VAR_MIN).item()
    assert var[3].item() == pytest.approx(expected, rel=1e-14)
    torch.testing.assert_close(confidence_from_raw(raw), 1.0 / var, rtol=0, atol=0)
    var.sum().backward()
    # Zero gradient where the clamp holds (upper bound; lower bound once softplus underflows),
    # sigmoid(r + o) inside the range.
    assert raw.grad[0].item() == 0.0 and raw.grad[-1].item() == 0.0 and raw.grad[-2].item() == 0.0
    torch.testing.assert_close(raw.grad[1:4], torch.sigmoid(raw.detach()[1:4] + VAR_OFFSET), rtol=1e-12, atol=0)


def test_reference_gradcheck_float64_plain_nll():
    # beta = 0: no stop-gradient, so autograd must equal the numerical derivative.
    target, eps_hat, raw, alpha_bar = make_inputs((2, 4, 3, 5), torch.float64, raw_scale=2.0, seed=1)
    with torch.no_grad():  # one pixel clamped at var_max, one near var_min (away from the kinks)
        raw[0, 0, 0, :2] = torch.tensor([25.0, -8.0], dtype=torch.float64)

    def fn(e, r):
        return confidence_nll_reference(target, e, r, alpha_bar, beta=0.0)

    assert torch.autograd.gradcheck(fn, (eps_hat, raw), eps=1e-6, atol=1e-8, rtol=1e-6)


def central_differences(fn, x, eps=1e-6):
    grad = torch.zeros_like(x)
    flat, out = x.detach().clone(), grad.view(-1)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus.view(-1)[i] += eps
        minus.view(-1)[i] -= eps
        out[i] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad


@pytest.mark.parametrize("beta", ["sqrt_alpha_bar", 1.0, 0.37])
def test_reference_gradient_is_numerical_with_frozen_weight(beta):
    # With beta > 0 the weight var^beta is a stop-gradient: the gradient must be the numerical
    # derivative of mean(w0 * nll) with w0 frozen at the current raw (plain gradcheck would
    # differentiate w too, which is exactly what beta-NLL forbids).
    target, eps_hat, raw, alpha_bar = make_inputs((2, 4, 3, 5), torch.float64, raw_scale=2.0, seed=1)
    with torch.no_grad():
        raw[0, 0, 0, :2] = torch.tensor([25.0, -8.0], dtype=torch.float64)
    exponent = alpha_bar.sqrt().view(-1, 1, 1, 1) if beta == "sqrt_alpha_bar" else beta
    w0 = variance_from_raw(raw.detach()) ** exponent

    def frozen(e, r):
        nll = confidence_nll_reference(target, e, r, alpha_bar, beta=0.0, reduction="none")
        return (w0 * nll).mean()

    _, d_eps_hat, d_raw = loss_and_grads(confidence_nll_reference, target, eps_hat, raw, alpha_bar, beta=beta)
    num_eps_hat = central_differences(lambda e: frozen(e, raw.detach()), eps_hat)
    num_raw = central_differences(lambda r: frozen(eps_hat.detach(), r), raw)
    torch.testing.assert_close(d_eps_hat, num_eps_hat, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d_raw, num_raw, rtol=1e-6, atol=1e-9)
    # ...and differs from the derivative with the weight left live (the stop-gradient matters).
    live = central_differences(
        lambda r: confidence_nll_reference(target, eps_hat.detach(), r, alpha_bar, beta=beta), raw
    )
    assert (live - d_raw).abs().max() > 100 * 1e-9


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("beta", [None, 0.0, 1.0])
def test_reference_matches_release_lines(beta, reduction):
    target, eps_hat, raw, alpha_bar = make_inputs((3, 4, 9, 7), raw_scale=10.0, seed=2)
    with torch.no_grad():
        raw[0, 0, 0, :4] = torch.tensor([-30.0, 30.0, -40.0, 40.0])  # both clamp bounds
    ours = loss_and_grads(
        confidence_nll_reference, target, eps_hat, raw, alpha_bar,
        beta="sqrt_alpha_bar" if beta is None else beta, reduction=reduction,
    )  # fmt: skip
    theirs = loss_and_grads(release_loss, target, eps_hat, raw, alpha_bar, beta=beta, reduction=reduction)
    for name, a, b in zip(("loss", "d_eps_hat", "d_raw"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * b.abs().max().item(), msg=name)
    assert ours[2][0, 0, 0, 1] == 0 and ours[2][0, 0, 0, 3] == 0  # clamped at var_max


def test_beta_zero_is_plain_gaussian_nll():
    target, eps_hat, raw, alpha_bar = make_inputs(dtype=torch.float64, seed=3)
    var = variance_from_raw(raw).expand_as(eps_hat)
    expected = F.gaussian_nll_loss(eps_hat, target, var, full=True, eps=1e-12)
    torch.testing.assert_close(confidence_nll_reference(target, eps_hat, raw, alpha_bar, beta=0.0), expected)


def test_none_reduction_and_mean_agree():
    target, eps_hat, raw, alpha_bar = make_inputs(seed=4)
    per_element = confidence_nll(target, eps_hat, raw, alpha_bar, reduction="none", backend="torch")
    assert per_element.shape == eps_hat.shape
    torch.testing.assert_close(per_element.mean(), confidence_nll(target, eps_hat, raw, alpha_bar, backend="torch"))


def test_half_inputs_upcast_and_keep_grad_dtype():
    target, eps_hat, raw, alpha_bar = make_inputs(dtype=torch.bfloat16, seed=5)
    value, d_eps_hat, d_raw = loss_and_grads(confidence_nll_reference, target, eps_hat, raw, alpha_bar)
    assert value.dtype == torch.float32 and d_eps_hat.dtype == torch.bfloat16 and d_raw.dtype == torch.bfloat16
    expected = release_loss(target.float(), eps_hat.detach().float(), raw.detach().float(), alpha_bar.float())
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)


def test_target_and_alpha_bar_get_no_gradient():
    target, eps_hat, raw, alpha_bar = make_inputs(seed=6)
    target.requires_grad_()
    alpha_bar.requires_grad_()
    confidence_nll(target, eps_hat, raw, alpha_bar, backend="torch").backward()
    assert target.grad is None and alpha_bar.grad is None and eps_hat.grad is not None


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(target=torch.zeros(3, 4, 9, 8)), "target shape"),
        (dict(eps_hat=torch.zeros(3, 4, 9)), "eps_hat must be"),
        (dict(raw=torch.zeros(3, 2, 9, 7)), "raw must be"),
        (dict(raw=torch.zeros(3, 1, 7, 9)), "raw must be"),
        (dict(alpha_bar=torch.zeros(3, 1)), "alpha_bar must be"),
        (dict(alpha_bar=torch.zeros(2)), "alpha_bar must be"),
        (dict(target=torch.zeros(3, 4, 9, 7, dtype=torch.long)), "target must be a floating"),
        (dict(beta="sqrt"), "beta must be"),
        (dict(beta=-0.5), "beta must be"),
        (dict(beta=float("nan")), "beta must be"),
        (dict(beta=True), "beta must be"),
        (dict(reduction="sum"), "reduction must be"),
        (dict(backend="cuda"), "backend must be"),
    ],
)
def test_bad_inputs_raise(change, match):
    target, eps_hat, raw, alpha_bar = make_inputs(seed=7)
    kw = dict(target=target, eps_hat=eps_hat, raw=raw, alpha_bar=alpha_bar)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        confidence_nll(**kw)


@pytest.mark.parametrize("bad", [500.0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_alpha_bar_outside_unit_interval_raises(bad, backend):
    # Timesteps passed by mistake (t = 500) gave a loss of 2e9; 0 or NaN gave NaN.
    target, eps_hat, raw, alpha_bar = make_inputs(seed=10)
    alpha_bar = torch.tensor([0.5, bad, 1.0])  # 1.0 itself is allowed
    with pytest.raises(ValueError, match=r"alpha_bar must lie in \(0, 1\]"):
        confidence_nll(target, eps_hat, raw, alpha_bar, backend=backend)


def test_bad_environment_switch_raises(monkeypatch):
    target, eps_hat, raw, alpha_bar = make_inputs(seed=8)
    monkeypatch.setenv("CDIFF_LOSS", "fast")
    with pytest.raises(ValueError, match="CDIFF_LOSS"):
        confidence_nll(target, eps_hat, raw, alpha_bar)


def test_dispatch(monkeypatch):
    from cdiff.kernels import confidence_nll as kernel_module

    calls = []

    def fake_kernel(*args, **kwargs):
        calls.append(kwargs)
        return torch.tensor(-1.0)

    monkeypatch.setattr(kernel_module, "confidence_nll_triton", fake_kernel)
    target, eps_hat, raw, alpha_bar = make_inputs(seed=9)
    tensors = (target, eps_hat, raw)
    monkeypatch.delenv("CDIFF_LOSS", raising=False)
    assert choose_backend(tensors) == "torch"  # auto on CPU tensors: the reference
    assert confidence_nll(target, eps_hat, raw, alpha_bar).item() > 0 and not calls
    assert confidence_nll(target, eps_hat, raw, alpha_bar, backend="triton").item() == -1.0
    monkeypatch.setenv("CDIFF_LOSS", "triton")
    assert choose_backend(tensors) == "triton"
    assert confidence_nll(target, eps_hat, raw, alpha_bar, beta=0.5, reduction="none").item() == -1.0
    assert calls[-1] == dict(beta=0.5, reduction="none")
    assert confidence_nll(target, eps_hat, raw, alpha_bar, backend="torch").item() > 0  # argument wins
    monkeypatch.setenv("CDIFF_LOSS", "torch")
    assert choose_backend(tensors, "auto") == "torch"
    assert len(calls) == 2
    monkeypatch.setattr(cdiff_loss, "_triton_available", lambda: False)
    with pytest.raises(ImportError, match="triton"):
        choose_backend(tensors, "triton")


def test_importing_the_loss_does_not_import_triton():
    code = "import sys, cdiff.loss; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT)})
