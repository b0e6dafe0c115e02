"""Fused Triton GroupNorm (+ SiLU) for NCHW and channels-last (NHWC) activations.

The PyTorch reference, and the definition, is ``cdiff.layers.group_norm_reference``; the entry
point is ``cdiff.layers.GroupNorm`` (it imports this module lazily, only when CDIFF_GROUP_NORM
chooses the kernel). Layout of this file, as Liger-Kernel's ops/: the kernels (the derivation of
the gradients above them), the host launchers, the ``torch.autograd.Function``.

Why: on CUDA, PyTorch's GroupNorm copies a channels-last input to NCHW and returns NCHW, so a
channels-last network pays a layout round trip around every norm, and SiLU is one more pass.
Here every kernel addresses x through its strides, so either layout is read and written where
it lies, and SiLU is applied on the way out.

Forward: three launches. (1) per (sample, group, chunk of pixels): the chunk's mean and its sum
of squared deviations (M2), in fp32; (2) per (sample, group): the group's mean and 1/std from the
chunks, by the exact two-level split of the variance (no E[x^2] - E[x]^2 cancellation, which
matters at the VAE decoder's ~1e3 activations); (3) per tile of (pixels x channels): normalise,
scale and shift, SiLU, one rounding to x's dtype. Backward: two launches (the reductions of
the input gradient and the per-chunk weight/bias gradients; then the input gradient); the small
per-chunk partial sums are added by torch in a fixed order (deterministic). Forward saves x, the
fp32 mean and 1/std: not its output, one activation fewer than GroupNorm then SiLU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cdiff.layers import KERNEL_DTYPES

# Derivation, per sample b and group g of N = (C/G) * H * W elements x_i (channel c(i)):
#   mu = (1/N) sum_i x_i,  var = (1/N) sum_i (x_i - mu)^2,  r = 1 / sqrt(var + eps)
#   xhat_i = (x_i - mu) r,  z_i = w_c xhat_i + b_c,  y_i = silu(z_i) = z_i s_i,  s_i = sigmoid(z_i)
# Chunks k of n_k elements with means m_k and M2_k = sum_{i in k} (x_i - m_k)^2 combine exactly:
#   mu = (1/N) sum_k n_k m_k,   N var = sum_k [M2_k + n_k (m_k - mu)^2].
# Backward, with dy the incoming gradient:
#   dz_i = dy_i * s_i (1 + z_i (1 - s_i))     (d silu / dz; dz = dy without SiLU)
#   dw_c = sum_{b, i in c} dz_i xhat_i,   db_c = sum_{b, i in c} dz_i
#   dxhat_i = dz_i w_c
#   dx_i = r (dxhat_i - (1/N) sum_j dxhat_j - xhat_i (1/N) sum_j dxhat_j xhat_j)
# (the last from d xhat_j / d x_i = r (delta_ij - 1/N - xhat_i xhat_j / N)). All in fp32.


@triton.jit
def _sigmoid(z):
    # exp of -|z| only: no overflow for very negative z.
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _chunk_stats_kernel(
    x_ptr,  # (B, C, HW) fp32/fp16/bf16, strides (x_sb, x_sc, x_sp): NCHW or NHWC memory
    mean_ptr,  # (B, G, n_chunks) fp32 out: each chunk's mean
    m2_ptr,  # (B, G, n_chunks) fp32 out: each chunk's sum of squared deviations from its mean
    x_sb, x_sc, x_sp,
    HW, G, n_chunks,
    CPG,  # channels per group
    BLOCK_P: tl.constexpr,  # pixels per chunk
    BLOCK_CG: tl.constexpr,  # next power of two >= CPG
):
    chunk = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    j = tl.arange(0, BLOCK_CG)  # (BLOCK_CG,) channel within the group
    mask = (p < HW)[:, None] & (j < CPG)[None, :]
    offs = b * x_sb + (g * CPG + j)[None, :].to(tl.int64) * x_sc + p[:, None].to(tl.int64) * x_sp
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_CG)
    count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    dev = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
    out = (b * G + g) * n_chunks + chunk
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, m2)


@triton.jit
def _combine_stats_kernel(
    mean_part_ptr,  # (B*G, n_chunks) fp32: chunk means
    m2_part_ptr,  # (B*G, n_chunks) fp32: chunk M2
    mean_ptr,  # (B*G,) fp32 out: the group's mean
    rstd_ptr,  # (B*G,) fp32 out: the group's 1 / sqrt(var + eps)
    HW, CPG, n_chunks, eps,
    inv_n,  # 1 / (CPG * HW), the group's element count
    BLOCK_P: tl.constexpr,  # pixels per chunk, as in _chunk_stats_kernel
    BLOCK_N: tl.constexpr,  # chunks read at a time
):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_chunks, BLOCK_N):  # pass 1: the mean, sum_k n_k m_k / N
        k = start + tl.arange(0, BLOCK_N)
        valid = k < n_chunks
        count = (tl.minimum(HW - k * BLOCK_P, BLOCK_P) * CPG).to(tl.float32)
        acc += tl.where(valid, count * tl.load(mean_part_ptr + row * n_chunks + k, mask=valid, other=0.0), 0.0)
    mean = tl.sum(acc, axis=0) * inv_n
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_chunks, BLOCK_N):  # pass 2: N var = sum_k M2_k + n_k (m_k - mu)^2
        k = start + tl.arange(0, BLOCK_N)
        valid = k < n_chunks
        count = (tl.minimum(HW - k * BLOCK_P, BLOCK_P) * CPG).to(tl.float32)
        m = tl.load(mean_part_ptr + row * n_chunks + k, mask=valid, other=0.0)
        m2 = tl.load(m2_part_ptr + row * n_chunks + k, mask=valid, other=0.0)
        acc += tl.where(valid, m2 + count * (m - mean) * (m - mean), 0.0)
    var = tl.sum(acc, axis=0) * inv_n
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _normalize_kernel(
    x_ptr,  # (B, C, HW) fp32/fp16/bf16, strides (x_sb, x_sc, x_sp)
    y_ptr,  # (B, C, HW) out, x's dtype, strides (y_sb, y_sc, y_sp)
    w_ptr,  # (C,) any float dtype
    bias_ptr,  # (C,) any float dtype
    mean_ptr,  # (B, G) fp32
    rstd_ptr,  # (B, G) fp32
    x_sb, x_sc, x_sp,
    y_sb, y_sc, y_sp,
    C, HW, G, CPG,
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_ok = c < C
    mask = (p < HW)[:, None] & c_ok[None, :]
    group = b * G + c // CPG  # (BLOCK_C,)
    mean = tl.load(mean_ptr + group, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + group, mask=c_ok, other=0.0)
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = rstd * w  # z = x * scale + shift
    shift = bias - mean * scale
    c64, p64 = c.to(tl.int64), p.to(tl.int64)
    x = tl.load(x_ptr + b * x_sb + c64[None, :] * x_sc + p64[:, None] * x_sp, mask=mask, other=0.0)
    z = x.to(tl.float32) * scale[None, :] + shift[None, :]  # (BLOCK_P, BLOCK_C)
    if SILU:
        z = z * _sigmoid(z)
    tl.store(y_ptr + b * y_sb + c64[None, :] * y_sc + p64[:, None] * y_sp, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_terms(x, dy, mean, rstd, w, bias, SILU: tl.constexpr):
    # xhat, dz and dxhat of the derivation above, in fp32.
    xhat = (x - mean) * rstd
    if SILU:
        z = xhat * w + bias
        s = _sigmoid(z)
        dz = dy * s * (1.0 + z * (1.0 - s))
    else:
        dz = dy
    return xhat, dz, dz * w


@triton.jit
def _backward_reduce_kernel(
    x_ptr,  # (B, C, HW) strides (x_sb, x_sc, x_sp)
    dy_ptr,  # (B, C, HW) strides (d_sb, d_sc, d_sp)
    w_ptr,  # (C,)
    bias_ptr,  # (C,)
    mean_ptr,  # (B, G) fp32
    rstd_ptr,  # (B, G) fp32
    sum_dxhat_ptr,  # (B, G, n_chunks) fp32 out: sum of dxhat over the chunk
    sum_dxhat_xhat_ptr,  # (B, G, n_chunks) fp32 out: sum of dxhat * xhat over the chunk
    dw_part_ptr,  # (B, n_chunks, C) fp32 out: sum of dz * xhat over the chunk, per channel
    db_part_ptr,  # (B, n_chunks, C) fp32 out: sum of dz over the chunk, per channel
    x_sb, x_sc, x_sp,
    d_sb, d_sc, d_sp,
    C, HW, G, n_chunks, CPG,
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    chunk = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = (chunk * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    j = tl.arange(0, BLOCK_CG)
    c = g * CPG + j  # (BLOCK_CG,)
    c_ok = j < CPG
    mask = (p < HW)[:, None] & c_ok[None, :]
    c64 = c.to(tl.int64)
    x = tl.load(x_ptr + b * x_sb + c64[None, :] * x_sc + p[:, None] * x_sp, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + b * d_sb + c64[None, :] * d_sc + p[:, None] * d_sp, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + b * G + g)
    rstd = tl.load(rstd_ptr + b * G + g)
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    xhat, dz, dxhat = _grad_terms(x, dy, mean, rstd, w, bias, SILU)
    xhat = tl.where(mask, xhat, 0.0)
    dz = tl.where(mask, dz, 0.0)
    dxhat = tl.where(mask, dxhat, 0.0)
    row = (b * G + g) * n_chunks + chunk
    tl.store(sum_dxhat_ptr + row, tl.sum(tl.sum(dxhat, axis=1), axis=0))
    tl.store(sum_dxhat_xhat_ptr + row, tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0))
    part = (b * n_chunks + chunk) * C + c64
    tl.store(dw_part_ptr + part, tl.sum(dz * xhat, axis=0), mask=c_ok)
    tl.store(db_part_ptr + part, tl.sum(dz, axis=0), mask=c_ok)


@triton.jit
def _backward_dx_kernel(
    x_ptr,  # (B, C, HW) strides (x_sb, x_sc, x_sp)
    dy_ptr,  # (B, C, HW) strides (d_sb, d_sc, d_sp)
    dx_ptr,  # (B, C, HW) out, x's dtype, strides (dx_sb, dx_sc, dx_sp)
    w_ptr,  # (C,)
    bias_ptr,  # (C,)
    mean_ptr,  # (B, G) fp32
    rstd_ptr,  # (B, G) fp32
    sum_dxhat_ptr,  # (B, G) fp32: sum of dxhat over the group
    sum_dxhat_xhat_ptr,  # (B, G) fp32: sum of dxhat * xhat over the group
    x_sb, x_sc, x_sp,
    d_sb, d_sc, d_sp,
    dx_sb, dx_sc, dx_sp,
    C, HW, G, CPG,
    inv_n,  # 1 / (CPG * HW)
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mask = (p < HW)[:, None] & c_ok[None, :]
    group = b * G + c // CPG
    mean = tl.load(mean_ptr + group, mask=c_ok, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + group, mask=c_ok, other=0.0)[None, :]
    mean_dxhat = (tl.load(sum_dxhat_ptr + group, mask=c_ok, other=0.0) * inv_n)[None, :]
    mean_dxhat_xhat = (tl.load(sum_dxhat_xhat_ptr + group, mask=c_ok, other=0.0) * inv_n)[None, :]
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    c64 = c.to(tl.int64)
    x = tl.load(x_ptr + b * x_sb + c64[None, :] * x_sc + p[:, None] * x_sp, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + b * d_sb + c64[None, :] * d_sc + p[:, None] * d_sp, mask=mask, other=0.0).to(tl.float32)
    xhat, dz, dxhat = _grad_terms(x, dy, mean, rstd, w, bias, SILU)
    dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
    offs = b * dx_sb + c64[None, :] * dx_sc + p[:, None] * dx_sp
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side

TILE = 4096  # elements per program: a (pixels x channels) tile


def _pixel_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(t, its (batch, channel, pixel) strides): H and W must merge into one pixel axis, as they do
    in NCHW and NHWC memory; any other layout is copied to NCHW first."""
    batch, channels, height, width = t.shape
    if height > 1 and t.stride(2) != width * t.stride(3):
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3) if width > 1 else t.stride(2))


