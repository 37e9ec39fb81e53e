"""What every APS layer shares: the candidate transforms of each side and their sharing level."""
from __future__ import annotations

import copy
import hashlib
import numbers
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from apsfast import _checks, ops
from apsfast.reference import channels_last_kernel
from apsfast.sharing import init_transforms, sharing_level, transition_step

SHARING = ("ordinal", "independent", "transitional")

# APS-T starts from the exact ordinal transforms, so warm-up runs on the free slicing path.
# That point is stationary for the projected descent (each column's gradient is parallel to
# it), so the first transition step perturbs it with this much Gaussian noise (the value the
# authors used on CIFAR; 1e-2 on ImageNet).
TRANSITION_NOISE = 1e-3


# The hooks a module runs around its forward and backward; what registered them (a searcher on
# a supernet, a profiler) owns them, not a copy of the module.
_RUN_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def copy_without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (parameters, buffers, submodules) without the forward and
    backward hooks registered on it or its submodules. An exported network must not carry a
    search's hooks: they would run in its forward, drag the searcher into the copy, and keep
    ``torch.export`` from tracing it."""
    memo: dict[int, object] = {}
    for m in module.modules():
        for name in _RUN_HOOKS:
            hooks = m.__dict__.get(name)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(module, memo)


def default_meta_width(widths: Sequence[int], sharing: str) -> int:
    """The meta width of one side: ``max(widths)`` for ordinal sharing (rows past the widest
    candidate would never be read), ``sum(widths)`` for independent (disjoint candidates) and
    transitional sharing (so that the transition can reach full independence)."""
    return max(widths) if sharing == "ordinal" else sum(widths)


class CandidateTransforms(nn.Module):
    """The transforms of one side of an APS layer, one ``[meta_width, c_a]`` matrix per
    candidate width, stored side by side in the single parameter ``matrix``
    ``[meta_width, Σ c_a]`` so that batched kernels see one buffer.

    ``matrix`` does not require grad: APS updates it by the transition alone. Set
    ``requires_grad_(True)`` on it to train the transforms by the task loss instead.
    """

    def __init__(self, widths: Sequence[int], meta_width: int, sharing: str, noise: float = 0.0,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.meta_width = meta_width
        mode = "independent" if sharing == "independent" else "ordinal"
        blocks = init_transforms(meta_width, self.widths, mode, noise=noise, dtype=dtype, device=device)
        self.matrix = nn.Parameter(torch.cat(blocks, dim=1), requires_grad=False)
        self._offsets = [sum(self.widths[:a]) for a in range(len(self.widths))]
        self._no_selections = (None,) * len(self.widths)
        # The exact selections it starts as, known without reading them back from the device.
        starts = self._offsets if mode == "independent" else [0] * len(self.widths)
        self._selections: tuple[object, Sequence[Optional[int]]] = \
            ((self.matrix.data_ptr(), self.matrix._version), list(starts) if not noise else [None] * len(starts))

    def __getitem__(self, index: int) -> Tensor:
        """The transform of candidate ``index``: a view of ``matrix``, ``[meta_width, c_index]``."""
        start = self._offsets[index]
        return self._parameters["matrix"][:, start:start + self.widths[index]]

    def matrices(self) -> tuple[Tensor, ...]:
        """Every candidate's transform, as views of ``matrix``, in ascending width."""
        return tuple(self[a] for a in range(len(self.widths)))

    def selection_start(self, index: int) -> Optional[int]:
        """``s`` if candidate ``index``'s transform is exactly ``[e_s … e_{s+c-1}]`` (then
        ``Pᵀ W`` is the row range ``W[s:s+c]``, a free view), else ``None``.

        Ordinal and independent transforms are such selections, and so are APS-T's until its
        transition starts. The answer is cached until ``matrix`` changes (its version counter
        moves with every in-place update); a transition step sets it without reading ``matrix``
        (:meth:`mark_transformed`), so a step of the search reads nothing back to the host.
        Never a selection while ``matrix`` is trained, nor under ``torch.compile`` or on the
        meta device.
        """
        matrix = self._parameters["matrix"]  # as self.matrix, without nn.Module's lookup (every forward)
        if matrix.requires_grad or matrix.is_meta or torch.compiler.is_compiling():
            # A traced graph cannot branch on values, nor can a tensor without any: dense path.
            return None
        key = (matrix.data_ptr(), matrix._version)
        if self._selections[0] != key:
            # A selection's columns are basis vectors, whose largest entry is exactly 1; a unit
            # column with two nonzero entries has none. One reduction over the whole matrix
            # rules out the dense transforms (APS-T in transition: every step) cheaply.
            ones = (matrix.abs().amax(0) == 1).tolist()
            self._selections = (key, [self._find_selection(a) if all(ones[o:o + w]) else None
                                      for a, (o, w) in enumerate(zip(self._offsets, self.widths))])
        return self._selections[1][index]

    def mark_transformed(self) -> tuple[int, int]:
        """Record that a transition step (or its start noise) has just moved ``matrix``: no
        transform is a selection until ``matrix`` changes again (checking would read it back to
        the host at every step).
        Were a column still a basis vector, the dense path builds the same kernel, exactly.
        Returns ``matrix``'s state as recorded: its data pointer and version counter."""
        matrix = self._parameters["matrix"]
        key = (matrix.data_ptr(), matrix._version)
        self.__dict__["_selections"] = (key, self._no_selections)  # without nn.Module's __setattr__ (µs)
        return key

    def _find_selection(self, index: int) -> Optional[int]:
        block = self[index]
        rows, cols = block.nonzero(as_tuple=True)  # row-major order
        width = self.widths[index]
        if rows.numel() != width or not bool((block[rows, cols] == 1).all()):
            return None
        expected = torch.arange(width, device=block.device)
        start = int(rows[0])
        if not (torch.equal(cols, expected) and torch.equal(rows, expected + start)):
            return None
        return start

    def is_selection(self) -> bool:
        """Whether every candidate's transform is an exact selection."""
        # The first call brings the cached answers up to date (or rules out a trained matrix).
        return self.selection_start(0) is not None and None not in self._selections[1]

    def perturb(self, std: float, generator: Optional[torch.Generator] = None) -> None:
        """Add Gaussian noise of ``std`` to every transform and renormalise its columns."""
        with torch.no_grad():
            noise = torch.randn(self.matrix.shape, generator=generator, dtype=torch.float64,
                                device=self.matrix.device if generator is None else generator.device)
            moved = self.matrix + std * noise.to(self.matrix)
            self.matrix.copy_(moved / moved.norm(dim=0, keepdim=True))

    def extra_repr(self) -> str:
        return f"meta_width={self.meta_width}, widths={self.widths}"


