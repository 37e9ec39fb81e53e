"""Case lists and input helpers shared by the op tests (one test file per op).

A *target* is a ``(device, backend)`` pair; tests take one through the ``target`` fixture
(``conftest.py``) by indirect parametrisation over the explicit lists below, so a GPU variant
is the same test with another case, marked ``gpu``.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from apsfast import reference
from conftest import assert_close

gpu = pytest.mark.gpu

# --- targets ------------------------------------------------------------------------------------
REFERENCE = pytest.param(("cpu", "reference"), id="cpu-reference")
CPU = pytest.param(("cpu", "cpu"), id="cpu-cpu")
# Triton on CPU tensors runs in the interpreter: slow per launch, so its cases stay few and small.
TRITON_INTERPRETED = pytest.param(("cpu", "triton"), id="cpu-triton")
CUDA = pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=gpu)
TRITON = pytest.param(("cuda", "triton"), id="cuda-triton", marks=gpu)

ALL = [REFERENCE, CPU, TRITON_INTERPRETED, CUDA, TRITON]
# Where thousands of calls are cheap (gradcheck, hypothesis, many steps): no interpreter.
NO_INTERPRETER = [REFERENCE, CPU, CUDA, TRITON]
# The two CPU backends of hypothesis tests (many examples each).
CPU_FAST = [REFERENCE, CPU]
TRITON_ONLY = [TRITON_INTERPRETED, TRITON]
# torch.compile traces with fake tensors, which have no data pointer for the interpreter.
COMPILE = NO_INTERPRETER

LOW_PRECISION = (torch.float16, torch.bfloat16)


# --- inputs -------------------------------------------------------------------------------------
def randn(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Seeded standard normal values, drawn in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def transform(rows: int, cols: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A transform as the layers keep it: unit columns (keeps long float32 sums in tolerance)."""
    return F.normalize(randn(rows, cols, seed=seed), dim=0).to(dtype)


def meta_weight(C_out: int, C_in: int, kernel: tuple = (), seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A meta-weight at the scale of a Kaiming init (outputs of order one)."""
    return (randn(C_out, C_in, *kernel, seed=seed) / math.sqrt(C_in * math.prod(kernel))).to(dtype)


def with_layout(weight: torch.Tensor, P: Optional[torch.Tensor], Q: Optional[torch.Tensor], layout: str):
    """The same values in another memory layout, read through strides:

    * ``contiguous``; ``transposed``: P and Q column-major;
    * ``strided``: every other column of wider P, Q and every other input channel of a wider
      weight (non-contiguous views); ``channels_last`` weight.
    """
    if layout == "transposed":
        P = None if P is None else P.t().contiguous().t()
        Q = None if Q is None else Q.t().contiguous().t()
    elif layout == "strided":
        def spread(t):  # every other column of a NaN-filled tensor twice as wide
            wide = torch.full((t.shape[0], 2 * t.shape[1], *t.shape[2:]), math.nan, dtype=t.dtype)
            wide[:, ::2] = t
            return wide[:, ::2]
        weight, P, Q = (None if t is None else spread(t) for t in (weight, P, Q))
    elif layout == "channels_last" and weight.dim() == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    return weight, P, Q


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def exact(*tensors):
    """float64 CPU copies (of already-rounded inputs, so input rounding is not counted as error)."""
    return [None if t is None else t.detach().cpu().double() for t in tensors]


def einsum_kernel(weight: torch.Tensor, P: Optional[torch.Tensor], Q: Optional[torch.Tensor]) -> torch.Tensor:
    """Paper eq. 2 verbatim, identities standing in for missing transforms."""
    P = torch.eye(weight.shape[0], dtype=weight.dtype) if P is None else P
    Q = torch.eye(weight.shape[1], dtype=weight.dtype) if Q is None else Q
    return torch.einsum("ao,bi,ab...->oi...", P, Q, weight)


def standard_strides(shape) -> tuple[int, ...]:
    return torch.empty(shape).stride()


def kernel_strides(shape, weight: torch.Tensor) -> tuple[int, ...]:
    """The strides every backend gives a candidate kernel of ``weight``: channels_last where
    the meta-weight has its channels innermost and a spatial extent, else standard."""
    if reference.channels_last_kernel(weight):
        return torch.empty(shape).contiguous(memory_format=torch.channels_last).stride()
    return standard_strides(shape)


# --- comparisons --------------------------------------------------------------------------------
def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    return (actual.detach().cpu().double() - expected.cpu().double()).abs().max().item()


def assert_matches(actual: torch.Tensor, expected64: torch.Tensor,
                   same_precision: Optional[torch.Tensor] = None) -> None:
    """``actual`` against the float64 reference: the dtype's tolerance, or for float16/bfloat16
    at most twice the error of the same computation done by PyTorch in that precision
    (``same_precision``)."""
    assert actual.shape == expected64.shape, (actual.shape, expected64.shape)
    if actual.dtype in LOW_PRECISION:
        ours, theirs = max_err(actual, expected64), max_err(same_precision, expected64)
        scale = expected64.abs().max().item() if expected64.numel() else 0.0
        assert ours <= 2 * theirs + 1e-6 * max(scale, 1.0), f"error {ours} vs PyTorch's own {theirs}"
    else:
        assert_close(actual, expected64, actual.dtype)


# --- sharing level: definitions written from the paper ------------------------------------------
def naive_phi(Ps, Qs) -> torch.Tensor:
    """Φ = Σ_{i≤ĩ} Σ_{o≤õ} ‖Q^{iᵀ} Q^{ĩ}‖²_F · ‖P^{oᵀ} P^{õ}‖²_F (eq. 4), as an explicit sum.

    A side given as ``None`` has one candidate (the identity) and its factor is 1.
    """
    def pair(Ms, a, b):
        if Ms is None:
            return 1.0
        return ((Ms[a].transpose(0, 1) @ Ms[b]) ** 2).sum()

    n_in = 1 if Qs is None else len(Qs)
    n_out = 1 if Ps is None else len(Ps)
    total = 0.0
    for i in range(n_in):
        for i_t in range(i, n_in):
            for o in range(n_out):
                for o_t in range(o, n_out):
                    total = total + pair(Qs, i, i_t) * pair(Ps, o, o_t)
    return torch.as_tensor(total, dtype=torch.float64)


def max_score(widths) -> int:
    """Largest S(M) over semi-orthogonal transforms: ‖M^{aᵀ}M^{ã}‖² ≤ min(c_a, c_ã) = c_a."""
    return sum(c * (len(widths) - a) for a, c in enumerate(widths))


def random_matrices(meta_width: int, widths, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(meta_width, c, generator=g, dtype=torch.float64).to(dtype) for c in widths]


def random_rotation(n: int, seed) -> torch.Tensor:
    """A Haar-random ``n × n`` rotation; ``seed`` is an int or a ``torch.Generator``."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def assert_semi_orthogonal(M: torch.Tensor, tol: float = 1e-12) -> None:
    eye = torch.eye(M.shape[1], dtype=torch.float64)
    torch.testing.assert_close(M.double().t() @ M.double(), eye, rtol=0, atol=tol)


def assert_unit_columns(M: torch.Tensor, tol: float = 1e-12) -> None:
    norms = M.detach().cpu().double().norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=tol)


class CountLaunches:
    """Stands in for a kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def nan_filled_empty():
    """``torch.empty`` whose floating tensors start as NaN: an element a kernel forgets to write
    (or a workspace entry read before it is written) shows up as NaN."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t
    return nan_empty
