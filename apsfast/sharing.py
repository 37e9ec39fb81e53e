"""Transforms P, Q: initialisation, the sharing level Φ (paper eq. 4) and the transition (eq. 5)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from apsfast import _checks, ops

MODES = ("ordinal", "independent", "orthogonal")
PRECISIONS = ("highest", "high", "medium")
# What torch.set_float32_matmul_precision(p) sets per backend (CUDA, oneDNN on CPUs).
_BACKEND_PRECISIONS = {"highest": ("ieee", "ieee"), "high": ("tf32", "tf32"), "medium": ("tf32", "bf16")}


def init_transforms(meta_width: int, widths: Sequence[int], mode: str = "ordinal", *,
                    noise: float = 0.0, generator: Optional[torch.Generator] = None,
                    dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None) -> list[Tensor]:
    """One semi-orthogonal transform ``[meta_width, c_a]`` per candidate width ``c_a``.

    Args:
        meta_width: rows of every transform (the meta-weight's width on that side).
        widths: candidate widths, strictly ascending, each ``≤ meta_width``.
        mode: ``"ordinal"`` — ``[e_1 … e_{c_a}]``, nested ranges, maximum Φ (APS-O);
            ``"independent"`` — disjoint sets of basis vectors, minimum Φ (APS-I), needs
            ``meta_width ≥ Σ widths``; ``"orthogonal"`` — independent random semi-orthogonal
            matrices (Φ in between).
        noise: standard deviation of Gaussian noise added before every column is renormalised
            to unit length. An exact ordinal init is a stationary point of the transition, so
            APS-T starts from a slightly perturbed one.
        generator: random source for ``"orthogonal"`` and ``noise``.
    """
    meta_width = _checks.positive_int("meta_width", meta_width)
    widths = _checks.widths("widths", widths)
    mode = _checks.choice("mode", mode, MODES)
    noise = _checks.finite_float("noise", noise, positive=False)
    if widths[-1] > meta_width:
        raise ValueError(f"widths must not exceed meta_width={meta_width}, got {list(widths)}")
    if mode == "independent" and sum(widths) > meta_width:
        raise ValueError(f"mode='independent' needs meta_width ≥ sum(widths) = {sum(widths)} "
                         f"(disjoint basis vectors per candidate), got meta_width={meta_width}")
    dtype = dtype or torch.get_default_dtype()
    eye = torch.eye(meta_width, dtype=dtype, device=device)
    offsets = [0] * len(widths)
    if mode == "independent":
        offsets = [sum(widths[:a]) for a in range(len(widths))]
    transforms = []
    for offset, width in zip(offsets, widths):
        if mode == "orthogonal":
            gauss = torch.randn(meta_width, width, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gauss)
            # Fix the signs so the result is Haar-distributed, not biased by the QR convention.
            m = (q * torch.sign(torch.diagonal(r))).to(dtype=dtype, device=device)
        else:
            m = eye[:, offset:offset + width].clone()
        if noise:
            m += noise * torch.randn(m.shape, generator=generator, dtype=torch.float64).to(m)
            m = F.normalize(m, dim=0)
        transforms.append(m)
    return transforms


def _check_side(name: str, Ms: Optional[Sequence[Tensor]], ref: Optional[Tensor],
                ref_name: str) -> Optional[list[Tensor]]:
    """Validate one side's transforms; all must share ``ref``'s dtype and device."""
    if Ms is None:
        return None
    if isinstance(Ms, Tensor) or not isinstance(Ms, Sequence) or len(Ms) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of [meta_width, c_a] tensors "
                        f"(one per candidate) or None, got {type(Ms).__name__}")
    for a, M in enumerate(Ms):
        _checks.tensor(f"{name}[{a}]", M, ndim=2, layout="(meta_width, c_a)")
        if ref is None:
            ref, ref_name = M, f"{name}[0]"
        _checks.same_kind(f"{name}[{a}]", M, ref_name, ref)
        _checks.dim_size(f"{name}[{a}]", M, 0, Ms[0].shape[0], f"the meta width of {name}[0]")
    return list(Ms)


def _check_layer(Ps, Qs) -> tuple[Optional[list[Tensor]], Optional[list[Tensor]]]:
    if Ps is None and Qs is None:
        raise ValueError("Ps and Qs are both None; at least one side must hold transforms")
    Ps = _check_side("Ps", Ps, None, "")
    Qs = _check_side("Qs", Qs, None if Ps is None else Ps[0], "Ps[0]")
    return Ps, Qs


def sharing_level(Ps: Optional[Sequence[Tensor]], Qs: Optional[Sequence[Tensor]]) -> Tensor:
    """Φ of one layer (paper eq. 4), in closed form ``Φ = S(Q) · S(P)``.

    ``S(M) = Σ_{a ≤ ã} ‖M^{aᵀ} M^{ã}‖²_F`` over the candidates of one side. Ordinal transforms
    attain the maximum, independent ones the minimum ``S = Σ_a c_a`` (Theorem 3.1).

    Args:
        Ps: the output-side transforms ``[C_out, c_o]``, one per candidate, ascending width.
        Qs: the input-side transforms ``[C_in, c_i]``, likewise. A side given as ``None`` has a
            single fixed width (identity transform) and contributes a factor of 1.

    Returns:
        A 0-d tensor, differentiable in every transform.
    """
    Ps, Qs = _check_layer(Ps, Qs)
    return ops.sharing_level(Ps or [], Qs or [])


def transition_step(Ps: Optional[Sequence[Tensor]], Qs: Optional[Sequence[Tensor]], tau: float, *,
                    relative: bool = False) -> Tensor:
    """One projected-gradient step of paper eq. 5 on every column of every P and Q, in place.

    ``p ← (p − τ ∂Φ/∂p) / ‖p − τ ∂Φ/∂p‖₂``; all gradients are taken at the current point
    before any transform moves. Arguments as in :func:`sharing_level`; ``tau`` is the
    transition rate (> 0). ``relative=True`` takes the step in the same direction with a rate
    independent of the widths (see :func:`transition_step_all`).

    Returns:
        Φ before the step (0-d tensor).
    """
    Ps, Qs = _check_layer(Ps, Qs)
    tau = _checks.finite_float("tau", tau, positive=True)
    return _step_layers([(Ps, Qs)], tau, _checks.flag("relative", relative))


def _side_matrix(Ms: list[Tensor]) -> tuple[Tensor, bool]:
    """One ``[C, Σ c_a]`` matrix holding a side's transforms, and whether it is a copy.

    When the transforms are adjacent column blocks of one 2-D tensor (as the layers store
    them) that tensor itself is returned, so the step lands in place with no copy.
    """
    base = Ms[0] if Ms[0]._base is None else Ms[0]._base
    if base.dim() == 2 and base.shape[0] == Ms[0].shape[0] and base.shape[1] == sum(M.shape[1] for M in Ms):
        column = 0
        for M in Ms:
            same = (M is base or M._base is base) and M.stride() == base.stride()
            if not same or M.data_ptr() != base[:, column:].data_ptr():
                break
            column += M.shape[1]
        else:
            return base, False
    return torch.cat(Ms, dim=1), True


@contextlib.contextmanager
def matmul_precision(precision: Optional[str]) -> Iterator[None]:
    """Run the body under ``torch.set_float32_matmul_precision(precision)``, then put back the
    settings found; ``None`` leaves them alone.

    ``"highest"``: IEEE float32 products; ``"high"``: TF32 on CUDA GPUs, float32 on CPUs;
    ``"medium"``: bfloat16 products with float32 accumulation on GPUs and on CPUs with oneDNN
    (AMX / AVX-512 bf16). Only float32 products change; float64 and half inputs are unaffected.

    The per-backend settings that knob writes (``torch.backends.cuda.matmul.fp32_precision``,
    ``torch.backends.mkldnn.matmul.fp32_precision``) are saved and put back as found too. Where
    they were set through that newer API to a mix the global getter cannot read (it raises),
    they alone are set for the body.
    """
    if precision is None:
        yield
        return
    precision = _checks.choice("precision", precision, PRECISIONS)
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = (cuda.fp32_precision, mkldnn.fp32_precision)
    try:
        previous: Optional[str] = torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and per-backend settings mixed: no global value to restore
        previous = None
    if previous is None:
        cuda.fp32_precision, mkldnn.fp32_precision = _BACKEND_PRECISIONS[precision]
    else:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        if previous is not None:
            torch.set_float32_matmul_precision(previous)
        cuda.fp32_precision, mkldnn.fp32_precision = saved


def transition_step_all(layers: Sequence[tuple[Optional[Sequence[Tensor]], Optional[Sequence[Tensor]]]],
                        tau: float, *, relative: bool = False, precision: Optional[str] = None) -> Tensor:
    """:func:`transition_step` on every layer of a network in one batched call, in place.

    Args:
        layers: one ``(Ps, Qs)`` pair per APS layer, each as in :func:`sharing_level`; all
            transforms share one dtype and device.
        tau: the transition rate (> 0).
        relative: divide each side's step by its partner's ``S`` (``∂Φ/∂P = S(Q) ∂S(P)/∂P``,
            so the step becomes ``τ ∂S(P)/∂p``): the same descent direction as eq. 5, at a
            rate that does not grow with the layer's widths. With eq. 5's own scale a stable
            τ depends on the widths (``S`` grows with them: τ = 1e-3 diverges on the
            {16, 32, 64, 96} CIFAR space and barely moves the ImageNet ones' narrow layers);
            relative, the curvature of the step is set by the number of candidates alone, so
            one τ (the paper's 1e-3) suits every layer of every space. The search uses it.
        precision: the float32 matmul precision of the step's products, as
            ``torch.set_float32_matmul_precision`` takes it (``"highest"``, ``"high"``,
            ``"medium"``), set for this call only (:func:`matmul_precision`); ``None`` (the
            default) runs under whatever is set globally. Under ``"medium"`` the CPU kernel
            takes bfloat16 products (float32 accumulation, oneDNN) for the gradient GEMMs of
            large layers and keeps every Gram, hence Φ, in float32: on a CPU with AMX the
            MobileNet-v2 space's step takes 0.68× the time and Φ stays within 5e-4 of its
            float32 path over 1000 steps on ResNet-20 (``apsfast bench precision``;
            bfloat16 Grams drift 7e-3).

    Returns:
        The network's Φ (the sum of the layers') before the step, a 0-d tensor.
    """
    if isinstance(layers, Tensor) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise TypeError(f"layers must be a non-empty sequence of (Ps, Qs) pairs, got {type(layers).__name__}")
    tau = _checks.finite_float("tau", tau, positive=True)
    relative = _checks.flag("relative", relative)
    if precision is not None:
        _checks.choice("precision", precision, PRECISIONS)
    checked, ref = [], None
    for l, pair in enumerate(layers):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise TypeError(f"layers[{l}] must be a (Ps, Qs) pair, got {type(pair).__name__}")
        try:
            Ps, Qs = _check_layer(*pair)
            for Ms in (Ps, Qs):
                if Ms is not None:
                    ref = ref if ref is not None else Ms[0]
                    _checks.same_kind("transform", Ms[0], "layers[0]'s transforms", ref)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layers[{l}]: {err}") from None
        checked.append((Ps, Qs))
    with matmul_precision(precision):
        return _step_layers(checked, tau, relative)


def _step_layers(layers: Sequence[tuple[Optional[list[Tensor]], Optional[list[Tensor]]]], tau: float,
                 relative: bool) -> Tensor:
    """Checked layers through ``apsfast::transition_step_all``: each side packed as one matrix
    (the layer's own storage where its transforms are adjacent column blocks of it, else a
    copy, written back after the step)."""
    sides, widths, counts, partner, copies = [], [], [], [], []
    for Ps, Qs in layers:
        present = [Ms for Ms in (Ps, Qs) if Ms is not None]
        for k, Ms in enumerate(present):
            matrix, copied = _side_matrix(Ms)
            partner.append(len(sides) + (1 - 2 * k) if len(present) == 2 else -1)
            sides.append(matrix)
            widths.extend(M.shape[1] for M in Ms)
            counts.append(len(Ms))
            copies.append(Ms if copied else None)
    with torch.no_grad():
        phi = ops.transition_step_all(sides, widths, counts, partner, tau, relative)
        for matrix, Ms in zip(sides, copies):
            if Ms is not None:
                for M, new in zip(Ms, torch.split(matrix, [M.shape[1] for M in Ms], dim=1)):
                    M.copy_(new)
    return phi