class APSLayer(nn.Module):
    """Base of the APS layers: the meta-weight ``weight`` (output mode first, input mode
    second), the input side ``Q`` and the output side ``P``.

    A side with a single candidate width is fixed: it needs no transform (``P``/``Q`` is
    ``None``) and its meta width is that width.
    """

    weight: nn.Parameter
    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]

    def _draw_meta_weight(self, draw: Callable[[Tensor, Optional[torch.Generator]], object]) -> None:
        """Initialise ``weight`` by ``draw(tensor, generator)`` (an in-place ``nn.init`` function).

        APS-T draws the block its ordinal start reads (the widest candidate on each side) as an
        APS-O layer of the same widths draws its whole meta-weight, from the global generator;
        the rows and columns that only the transition reaches come from a generator of their
        own (seeded by the global one's state, which it leaves where it was). One seed then
        gives APS-O and APS-T the same initial network and the same random stream after it: the
        same warm-up, so that a comparison of the two measures the transition. APS-I's
        candidates read disjoint blocks: its whole meta-weight comes from the global generator.
        """
        weight = self.weight
        block = (min(self.out_widths[-1], weight.shape[0]), min(self.in_widths[-1], weight.shape[1]))
        if self.sharing != "transitional" or block == tuple(weight.shape[:2]) or weight.is_meta:
            draw(weight, None)
            return
        drawn = torch.empty((*block, *weight.shape[2:]), dtype=weight.dtype, device=weight.device)
        draw(drawn, None)
        # The state of the generator the block came from (a CUDA weight draws from its device's).
        state = (torch.cuda.get_rng_state(weight.device) if weight.device.type == "cuda"
                 else torch.get_rng_state()).numpy().tobytes()
        seed = int.from_bytes(hashlib.blake2b(state, digest_size=7).digest(), "little")
        rest = torch.empty(weight.shape, dtype=weight.dtype)
        draw(rest, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            weight.copy_(rest)
            weight[:block[0], :block[1]].copy_(drawn)

    def _make_side(self, name: str, widths: tuple[int, ...], meta_width: Optional[int],
                   sharing: str, device, dtype) -> tuple[int, Optional[CandidateTransforms]]:
        if len(widths) == 1:
            if meta_width not in (None, widths[0]):
                raise ValueError(f"{name} must be None or {widths[0]} for a side with the single "
                                 f"width {widths[0]}, got {meta_width!r}")
            return widths[0], None
        needed = sum(widths) if sharing == "independent" else widths[-1]
        if meta_width is None:
            meta_width = default_meta_width(widths, sharing)
        elif _checks.positive_int(name, meta_width) < needed:
            raise ValueError(f"{name} must be ≥ {needed} for sharing={sharing!r} and widths "
                             f"{list(widths)}, got {meta_width}")
        return meta_width, CandidateTransforms(widths, meta_width, sharing, 0.0, device=device, dtype=dtype)

    def _init_sides(self, in_widths, out_widths, sharing: str, meta_in_width: Optional[int],
                    meta_out_width: Optional[int], transition_noise: float, device, dtype) -> None:
        self.sharing = _checks.choice("sharing", sharing, SHARING)
        self.in_widths = _checks.widths("in_widths", in_widths)
        self.out_widths = _checks.widths("out_widths", out_widths)
        self.transition_noise = _checks.finite_float("transition_noise", transition_noise, positive=False)
        self.meta_in_width, self.in_transforms = self._make_side(
            "meta_in_width", self.in_widths, meta_in_width, sharing, device, dtype)
        self.meta_out_width, self.out_transforms = self._make_side(
            "meta_out_width", self.out_widths, meta_out_width, sharing, device, dtype)
        self._in_index = {w: a for a, w in enumerate(self.in_widths)}
        self._active_out_index = len(self.out_widths) - 1
        self._prebuilt: Optional[tuple[tuple[tuple[int, int], int], Tensor]] = None

    @property
    def P(self) -> Optional[tuple[Tensor, ...]]:
        """Output-side transforms ``[meta_out_width, c_o]``, one per output candidate, or None."""
        return None if self.out_transforms is None else self.out_transforms.matrices()

    @property
    def Q(self) -> Optional[tuple[Tensor, ...]]:
        """Input-side transforms ``[meta_in_width, c_i]``, one per input candidate, or None."""
        return None if self.in_transforms is None else self.in_transforms.matrices()

    @property
    def active_out(self) -> int:
        """The output width (channels) the next forward produces; one of ``out_widths``."""
        return self.out_widths[self._active_out_index]

    @active_out.setter
    def active_out(self, width: int) -> None:
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width not in self.out_widths:
            raise ValueError(f"active_out must be one of out_widths {self.out_widths}, got {width!r}")
        self._active_out_index = self.out_widths.index(width)

    @property
    def active_out_index(self) -> int:
        """Index of ``active_out`` in ``out_widths``."""
        return self._active_out_index

    def select_out(self, index: int) -> None:
        """Make ``out_widths[index]`` the output width: ``active_out`` by index, without
        nn.Module's attribute machinery (µs a layer), for switching architectures every step."""
        if not 0 <= index < len(self.out_widths):
            raise ValueError(f"index must be in 0..{len(self.out_widths) - 1} (out_widths {self.out_widths}), "
                             f"got {index!r}")
        object.__setattr__(self, "_active_out_index", index)

    def input_index(self, width: int) -> int:
        """Index of the input candidate of this width; a clear error if it is not one."""
        try:
            return self._in_index[width]
        except KeyError:
            raise ValueError(f"{type(self).__name__} got an input with {width} channels, expected "
                             f"one of in_widths {self.in_widths}") from None

    # --- the candidate weight ------------------------------------------------------------

    def _indices(self, in_width: int) -> tuple[int, int]:
        """(output candidate, input candidate) for an input of ``in_width`` channels."""
        return self._active_out_index, self.input_index(in_width)

    @staticmethod
    def _side(side: Optional[CandidateTransforms], index: int) -> tuple[Optional[slice], Optional[Tensor]]:
        """How one side applies: a row range of the meta-weight when its transform is an exact
        selection (a free view), else the dense transform; ``(None, None)`` for a fixed side."""
        if side is None:
            return None, None
        start = side.selection_start(index)
        if start is not None:
            return slice(start, start + side.widths[index]), None
        return None, side[index]

    def _operands(self, out_index: int, in_index: int) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(weight', P, Q)`` with selection sides already sliced out of the meta-weight."""
        rows, P = self._side(self.out_transforms, out_index)
        cols, Q = self._side(self.in_transforms, in_index)
        weight = self.weight
        if rows is not None:
            weight = weight[rows]
        if cols is not None:
            weight = weight[:, cols]
        return weight, P, Q

    def _candidate_weight(self, out_index: int, in_index: int) -> Tensor:
        if self._prebuilt is not None:
            # Used by this forward or discarded: a prebuilt weight never outlives one forward,
            # and never serves after the meta-weight changed (its version counter moved).
            (key, version), kernel = self._prebuilt
            self.__dict__["_prebuilt"] = None  # nn.Module's __setattr__ costs µs, every layer's forward
            if key == (out_index, in_index) and version == self.weight._version:
                return kernel
        weight, P, Q = self._operands(out_index, in_index)
        if P is None and Q is None:
            # A contiguous copy of the slice (a few KB): a convolution rounds a strided weight
            # differently, so that APS-T's warm-up would part from APS-O's within a few steps.
            layout = torch.channels_last if channels_last_kernel(weight) else torch.contiguous_format
            return weight.contiguous(memory_format=layout)
        return ops.construct(weight, P, Q)

    def keep_prebuilt(self, key: tuple[int, int], kernel: Tensor) -> None:
        """Hold ``kernel``, built from :meth:`prebuild_operands`' operands for ``key``, as the
        candidate weight of the next forward (for that key and the meta-weight as it is now)."""
        self.__dict__["_prebuilt"] = ((key, self.weight._version), kernel)

    def prebuild_operands(self, in_width: int) -> Optional[tuple[tuple[int, int], Tensor, Optional[Tensor], Optional[Tensor]]]:
        """``(key, weight', P, Q)`` that :func:`apsfast.nn.prebuild_kernels` builds this layer's
        next candidate weight from; ``None`` when that weight is a free slice."""
        key = self._indices(in_width)
        weight, P, Q = self._operands(*key)
        return None if P is None and Q is None else (key, weight, P, Q)

    def _candidate_bias(self, out_index: int, bias: Optional[Tensor]) -> Optional[Tensor]:
        """The meta-bias projected like the output mode of the kernel: ``Pᵀ b``."""
        if bias is None:
            return None
        rows, P = self._side(self.out_transforms, out_index)
        if rows is not None:
            return bias[rows]
        return bias if P is None else bias @ P

    # --- sharing ---------------------------------------------------------------------------

    def sharing_level(self) -> Tensor:
        """Φ of this layer (paper eq. 4); ``1`` for a layer whose both sides are fixed."""
        if self.P is None and self.Q is None:
            return torch.ones((), dtype=self.weight.dtype, device=self.weight.device)
        return sharing_level(self.P, self.Q)

    def begin_transition(self, generator: Optional[torch.Generator] = None) -> bool:
        """Perturb the transforms by ``transition_noise`` if this is an APS-T layer still at its
        exact ordinal start (a stationary point of eq. 5). Returns whether it did."""
        sides = [s for s in (self.out_transforms, self.in_transforms) if s is not None]
        if self.sharing != "transitional" or not self.transition_noise \
                or not sides or not all(s.is_selection() for s in sides):
            return False
        for side in sides:
            side.perturb(self.transition_noise, generator)
        self.mark_transformed()  # no longer selections, known without reading the transforms back
        return True

    def transition_step(self, tau: float, *, relative: bool = True) -> Tensor:
        """One step of paper eq. 5 on this layer's transforms, in place; returns Φ before it.

        An APS-T layer's first step starts the transition (see :meth:`begin_transition`);
        ``relative`` (the default, the search's rate) as in :func:`apsfast.transition_step_all`;
        ``relative=False`` takes eq. 5's own scale, whose stable τ depends on the widths.
        """
        if self.P is None and self.Q is None:
            return self.sharing_level()
        self.begin_transition()
        phi = transition_step(self.P, self.Q, tau, relative=relative)
        self.mark_transformed()
        return phi

    def mark_transformed(self) -> None:
        """After a transition step: see :meth:`CandidateTransforms.mark_transformed`."""
        for side in (self.out_transforms, self.in_transforms):
            if side is not None:
                side.mark_transformed()
