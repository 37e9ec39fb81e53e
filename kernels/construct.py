"""Triton kernels for the candidate-kernel construction (paper eq. 2).

``out[o, i, s] = Σ_a Σ_b P[a, o] · Q[b, i] · W[a, b, s]`` with the meta-weight viewed as
``[C_out, C_in, S]`` (``S`` = product of the kernel dims, 1 for a linear layer), computed as two
mode products, cheapest first. Each mode product is one GEMM of the same form::

    Y[c, x] = Σ_k M[k, c] · X̃[k, x]

where ``M`` is the transform (``[K, c]``, any strides) and ``X̃`` is the 3-D operand with the
contracted mode brought first and the two remaining modes (the other channel mode and ``S``)
flattened into ``x``. Mode 0 and mode 1 differ only in which strides play which role, so one
kernel serves both and a grouped launch can mix them. Nothing is copied: transposed or
channels_last operands are read through their strides, and a flattened index whose two modes
do not merge into one stride is split with one division per tile (not per element of ``K``).

The grouped launch builds the kernels of many layers with one launch per stage: a small int64
table holds each GEMM's pointers, sizes and strides, and a second table maps each program to
its GEMM, so every layer's tiles run side by side. Layers with a transform on both sides write
their first product to a float32 (float64 for float64 inputs) workspace, read back by the
second stage.

Precision: accumulation in float32 (float64 for float64 inputs). Float16/bfloat16 operands go
to the tensor cores as they are; the intermediate of a two-product construction stays in
float32, so its second product runs on float32 operands (TF32 for float16/bfloat16 inputs,
which rounds no coarser than torch's own half intermediate). Float32 inputs follow
``torch.get_float32_matmul_precision()``: ``highest`` → IEEE fp32, ``high`` → 3×TF32,
``medium`` → TF32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from apsfast._order import p_first

from .common import INTERPRETED, TL_DTYPES, acc_dtype, cast_out, fp32_precision, half_dot_dtype, mma

# Block sizes (tl.dot needs every block dim ≥ 16): 64×64 output tiles with 32-deep K steps keep
# the operands of a 4-warp program in registers for float32 and half inputs alike; a single
# layer whose candidate width is ≤ 32 takes 32-row tiles, which halves the masked-off work.
# Chosen by size, not autotuned: a search meets a new (c_o, c_i) at almost every step, and
# benchmarking each new shape would cost more than the best config saves. The grouped launch
# uses one config for all its layers (its tile table is built with it).
BLOCK_C, BLOCK_X, BLOCK_K = 64, 64, 32
SMALL_BLOCK_C = 32
NUM_WARPS = 4

# One GEMM's row of the grouped table (int64), in this order:
#   0 M_ptr, 1 X_ptr, 2 Y_ptr, 3 C, 4 NX, 5 K, 6 DIV, 7 M_stride_k, 8 M_stride_c,
#   9 X_stride_k, 10 X_stride_h, 11 X_stride_l, 12 Y_stride_c, 13 Y_stride_h, 14 Y_stride_l,
#   15 first tile (program id), 16 Y is the workspace (1) or an output (0)
_NPARAM = 17


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _mode_product_tile(M_ptr, X_ptr, c_offs, x_offs, C, NX, K, DIV,
                       M_stride_k, M_stride_c, X_stride_k, X_stride_h, X_stride_l,
                       ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``[BLOCK_C, BLOCK_X]`` tile of ``Y[c, x] = Σ_k M[k, c] X̃[k, x]`` (float accumulator)."""
    c_mask = c_offs < C
    x_mask = x_offs < NX
    # x = (h, l) with l fastest; DIV == 1 when the two modes merged into one stride.
    x_hi = (x_offs // DIV).to(tl.int64)
    x_lo = (x_offs % DIV).to(tl.int64)
    x_base = x_hi * X_stride_h + x_lo * X_stride_l
    m_base = c_offs.to(tl.int64) * M_stride_c
    acc = tl.zeros((BLOCK_C, BLOCK_X), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < K
        k64 = k_offs.to(tl.int64)
        # Mᵀ tile [BLOCK_C, BLOCK_K] and X̃ tile [BLOCK_K, BLOCK_X]; masked lanes read zero.
        m = tl.load(M_ptr + m_base[:, None] + k64[None, :] * M_stride_k,
                    mask=c_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(X_ptr + k64[:, None] * X_stride_k + x_base[None, :],
                    mask=k_mask[:, None] & x_mask[None, :], other=0.0)
        acc = mma(m, x, acc, DOT_DTYPE, PRECISION)
    return acc


@triton.jit
def _store_tile(Y_ptr, acc, c_offs, x_offs, C, NX, DIV, Y_stride_c, Y_stride_h, Y_stride_l,
                ROUND_BF16: tl.constexpr):
    x_hi = (x_offs // DIV).to(tl.int64)
    x_lo = (x_offs % DIV).to(tl.int64)
    offs = c_offs.to(tl.int64)[:, None] * Y_stride_c + (x_hi * Y_stride_h + x_lo * Y_stride_l)[None, :]
    mask = (c_offs < C)[:, None] & (x_offs < NX)[None, :]
    tl.store(Y_ptr + offs, cast_out(acc, Y_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


@triton.jit
def _construct_mode_kernel(M_ptr, X_ptr, Y_ptr, C, NX, K, DIV,
                           M_stride_k, M_stride_c, X_stride_k, X_stride_h, X_stride_l,
                           Y_stride_c, Y_stride_h, Y_stride_l,
                           ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr,
                           ROUND_BF16: tl.constexpr):
    """One mode product of one layer: ``Y[c, x] = Σ_k M[k, c] X̃[k, x]``; grid = tiles of Y."""
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    # Consecutive programs share an X̃ column block (the big operand) and walk the c tiles.
    c_offs = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_offs = (pid // n_c) * BLOCK_X + tl.arange(0, BLOCK_X)
    acc = _mode_product_tile(M_ptr, X_ptr, c_offs, x_offs, C, NX, K, DIV,
                             M_stride_k, M_stride_c, X_stride_k, X_stride_h, X_stride_l,
                             ACC_DTYPE, DOT_DTYPE, PRECISION, BLOCK_C, BLOCK_X, BLOCK_K)
    _store_tile(Y_ptr, acc, c_offs, x_offs, C, NX, DIV, Y_stride_c, Y_stride_h, Y_stride_l, ROUND_BF16)


@triton.jit
def _construct_grouped_kernel(TABLE_ptr, TILE_JOB_ptr, M_REF_ptr, X_REF_ptr, Y_REF_ptr, WS_REF_ptr,
                              HAS_WS_OUTPUT: tl.constexpr, NPARAM: tl.constexpr,
                              ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr,
                              ROUND_BF16: tl.constexpr):
    """One stage of the grouped construction: program ``pid`` runs one tile of GEMM
    ``TILE_JOB[pid]``, whose pointers, sizes and strides are row ``job`` of ``TABLE`` (layout
    above ``_NPARAM``).

    ``*_REF_ptr`` only carry the element types (pointers in the table are raw addresses). With
    ``HAS_WS_OUTPUT`` some GEMMs of the stage write the workspace (``WS_REF``'s type) instead
    of an output (``Y_REF``'s type), as flagged in the table.
    """
    pid = tl.program_id(0)
    job = tl.load(TILE_JOB_ptr + pid).to(tl.int64)
    row = TABLE_ptr + job * NPARAM
    M_ptr = tl.load(row + 0).to(M_REF_ptr.dtype)
    X_ptr = tl.load(row + 1).to(X_REF_ptr.dtype)
    C = tl.load(row + 3)
    NX = tl.load(row + 4)
    K = tl.load(row + 5)
    DIV = tl.load(row + 6)
    n_c = tl.cdiv(C, BLOCK_C)
    tile = pid - tl.load(row + 15)
    c_offs = (tile % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_offs = (tile // n_c) * BLOCK_X + tl.arange(0, BLOCK_X)
    acc = _mode_product_tile(M_ptr, X_ptr, c_offs, x_offs, C, NX, K, DIV,
                             tl.load(row + 7), tl.load(row + 8), tl.load(row + 9), tl.load(row + 10),
                             tl.load(row + 11), ACC_DTYPE, DOT_DTYPE, PRECISION, BLOCK_C, BLOCK_X, BLOCK_K)
    Y_stride_c = tl.load(row + 12)
    Y_stride_h = tl.load(row + 13)
    Y_stride_l = tl.load(row + 14)
    if HAS_WS_OUTPUT:
        if tl.load(row + 16) != 0:
            _store_tile(tl.load(row + 2).to(WS_REF_ptr.dtype), acc, c_offs, x_offs, C, NX, DIV,
                        Y_stride_c, Y_stride_h, Y_stride_l, ROUND_BF16)
        else:
            _store_tile(tl.load(row + 2).to(Y_REF_ptr.dtype), acc, c_offs, x_offs, C, NX, DIV,
                        Y_stride_c, Y_stride_h, Y_stride_l, ROUND_BF16)
    else:
        _store_tile(tl.load(row + 2).to(Y_REF_ptr.dtype), acc, c_offs, x_offs, C, NX, DIV,
                    Y_stride_c, Y_stride_h, Y_stride_l, ROUND_BF16)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def dot_config(x_dtype: torch.dtype, m_dtype: torch.dtype) -> tuple:
    """``(DOT_DTYPE, PRECISION)`` for a product of an ``x_dtype`` by an ``m_dtype`` operand."""
    if x_dtype == torch.float64 or m_dtype == torch.float64:
        return tl.float64, "ieee"
    if x_dtype == m_dtype and x_dtype in (torch.float16, torch.bfloat16):
        return half_dot_dtype(x_dtype), "ieee"
    if x_dtype != m_dtype:
        # A float32 intermediate against a half transform: TF32 rounds the intermediate no
        # coarser than torch's own half intermediate would be.
        return tl.float32, "tf32"
    return tl.float32, fp32_precision()


def weight_3d(weight: Tensor) -> Tensor:
    """``weight`` ``[C_out, C_in, *kernel]`` as ``[C_out, C_in, S]``, a view whenever the
    kernel dims merge (contiguous and channels_last weights both do)."""
    if weight.dim() == 2:
        return weight.unsqueeze(-1)
    return weight.flatten(2)


def _gemm(X3: Tensor, M: Tensor, Y3: Tensor, mode: int) -> dict:
    """The GEMM ``Y = X ×_mode Mᵀ`` as sizes and strides of ``Y[c, x] = Σ_k M[k, c] X̃[k, x]``."""
    S = X3.shape[2]
    if mode == 0:
        xk, xh, xl = X3.stride(0), X3.stride(1), X3.stride(2)
        yc, yh, yl = Y3.stride(0), Y3.stride(1), Y3.stride(2)
        other = X3.shape[1]
    else:
        xk, xh, xl = X3.stride(1), X3.stride(0), X3.stride(2)
        yc, yh, yl = Y3.stride(1), Y3.stride(0), Y3.stride(2)
        other = X3.shape[0]
    div = S
    if S == 1:
        div, xl, yl = 1, 0, 0
    elif xh == S * xl and yh == S * yl:
        # The (other, s) pair merges into one stride: no division in the kernel.
        div, xh, yh, xl, yl = 1, xl, yl, 0, 0
    return dict(C=M.shape[1], NX=other * S, K=M.shape[0], DIV=div,
                M_stride_k=M.stride(0), M_stride_c=M.stride(1),
                X_stride_k=xk, X_stride_h=xh, X_stride_l=xl,
                Y_stride_c=yc, Y_stride_h=yh, Y_stride_l=yl)


def _tiles(g: dict, block_c: int = BLOCK_C) -> int:
    return triton.cdiv(g["C"], block_c) * triton.cdiv(g["NX"], BLOCK_X)


def _launch_mode(X3: Tensor, M: Tensor, Y3: Tensor, mode: int) -> None:
    g = _gemm(X3, M, Y3, mode)
    block_c = SMALL_BLOCK_C if g["C"] <= SMALL_BLOCK_C else BLOCK_C
    grid = (_tiles(g, block_c),)
    if grid[0] == 0:
        return
    dot_dtype, precision = dot_config(X3.dtype, M.dtype)
    _construct_mode_kernel[grid](M, X3, Y3, g["C"], g["NX"], g["K"], g["DIV"],
                                 g["M_stride_k"], g["M_stride_c"], g["X_stride_k"], g["X_stride_h"],
                                 g["X_stride_l"], g["Y_stride_c"], g["Y_stride_h"], g["Y_stride_l"],
                                 ACC_DTYPE=TL_DTYPES[acc_dtype(X3.dtype)], DOT_DTYPE=dot_dtype,
                                 PRECISION=precision, BLOCK_C=block_c, BLOCK_X=BLOCK_X, BLOCK_K=BLOCK_K,
                                 ROUND_BF16=INTERPRETED, num_warps=NUM_WARPS)


def _plan(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]):
    """The mode products of one construction, in order, as ``(mode, M)`` pairs."""
    C_out, C_in = weight.shape[0], weight.shape[1]
    if P is None:
        return [] if Q is None else [(1, Q)]
    if Q is None:
        return [(0, P)]
    if p_first(C_out, P.shape[1], C_in, Q.shape[1]):
        return [(0, P), (1, Q)]
    return [(1, Q), (0, P)]


def _out_shape(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> tuple[int, ...]:
    c_o = weight.shape[0] if P is None else P.shape[1]
    c_i = weight.shape[1] if Q is None else Q.shape[1]
    return (c_o, c_i, *weight.shape[2:])


def _intermediate_shape(X3: Tensor, mode: int, M: Tensor) -> tuple[int, int, int]:
    shape = list(X3.shape)
    shape[mode] = M.shape[1]
    return tuple(shape)


def construct_forward(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    """Candidate kernel ``einsum('ao,bi,abs->ois', P, Q, weight)`` of one layer.

    weight ``[C_out, C_in, *kernel]`` (any strides), P ``[C_out, c_o]`` or None, Q ``[C_in, c_i]``
    or None (any strides, e.g. transposed views) → contiguous ``[c_o, c_i, *kernel]`` in
    ``weight.dtype``. Two launches with both transforms, one with one, a copy with none.
    """
    out = torch.empty(_out_shape(weight, P, Q), dtype=weight.dtype, device=weight.device)
    plan = _plan(weight, P, Q)
    if not plan:
        out.copy_(weight)
        return out
    X3 = weight_3d(weight)
    Y3 = weight_3d(out)
    if len(plan) == 1:
        _launch_mode(X3, plan[0][1], Y3, plan[0][0])
        return out
    (mode1, M1), (mode2, M2) = plan
    T = torch.empty(_intermediate_shape(X3, mode1, M1), dtype=acc_dtype(weight.dtype), device=weight.device)
    _launch_mode(X3, M1, T, mode1)
    _launch_mode(T, M2, Y3, mode2)
    return out


def _table_row(g: dict, M: Tensor, X: Tensor, Y: Tensor, tile_start: int, y_is_ws: bool) -> list[int]:
    """One GEMM's row of the grouped table (layout above ``_NPARAM``)."""
    return [M.data_ptr(), X.data_ptr(), Y.data_ptr(), g["C"], g["NX"], g["K"], g["DIV"],
            g["M_stride_k"], g["M_stride_c"], g["X_stride_k"], g["X_stride_h"], g["X_stride_l"],
            g["Y_stride_c"], g["Y_stride_h"], g["Y_stride_l"], tile_start, int(y_is_ws)]


def _launch_grouped(jobs: list, device: torch.device, M_ref: Tensor, X_ref: Tensor, Y_ref: Tensor,
                    WS_ref: Tensor) -> None:
    """One launch over every ``(X3, M, Y3, mode, y_is_ws)`` job of a stage."""
    rows, counts, start = [], [], 0
    for X3, M, Y3, mode, y_is_ws in jobs:
        g = _gemm(X3, M, Y3, mode)
        n = _tiles(g)
        rows.extend(_table_row(g, M, X3, Y3, start, y_is_ws))
        counts.append(n)
        start += n
    if start == 0:
        return
    # Table and tile→GEMM map in one int64 tensor: one host-to-device copy per stage.
    tile_job = torch.repeat_interleave(torch.arange(len(jobs), dtype=torch.int64), torch.tensor(counts))
    packed = torch.cat([torch.tensor(rows, dtype=torch.int64), tile_job])
    if device.type != "cpu":
        packed = packed.pin_memory().to(device, non_blocking=True)
    table, tile_map = packed[:len(rows)], packed[len(rows):]
    dot_dtype, precision = dot_config(X_ref.dtype, M_ref.dtype)
    mixed = WS_ref.dtype != Y_ref.dtype and any(job[4] for job in jobs)
    _construct_grouped_kernel[(start,)](
        table, tile_map, M_ref, X_ref, Y_ref, WS_ref, HAS_WS_OUTPUT=mixed, NPARAM=_NPARAM,
        ACC_DTYPE=TL_DTYPES[acc_dtype(X_ref.dtype)], DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_C=BLOCK_C, BLOCK_X=BLOCK_X, BLOCK_K=BLOCK_K, ROUND_BF16=INTERPRETED, num_warps=NUM_WARPS)


def construct_grouped_forward(weights: Sequence[Tensor], Ps: Sequence[Optional[Tensor]],
                              Qs: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """The candidate kernels of many layers, ``[construct_forward(w, P, Q) …]``, with one launch
    per stage: stage 1 runs every layer's first mode product, stage 2 the second product of the
    layers that have two. All tensors share one device and dtype; shapes are free per layer.
    """
    if not weights:
        return []
    device, dtype = weights[0].device, weights[0].dtype
    ws_dtype = acc_dtype(dtype)
    outs, plans, sizes = [], [], []
    for w, P, Q in zip(weights, Ps, Qs):
        outs.append(torch.empty(_out_shape(w, P, Q), dtype=dtype, device=device))
        plan = _plan(w, P, Q)
        plans.append(plan)
        sizes.append(math.prod(_intermediate_shape(weight_3d(w), *plan[0])) if len(plan) == 2 else 0)
    workspace = torch.empty(sum(sizes), dtype=ws_dtype, device=device)
    stage1, stage2, offset = [], [], 0
    for w, out, plan, size in zip(weights, outs, plans, sizes):
        X3, Y3 = weight_3d(w), weight_3d(out)
        if not plan:
            out.copy_(w)
        elif len(plan) == 1:
            stage1.append((X3, plan[0][1], Y3, plan[0][0], False))
        else:
            (mode1, M1), (mode2, M2) = plan
            T = workspace[offset:offset + size].view(_intermediate_shape(X3, mode1, M1))
            offset += size
            stage1.append((X3, M1, T, mode1, True))
            stage2.append((T, M2, Y3, mode2, False))
    if stage1:
        M_ref = stage1[0][1]
        _launch_grouped(stage1, device, M_ref, weights[0], outs[0], workspace)
    if stage2:
        _launch_grouped(stage2, device, stage2[0][1], workspace, outs[0], workspace)
    return outs
