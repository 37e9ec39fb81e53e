"""Triton GEMM for a 1×1 APS conv that builds its weight tile in the prologue.

``y[n, o, p] = Σ_i K[o, i] · x[n, i, p]`` with the candidate kernel ``K = Pᵀ W Q``
(``W`` ``[C_out, C_in]``, ``P`` ``[C_out, c_o]``, ``Q`` ``[C_in, c_i]``), ``p`` over the ``H·W``
pixels. Each program owns ``BLOCK_O`` output channels: its prologue builds their rows of
``K`` (``[BLOCK_O, c_i]``, P's mode product first, so none of that work is shared with — or
repeated for — another channel tile) and keeps them in registers; then it walks a strided
share of the pixel tiles of the whole batch with one ``[BLOCK_O, c_i] × [c_i, BLOCK_P]`` dot
per tile. ``K`` never goes through global memory. The build is repeated once per pixel share,
so the launcher gives each program many pixel tiles (just enough programs to fill the device).

The prologue keeps the whole ``c_i`` in registers, so it serves ``c_i ≤ MAX_BUILD_CI``; wider
inputs (and the identity P = Q = None) take the plain path: ``K`` from memory, K loop over
``c_i``. Accumulation in float32 (float64 for float64 inputs); ``x`` may be NCHW or
channels_last (any strides whose H and W merge), and ``y`` takes ``x``'s memory format.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .construct import INTERPRETED, acc_dtype, cast_out, construct_forward, dot_config

MAX_BUILD_CI = 256
BLOCK_O, BLOCK_P = 64, 64
BLOCK_A, BLOCK_B = 32, 32        # prologue K steps over C_out and C_in
BLOCK_PLAIN_CI = 32              # K step of the plain path

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


@triton.jit
def _mma(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _aps_conv1x1_fwd_kernel(X_ptr, W_ptr, P_ptr, Q_ptr, K_ptr, Y_ptr,
                            N, HW, C_out, C_in, c_o, c_i, n_groups,
                            X_stride_n, X_stride_c, X_stride_p,
                            W_stride_0, W_stride_1, P_stride_0, P_stride_1, Q_stride_0, Q_stride_1,
                            K_stride_0, K_stride_1, Y_stride_n, Y_stride_c, Y_stride_p,
                            HAS_P: tl.constexpr, HAS_Q: tl.constexpr, BUILD_K: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, BUILD_ACC_DTYPE: tl.constexpr,
                            BUILD_DOT_DTYPE: tl.constexpr,
                            BUILD_PRECISION: tl.constexpr, BUILD_Q_PRECISION: tl.constexpr,
                            MAIN_DOT_DTYPE: tl.constexpr,
                            MAIN_PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_CI: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                            ROUND_BF16: tl.constexpr):
    """Grid ``(cdiv(c_o, BLOCK_O), n_groups)``; program ``(i, g)`` computes output channels
    ``[i·BLOCK_O, (i+1)·BLOCK_O)`` for pixel tiles ``g, g + n_groups, …`` of the batch.

    x ``[N, c_i, HW]``, y ``[N, c_o, HW]`` (strides), W ``[C_out, C_in]``, P ``[C_out, c_o]``,
    Q ``[C_in, c_i]``; without ``BUILD_K``, ``K`` ``[c_o, c_i]`` is read from ``K_ptr``.
    """
    pid_o = tl.program_id(0)
    pid_g = tl.program_id(1)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = o < c_o
    o64 = o.to(tl.int64)
    ci = tl.arange(0, BLOCK_CI)

    if BUILD_K:
        mci = ci < c_i
        kt = tl.zeros((BLOCK_O, BLOCK_CI), dtype=BUILD_ACC_DTYPE)
        if HAS_Q:
            for b0 in range(0, C_in, BLOCK_B):
                b = b0 + tl.arange(0, BLOCK_B)
                mb = b < C_in
                if HAS_P:
                    # (Pᵀ W)[o, b-chunk]
                    t = tl.zeros((BLOCK_O, BLOCK_B), dtype=BUILD_ACC_DTYPE)
                    for a0 in range(0, C_out, BLOCK_A):
                        a = a0 + tl.arange(0, BLOCK_A)
                        ma = a < C_out
                        pt = tl.load(P_ptr + o64[:, None] * P_stride_1 + a[None, :] * P_stride_0,
                                     mask=mo[:, None] & ma[None, :], other=0.0)
                        wt = tl.load(W_ptr + a[:, None] * W_stride_0 + b[None, :] * W_stride_1,
                                     mask=ma[:, None] & mb[None, :], other=0.0)
                        t = _mma(pt, wt, t, BUILD_DOT_DTYPE, BUILD_PRECISION)
                else:
                    t = tl.load(W_ptr + o64[:, None] * W_stride_0 + b[None, :] * W_stride_1,
                                mask=mo[:, None] & mb[None, :], other=0.0).to(BUILD_ACC_DTYPE)
                qt = tl.load(Q_ptr + b[:, None] * Q_stride_0 + ci[None, :] * Q_stride_1,
                             mask=mb[:, None] & mci[None, :], other=0.0)
                # The float32 partial product meets Q in float32 (TF32 or better).
                kt = _mma(t, qt, kt, BUILD_ACC_DTYPE, BUILD_Q_PRECISION)
        else:
            for a0 in range(0, C_out, BLOCK_A):
                a = a0 + tl.arange(0, BLOCK_A)
                ma = a < C_out
                pt = tl.load(P_ptr + o64[:, None] * P_stride_1 + a[None, :] * P_stride_0,
                             mask=mo[:, None] & ma[None, :], other=0.0)
                wt = tl.load(W_ptr + a[:, None] * W_stride_0 + ci[None, :] * W_stride_1,
                             mask=ma[:, None] & mci[None, :], other=0.0)
                kt = _mma(pt, wt, kt, BUILD_DOT_DTYPE, BUILD_PRECISION)
        # Rounded once to the activations' precision, as the conv of a materialised K would.
        kt = cast_out(kt, X_ptr.dtype.element_ty, ROUND_BF16)

    tiles_per_image = tl.cdiv(HW, BLOCK_P)
    for t in range(pid_g, N * tiles_per_image, n_groups):
        n = (t // tiles_per_image).to(tl.int64)
        p = (t % tiles_per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = p < HW
        p64 = p.to(tl.int64)
        x_base = X_ptr + n * X_stride_n + p64[None, :] * X_stride_p
        acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=ACC_DTYPE)
        if BUILD_K:
            xt = tl.load(x_base + ci[:, None].to(tl.int64) * X_stride_c, mask=mci[:, None] & mp[None, :], other=0.0)
            acc = _mma(kt, xt, acc, MAIN_DOT_DTYPE, MAIN_PRECISION)
        else:
            for c0 in range(0, c_i, BLOCK_CI):
                c = c0 + ci
                mc = c < c_i
                kk = tl.load(K_ptr + o64[:, None] * K_stride_0 + c[None, :] * K_stride_1,
                             mask=mo[:, None] & mc[None, :], other=0.0)
                xt = tl.load(x_base + c[:, None].to(tl.int64) * X_stride_c, mask=mc[:, None] & mp[None, :], other=0.0)
                acc = _mma(kk, xt, acc, MAIN_DOT_DTYPE, MAIN_PRECISION)
        tl.store(Y_ptr + n * Y_stride_n + o64[:, None] * Y_stride_c + p64[None, :] * Y_stride_p,
                 cast_out(acc, Y_ptr.dtype.element_ty, ROUND_BF16), mask=mo[:, None] & mp[None, :])


def _pixel_stride(t: Tensor) -> Optional[int]:
    """The stride of the merged (H, W) index of a 4-D tensor, or None if H and W do not merge."""
    H, W = t.shape[2], t.shape[3]
    if H == 1:
        return t.stride(3)
    if W == 1:
        return t.stride(2)
    return t.stride(3) if t.stride(2) == W * t.stride(3) else None


def _n_groups(n_o_tiles: int, n_tiles: int, device: torch.device, build: bool) -> int:
    if not build:
        return max(n_tiles, 1)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(n_tiles, triton.cdiv(target, n_o_tiles)))


def aps_conv1x1_forward(x: Tensor, weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    """1×1 conv (stride 1, no padding, no bias) with the candidate kernel ``Pᵀ W Q``.

    x ``[N, c_i, H, W]`` (NCHW or channels_last), weight ``[C_out, C_in]`` or
    ``[C_out, C_in, 1, 1]``, P ``[C_out, c_o]`` or None, Q ``[C_in, c_i]`` or None
    → y ``[N, c_o, H, W]`` in ``x.dtype`` and ``x``'s memory format.
    """
    W2 = weight.reshape(weight.shape[0], weight.shape[1])
    C_out, C_in = W2.shape
    c_o = C_out if P is None else P.shape[1]
    c_i = C_in if Q is None else Q.shape[1]
    N, _, H, Wd = x.shape
    if _pixel_stride(x) is None:
        x = x.contiguous()
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    y = torch.empty((N, c_o, H, Wd), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    build = (P is not None or Q is not None) and c_i <= MAX_BUILD_CI
    if build:
        block_ci = max(16, triton.next_power_of_2(c_i))
        K = W2  # not read: the prologue builds K
    else:
        block_ci = BLOCK_PLAIN_CI
        K = W2 if P is None and Q is None else construct_forward(W2, P, Q)
    n_o_tiles = triton.cdiv(c_o, BLOCK_O)
    n_tiles = N * triton.cdiv(H * Wd, BLOCK_P)
    groups = _n_groups(n_o_tiles, n_tiles, x.device, build)
    build_dot, build_precision = dot_config(W2.dtype, W2.dtype)
    # The float32 partial product Pᵀ W meets Q in float32: TF32 for half transforms (no
    # coarser than a half K), torch's matmul precision for float32 ones.
    build_q_precision = "tf32" if W2.dtype in (torch.float16, torch.bfloat16) else build_precision
    main_dot, main_precision = dot_config(x.dtype, x.dtype)
    _aps_conv1x1_fwd_kernel[(n_o_tiles, groups)](
        x, W2, W2 if P is None else P, W2 if Q is None else Q, K, y,
        N, H * Wd, C_out, C_in, c_o, c_i, groups,
        x.stride(0), x.stride(1), _pixel_stride(x),
        W2.stride(0), W2.stride(1),
        *(P.stride() if P is not None else (0, 0)), *(Q.stride() if Q is not None else (0, 0)),
        K.stride(0), K.stride(1), y.stride(0), y.stride(1), _pixel_stride(y),
        HAS_P=P is not None, HAS_Q=Q is not None, BUILD_K=build,
        ACC_DTYPE=_TL[acc_dtype(x.dtype)], BUILD_ACC_DTYPE=_TL[acc_dtype(W2.dtype)], BUILD_DOT_DTYPE=build_dot,
        BUILD_PRECISION=build_precision, BUILD_Q_PRECISION=build_q_precision,
        MAIN_DOT_DTYPE=main_dot, MAIN_PRECISION=main_precision,
        BLOCK_O=BLOCK_O, BLOCK_P=BLOCK_P, BLOCK_CI=block_ci, BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B,
        ROUND_BF16=INTERPRETED, num_warps=8 if block_ci >= 128 else 4)
    return y
