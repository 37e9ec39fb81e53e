"""The order rule of the construction's two mode products (paper eq. 2).

``W^{i,o} = Pᵀ ×₁ W ×₂ Q`` can apply P first (``[C_out, C_in] → [c_o, C_in] → [c_o, c_i]``)
or Q first (``→ [C_out, c_i] → [c_o, c_i]``); both give the same kernel at different cost.
Multiply-adds per kernel element:

* P first: ``c_o·C_out·C_in + c_o·C_in·c_i``;
* Q first: ``C_out·C_in·c_i + c_o·C_out·c_i``.

Every backend takes the cheaper order (ties: P first). This module imports nothing, so the
reference and the kernels both use it without importing each other; the C++ and CUDA
libraries use its twin, ``apsfast::p_first`` in ``csrc/common/order.h``.
"""
from __future__ import annotations


def _costs(C_out: int, c_o: int, C_in: int, c_i: int) -> tuple[int, int]:
    return c_o * C_out * C_in + c_o * C_in * c_i, C_out * C_in * c_i + c_o * C_out * c_i


def p_first(C_out: int, c_o: int, C_in: int, c_i: int) -> bool:
    """Whether the output-side product (P, ``[C_out, c_o]``) goes before the input-side one
    (Q, ``[C_in, c_i]``): the cheaper order, P first on a tie."""
    p_cost, q_cost = _costs(C_out, c_o, C_in, c_i)
    return p_cost <= q_cost


def construct_macs(C_out: int, c_o: int, C_in: int, c_i: int) -> int:
    """Multiply-adds per kernel element of the construction in the order :func:`p_first`
    picks (multiply by ``kh·kw`` for a whole kernel)."""
    return min(_costs(C_out, c_o, C_in, c_i))