def _check(x: torch.Tensor, groups: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"group_norm_silu (triton): x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"group_norm_silu (triton): dtype {x.dtype} not supported; use fp32, fp16 or bf16")
    if x.shape[1] % groups:
        raise ValueError(f"group_norm_silu (triton): {x.shape[1]} channels do not split into {groups} groups")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("group_norm_silu (triton): CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)")


def _blocks(channels: int, groups: int, pixels: int, block_p: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_CG, pixels per stats chunk, BLOCK_C, pixels per normalise tile)."""
    block_cg = max(2, triton.next_power_of_2(channels // groups))
    pixels_pow2 = max(2, triton.next_power_of_2(pixels))
    chunk = block_p or min(pixels_pow2, max(16, TILE // block_cg))
    block_c = min(max(2, triton.next_power_of_2(channels)), 128)
    tile_p = block_p or min(pixels_pow2, max(16, TILE // block_c))
    return block_cg, chunk, block_c, tile_p


def group_norm_stats(x, groups: int, eps: float, block_p: int | None = None):
    """(mean, rstd), each (B, G) fp32, of x (B, C, H, W); ``block_p`` (pixels per chunk) is for tests."""
    _check(x, groups)
    x, (sb, sc, sp) = _pixel_strides(x)
    batch, channels, height, width = x.shape
    pixels, cpg = height * width, channels // groups
    block_cg, chunk, _, _ = _blocks(channels, groups, pixels, block_p)
    n_chunks = triton.cdiv(pixels, chunk)
    parts = torch.empty(2, batch, groups, n_chunks, device=x.device, dtype=torch.float32)
    _chunk_stats_kernel[(n_chunks, groups, batch)](
        x, parts[0], parts[1], sb, sc, sp, pixels, groups, n_chunks, cpg, BLOCK_P=chunk, BLOCK_CG=block_cg,
    )  # fmt: skip
    stats = torch.empty(2, batch, groups, device=x.device, dtype=torch.float32)
    _combine_stats_kernel[(batch * groups,)](
        parts[0], parts[1], stats[0], stats[1], pixels, cpg, n_chunks, eps, 1.0 / (cpg * pixels),
        BLOCK_P=chunk, BLOCK_N=128,
    )  # fmt: skip
    return stats[0], stats[1]


def group_norm_forward(x, groups, weight, bias, eps, silu, block_p=None):
    """(y, mean, rstd): y in x's dtype and memory format (NCHW or NHWC)."""
    mean, rstd = group_norm_stats(x, groups, eps, block_p)
    x, (sb, sc, sp) = _pixel_strides(x)
    batch, channels, height, width = x.shape
    pixels = height * width
    _, _, block_c, tile_p = _blocks(channels, groups, pixels, block_p)
    y = torch.empty_like(x)  # a dense x's strides: channels-last stays channels-last
    _, (yb, yc, yp) = _pixel_strides(y)
    grid = (triton.cdiv(pixels, tile_p), triton.cdiv(channels, block_c), batch)
    _normalize_kernel[grid](
        x, y, weight, bias, mean, rstd, sb, sc, sp, yb, yc, yp, channels, pixels, groups, channels // groups,
        SILU=silu, BLOCK_P=tile_p, BLOCK_C=block_c,
    )  # fmt: skip
    return y, mean, rstd


def group_norm_backward(dy, x, weight, bias, mean, rstd, groups, silu, block_p=None):
    """(dx, dweight, dbias) for the incoming gradient dy; dx in x's dtype and layout, the others in
    weight's dtype (summed over chunks and the batch in fp32, in a fixed order)."""
    x, (sb, sc, sp) = _pixel_strides(x)
    dy, (db_, dc, dp) = _pixel_strides(dy)
    batch, channels, height, width = x.shape
    pixels, cpg = height * width, channels // groups
    block_cg, chunk, block_c, tile_p = _blocks(channels, groups, pixels, block_p)
    n_chunks = triton.cdiv(pixels, chunk)
    sums = torch.empty(2, batch, groups, n_chunks, device=x.device, dtype=torch.float32)
    params = torch.empty(2, batch, n_chunks, channels, device=x.device, dtype=torch.float32)
    _backward_reduce_kernel[(n_chunks, groups, batch)](
        x, dy, weight, bias, mean, rstd, sums[0], sums[1], params[0], params[1],
        sb, sc, sp, db_, dc, dp, channels, pixels, groups, n_chunks, cpg,
        SILU=silu, BLOCK_P=chunk, BLOCK_CG=block_cg,
    )  # fmt: skip
    sums = sums.sum(-1)  # (2, B, G)
    dx = torch.empty_like(x)
    _, (xb, xc, xp) = _pixel_strides(dx)
    grid = (triton.cdiv(pixels, tile_p), triton.cdiv(channels, block_c), batch)
    _backward_dx_kernel[grid](
        x, dy, dx, weight, bias, mean, rstd, sums[0], sums[1],
        sb, sc, sp, db_, dc, dp, xb, xc, xp, channels, pixels, groups, cpg, 1.0 / (cpg * pixels),
        SILU=silu, BLOCK_P=tile_p, BLOCK_C=block_c,
    )  # fmt: skip
    dweight, dbias = params.sum((1, 2)).to(weight.dtype)  # (C,) each
    return dx, dweight, dbias


class GroupNormSiLUFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels. Saves x and the fp32 statistics; a second backward through
    the same graph recomputes from them (nothing saved is modified). No double backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu, block_p):
        y, mean, rstd = group_norm_forward(x, groups, weight, bias, eps, silu, block_p)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu, ctx.block_p = groups, silu, block_p
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "group_norm_silu: the Triton kernel has no double backward (create_graph=True); "
                "set CDIFF_GROUP_NORM=torch for higher-order gradients"
            )
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = group_norm_backward(dy, x, weight, bias, mean, rstd, ctx.groups, ctx.silu, ctx.block_p)
        needs = ctx.needs_input_grad
        return dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None, None, None, None, None


def group_norm_silu(x, groups: int, weight, bias, eps: float, silu: bool = True, block_p: int | None = None):
    """GroupNorm of x (B, C, H, W) with fp32 statistics, then SiLU when ``silu``: the fused kernel.

    Same contract as ``cdiff.layers.group_norm_reference``; x in NCHW or channels-last memory
    (the result keeps it), fp32, fp16 or bf16; weight and bias (C,) of any float dtype.
    ``block_p`` (pixels per program, a power of two) is for tests.
    """
    _check(x, groups)
    return GroupNormSiLUFunction.apply(x, weight, bias, groups, float(eps), bool(silu), block_p)
