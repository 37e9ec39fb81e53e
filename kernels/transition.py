"""Triton kernels for the batched transition (paper eqs. 4–5) of every layer of a network.

Each *side* ``s`` (the P or the Q of one layer) is a matrix ``M`` ``[C, n]`` of ``count`` blocks
``M_a`` side by side. Per side, with ``G = MᵀM`` and ``G_aa = M_aᵀM_a``::

    S = ½‖G‖²_F + ½ Σ_a ‖G_aa‖²_F,      ∂S/∂M_a = 2 (M Mᵀ) M_a + 2 M_a G_aa,

Φ = Σ_layers S_P · S_Q, and every column steps ``p ← normalize(p − τ · S_partner · ∂S/∂p)``.

Two launches for all sides together:

1. ``_transition_gram_kernel`` — one program per upper-triangular tile of every side's Gram
   matrix, taken on the smaller side (``H = MMᵀ`` ``[C, C]`` when ``C < n``, else ``H = MᵀM``
   ``[n, n]``), and, for ``C < n``, of every block's ``G_aa``. Each tile writes itself and its
   mirror to a workspace and its share of ``S`` to one partial sum per tile (summed later in a
   fixed order, so Φ is deterministic). The diagonal tiles of ``H`` read every element of
   ``M`` exactly once; they also copy it to a float32 snapshot, which is what the second launch
   reads, so the in-place update never races with a read of the old values.
2. ``_transition_update_kernel`` — one program per (side, block, column tile): the gradient
   columns from the snapshot and the Gram workspace, ``u = p − τ S_partner ∂S/∂p``, the column
   norms, then ``p ← u / max(‖u‖, ε)`` written in place through ``M``'s strides. Program 0 also
   reduces Φ.

For ``C ≥ n`` the block term folds into the Gram term: ``∂S/∂M_a = 2 M (G[:, a] + E_a)`` with
``E_a`` the rows of block ``a`` of ``G[:, a]``, so one K loop with the in-block rows of ``G``
counted twice. Accumulation in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import struct
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import INTERPRETED, TL_DTYPES, acc_dtype, cast_out, fp32_precision, half_dot_dtype, mma

BLOCK_T, BLOCK_TK = 64, 32                    # Gram tiles (square) and their K step
BLOCK_R, BLOCK_N, BLOCK_UK = 64, 32, 32       # update: rows per step, columns per program, K step
BLOCK_RED = 256                               # partial sums reduced per step
EPS = 1e-12                                   # F.normalize's
NUM_WARPS = 4

# Rows of the int64 tables.
_GRAM_NP = 11   # X_ptr, X_sr, X_sk, R, K, out_off, snap_off, snap_sr, snap_sk, blk_off, unused
_SIDE_NP = 12   # M_ptr, M_s0, M_s1, C, n, snap_off, u_off, h_off, outer, p_start, p_end, partner
_UPD_NP = 5     # side, col0, blk_off, blk_w, d_off


@triton.jit
def _range_sum(X_ptr, start, end, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``Σ X[start:end]`` in a fixed order."""
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(X_ptr + offs, mask=offs < end, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _transition_gram_kernel(TABLE_ptr, TILES_ptr, X_REF_ptr, WS_ptr, BLK_ptr, PART_ptr,
                            GRAM_NP: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile ``(ti, tj)``, ``ti ≤ tj``, of the Gram ``H = X Xᵀ`` of job ``TILES[pid, 0]``.

    ``X`` ``[R, K]`` is ``M`` (``H = MMᵀ``), ``Mᵀ`` (``H = MᵀM``) or a block ``M_aᵀ`` read
    through strides; ``H`` goes to ``WS[out_off:]`` (``[R, R]``, row-major), the tile's share of
    ``S`` to ``PART[pid]``.
    """
    pid = tl.program_id(0)
    job = tl.load(TILES_ptr + pid * 3).to(tl.int64)
    ti = tl.load(TILES_ptr + pid * 3 + 1)
    tj = tl.load(TILES_ptr + pid * 3 + 2)
    row = TABLE_ptr + job * GRAM_NP
    X_ptr = tl.load(row + 0).to(X_REF_ptr.dtype)
    X_stride_r = tl.load(row + 1)
    X_stride_k = tl.load(row + 2)
    R = tl.load(row + 3)
    K = tl.load(row + 4)
    out_off = tl.load(row + 5)
    snap_off = tl.load(row + 6)
    snap_stride_r = tl.load(row + 7)
    snap_stride_k = tl.load(row + 8)
    blk_off = tl.load(row + 9)

    ri = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    rj = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    mi = ri < R
    mj = rj < R
    ri64 = ri.to(tl.int64)
    rj64 = rj.to(tl.int64)
    # Diagonal tiles of H see each row of X once: they write the snapshot. (Scalar conditions
    # enter masks as index bounds: a block mask & a scalar bool is not portable.)
    snap_rows = tl.where((ti == tj) & (snap_off >= 0), R, 0)
    snap_base = tl.maximum(snap_off, 0)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        k64 = k.to(tl.int64)
        a_mask = mi[:, None] & mk[None, :]
        a = tl.load(X_ptr + ri64[:, None] * X_stride_r + k64[None, :] * X_stride_k, mask=a_mask, other=0.0)
        b = tl.load(X_ptr + k64[:, None] * X_stride_k + rj64[None, :] * X_stride_r,
                    mask=mk[:, None] & mj[None, :], other=0.0)
        tl.store(WS_ptr + snap_base + ri64[:, None] * snap_stride_r + k64[None, :] * snap_stride_k,
                 a.to(ACC_DTYPE), mask=(ri < snap_rows)[:, None] & mk[None, :])
        acc = mma(a, b, acc, DOT_DTYPE, PRECISION)

    mask = mi[:, None] & mj[None, :]
    tl.store(WS_ptr + out_off + ri64[:, None] * R + rj64[None, :], acc, mask=mask)
    off_diagonal = ti != tj
    mirror_rows = tl.where(off_diagonal, R, 0)
    tl.store(WS_ptr + out_off + rj64[None, :] * R + ri64[:, None], acc,
             mask=(ri < mirror_rows)[:, None] & mj[None, :])

    sq = tl.where(mask, acc * acc, 0.0)
    # H = MᵀM (blk_off ≥ 0): entries inside a diagonal block count again, for ½Σ‖G_aa‖².
    blk_rows = tl.where(blk_off >= 0, R, 0)
    blk_base = tl.maximum(blk_off, 0)
    bi = tl.load(BLK_ptr + blk_base + ri64, mask=ri < blk_rows, other=-1)
    bj = tl.load(BLK_ptr + blk_base + rj64, mask=rj < blk_rows, other=-2)
    sq = tl.where(bi[:, None] == bj[None, :], 2.0 * sq, sq)
    part = 0.5 * tl.sum(tl.sum(sq, axis=1), axis=0)
    part = tl.where(off_diagonal, 2.0 * part, part)     # the mirrored tile
    tl.store(PART_ptr + pid, part)


@triton.jit(do_not_specialize=["tau_bits"])
def _transition_update_kernel(SIDES_ptr, TILES_ptr, M_REF_ptr, WS_ptr, PART_ptr, PHI_ptr, n_sides, tau_bits,
                              IS_RELATIVE: tl.constexpr, SIDE_NP: tl.constexpr, UPD_NP: tl.constexpr, ACC_DTYPE: tl.constexpr,
                              PRECISION: tl.constexpr, EPS: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RED: tl.constexpr,
                              ROUND_BF16: tl.constexpr):
    """Columns ``[col0, col0 + BLOCK_N)`` (inside one block) of one side: gradient, step,
    normalisation, in-place store. Program 0 also writes Φ to ``PHI[0]``."""
    pid = tl.program_id(0)
    tile = TILES_ptr + pid * UPD_NP
    side = tl.load(tile + 0)
    col0 = tl.load(tile + 1)
    blk_off = tl.load(tile + 2)
    blk_w = tl.load(tile + 3)
    d_off = tl.load(tile + 4)
    srow = SIDES_ptr + side * SIDE_NP
    M_ptr = tl.load(srow + 0).to(M_REF_ptr.dtype)
    M_stride_0 = tl.load(srow + 1)
    M_stride_1 = tl.load(srow + 2)
    C = tl.load(srow + 3)
    n = tl.load(srow + 4)
    snap_off = tl.load(srow + 5)
    u_off = tl.load(srow + 6)
    h_off = tl.load(srow + 7)
    outer = tl.load(srow + 8)
    partner = tl.load(srow + 11)

    if IS_RELATIVE:  # τ ∂S/∂p: a rate independent of the widths, no partner factor
        factor = 1.0
    else:
        prow = SIDES_ptr + tl.maximum(partner, 0) * SIDE_NP
        s_partner = _range_sum(PART_ptr, tl.load(prow + 9), tl.load(prow + 10), ACC_DTYPE, BLOCK_RED)
        factor = tl.where(partner >= 0, s_partner, 1.0)
    # τ arrives as the bits of a float64 so that float64 inputs step with the exact τ.
    tau = tau_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC_DTYPE)
    step = 2.0 * tau * factor

    cols = col0 + tl.arange(0, BLOCK_N)
    mc = cols < blk_off + blk_w
    cols64 = cols.to(tl.int64)
    colsq = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for r0 in range(0, C, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mr = rows < C
        rows64 = rows.to(tl.int64)
        grad = tl.zeros((BLOCK_R, BLOCK_N), dtype=ACC_DTYPE)
        if outer != 0:
            # (M Mᵀ) M_a: H = MMᵀ [C, C] times the snapshot's columns.
            for k0 in range(0, C, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mk = k < C
                k64 = k.to(tl.int64)
                a = tl.load(WS_ptr + h_off + rows64[:, None] * C + k64[None, :],
                            mask=mr[:, None] & mk[None, :], other=0.0)
                b = tl.load(WS_ptr + snap_off + k64[:, None] * n + cols64[None, :],
                            mask=mk[:, None] & mc[None, :], other=0.0)
                grad = mma(a, b, grad, ACC_DTYPE, PRECISION)
            # M_a G_aa, G_aa [blk_w, blk_w] at WS[d_off:].
            for k0 in range(0, blk_w, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mk = k < blk_w
                k64 = k.to(tl.int64)
                a = tl.load(WS_ptr + snap_off + rows64[:, None] * n + (blk_off + k64)[None, :],
                            mask=mr[:, None] & mk[None, :], other=0.0)
                b = tl.load(WS_ptr + d_off + k64[:, None] * blk_w + (cols64 - blk_off)[None, :],
                            mask=mk[:, None] & mc[None, :], other=0.0)
                grad = mma(a, b, grad, ACC_DTYPE, PRECISION)
        else:
            # M (G[:, a] + E_a): H = MᵀM [n, n], rows of block a counted twice.
            for k0 in range(0, n, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mk = k < n
                k64 = k.to(tl.int64)
                a = tl.load(WS_ptr + snap_off + rows64[:, None] * n + k64[None, :],
                            mask=mr[:, None] & mk[None, :], other=0.0)
                b = tl.load(WS_ptr + h_off + k64[:, None] * n + cols64[None, :],
                            mask=mk[:, None] & mc[None, :], other=0.0)
                in_block = (k >= blk_off) & (k < blk_off + blk_w)
                b = tl.where(in_block[:, None], 2.0 * b, b)
                grad = mma(a, b, grad, ACC_DTYPE, PRECISION)
        mask = mr[:, None] & mc[None, :]
        p = tl.load(WS_ptr + snap_off + rows64[:, None] * n + cols64[None, :], mask=mask, other=0.0)
        u = tl.where(mask, p - step * grad, 0.0)
        tl.store(WS_ptr + u_off + rows64[:, None] * n + cols64[None, :], u, mask=mask)
        colsq += tl.sum(u * u, axis=0)
    inv = 1.0 / tl.maximum(tl.sqrt(colsq), EPS)
    # The second pass reads what other threads of this program stored in the first.
    tl.debug_barrier()
    for r0 in range(0, C, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rows64 = rows.to(tl.int64)
        mask = (rows < C)[:, None] & mc[None, :]
        u = tl.load(WS_ptr + u_off + rows64[:, None] * n + cols64[None, :], mask=mask, other=0.0)
        tl.store(M_ptr + rows64[:, None] * M_stride_0 + cols64[None, :] * M_stride_1,
                 cast_out(u * inv[None, :], M_ptr.dtype.element_ty, ROUND_BF16), mask=mask)

    if pid == 0:
        phi = tl.sum(tl.zeros((BLOCK_RED,), dtype=ACC_DTYPE), axis=0)
        for s in range(0, n_sides):
            srow_s = SIDES_ptr + s * SIDE_NP
            p_s = tl.load(srow_s + 11)
            score = _range_sum(PART_ptr, tl.load(srow_s + 9), tl.load(srow_s + 10), ACC_DTYPE, BLOCK_RED)
            prow_s = SIDES_ptr + tl.maximum(p_s, 0) * SIDE_NP
            other = _range_sum(PART_ptr, tl.load(prow_s + 9), tl.load(prow_s + 10), ACC_DTYPE, BLOCK_RED)
            other = tl.where(p_s >= 0, other, 1.0)
            # Each layer once: at its single side, or at the later of its two.
            phi += tl.where(p_s < s, score * other, 0.0)
        tl.store(PHI_ptr, phi)


class _Plan:
    """Tables and workspace of one network layout (sizes, strides, addresses), kept across
    steps: the transforms are updated in place, so a search reuses one plan every step."""

    def __init__(self, Ms: Sequence[Tensor], widths: Sequence[int], counts: Sequence[int],
                 partner: Sequence[int]):
        device = Ms[0].device
        self.acc = acc_dtype(Ms[0].dtype)
        gram_rows, gram_tiles, side_rows, upd_rows, blk_ids = [], [], [], [], []
        ws = 0
        start_w = 0
        blk_base = 0
        esize = Ms[0].element_size()
        for s, (M, count) in enumerate(zip(Ms, counts)):
            C, n = M.shape
            ws_w = list(widths[start_w:start_w + count])
            start_w += count
            offs = [sum(ws_w[:a]) for a in range(count)]
            outer = C < n
            snap_off, u_off, h_off = ws, ws + C * n, ws + 2 * C * n
            ws = h_off + (C * C if outer else n * n)
            p_start = len(gram_tiles)

            def add_gram(ptr, sr, sk, R, K, out_off, snap, blk):
                job = len(gram_rows) // _GRAM_NP
                gram_rows.extend([ptr, sr, sk, R, K, out_off, *snap, blk, 0])
                nt = triton.cdiv(R, BLOCK_T)
                gram_tiles.extend(v for ti in range(nt) for tj in range(ti, nt) for v in (job, ti, tj))

            if outer:
                add_gram(M.data_ptr(), M.stride(0), M.stride(1), C, n, h_off, (snap_off, n, 1), -1)
                d_offs = []
                for off, w in zip(offs, ws_w):
                    d_offs.append(ws)
                    add_gram(M.data_ptr() + off * M.stride(1) * esize, M.stride(1), M.stride(0), w, C, ws,
                             (-1, 0, 0), -1)
                    ws += w * w
            else:
                add_gram(M.data_ptr(), M.stride(1), M.stride(0), n, C, h_off, (snap_off, 1, n), blk_base)
                d_offs = [0] * count
            blk_ids.extend(a for a, w in enumerate(ws_w) for _ in range(w))
            blk_base += n
            side_rows.extend([M.data_ptr(), M.stride(0), M.stride(1), C, n, snap_off, u_off, h_off,
                              int(outer), p_start // 3, len(gram_tiles) // 3, partner[s]])
            for off, w, d_off in zip(offs, ws_w, d_offs):
                for c0 in range(off, off + w, BLOCK_N):
                    upd_rows.extend([s, c0, off, w, d_off])
        self.n_gram = len(gram_tiles) // 3
        self.n_upd = len(upd_rows) // _UPD_NP
        self.n_sides = len(Ms)
        parts = [gram_rows, gram_tiles, side_rows, upd_rows, blk_ids]
        packed = torch.tensor([v for part in parts for v in part], dtype=torch.int64)
        if device.type != "cpu":
            packed = packed.to(device)
        views, at = [], 0
        for part in parts:
            views.append(packed[at:at + len(part)])
            at += len(part)
        self.gram_table, self.gram_tiles, self.sides, self.upd_tiles, blk = views
        self.blk = blk.to(torch.int32)
        self.workspace = torch.empty(ws, dtype=self.acc, device=device)
        self.partials = torch.empty(max(self.n_gram, 1), dtype=self.acc, device=device)


_PLANS: dict = {}
_MAX_PLANS = 8


def _plan(Ms, widths, counts, partner) -> _Plan:
    key = (Ms[0].device, Ms[0].dtype, tuple((M.data_ptr(), tuple(M.shape), M.stride()) for M in Ms),
           tuple(widths), tuple(counts), tuple(partner))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[key] = _Plan(Ms, widths, counts, partner)
    return plan


def transition_step_all_forward(Ms: Sequence[Tensor], widths: Sequence[int], counts: Sequence[int],
                                partner: Sequence[int], tau: float, relative: bool = False) -> Tensor:
    """One projected-gradient step of eq. 5 on every column of every side, in place.

    Ms: sides ``[C_s, n_s]`` (any strides, one dtype and device); widths: the block widths of
    all sides in order, ``counts[s]`` of them per side; partner: the other side of the same
    layer or ``-1``; tau: the step; relative: step by ``τ ∂S/∂p`` (no partner factor). Returns Φ before the step, a 0-d tensor in float32
    (float64 for float64 inputs). Two launches, whatever the number of layers.
    """
    plan = _plan(Ms, widths, counts, partner)
    dtype = Ms[0].dtype
    acc = TL_DTYPES[plan.acc]
    phi = torch.empty((), dtype=plan.acc, device=Ms[0].device)
    if dtype == torch.float64:
        gram_dot, gram_precision, upd_precision = tl.float64, "ieee", "ieee"
    elif dtype == torch.float32:
        gram_dot, gram_precision = tl.float32, fp32_precision()
        upd_precision = gram_precision
    else:
        # Half inputs: products on the tensor cores; the float32 update may use TF32 since it
        # is rounded to the input's precision at the end.
        gram_dot = half_dot_dtype(dtype)
        gram_precision, upd_precision = "ieee", "tf32"
    if plan.n_gram:
        _transition_gram_kernel[(plan.n_gram,)](
            plan.gram_table, plan.gram_tiles, Ms[0], plan.workspace, plan.blk, plan.partials,
            GRAM_NP=_GRAM_NP, ACC_DTYPE=acc, DOT_DTYPE=gram_dot, PRECISION=gram_precision,
            BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_TK, num_warps=NUM_WARPS)
    if plan.n_upd:
        _transition_update_kernel[(plan.n_upd,)](
            plan.sides, plan.upd_tiles, Ms[0], plan.workspace, plan.partials, phi, plan.n_sides,
            struct.unpack("<q", struct.pack("<d", float(tau)))[0], IS_RELATIVE=bool(relative),
            SIDE_NP=_SIDE_NP, UPD_NP=_UPD_NP, ACC_DTYPE=acc, PRECISION=upd_precision, EPS=EPS,
            BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_UK, BLOCK_RED=BLOCK_RED,
            ROUND_BF16=INTERPRETED, num_warps=NUM_WARPS)
    else:
        phi.zero_()
    return phi
