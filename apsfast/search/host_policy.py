"""The controller's LSTM policy in NumPy on the host, on its parameters' memory.

A controller step's policy work — drawing archs, and REINFORCE's gradient of their
log-likelihoods and entropies — is a few microseconds of arithmetic per decision for a 64-wide
LSTM. As torch ops it cost about 20 dispatched ops a decision to sample and 100 a step to
differentiate, each an op's worth of host work (and on a GPU a launch). Here it is NumPy:
:func:`unroll` runs the policy over the decisions, choosing each (a draw) or reading it (known
archs, recording what the backward needs), and :func:`backward` takes the vector-Jacobian
product that autograd would take through :meth:`Controller.evaluate
<apsfast.search.controller.Controller.evaluate>`: softmax, heads, the LSTM cells through time
and the embeddings, written out (tested against autograd's in float64).

The cell is torch's ``LSTMCell``: gates ``x W_ihᵀ + h W_hhᵀ + b_ih + b_hh`` in the order input,
forget, cell, output; ``c' = σ(f)·c + σ(i)·tanh(g)``, ``h' = σ(o)·tanh(c')``.
"""
from __future__ import annotations

import functools
from typing import Callable, ContextManager, NamedTuple, Optional

import numpy as np
from threadpoolctl import ThreadpoolController

Choose = Callable[[int, np.ndarray], np.ndarray]
BudgetLeft = Callable[[np.ndarray], np.ndarray]


@functools.lru_cache(maxsize=None)
def _blas() -> ThreadpoolController:
    return ThreadpoolController().select(user_api="blas")


def one_blas_thread() -> ContextManager:
    """NumPy's BLAS held to one thread for the block. The policy's products are small, but some
    pass OpenBLAS's threading threshold (the backward's products over every decision), and its
    idle threads then spin for a while after each call, taking the cores from torch's threads:
    a search on two threads ran 40% slower."""
    return _blas().limit(limits=1)


class Weights(NamedTuple):
    """The policy's parameters as arrays: ``start [1, H]``; per decision its embedding ``[n_k, H]``
    and head ``(weight [n_k, H], bias [n_k])``; per stacked cell ``(w_ih, w_hh [4H, H], b_ih,
    b_hh [4H])``; the optional decision-index embedding ``[D, H]`` and the budget input's
    ``(weight [H], bias [H])``."""

    start: np.ndarray
    embeddings: list[np.ndarray]
    cells: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    heads: list[tuple[np.ndarray, np.ndarray]]
    positions: Optional[np.ndarray]
    budget_in: Optional[tuple[np.ndarray, np.ndarray]]


class Trace(NamedTuple):
    """What :func:`backward` reads of a recorded :func:`unroll`: per decision the budget share fed
    (or ``None``), per decision and cell ``(x, h, c, σ(gates), tanh(g), tanh(c'), ∂act/∂gates)``
    (the gates' activations' derivatives: ``σ'`` for i, f, o, ``tanh'`` for g), the top
    cell's output (the heads' input) and the log-probabilities ``[B, n_k]``."""

    left: list[Optional[np.ndarray]]
    cells: list[list[tuple[np.ndarray, ...]]]
    outputs: list[np.ndarray]
    log_probs: list[np.ndarray]


def unroll(w: Weights, batch: int, choose: Choose, budget: Optional[BudgetLeft] = None,
           record: bool = False) -> tuple[np.ndarray, Optional[Trace]]:
    """The choices ``[batch, D]`` of the policy run decision by decision, ``choose(k, logits
    [batch, n_k])`` giving decision ``k``'s (each fed back as the next input), and with
    ``record`` the :class:`Trace` of the run. ``budget(prefix [batch, k]) -> [batch]``: the
    share of the budget a prefix leaves, fed when the policy has a budget input."""
    dtype, hidden = w.start.dtype, w.start.shape[1]
    state = [(np.zeros((batch, hidden), dtype), np.zeros((batch, hidden), dtype)) for _ in w.cells]
    biases = [b_ih + b_hh for _, _, b_ih, b_hh in w.cells]
    x = np.broadcast_to(w.start, (batch, hidden))
    chosen = np.zeros((batch, len(w.heads)), np.int64)
    trace = Trace([], [], [], []) if record else None
    for k, (head_w, head_b) in enumerate(w.heads):
        if w.positions is not None:
            x = x + w.positions[k]
        left = None
        if w.budget_in is not None:
            left = budget(chosen[:, :k]).astype(dtype)
            x = x + (left[:, None] * w.budget_in[0] + w.budget_in[1])
        steps = []
        for layer, ((w_ih, w_hh, _, _), bias) in enumerate(zip(w.cells, biases)):
            h, c = state[layer]
            gates = x @ w_ih.T + h @ w_hh.T + bias
            act = 1 / (1 + np.exp(-gates))  # σ of every gate; the cell gate's is not read
            g = np.tanh(gates[:, 2 * hidden:3 * hidden])
            c_new = act[:, hidden:2 * hidden] * c + act[:, :hidden] * g
            tanh_c = np.tanh(c_new)
            if record:
                slope = act * (1 - act)
                slope[:, 2 * hidden:3 * hidden] = 1 - g * g
                steps.append((x, h, c, act, g, tanh_c, slope))
            x = act[:, 3 * hidden:] * tanh_c
            state[layer] = (x, c_new)
        logits = x @ head_w.T + head_b
        chosen[:, k] = choose(k, logits)
        if trace is not None:
            top = logits.max(-1, keepdims=True)
            trace.left.append(left)
            trace.cells.append(steps)
            trace.outputs.append(x)
            trace.log_probs.append(logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True))))
        x = w.embeddings[k][chosen[:, k]]
    return chosen, trace


