"""Helpers shared by the Triton kernels of ``apsfast.kernels``: dtype maps, the accumulator
and ``tl.dot`` precision rules, and the jitted building blocks every kernel uses.

Kernels are decorated when their module is imported: they run in the interpreter (on CPU
tensors) only if ``TRITON_INTERPRET=1`` was set by then, which :data:`INTERPRETED` records.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32, torch.float64: tl.float64}
_FP32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator (and workspace) dtype for inputs of ``dtype``: float64 for float64,
    float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp32_precision() -> str:
    """tl.dot's ``input_precision`` for float32 operands, following
    ``torch.get_float32_matmul_precision()``: ``highest`` → IEEE fp32, ``high`` → 3×TF32,
    ``medium`` → TF32."""
    return _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def half_dot_dtype(dtype: torch.dtype):
    """The ``tl.dot`` operand type for float16/bfloat16 operands: their own (the tensor cores),
    except bfloat16 in the interpreter, which multiplies bfloat16 blocks as raw uint16 words
    and so gets float32."""
    return tl.float32 if INTERPRETED and dtype == torch.bfloat16 else TL_DTYPES[dtype]


@triton.jit
def mma(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with both operands in ``DOT_DTYPE`` (a no-op cast when they already are),
    accumulated in ``acc``'s dtype (a GPU compile needs it named for float64)."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def cast_out(x, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """``x.to(DTYPE)`` rounded to nearest even. GPUs round so in hardware; the interpreter
    truncates float32 → bfloat16, so with ``ROUND_BF16`` the rounding is done on the bits first."""
    if ROUND_BF16:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
