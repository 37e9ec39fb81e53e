"""A complete short search on the embedded data: the sharing level of the three strategies,
then warm-up → transition with the controller → beam search → export → a short retrain from
scratch, with the ``demo`` preset (a narrow ResNet-20 on 16×16 images).

Run with ``apsfast demo`` (or ``make demo``); a few minutes on two CPU cores.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

import apsfast

WIDTHS = (4, 8, 16, 32)


def show_sharing_levels() -> None:
    print(f"Sharing level Φ of one layer with candidate widths {WIDTHS} on both sides (eq. 4):")
    meta = sum(WIDTHS)
    for mode in ("ordinal", "orthogonal", "independent"):
        Ps = apsfast.init_transforms(meta, WIDTHS, mode, generator=torch.Generator().manual_seed(0))
        Qs = apsfast.init_transforms(meta, WIDTHS, mode, generator=torch.Generator().manual_seed(1))
        print(f"  {mode:<12} Φ = {apsfast.sharing_level(Ps, Qs).item():10.1f}")
    print(f"  Theorem 3.1: ordinal is the maximum, independent the minimum (Σc)² = {meta ** 2}\n")


def main(out: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Path:
    """Run the demo into ``out`` (default ``runs/demo/<date-time>``) with the ``demo`` preset
    and ``overrides`` (``"train.epochs=4"``…); returns that folder."""
    from apsfast.search.settings import load_config
    from apsfast.search.schedule import Search
    from apsfast.search.retrain import retrain

    started = time.perf_counter()
    print(f"apsfast {apsfast.__version__} — backends: {', '.join(apsfast.backends())}\n")
    show_sharing_levels()
    out = Path(out) if out is not None else Path("runs", "demo", time.strftime("%Y%m%d-%H%M%S"))
    Search(load_config("demo", overrides=overrides), out).run()
    retrain(out)
    print(f"\ndemo done in {time.perf_counter() - started:.0f} s. Everything is in {out}: result.json (the "
          f"beam, the chosen arch and the controller's probabilities), model.pt (the export), curves.png and "
          f"decisions.png (the plots), metrics.jsonl, retrain/retrain.json (test accuracy).")
    return out
