"""APSBatchNorm2d: batch norm with private statistics and affine parameters per candidate width,
optionally synchronised over the processes of a distributed run."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from apsfast import _checks
from apsfast.nn.base import copy_without_hooks


class APSBatchNorm2d(nn.Module):
    """One ``nn.BatchNorm2d`` per candidate width, chosen by the input's channel count.

    Candidates of different widths see differently distributed activations, so sharing one
    set of running statistics would mis-normalise all but one of them (the switchable batch
    norm of slimmable networks). The per-width modules are in ``bns``.

    With ``process_group`` set (see :func:`sync_batch_norm`) the batch statistics are those of
    the whole distributed batch, so data-parallel processes compute what one process does on
    the global batch. Works on any device and backend (gloo included), unlike
    ``nn.SyncBatchNorm``, which needs a GPU.
    """

    def __init__(self, widths: Sequence[int], eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.widths = _checks.widths("widths", widths)
        self.bns = nn.ModuleList(nn.BatchNorm2d(w, eps, momentum, affine, track_running_stats,
                                                device=device, dtype=dtype) for w in self.widths)
        self._index = {w: a for a, w in enumerate(self.widths)}
        self.process_group: Optional[Any] = None

    def candidate(self, width: int) -> nn.BatchNorm2d:
        """The batch norm of the candidate with ``width`` channels."""
        try:
            return self.bns[self._index[width]]
        except KeyError:
            raise ValueError(f"APSBatchNorm2d got {width} channels, expected one of widths "
                             f"{self.widths}") from None

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor("x", x, ndim=4, layout="(N, C, H, W)")
        bn = self.candidate(x.shape[1])
        if self.process_group is None or not bn.training:
            return bn(x)
        return _synchronised(bn, x, self.process_group)

    def to_static(self, width: int) -> nn.BatchNorm2d:
        """A copy of the batch norm of the ``width`` candidate."""
        return copy_without_hooks(self.candidate(width))

    def extra_repr(self) -> str:
        return f"widths={self.widths}" + (", synchronised" if self.process_group is not None else "")


def sync_batch_norm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every :class:`APSBatchNorm2d` of ``module`` use the statistics of the whole batch
    of a distributed run (``process_group``: default the world); ``None`` outside one.
    Returns ``module``."""
    group = (process_group or dist.group.WORLD) if dist.is_available() and dist.is_initialized() else None
    for m in module.modules():
        if isinstance(m, APSBatchNorm2d):
            m.process_group = group
    return module


def _synchronised(bn: nn.BatchNorm2d, x: Tensor, group: Any) -> Tensor:
    """``bn(x)`` in training mode with the mean and variance of every process's batch."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    update = bn.track_running_stats
    if update:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    y, mean, var, count = _SyncBatchNorm.apply(x, bn.weight, bn.bias, bn.eps, group)
    if update:
        with torch.no_grad():
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * (count / max(count - 1.0, 1.0))
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    return y


class _SyncBatchNorm(torch.autograd.Function):
    """Batch norm over the union of every process's batch, in float32 (or wider).

    Forward: one all-gather of each process's (mean, variance, count) per channel, combined
    exactly (Chan et al.'s parallel variance). Backward: one all-reduce of ``Σ dy`` and
    ``Σ dy·x̂``. The weight and bias gradients stay local: data parallelism averages them
    like every other parameter's.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                group: Any) -> tuple[Tensor, Tensor, Tensor, float]:
        work = x.double() if x.dtype == torch.float64 else x.float()
        channels = x.shape[1]
        local = torch.cat([work.mean((0, 2, 3)), work.var((0, 2, 3), unbiased=False),
                           work.new_full((1,), x.numel() // channels)])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)
        counts = stats[:, -1:]
        total = counts.sum()
        mean = (counts * stats[:, :channels]).sum(0) / total
        var = (counts * (stats[:, channels:2 * channels] + (stats[:, :channels] - mean) ** 2)).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        xhat = (work - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        y = xhat
        if weight is not None:
            y = y * weight.to(work.dtype).view(1, -1, 1, 1) + bias.to(work.dtype).view(1, -1, 1, 1)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.total, ctx.group, ctx.dtype = float(total), group, x.dtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var, float(total)

    @staticmethod
    def backward(ctx, dy: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
        xhat, weight, invstd = ctx.saved_tensors
        dy = dy.to(xhat.dtype)
        sum_dy = dy.sum((0, 2, 3))
        sum_dy_xhat = (dy * xhat).sum((0, 2, 3))
        total = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(total, group=ctx.group)
        mean_dy, mean_dy_xhat = (total / ctx.total).chunk(2)
        scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
        dx = scale.view(1, -1, 1, 1) * (dy - mean_dy.view(1, -1, 1, 1) - xhat * mean_dy_xhat.view(1, -1, 1, 1))
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx.to(ctx.dtype), grad_weight, grad_bias, None, None