def flatten(w: Weights) -> list:
    """The entries of ``w`` (weights, or gradients) in one list, in a fixed order."""
    return [w.start, *w.embeddings, *(x for cell in w.cells for x in cell), *(x for head in w.heads for x in head),
            *(() if w.positions is None else (w.positions,)), *(() if w.budget_in is None else w.budget_in)]


def backward(w: Weights, trace: Trace, archs: np.ndarray, grad_log_prob: np.ndarray,
             grad_entropy: np.ndarray) -> tuple[Weights, np.ndarray, np.ndarray]:
    """The gradient of ``Σ_b grad_log_prob[b]·log π(archs[b]) + grad_entropy[b]·H(π; archs[b])``
    (``H``: the sum of the decisions' entropies along the arch) with respect to every weight, as a
    :class:`Weights` of gradients (``b_ih``'s and ``b_hh``'s are equal; the last decision's
    embedding, never read, gets ``None``); and the log-likelihoods and entropies ``[B]``."""
    dtype, hidden = w.start.dtype, w.start.shape[1]
    batch, count = archs.shape
    rows = np.arange(batch)
    grad_log_prob, grad_entropy = grad_log_prob.astype(dtype)[:, None], grad_entropy.astype(dtype)[:, None]
    heads, inputs = [], []
    log_prob, entropy_sum = np.zeros(batch, dtype), np.zeros(batch, dtype)
    dh_next = [np.zeros((batch, hidden), dtype) for _ in w.cells]
    dc_next = [np.zeros((batch, hidden), dtype) for _ in w.cells]
    gate_grads: list[list[np.ndarray]] = [[] for _ in w.cells]
    for k in reversed(range(count)):
        logp = trace.log_probs[k]
        p = np.exp(logp)
        # ∂ log p_a / ∂z = onehot(a) − p;  ∂H / ∂z = −p·(log p + H).
        entropy = -(p * logp).sum(-1, keepdims=True)
        log_prob += logp[rows, archs[:, k]]
        entropy_sum += entropy[:, 0]
        dz = -p * grad_log_prob - grad_entropy * p * (logp + entropy)
        dz[rows, archs[:, k]] += grad_log_prob[:, 0]
        heads.append((dz.T @ trace.outputs[k], dz.sum(0)))
        dx = dz @ w.heads[k][0]
        for layer in reversed(range(len(w.cells))):
            x, h, c, act, g, tanh_c, slope = trace.cells[k][layer]
            i, f, o = act[:, :hidden], act[:, hidden:2 * hidden], act[:, 3 * hidden:]
            dh = dx + dh_next[layer]
            dc = dc_next[layer] + dh * o * (1 - tanh_c * tanh_c)
            dc_next[layer] = dc * f
            # ∂c'/∂(i, f, g) = (g, c, i) and ∂h'/∂o = tanh(c'), through each gate's activation.
            dgates = np.concatenate([dc * g, dc * c, dc * i, dh * tanh_c], 1) * slope
            gate_grads[layer].append(dgates)
            dh_next[layer] = dgates @ w.cells[layer][1]
            dx = dgates @ w.cells[layer][0]
        inputs.append(dx)
    heads.reverse()
    inputs.reverse()
    cells = []
    for layer in range(len(w.cells)):
        # One product over all decisions per weight, in decision order.
        dgates = np.concatenate(gate_grads[layer][::-1])
        xs = np.concatenate([trace.cells[k][layer][0] for k in range(count)])
        hs = np.concatenate([trace.cells[k][layer][1] for k in range(count)])
        bias = dgates.sum(0)
        cells.append((dgates.T @ xs, dgates.T @ hs, bias, bias.copy()))
    embeddings: list[Optional[np.ndarray]] = []
    for k in range(count - 1):
        grad = np.zeros_like(w.embeddings[k])
        np.add.at(grad, archs[:, k], inputs[k + 1])
        embeddings.append(grad)
    embeddings.append(None)
    positions = None if w.positions is None else np.stack([dx.sum(0) for dx in inputs])
    budget_in = None
    if w.budget_in is not None:
        budget_in = (sum((dx * left[:, None]).sum(0) for dx, left in zip(inputs, trace.left)),
                     sum(dx.sum(0) for dx in inputs))
    grads = Weights(inputs[0].sum(0, keepdims=True), embeddings, cells, heads, positions, budget_in)
    return grads, log_prob, entropy_sum
