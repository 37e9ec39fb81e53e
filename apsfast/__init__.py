"""apsfast: fast channel number search with affine parameter sharing (APS).

Public API:

* :func:`construct`, :func:`aps_conv2d` — candidate kernels (paper eq. 2) and the APS conv;
* :func:`sharing_level`, :func:`transition_step`, :func:`init_transforms` — Φ (eq. 4) and
  its projected-gradient transition (eq. 5);
* :mod:`apsfast.nn` — drop-in layers (:class:`~apsfast.nn.APSConv2d`, …);
* :func:`backends` — which compute backends this installation has.
"""
from apsfast import _backends
from apsfast.functional import aps_conv2d, construct
from apsfast.sharing import init_transforms, sharing_level, transition_step

__version__ = "0.1.0"


def backends() -> tuple[str, ...]:
    """Names of the backends available here, e.g. ``('reference', 'cpu')``.

    ``apsfast info`` also says why each missing one is missing. ``APSFAST_BACKEND`` forces one.
    """
    return _backends.available()


from apsfast import nn  # noqa: E402  (nn builds on the functions above)

__all__ = ["construct", "aps_conv2d", "sharing_level", "transition_step", "init_transforms",
           "backends", "nn", "__version__"]
