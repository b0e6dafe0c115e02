"""Fused Triton kernel of the C-Diff loss: the loss in one pass, both gradients in one pass.

The PyTorch reference, and the definition, is ``cdiff.loss.confidence_nll_reference``; the
public entry point is ``cdiff.loss.confidence_nll`` (it imports this module lazily, only when the
Triton path is chosen). Layout of this file, as Liger-Kernel's ops/: the kernels (derivation of
the gradients above them), the host launchers, the ``torch.autograd.Function``.

Forward (reduction="mean", training): one launch reads target, eps_hat and raw once and writes
one partial sum per program; a one-program launch adds the partials in a fixed order
(deterministic: no float atomics). Backward: one launch reads the three inputs again and writes
d loss / d eps_hat and d loss / d raw, with the incoming gradient (a loss scale such as 65536
under fp16 training) multiplied in fp32 before the single rounding to the input dtype. Storing
the gradients at forward time instead would round them scaled by 1/N, where fp16 is subnormal or
zero, before the loss scale could lift them. Backward modifies nothing it saved, so a second
backward through the same graph works; double backward (create_graph=True) raises.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cdiff.loss import BETA_SQRT_ALPHA_BAR, KERNEL_DTYPES, LOG_2PI, VAR_MAX, VAR_MIN, VAR_OFFSET

# Derivation (per pixel p of sample b; c runs over the C noise channels; N = B*C*h*w).
#   x = r + o,  u = softplus(x) + var_min,  v = clamp(u, var_min, var_max)
#   d_c = target_c - eps_hat_c,  q_c = d_c^2,  w = stopgrad(v)^beta
#   l_c = w/2 * (q_c / v + log v + log 2pi),   loss = (1/N) sum l_c   (or l_c itself, "none")
# With g the incoming gradient (a scalar for "mean", (B, C, h, w) for "none") and
# s_c = d out / d l_c = g / N ("mean") or g_c ("none"), computed in fp32 before any rounding:
#   d loss / d eps_hat_c = s_c * w/2 * 2 d_c / v * (-1) = -s_c * w * d_c / v
#   d loss / d v         = sum_c s_c * w/2 * (1/v - q_c / v^2)         (w is a constant: stop-grad)
#   d v / d r            = sigmoid(x) * [var_min < u < var_max]      (torch's clamp passes the
#                          gradient strictly inside the range, zero at and beyond its bounds)
#   d loss / d r         = w/2 * sum_c s_c (1/v - q_c / v^2) * sigmoid(x) * [var_min < u < var_max]
# The target gets no gradient. Everything is computed in fp32 whatever the input dtypes.


@triton.jit
def _softplus_and_sigmoid(x):
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(z) = log(1 + z) * z / ((1 + z) - 1)
    # (Kahan's trick: exact to fp32 rounding for tiny z, where log(1 + z) alone returns 0).
    z = tl.exp(-tl.abs(x))
    one_plus_z = 1.0 + z
    tiny = one_plus_z == 1.0
    log1p_z = tl.where(tiny, z, tl.log(one_plus_z) * (z / tl.where(tiny, 1.0, one_plus_z - 1.0)))
    softplus = tl.maximum(x, 0.0) + log1p_z
    sigmoid = tl.where(x >= 0.0, 1.0 / one_plus_z, z / one_plus_z)
    return softplus, sigmoid


@triton.jit
def _confidence_nll_kernel(
    target_ptr,  # (B, C, H, W) fp32/fp16/bf16, any strides
    eps_hat_ptr,  # (B, C, H, W) fp32/fp16/bf16, any strides
    raw_ptr,  # (B, 1, H, W) fp32/fp16/bf16, any strides
    alpha_bar_ptr,  # (B,) any float dtype; read only when BETA_FROM_ALPHA
    elem_ptr,  # (B, C, H, W): loss out (fp32, "none" forward) or incoming gradient (backward; may be 0-strided)
    partial_ptr,  # (B * n_blocks,) fp32 out: one partial sum per program (REDUCE)
    d_eps_hat_ptr,  # (B, C, H, W) out, eps_hat's dtype (COMPUTE_GRADS)
    d_raw_ptr,  # (B, 1, H, W) out, raw's dtype (COMPUTE_GRADS)
    t_sb, t_sc, t_sh, t_sw,  # target strides (elements)
    e_sb, e_sc, e_sh, e_sw,  # eps_hat strides
    r_sb, r_sh, r_sw,  # raw strides (its channel stride is never needed)
    a_s,  # alpha_bar stride
    l_sb, l_sc, l_sh, l_sw,  # elem strides
    de_sb, de_sc, de_sh, de_sw,  # d_eps_hat strides
    dr_sb, dr_sh, dr_sw,  # d_raw strides
    H, W,
    n_blocks,  # programs per sample along the pixels (grid axis 0)
    scale,  # backward: d l_out / d l_c, 1 / (B*C*H*W) for "mean", 1 for "none"
    beta_const,  # beta when not BETA_FROM_ALPHA
    var_min, var_max, var_offset, log_2pi,
    C: tl.constexpr,  # noise channels (4), unrolled
    BLOCK: tl.constexpr,  # pixels per program
    BETA_FROM_ALPHA: tl.constexpr,  # beta = sqrt(alpha_bar[b])
    REDUCE: tl.constexpr,  # forward "mean": write partial sums (else, forward: per-element values)
    COMPUTE_GRADS: tl.constexpr,  # backward: write d_eps_hat and d_raw (no loss), s = elem * scale
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # int64: b * stride may pass 2^31 on big batches
    p = pid_p * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat pixel index in the h*w plane
    mask = p < H * W
    y = p // W
    x = p % W

    # Variance, its log, the beta-NLL weight and dv/dr: once per pixel, shared by the C channels.
    r = tl.load(raw_ptr + b * r_sb + y * r_sh + x * r_sw, mask=mask, other=0.0).to(tl.float32)
    softplus, sigmoid = _softplus_and_sigmoid(r + var_offset)
    u = softplus + var_min
    var = tl.minimum(tl.maximum(u, var_min), var_max)
    log_var = tl.log(var)
    inv_var = 1.0 / var
    if BETA_FROM_ALPHA:
        beta = tl.sqrt(tl.load(alpha_bar_ptr + b * a_s).to(tl.float32))
    else:
        beta = beta_const
    half_w = 0.5 * tl.exp(beta * log_var)  # w/2, w = var^beta (a constant for the gradient)
    const = log_var + log_2pi

    acc = tl.zeros([BLOCK], dtype=tl.float32)  # sum_c l_c ("mean")
    d_var = tl.zeros([BLOCK], dtype=tl.float32)  # sum_c s_c (1/v - q_c/v^2)
    for c in tl.static_range(C):
        t = tl.load(target_ptr + b * t_sb + c * t_sc + y * t_sh + x * t_sw, mask=mask, other=0.0)
        e = tl.load(eps_hat_ptr + b * e_sb + c * e_sc + y * e_sh + x * e_sw, mask=mask, other=0.0)
        d = t.to(tl.float32) - e.to(tl.float32)
        q = d * d
        elem_off = b * l_sb + c * l_sc + y * l_sh + x * l_sw
        if COMPUTE_GRADS:
            # s_c in fp32: the incoming gradient times 1/N, before anything is rounded.
            s = tl.load(elem_ptr + elem_off, mask=mask, other=0.0).to(tl.float32) * scale
            d_eps_hat = -2.0 * s * half_w * d * inv_var
            de_off = b * de_sb + c * de_sc + y * de_sh + x * de_sw
            tl.store(d_eps_hat_ptr + de_off, d_eps_hat.to(d_eps_hat_ptr.dtype.element_ty), mask=mask)
            d_var += s * (inv_var - q * inv_var * inv_var)
        else:
            elem = half_w * (q * inv_var + const)  # (BLOCK,) l_c
            if REDUCE:
                acc += tl.where(mask, elem, 0.0)
            else:
                tl.store(elem_ptr + elem_off, elem, mask=mask)

    if COMPUTE_GRADS:
        inside = (u > var_min) & (u < var_max)
        d_raw = tl.where(inside, half_w * d_var * sigmoid, 0.0)
        dr_off = b * dr_sb + y * dr_sh + x * dr_sw
        tl.store(d_raw_ptr + dr_off, d_raw.to(d_raw_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        tl.store(partial_ptr + b * n_blocks + pid_p, tl.sum(acc, axis=0))


@triton.jit
def _sum_partials_kernel(
    partial_ptr,  # (n,) fp32 per-program sums
    out_ptr,  # () fp32 out: scale * sum
    n,
    scale,
    BLOCK: tl.constexpr,
):
    # One program, a fixed order: the same bits on every run (float atomics would not be).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


# ---------------------------------------------------------------------------------------------
# Host side


def _check_kernel_inputs(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"confidence_nll (triton): dtype {t.dtype} not supported; use fp32, fp16 or bf16")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("confidence_nll (triton): CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)")


def _block_size(batch: int, pixels: int) -> int:
    # Big problems: 1024 pixels (4096 elements) per program for wide vector loads; small ones:
    # 256, so that a (64, 4, 32, 32) batch still spreads over enough programs to fill the GPU.
    block = 1024 if batch * pixels >= (1 << 20) else 256
    return min(block, triton.next_power_of_2(pixels))


def _launch(target, eps_hat, raw, alpha_bar, beta, *, mode, grad_out=None, block=None):
    """One launch of the main kernel.

    mode "mean": returns the per-program partial sums (fp32); "none": the per-element loss (fp32,
    (B, C, h, w)); "grads": (d_eps_hat, d_raw) for the incoming gradient ``grad_out`` (a 0-d
    tensor for a "mean" loss, (B, C, h, w) for "none"), in eps_hat's and raw's dtypes.
    """
    batch, channels, height, width = eps_hat.shape
    pixels = height * width
    block = block or _block_size(batch, pixels)
    n_blocks = triton.cdiv(pixels, block)
    beta_from_alpha = beta == BETA_SQRT_ALPHA_BAR
    beta_const = 0.0 if beta_from_alpha else float(beta)
    reduce, compute_grads = mode == "mean", mode == "grads"

    partials = torch.empty(batch * n_blocks if reduce else 1, device=eps_hat.device, dtype=torch.float32)
    scale = 1.0
    if reduce:
        elem = partials  # unused slot
    elif compute_grads:
        if grad_out.ndim == 0:  # a "mean" loss: one gradient for every element, times 1/N
            grad_out, scale = grad_out.expand(eps_hat.shape), 1.0 / eps_hat.numel()  # strides (0, 0, 0, 0)
        elem = grad_out
    else:
        elem = torch.empty_like(eps_hat, dtype=torch.float32)  # the per-element loss
    if compute_grads:
        d_eps_hat = torch.empty_like(eps_hat)  # keeps a dense input's layout (channels-last stays so)
        d_raw = torch.empty_like(raw)
    else:
        d_eps_hat, d_raw = eps_hat, raw  # unused slots, never written
    elem_strides = elem.stride() if elem.ndim == 4 else (0, 0, 0, 0)

    _confidence_nll_kernel[(n_blocks, batch)](
        target, eps_hat, raw, alpha_bar, elem, partials, d_eps_hat, d_raw,
        *target.stride(),
        *eps_hat.stride(),
        raw.stride(0), raw.stride(2), raw.stride(3),
        alpha_bar.stride(0),
        *elem_strides,
        *d_eps_hat.stride(),
        d_raw.stride(0), d_raw.stride(2), d_raw.stride(3),
        height, width,
        n_blocks,
        scale,
        beta_const,
        VAR_MIN, VAR_MAX, VAR_OFFSET, LOG_2PI,
        C=channels,
        BLOCK=block,
        BETA_FROM_ALPHA=beta_from_alpha,
        REDUCE=reduce,
        COMPUTE_GRADS=compute_grads,
        num_warps=4,
    )  # fmt: skip
    if compute_grads:
        return d_eps_hat, d_raw
    return partials if reduce else elem


def confidence_nll_mean(target, eps_hat, raw, alpha_bar, beta=BETA_SQRT_ALPHA_BAR, block=None):
    """The mean loss, an fp32 scalar: the kernel's partial sums, then their fixed-order sum."""
    _check_kernel_inputs(target, eps_hat, raw)
    partials = _launch(target, eps_hat, raw, alpha_bar, beta, mode="mean", block=block)
    loss = torch.empty((), device=eps_hat.device, dtype=torch.float32)
    _sum_partials_kernel[(1,)](partials, loss, partials.numel(), 1.0 / eps_hat.numel(), BLOCK=1024)
    return loss


