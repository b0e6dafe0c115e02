"""The confidence-guided diffusion (C-Diff) loss of C-DiffSET: a beta-NLL on the predicted noise.

The U-Net predicts, beside the noise eps_hat (B, 4, h, w), a raw variance r (B, 1, h, w) (its
fifth output channel). The variance (units of the noise squared) is

    var = clamp(softplus(r + VAR_OFFSET) + VAR_MIN, VAR_MIN, VAR_MAX)

and its inverse is the confidence map. Per element, with var broadcast over the noise channels,

    loss = w * 0.5 * ((target - eps_hat)^2 / var + log(var) + log(2 pi)),   w = stopgrad(var)^beta,

with beta = sqrt(alpha_bar) of each sample's timestep (the official release's training code),
or a constant (0: the plain Gaussian NLL; 1: the paper's text). This is beta-NLL
(Seitzer et al., 2022); the paper's Eq. 3 is its short form.

``confidence_nll`` is the public entry point. It runs the fused Triton kernel
(``cdiff.kernels.confidence_nll``) for CUDA tensors when Triton is importable, and the PyTorch
reference ``confidence_nll_reference`` otherwise; ``backend=`` or CDIFF_LOSS forces either.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from cdiff import flags

# The one home of the variance constants (checkpoint surgery imports them to initialise the
# variance channel): var_min keeps log(var) finite, var_max keeps a runaway variance from
# switching the loss off, and the offset makes a raw output of 0 mean var = 1 (plain L2 at start).
VAR_MIN = 1e-6
VAR_MAX = 10.0
VAR_OFFSET = math.log(math.expm1(1.0 - VAR_MIN))  # softplus(VAR_OFFSET) + VAR_MIN == 1
LOG_2PI = math.log(2.0 * math.pi)

BETA_SQRT_ALPHA_BAR = "sqrt_alpha_bar"
REDUCTIONS = ("mean", "none")
BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def variance_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """The predicted variance, (B, 1, h, w), from the U-Net's raw variance channel r.

    var = clamp(softplus(r + VAR_OFFSET) + VAR_MIN, VAR_MIN, VAR_MAX); r = 0 gives var = 1.
    Computed in at least fp32; the gradient is zero where the clamp is active (torch's clamp).
    """
    raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
    return (F.softplus(raw + VAR_OFFSET) + VAR_MIN).clamp(VAR_MIN, VAR_MAX)


def confidence_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """The confidence map 1 / var, (B, 1, h, w), in [1 / VAR_MAX, 1 / VAR_MIN]."""
    return variance_from_raw(raw).reciprocal()


def _check_inputs(target, eps_hat, raw, alpha_bar, beta, reduction) -> None:
    tensors = {"target": target, "eps_hat": eps_hat, "raw": raw, "alpha_bar": alpha_bar}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"confidence_nll: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"confidence_nll: {name} must be a floating-point tensor, got {t.dtype}")
    if eps_hat.ndim != 4:
        raise ValueError(f"confidence_nll: eps_hat must be (B, C, h, w), got shape {tuple(eps_hat.shape)}")
    if target.shape != eps_hat.shape:
        raise ValueError(
            f"confidence_nll: target shape {tuple(target.shape)} != eps_hat shape {tuple(eps_hat.shape)}"
        )
    batch, _, height, width = eps_hat.shape
    if tuple(raw.shape) != (batch, 1, height, width):
        raise ValueError(
            f"confidence_nll: raw must be (B, 1, h, w) = {(batch, 1, height, width)}, got {tuple(raw.shape)}"
        )
    if tuple(alpha_bar.shape) != (batch,):
        raise ValueError(f"confidence_nll: alpha_bar must be (B,) = ({batch},), got {tuple(alpha_bar.shape)}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"confidence_nll: all inputs must be on one device, got {sorted(map(str, devices))}")
    # The values too (one host sync on a GPU): timesteps passed where alpha_bar belongs give a
    # loss of 2e9 or NaN instead of an error.
    outside = ~((alpha_bar > 0) & (alpha_bar <= 1))  # NaN counts as outside
    if outside.any():
        raise ValueError(
            "confidence_nll: alpha_bar must lie in (0, 1] (the cumulative alpha of each sample's timestep, "
            f"DDPM.alpha_bar(t), not t itself), got {alpha_bar[outside][:4].tolist()}"
        )
    if isinstance(beta, str):
        if beta != BETA_SQRT_ALPHA_BAR:
            raise ValueError(f"confidence_nll: beta must be {BETA_SQRT_ALPHA_BAR!r} or a float, got {beta!r}")
    elif isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"confidence_nll: beta must be {BETA_SQRT_ALPHA_BAR!r} or a finite float >= 0, got {beta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"confidence_nll: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def confidence_nll_reference(
    target: torch.Tensor,
    eps_hat: torch.Tensor,
    raw: torch.Tensor,
    alpha_bar: torch.Tensor,
    beta: str | float = BETA_SQRT_ALPHA_BAR,
    reduction: str = "mean",
) -> torch.Tensor:
    """The C-Diff loss in plain PyTorch (what runs without a GPU); see ``confidence_nll``.

    Computes in at least fp32 (fp16/bf16 inputs are upcast; their gradients come back in
    their own dtype). The target carries no gradient.
    """
    compute = torch.promote_types(eps_hat.dtype, torch.float32)
    residual = target.detach().to(compute) - eps_hat.to(compute)  # (B, C, h, w)
    var = variance_from_raw(raw).to(compute)  # (B, 1, h, w), broadcast over C
    if beta == BETA_SQRT_ALPHA_BAR:
        beta_t = alpha_bar.detach().to(compute).sqrt().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    else:
        beta_t = float(beta)
    # beta-NLL: the weight var^beta is a constant for the optimiser (stop-gradient).
    weight = var.detach() ** beta_t  # (B, 1, h, w)
    nll = 0.5 * (residual.square() / var + var.log() + LOG_2PI)  # (B, C, h, w)
    loss = weight * nll
    return loss.mean() if reduction == "mean" else loss


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_backend(tensors: tuple[torch.Tensor, ...], backend: str | None = None) -> str:
    """"triton" or "torch" for these inputs (target, eps_hat, raw): ``backend`` (or CDIFF_LOSS) when forced, else auto.

    Auto picks the kernel for CUDA tensors of a kernel dtype (fp32, fp16, bf16) when Triton is
    importable. Forcing "triton" on CPU tensors runs the kernel, which needs TRITON_INTERPRET=1.
    """
    choice = flags.get("CDIFF_LOSS") if backend is None else backend
    if choice not in BACKENDS:
        raise ValueError(f"confidence_nll: backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        use_kernel = all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors) and _triton_available()
        return "triton" if use_kernel else "torch"
    if choice == "triton" and not _triton_available():
        raise ImportError("confidence_nll: backend 'triton' was forced but triton is not installed")
    return choice


def confidence_nll(
    target: torch.Tensor,
    eps_hat: torch.Tensor,
    raw: torch.Tensor,
    alpha_bar: torch.Tensor,
    beta: str | float = BETA_SQRT_ALPHA_BAR,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """The C-Diff loss (beta-NLL with a learned per-pixel variance), as the release trains with.

    Args:
        target: (B, C, h, w) the regression target (the true noise eps for epsilon
            prediction). It is a constant: no gradient flows to it.
        eps_hat: (B, C, h, w) the U-Net's prediction (its first C output channels).
        raw: (B, 1, h, w) the raw variance (the U-Net's last output channel); the variance is
            ``variance_from_raw(raw)``, broadcast over the C channels.
        alpha_bar: (B,) cumulative alpha of each sample's timestep, in (0, 1] (no gradient;
            checked, which costs one host sync on a GPU).
        beta: "sqrt_alpha_bar" (default, the release: beta = sqrt(alpha_bar) per sample) or a
            constant float >= 0 (0: plain Gaussian NLL; 1: the paper's text).
        reduction: "mean" (a scalar, the mean over all B*C*h*w elements) or "none" (the
            per-element values, (B, C, h, w), for logs and figures).
        backend: "auto", "triton" or "torch"; None reads CDIFF_LOSS (default "auto": the Triton
            kernel for CUDA tensors when Triton is importable, the PyTorch reference otherwise).

    Returns:
        The loss in nats, in fp32 (fp64 for fp64 inputs). Inputs may be fp32, fp16 or bf16
        (fp64 on the reference only), contiguous or channels-last; gradients keep the dtype of
        eps_hat and raw.
    """
    _check_inputs(target, eps_hat, raw, alpha_bar, beta, reduction)
    if choose_backend((target, eps_hat, raw), backend) == "triton":
        from cdiff.kernels.confidence_nll import confidence_nll_triton

        return confidence_nll_triton(target, eps_hat, raw, alpha_bar, beta=beta, reduction=reduction)
    return confidence_nll_reference(target, eps_hat, raw, alpha_bar, beta=beta, reduction=reduction)
