"""The architecture controller: an autoregressive LSTM policy over a supernet's decisions,
trained by REINFORCE with a moving-average baseline and an entropy bonus, and the beam search
of its most likely architectures."""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast import _checks
from apsfast.search.config import BASELINES
from apsfast.search import steps


class Rollout(NamedTuple):
    """Architectures ``[B, D]`` with their log-probabilities and entropies ``[B]``, and the
    per-decision candidate probabilities along them (``D`` tensors ``[B, n_k]``).

    ``packed``: the tensors the likelihoods read the controller's parameters through, each with
    the parameters it holds (a concatenation of some, or one parameter itself): what
    :class:`Reinforce` differentiates, one gradient per tensor instead of an autograd node and
    an accumulation per parameter."""

    archs: Tensor
    log_prob: Tensor
    entropy: Tensor
    probs: Sequence[Tensor]
    packed: tuple[tuple[Tensor, tuple[nn.Parameter, ...]], ...] = ()


class _Probabilities(Sequence[Tensor]):
    """Each decision's candidate probabilities ``[B, n_k]``, cut from the padded ``[D, B, max n]``
    when read (a rollout that trains the policy never reads them)."""

    def __init__(self, padded: Tensor, counts: tuple[int, ...]) -> None:
        self.padded, self.counts = padded, counts

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, k):  # type: ignore[override]
        return self.padded[k, :, :self.counts[k]]


def _choice_counts(decisions: Sequence[Any]) -> tuple[int, ...]:
    """Candidate counts from ``supernet.decisions()``, from ``(name, widths)`` pairs or from
    plain counts."""
    if isinstance(decisions, (str, bytes)) or not isinstance(decisions, Sequence) or not decisions:
        raise TypeError(f"decisions must be a non-empty sequence of decisions (or candidate counts), "
                        f"got {decisions!r}")

    def count(d: Any) -> Any:
        if hasattr(d, "widths"):
            return len(d.widths)
        if isinstance(d, Sequence) and len(d) == 2 and isinstance(d[1], Sequence):  # (name, widths)
            return len(d[1])
        return d
    return tuple(_checks.positive_int(f"decisions[{k}] candidates", count(d)) for k, d in enumerate(decisions))


Budget = Callable[[Tensor], Tensor]