def confidence_nll_grads(target, eps_hat, raw, alpha_bar, grad_out, beta=BETA_SQRT_ALPHA_BAR, block=None):
    """(d out/d eps_hat, d out/d raw) given ``grad_out`` = d out/d loss: 0-d for the mean loss,
    (B, C, h, w) for the per-element loss. Gradients come back in eps_hat's and raw's dtypes."""
    _check_kernel_inputs(target, eps_hat, raw)
    return _launch(target, eps_hat, raw, alpha_bar, beta, mode="grads", grad_out=grad_out, block=block)


class ConfidenceNLLFunction(torch.autograd.Function):
    """Autograd wrapper of the kernel. The target and alpha_bar get no gradient (None).

    Forward saves its inputs (not gradients); backward runs the gradient launch with the
    incoming gradient, so a second backward (retain_graph=True) gets the same result.
    """

    @staticmethod
    def forward(ctx, target, eps_hat, raw, alpha_bar, beta, reduction, block):
        ctx.beta, ctx.block = beta, block
        ctx.save_for_backward(target, eps_hat, raw, alpha_bar)
        if reduction == "mean":
            return confidence_nll_mean(target, eps_hat, raw, alpha_bar, beta, block=block)
        _check_kernel_inputs(target, eps_hat, raw)
        return _launch(target, eps_hat, raw, alpha_bar, beta, mode="none", block=block)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # backward(create_graph=True): the kernel's gradient is not differentiable
            raise RuntimeError(
                "confidence_nll: the Triton kernel has no double backward (create_graph=True); "
                "use confidence_nll(..., backend='torch') for higher-order gradients"
            )
        target, eps_hat, raw, alpha_bar = ctx.saved_tensors
        d_eps_hat, d_raw = confidence_nll_grads(target, eps_hat, raw, alpha_bar, grad_loss, ctx.beta, ctx.block)
        return (
            None,
            d_eps_hat if ctx.needs_input_grad[1] else None,
            d_raw if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def confidence_nll_triton(target, eps_hat, raw, alpha_bar, beta=BETA_SQRT_ALPHA_BAR, reduction="mean", block=None):
    """The C-Diff loss on the fused kernel; same contract as ``cdiff.loss.confidence_nll``.

    The target carries no gradient. ``block`` (pixels per program, a power of two) is for tests.
    Inputs are not validated here: call ``cdiff.loss.confidence_nll``.
    """
    return ConfidenceNLLFunction.apply(target, eps_hat, raw, alpha_bar, beta, reduction, block)
