"""The architecture controller: an autoregressive LSTM policy over a supernet's decisions (trained
by :class:`~apsfast.search.policy_gradient.Reinforce`), and the beam search of its most likely
architectures."""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast import _checks
from apsfast.search import host_policy


class Rollout(NamedTuple):
    """Architectures ``[B, D]`` with their log-probabilities and entropies ``[B]``, and the
    per-decision candidate probabilities along them (``D`` tensors ``[B, n_k]``)."""

    archs: Tensor
    log_prob: Tensor
    entropy: Tensor
    probs: Sequence[Tensor]


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
        self._host_cache: Optional[tuple[tuple, list[nn.Parameter], host_policy.Weights]] = None
        self._grads_cache: Optional[tuple[tuple, list[tuple[Tensor, np.ndarray]]]] = None
        self._kept: Optional[tuple[np.ndarray, tuple[int, ...], host_policy.Trace]] = None
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
        return Rollout(archs, log_prob, entropy, _Probabilities(p, self.num_choices))

    def _host_weights(self) -> tuple[list[nn.Parameter], host_policy.Weights]:
        """The parameters in :func:`host_policy.flatten`'s order, and as NumPy arrays sharing their
        memory (copies, for a controller off the CPU), made once: the optimizer and
        ``load_state_dict`` write the parameters in place, and a conversion (``.double()``,
        ``.to()``) gives them new memory, which the key sees."""
        key = tuple((p.device, p.data_ptr()) for p in self.parameters())
        if self._host_cache is None or self._host_cache[0] != key or self.start.device.type != "cpu":
            def host(p: Tensor) -> np.ndarray:
                return p.detach().cpu().numpy()
            weights = host_policy.Weights(
                host(self.start), [host(e.weight) for e in self.embeddings],
                [(host(c.weight_ih), host(c.weight_hh), host(c.bias_ih), host(c.bias_hh)) for c in self._cells()],
                [(host(h.weight), host(h.bias)) for h in self.heads],
                None if self.positions is None else host(self.positions.weight),
                None if self.budget_in is None else (host(self.budget_in.weight)[:, 0], host(self.budget_in.bias)))
            params = host_policy.flatten(host_policy.Weights(
                self.start, [e.weight for e in self.embeddings],
                [(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh) for c in self._cells()],
                [(h.weight, h.bias) for h in self.heads], None if self.positions is None else self.positions.weight,
                None if self.budget_in is None else (self.budget_in.weight, self.budget_in.bias)))
            self._host_cache = (key, params, weights)
        return self._host_cache[1], self._host_cache[2]

    def _host_budget(self) -> Optional[host_policy.BudgetLeft]:
        """:attr:`budget` on the host's arrays."""
        if self.budget is None:
            return None
        budget = self.budget
        return lambda prefix: budget(torch.from_numpy(prefix)).to(self.start.dtype).cpu().numpy()

    def _host_archs(self, archs: Sequence[Sequence[int]] | Tensor | np.ndarray) -> np.ndarray:
        """``archs`` as a host array ``[B, D]``, checked: a row per arch, an index in range per
        decision."""
        archs = archs.cpu().numpy() if isinstance(archs, Tensor) else np.asarray(archs)
        if archs.ndim == 1:
            archs = archs[None]
        if archs.ndim != 2 or archs.shape[1] != len(self.num_choices) or not np.issubdtype(archs.dtype, np.integer):
            raise ValueError(f"archs must be [B, {len(self.num_choices)}] candidate indices, got shape "
                             f"{tuple(archs.shape)} of {archs.dtype}")
        bad = np.argwhere((archs < 0) | (archs >= np.asarray(self.num_choices)))
        if len(bad):
            b, k = bad[0].tolist()
            raise ValueError(f"archs[{b}, {k}] = {int(archs[b, k])} is out of range: decision {k} has "
                             f"{self.num_choices[k]} candidates")
        return archs.astype(np.int64, copy=False)

    @torch.no_grad()
    def sample_archs(self, batch: int = 1, generator: Optional[torch.Generator] = None, *,
                     keep: bool = False) -> Tensor:
        """Draw ``batch`` architectures ``[batch, D]`` (no likelihoods, no graph): per decision
        one LSTM step and the Gumbel-max choice ``argmax(logits + G)``, which is a draw from the
        softmax; the noise of all decisions is drawn at once, from ``generator``.

        The policy runs in NumPy on the host, on the parameters' memory: a step of a
        64-wide LSTM is a few microseconds of arithmetic, and as torch ops each decision cost
        about 20 dispatched ops (400 a sample of 19 decisions, 2 ms on a CPU core). Its
        products round differently from torch's, so a near tie of two candidates' noisy logits
        may go the other way (none did in 38,400 draws compared).

        ``keep``: keep the draw's forward for :meth:`likelihood_backward` of these archs, which
        then need not run the policy again while the parameters are unchanged (a REINFORCE
        update of the archs just drawn): the same arrays it would compute."""
        batch = _checks.positive_int("batch", batch)
        noise = torch.empty(batch, len(self.num_choices), max(self.num_choices))
        gumbel = -noise.exponential_(generator=generator).log_().numpy()
        params, weights = self._host_weights()
        with host_policy.one_blas_thread():
            chosen, trace = host_policy.unroll(weights, batch,
                                               lambda k, logits: (logits + gumbel[:, k, :logits.shape[1]]).argmax(-1),
                                               self._host_budget(), record=keep)
        if keep:
            self._kept = (chosen.copy(), self._versions(params), trace)
        return torch.from_numpy(chosen).to(self.start.device)

    @staticmethod
    def _versions(params: list[nn.Parameter]) -> tuple[int, ...]:
        """The parameters' in-place write counters: any update of them (an optimizer's step,
        ``load_state_dict``) changes one."""
        return tuple(p._version for p in params)

    def sample(self, batch: int = 1, generator: Optional[torch.Generator] = None) -> Rollout:
        """Draw ``batch`` architectures; their log-probabilities carry gradients."""
        return self.rollout(self.sample_archs(batch, generator))

    def rollout(self, archs: Tensor) -> Rollout:
        """The likelihoods of ``archs`` ``[B, D]`` that :meth:`sample_archs` drew (unchecked:
        :meth:`evaluate` checks given architectures)."""
        return self._score(archs)

    def evaluate(self, archs: Sequence[Sequence[int]] | Tensor) -> Rollout:
        """Log-probabilities, entropies and per-decision probabilities of given architectures."""
        return self._score(torch.from_numpy(self._host_archs(archs)).to(self.start.device))

    @torch.no_grad()
    def likelihood_backward(self, archs: Sequence[Sequence[int]] | Tensor, grad_log_prob: Sequence[float],
                            grad_entropy: Sequence[float]) -> tuple[Tensor, Tensor]:
        """The log-probabilities and entropies ``[B]`` of ``archs`` ``[B, D]``, and their gradient
        for ``grad_log_prob`` and ``grad_entropy`` ``[B]`` accumulated into the parameters'
        ``.grad`` — what ``torch.autograd.backward([r.log_prob, r.entropy], [grad_log_prob,
        grad_entropy])`` does for ``r = evaluate(archs)``, computed in NumPy on the host
        (:mod:`apsfast.search.host_policy`), without a graph. The last decision's embedding,
        never read, gets no gradient. (:class:`~apsfast.search.policy_gradient.Reinforce`
        replaces the gradients instead, in tensors the controller reuses at every step.)"""
        archs = self._host_archs(archs)
        grad_log_prob, grad_entropy = np.asarray(grad_log_prob), np.asarray(grad_entropy)
        if grad_log_prob.shape != (len(archs),) or grad_entropy.shape != (len(archs),):
            raise ValueError(f"grad_log_prob and grad_entropy must be [{len(archs)}], one per arch, got "
                             f"{grad_log_prob.shape} and {grad_entropy.shape}")
        log_prob, entropy = self._host_backward(archs, grad_log_prob, grad_entropy, accumulate=True)
        return torch.from_numpy(log_prob), torch.from_numpy(entropy)

    def _host_backward(self, archs: np.ndarray, grad_log_prob: np.ndarray, grad_entropy: np.ndarray,
                       accumulate: bool) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`likelihood_backward` on checked host arrays, returning host arrays; without
        ``accumulate`` the gradients replace the parameters' ``.grad`` (an optimizer's step), in
        tensors made once and written through their arrays: a tensor made from an array is an
        op, and setting ``.grad`` a few microseconds, per parameter and step."""
        params, weights = self._host_weights()
        kept, self._kept = self._kept, None
        with host_policy.one_blas_thread():
            if kept is not None and np.array_equal(kept[0], archs) and kept[1] == self._versions(params):
                trace = kept[2]
            else:
                _, trace = host_policy.unroll(weights, len(archs), lambda k, logits: archs[:, k],
                                              self._host_budget(), record=True)
            grads, log_prob, entropy = host_policy.backward(weights, trace, archs, grad_log_prob, grad_entropy)
        grads = host_policy.flatten(grads)
        if accumulate or self.start.device.type != "cpu":
            for param, grad in zip(params, grads):
                if grad is not None:
                    grad = torch.from_numpy(np.ascontiguousarray(grad).reshape(param.shape)).to(param.device)
                    param.grad = grad if param.grad is None or not accumulate else param.grad + grad
        else:
            for param, grad, (tensor, array) in zip(params, grads, self._grad_buffers(params)):
                if grad is None:
                    param.grad = None
                    continue
                np.copyto(array, grad.reshape(array.shape))
                if param.grad is not tensor:
                    param.grad = tensor
        return log_prob, entropy

    def _grad_buffers(self, params: list[nn.Parameter]) -> list[tuple[Tensor, np.ndarray]]:
        """A gradient tensor per parameter and its array, made once (anew when a parameter's
        memory changes)."""
        key = tuple((param.data_ptr(), param.dtype) for param in params)
        if self._grads_cache is None or self._grads_cache[0] != key:
            tensors = [torch.empty_like(param, memory_format=torch.contiguous_format) for param in params]
            self._grads_cache = (key, [(tensor, tensor.numpy()) for tensor in tensors])
        return self._grads_cache[1]

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
