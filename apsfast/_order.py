"""The order rule of the construction's two mode products (paper eq. 2).

``W^{i,o} = Pᵀ ×₁ W ×₂ Q`` can apply P first (``[C_out, C_in] → [c_o, C_in] → [c_o, c_i]``)
or Q first (``→ [C_out, c_i] → [c_o, c_i]``); both give the same kernel at different cost.
Multiply-adds per kernel element:

* P first: ``c_o·C_out·C_in + c_o·C_in·c_i``;
* Q first: ``C_out·C_in·c_i + c_o·C_out·c_i``.

Every backend takes the cheaper order. On a tie (a square meta-weight with ``c_o = c_i``, and
every backward of one) the input-side product takes the smaller operand: P first where
``c_o ≤ C_out``. The CPU library contracts the input mode as a batch of small GEMMs (up to
8 columns), which runs far below the GEMM rate, or as one GEMM after a copy of its operand;
either way it should see ``[c_o, C_in]`` in a forward and the gradient ``[c_o, c_i]`` in a
backward, not the meta-sized tensors (a 208-wide ResNet-20 layer's backward, as a batch:
240 → 121 µs). This module imports nothing, so the
reference and the kernels both use it without importing each other; the C++ and CUDA
libraries use its twin, ``apsfast::p_first`` in ``csrc/common/order.h``.
"""
from __future__ import annotations


def _costs(C_out: int, c_o: int, C_in: int, c_i: int) -> tuple[int, int]:
    return c_o * C_out * C_in + c_o * C_in * c_i, C_out * C_in * c_i + c_o * C_out * c_i


def p_first(C_out: int, c_o: int, C_in: int, c_i: int) -> bool:
    """Whether the output-side product (P, ``[C_out, c_o]``) goes before the input-side one
    (Q, ``[C_in, c_i]``): the cheaper order; on a tie, P first where ``c_o ≤ C_out``."""
    p_cost, q_cost = _costs(C_out, c_o, C_in, c_i)
    return p_cost < q_cost or (p_cost == q_cost and c_o <= C_out)


def construct_macs(C_out: int, c_o: int, C_in: int, c_i: int) -> int:
    """Multiply-adds per kernel element of the construction in the order :func:`p_first`
    picks (multiply by ``kh·kw`` for a whole kernel)."""
    return min(_costs(C_out, c_o, C_in, c_i))
