"""apsfast: fast channel number search with affine parameter sharing (APS).

Public API:

* :func:`construct`, :func:`aps_conv2d` — candidate kernels (paper eq. 2) and the APS conv;
  :func:`construct_grouped` — the kernels of many layers in one call;
* :func:`sharing_level`, :func:`transition_step`, :func:`init_transforms` — Φ (eq. 4) and
  its projected-gradient transition (eq. 5); :func:`transition_step_all` — every layer at once;
* :mod:`apsfast.nn` — drop-in layers (:class:`~apsfast.nn.APSConv2d`, …);
* :mod:`apsfast.models` — search spaces: supernets, architecture encoding, MACs, export;
* :func:`backends` — which compute backends this installation has.
"""
from apsfast import _backends
from apsfast.functional import aps_conv2d, construct, construct_grouped
from apsfast.sharing import init_transforms, sharing_level, transition_step, transition_step_all

__version__ = "0.1.0"


def backends() -> tuple[str, ...]:
    """Names of the backends available here, e.g. ``('reference', 'cpu')``.

    ``apsfast info`` also says why each missing one is missing. ``APSFAST_BACKEND`` forces one.
    """
    return _backends.available()


from apsfast import nn  # noqa: E402  (nn builds on the functions above)
from apsfast import models  # noqa: E402  (models build on nn)
from apsfast.models.converter import convert  # noqa: E402

__all__ = ["construct", "construct_grouped", "aps_conv2d", "sharing_level", "transition_step",
           "transition_step_all", "init_transforms",
           "backends", "nn", "models", "convert", "__version__"]