class Controller(nn.Module):
    """LSTM policy: at decision ``k`` it reads the embedding of decision ``k-1``'s choice (a
    learned start vector at ``k = 0``) and emits a softmax over decision ``k``'s candidates.

    Args:
        decisions: ``supernet.decisions()`` (``(name, widths)`` pairs), or the number of
            candidates of each decision.
        hidden_size: width of the embeddings and of the LSTM.
        layers: stacked LSTM cells (the authors' controller has 2).
        layer_input: also feed a learned embedding of the decision's index (the authors').
        budget: also feed the share of the MACs budget a partial arch leaves (the authors'
            remaining-FLOPs input): ``budget(prefix [B, k]) -> [B]``, e.g. ``1 − F(prefix,
            narrowest after it) / target``.
    """

    def __init__(self, decisions: Sequence[Any], hidden_size: int = 64, *, layers: int = 1,
                 layer_input: bool = False, budget: Optional[Budget] = None) -> None:
        super().__init__()
        self.num_choices = _choice_counts(decisions)
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self.start = nn.Parameter(torch.zeros(1, hidden_size))
        self.embeddings = nn.ModuleList(nn.Embedding(n, hidden_size) for n in self.num_choices)
        self.lstm = nn.LSTMCell(hidden_size, hidden_size)
        self.heads = nn.ModuleList(nn.Linear(hidden_size, n) for n in self.num_choices)
        # Options after the default modules: the default controller's initialisation is unchanged.
        self.upper = nn.ModuleList(nn.LSTMCell(hidden_size, hidden_size)
                                   for _ in range(_checks.positive_int("layers", layers) - 1))
        self.positions = nn.Embedding(len(self.num_choices), hidden_size) if layer_input else None
        self.budget = budget
        self.budget_in = nn.Linear(1, hidden_size) if budget is not None else None
        self._layout_cache: Optional[tuple[torch.device, tuple[Tensor, Tensor, Tensor]]] = None
        self._host_cache: Optional[tuple[tuple, dict[str, Any]]] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small uniform weights: every candidate starts about equally likely.
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def _input(self, x: Tensor, k: int, chosen: list[Tensor]) -> Tensor:
        """Decision ``k``'s input: the last choice's embedding, plus the optional features."""
        if self.positions is not None:
            x = x + self.positions.weight[k]
        if self.budget_in is not None:
            prefix = torch.stack(chosen, 1) if chosen else x.new_zeros(x.shape[0], 0, dtype=torch.long)
            x = x + self.budget_in(self.budget(prefix).to(x)[:, None])
        return x

    def _cells(self) -> list[nn.LSTMCell]:
        """The stacked LSTM's cells, bottom first."""
        return [self.lstm, *self.upper]

    def _cell(self, x: Tensor, state: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """One step of the stacked LSTM; returns the top layer's output and the new states."""
        new = []
        for cell, (h, c) in zip(self._cells(), state):
            h, c = cell(x, (h, c))
            new.append((h, c))
            x = h
        return x, new

    def _zero_state(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        zero = self.start.new_zeros(batch, self.hidden_size)
        return [(zero, zero)] * (1 + len(self.upper))

    def _layout(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Where each decision's candidates sit: the row of decision ``k``'s first embedding in
        the table of :meth:`_teacher_inputs` ``[D − 1]`` (for ``k < D − 1``), a gather index
        ``[D, 1, max n]`` onto all heads' outputs (repeating the last candidate past ``n_k``),
        and the mask of the padding past ``n_k`` ``[D, 1, max n]``; made once per device."""
        if self._layout_cache is None or self._layout_cache[0] != device:
            counts = torch.tensor(self.num_choices, device=device)
            offsets = counts.cumsum(0) - counts
            column = torch.arange(max(self.num_choices), device=device)
            index = offsets[:, None] + torch.minimum(column[None], counts[:, None] - 1)
            self._layout_cache = (device, (offsets[:-1] + 1, index[:, None], column[None, None] >= counts[:, None, None]))
        return self._layout_cache[1]

    def _teacher_inputs(self, archs: Tensor) -> tuple[Tensor, Tensor]:
        """Every decision's input ``[D, B, H]`` for known ``archs`` ``[B, D]``: the start vector,
        then the embedding of each previous choice (one lookup in a table of the start vector
        and every embedding, returned too), plus the optional features — what
        :meth:`sample_archs` feeds its LSTM one decision at a time."""
        count = archs.shape[1]
        table = torch.cat([self.start, *(e.weight for e in self.embeddings[:-1])])
        # The start vector is the table's row 0, decision k's choices follow at 1 + offset[k].
        rows = F.pad(archs[:, :-1] + self._layout(archs.device)[0], (1, 0)).t()
        x = F.embedding(rows, table)
        if self.positions is not None:
            x = x + self.positions.weight[:, None]
        if self.budget_in is not None:
            left = torch.stack([self.budget(archs[:, :k]).to(x) for k in range(count)])
            x = x + self.budget_in(left[..., None])
        return x, table

    def _score(self, archs: Tensor) -> Rollout:
        """Log-probabilities, entropies and probabilities of known ``archs`` ``[B, D]``: the
        whole decision sequence in one LSTM call and one product with every head, instead of a
        Python step per decision (a controller step's host cost)."""
        batch = archs.shape[0]
        layers = 1 + len(self.upper)
        zero = self.start.new_zeros(layers, batch, self.hidden_size)
        weights = [w for cell in self._cells() for w in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
        x, table = self._teacher_inputs(archs)
        out, _, _ = torch.lstm(x, (zero, zero), weights, True, layers, 0.0, self.training, False, False)
        head_weight, head_bias = torch.cat([h.weight for h in self.heads]), torch.cat([h.bias for h in self.heads])
        logits = F.linear(out, head_weight, head_bias)
        _, index, padding = self._layout(archs.device)
        # Each decision's logits side by side [D, B, max n], the padding at −∞: one softmax
        # for all decisions, with zero probability (and a zero gradient) past n_k.
        padded = logits.gather(2, index.expand(-1, batch, -1)).masked_fill(padding, -math.inf)
        logp = F.log_softmax(padded, dim=-1)
        p = logp.exp()
        log_prob = logp.gather(2, archs.t()[..., None]).squeeze(2).sum(0)
        entropy = -(p * logp.masked_fill(padding, 0.0)).sum(-1).sum(0)
        packed = ((table, (self.start, *(e.weight for e in self.embeddings[:-1]))),
                  (head_weight, tuple(h.weight for h in self.heads)), (head_bias, tuple(h.bias for h in self.heads)),
                  *((w, (w,)) for w in weights),
                  *((w, (w,)) for m in (self.positions, self.budget_in) if m is not None for w in m.parameters()))
        return Rollout(archs, log_prob, entropy, _Probabilities(p, self.num_choices), packed)

    def _host_weights(self) -> dict[str, Any]:
        """The parameters as NumPy arrays sharing their memory (copies, for a controller off
        the CPU), made once: the optimizer and ``load_state_dict`` write the parameters in
        place, and a conversion (``.double()``, ``.to()``) gives them new memory, which the
        key sees."""
        params = list(self.parameters())
        key = tuple((p.device, p.data_ptr()) for p in params)
        if self._host_cache is None or self._host_cache[0] != key or self.start.device.type != "cpu":
            def host(p: Tensor) -> np.ndarray:
                return p.detach().cpu().numpy()
            self._host_cache = (key, {
                "start": host(self.start), "embeddings": [host(e.weight) for e in self.embeddings],
                "cells": [(host(c.weight_ih), host(c.weight_hh), host(c.bias_ih), host(c.bias_hh))
                          for c in self._cells()],
                "heads": [(host(h.weight), host(h.bias)) for h in self.heads],
                "positions": None if self.positions is None else host(self.positions.weight),
                "budget_in": None if self.budget_in is None else (host(self.budget_in.weight)[:, 0],
                                                                  host(self.budget_in.bias))})
        return self._host_cache[1]

    @torch.no_grad()
    def sample_archs(self, batch: int = 1, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw ``batch`` architectures ``[batch, D]`` (no likelihoods, no graph): per decision
        one LSTM step and the Gumbel-max choice ``argmax(logits + G)``, which is a draw from the
        softmax; the noise of all decisions is drawn at once, from ``generator``.

        The policy runs in NumPy on the host, on the parameters' memory: a step of a
        64-wide LSTM is a few microseconds of arithmetic, and as torch ops each decision cost
        about 20 dispatched ops (400 a sample of 19 decisions, 2 ms on a CPU core). Its
        products round differently from torch's, so a near tie of two candidates' noisy logits
        may go the other way (none did in 38,400 draws compared)."""
        batch = _checks.positive_int("batch", batch)
        noise = torch.empty(batch, len(self.num_choices), max(self.num_choices))
        gumbel = -noise.exponential_(generator=generator).log_().numpy()
        w = self._host_weights()
        dtype = w["start"].dtype
        state = [(np.zeros((batch, self.hidden_size), dtype), np.zeros((batch, self.hidden_size), dtype))
                 for _ in w["cells"]]
        biases = [b_ih + b_hh for _, _, b_ih, b_hh in w["cells"]]
        x = np.broadcast_to(w["start"], (batch, self.hidden_size))
        chosen = np.zeros((batch, len(self.num_choices)), np.int64)
        hidden = self.hidden_size
        for k, ((head_w, head_b), n) in enumerate(zip(w["heads"], self.num_choices)):
            if w["positions"] is not None:
                x = x + w["positions"][k]
            if w["budget_in"] is not None:
                left = self.budget(torch.from_numpy(chosen[:, :k])).to(self.start.dtype).cpu().numpy()
                x = x + (left[:, None] * w["budget_in"][0] + w["budget_in"][1])
            for layer, ((w_ih, w_hh, _, _), bias) in enumerate(zip(w["cells"], biases)):
                h, c = state[layer]
                gates = x @ w_ih.T + h @ w_hh.T + bias  # input, forget, cell, output (torch's order)
                act = 1 / (1 + np.exp(-gates))
                c = act[:, hidden:2 * hidden] * c + act[:, :hidden] * np.tanh(gates[:, 2 * hidden:3 * hidden])
                x = act[:, 3 * hidden:] * np.tanh(c)
                state[layer] = (x, c)
            chosen[:, k] = (x @ head_w.T + head_b + gumbel[:, k, :n]).argmax(-1)
            x = w["embeddings"][k][chosen[:, k]]
        return torch.from_numpy(chosen).to(self.start.device)

    def sample(self, batch: int = 1, generator: Optional[torch.Generator] = None) -> Rollout:
        """Draw ``batch`` architectures; their log-probabilities carry gradients."""
        return self.rollout(self.sample_archs(batch, generator))

    def rollout(self, archs: Tensor) -> Rollout:
        """The likelihoods of ``archs`` ``[B, D]`` that :meth:`sample_archs` drew (unchecked:
        :meth:`evaluate` checks given architectures)."""
        return self._score(archs)

    def evaluate(self, archs: Sequence[Sequence[int]] | Tensor) -> Rollout:
        """Log-probabilities, entropies and per-decision probabilities of given architectures."""
        archs = torch.as_tensor(archs, dtype=torch.long, device=self.start.device)
        if archs.dim() == 1:
            archs = archs[None]
        if archs.dim() != 2 or archs.shape[1] != len(self.num_choices):
            raise ValueError(f"archs must be [B, {len(self.num_choices)}] candidate indices, got shape "
                             f"{tuple(archs.shape)}")
        bad = ((archs < 0) | (archs >= torch.tensor(self.num_choices, device=archs.device))).nonzero()
        if len(bad):
            b, k = bad[0].tolist()
            raise ValueError(f"archs[{b}, {k}] = {int(archs[b, k])} is out of range: decision {k} has "
                             f"{self.num_choices[k]} candidates")
        return self._score(archs)

    @torch.no_grad()
    def beam_search(self, beam_size: int) -> list[tuple[list[int], float]]:
        """The ``beam_size`` most likely architectures by sequence log-likelihood, best first
        (exact when ``beam_size`` covers every prefix, a beam approximation otherwise)."""
        beam_size = _checks.positive_int("beam_size", beam_size)
        state = self._zero_state(1)
        x = self.start
        scores = self.start.new_zeros(1)
        archs = torch.zeros(1, 0, dtype=torch.long, device=self.start.device)
        for k, head in enumerate(self.heads):
            h, state = self._cell(self._input(x, k, list(archs.unbind(1))), state)
            total = (scores[:, None] + F.log_softmax(head(h), dim=-1)).flatten()
            scores, index = total.topk(min(beam_size, total.numel()))
            parent, choice = index // self.num_choices[k], index % self.num_choices[k]
            archs = torch.cat([archs[parent], choice[:, None]], 1)
            state = [(h_[parent], c_[parent]) for h_, c_ in state]
            x = self.embeddings[k](choice)
        return [(a.tolist(), float(s)) for a, s in zip(archs, scores)]


class Reinforce:
    """REINFORCE for a :class:`Controller`: ``loss = −(R − b)·log π(a) − w·H(π)``.

    ``baseline``: ``moving_average`` (the paper's), ``b ← d·b + (1 − d)·R̄`` (the first reward
    starts it); or ``leave_one_out``, each of the B archs of a step measured against the mean
    reward of the other B − 1 (Kool et al., 2019). All archs of a step are scored on the same
    validation batch, so leave-one-out cancels how hard that batch is, which a moving average
    cannot: on a short search with small batches that difficulty swamps the differences
    between archs. It needs B ≥ 2; the moving average is still kept for the logs.

    Defaults are the authors' CIFAR settings: Adam lr 1.6e-4, betas (0.5, 0.999), baseline
    decay 0.99, entropy weight 4e-3.
    """

    def __init__(self, controller: Controller, lr: float = 1.6e-4, betas: tuple[float, float] = (0.5, 0.999),
                 baseline_decay: float = 0.99, entropy_weight: float = 4e-3, weight_decay: float = 0.0,
                 baseline: str = "moving_average") -> None:
        self.controller = controller
        self.optimizer = steps.adam(controller.parameters(), lr=_checks.finite_float("lr", lr, positive=True),
                                    betas=betas,
                                    weight_decay=_checks.finite_float("weight_decay", weight_decay, positive=False))
        self.baseline_decay = _checks.finite_float("baseline_decay", baseline_decay, positive=False)
        if self.baseline_decay >= 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay!r}")
        self.entropy_weight = _checks.finite_float("entropy_weight", entropy_weight, positive=False)
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        self.leave_one_out = baseline == "leave_one_out"
        self.baseline: Optional[float] = None

    def step(self, rollout: Rollout, rewards: Tensor | Sequence[float] | float) -> dict[str, float]:
        """One policy-gradient step on the sampled ``rollout`` with its ``rewards`` ``[B]``."""
        # Checked on the host, where a searcher's rewards are (a tensor's are read back once).
        values = rewards.tolist() if isinstance(rewards, Tensor) else rewards
        values = [float(v) for v in values] if isinstance(values, Sequence) else [float(values)]
        if not all(map(math.isfinite, values)):
            raise ValueError(f"rewards must be finite, got {values}")
        count = len(rollout.log_prob)
        rewards = torch.tensor(values * count if len(values) == 1 else values, dtype=rollout.log_prob.dtype,
                               device=rollout.log_prob.device)
        mean = float(rewards.mean())
        self.baseline = mean if self.baseline is None else \
            self.baseline_decay * self.baseline + (1 - self.baseline_decay) * mean
        if self.leave_one_out:
            if count < 2:
                raise ValueError("the leave_one_out baseline needs at least 2 archs per step, got 1")
            advantage = rewards - (rewards.sum() - rewards) / (count - 1)
        else:
            advantage = rewards - self.baseline
        entropy = rollout.entropy.mean()
        loss = -(advantage * rollout.log_prob).mean() - self.entropy_weight * entropy
        self.optimizer.zero_grad()
        self._backward(loss, rollout)
        self.optimizer.step()
        return {"loss": loss.item(), "reward": mean, "baseline": self.baseline, "entropy": entropy.item()}

    @staticmethod
    def _backward(loss: Tensor, rollout: Rollout) -> None:
        """``loss.backward()`` into the parameters' ``.grad`` (all ``None`` before): the gradient
        of each tensor of ``rollout.packed``, split into its parameters' (views of it). The
        same values as autograd's accumulation, without the per-parameter slice and
        accumulation it dispatches (120 ops of a 19-decision controller's update)."""
        if not rollout.packed:
            loss.backward()
            return
        grads = torch.autograd.grad(loss, [tensor for tensor, _ in rollout.packed], allow_unused=True)
        for grad, (_, params) in zip(grads, rollout.packed):
            if grad is not None:
                for param, part in zip(params, grad.split([p.shape[0] for p in params]) if len(params) > 1 else (grad,)):
                    param.grad = part

    def state_dict(self) -> dict[str, Any]:
        """Controller, optimizer and baseline: everything a resume needs."""
        return {"controller": self.controller.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]


def flops_reward(accuracy: float, flops: float, target: Optional[float], alpha: float = 0.0,
                 beta: float = -0.1) -> float:
    """The FLOPs-penalised reward (MnasNet's soft constraint): ``acc·(F/T)^α`` at or below
    the target ``T``, ``acc·(F/T)^β`` above it; ``target=None`` is unconstrained (``acc``).
    The authors' defaults α = 0, β = −0.1 leave archs under the target unpenalised."""
    if target is None:
        return float(accuracy)
    target = _checks.finite_float("target", target, positive=True)
    flops = _checks.finite_float("flops", flops, positive=True)
    return float(accuracy) * math.pow(flops / target, alpha if flops <= target else beta)
