"""A run's folder and how a run is resumed.

``apsfast search --resume --out RUN`` (and ``apsfast train RUN --resume``) reads the settings
the run was started with from ``RUN/config.yaml``; settings given with it may change only what
cannot make the resumed run differ from what it was doing:

* bookkeeping and placement — ``run.log_every``, ``run.checkpoint_every``, ``run.progress``,
  ``run.device``, ``run.dist_backend``, ``data.root`` (the same data moved), ``data.workers``,
  ``result.beam`` and ``result.select`` (the beam written at the end and the choice in it),
  ``result.portable`` (what ``model.pt`` holds);
* the length — ``train.epochs`` (``retrain.epochs`` for a retrain), never below the epochs done;
  the cosine schedule then spans the new length from where the run stands;
* the way out of a divergence — ``train.lr`` and ``train.grad_clip`` (``retrain.lr``,
  ``retrain.grad_clip``), which a non-finite loss asks for;
* for a search, the whole ``retrain`` section (read by ``apsfast train`` only) and the
  ``analysis`` section (measurements that change nothing the run computes).

Anything else is refused, naming each field with its old and new value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import yaml

from apsfast.search.config import Config, ConfigError
from apsfast.search.session import CHECKPOINT, CONFIG
from apsfast.search.settings import apply_overrides, config_from_dict

_BOOKKEEPING = ("run.log_every", "run.checkpoint_every", "run.progress", "run.device", "run.dist_backend",
                "data.root", "data.workers", "result.beam", "result.select", "result.portable")
RESUMABLE = {
    "search": (*_BOOKKEEPING, "train.epochs", "train.lr", "train.grad_clip", "retrain.", "analysis."),
    "retrain": (*_BOOKKEEPING, "retrain.epochs", "retrain.lr", "retrain.grad_clip"),
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}`` (mappings under ``options`` stay whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != "options":
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, old value, new value)`` of every field that differs between two config dicts."""
    before, after = flatten(old), flatten(new)
    return [(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def refused(kind: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The changes a resume of a ``kind`` run may not make."""
    allowed = RESUMABLE[kind]
    return [c for c in changes(old, new) if not any(c[0] == a or (a.endswith(".") and c[0].startswith(a))
                                                    for a in allowed)]


def check_resume(kind: str, old: Mapping[str, Any], new: Mapping[str, Any], epochs_done: int) -> None:
    """Refuse a resume whose settings differ from the run's in what it may not change (one
    line naming each field with its old and new value), or that asks for fewer epochs than done."""
    bad = refused(kind, old, new)
    if bad:
        listed = "; ".join(f"{key}: {a!r} → {b!r}" for key, a, b in bad)
        raise ConfigError(f"a resume may not change {listed} (the run was started with the old values; start a new "
                          f"run in another --out to change them)")
    key = "train.epochs" if kind == "search" else "retrain.epochs"
    epochs = flatten(new)[key]
    if epochs < epochs_done:
        raise ConfigError(f"{key} = {epochs} is below the {epochs_done} epochs this run has done")


def saved_config(out: Union[str, Path], overrides: Sequence[Union[str, tuple[str, Any]]] = ()) -> Config:
    """The settings a run in ``out`` was started with (its ``config.yaml``), with ``overrides``.

    Raises ``FileNotFoundError`` naming the folder when it holds no run.
    """
    path = Path(out) / CONFIG
    if not path.is_file():
        what = "does not exist" if not Path(out).exists() else "holds no run (no config.yaml)"
        raise FileNotFoundError(f"cannot resume: {str(out)!r} {what}; check --out, or start the run without --resume")
    config = config_from_dict(yaml.safe_load(path.read_text()) or {})
    return apply_overrides(config, overrides)


def resume_state(out: Union[str, Path], resume: bool) -> Optional[str]:
    """How a run in ``out`` starts: ``None`` for a fresh start where there is nothing, or a
    line saying it resumes or starts afresh. Refuses to overwrite a run without ``resume``,
    and to resume where there is no run."""
    out = Path(out)
    has_checkpoint = (out / CHECKPOINT).exists()
    if not resume:
        if has_checkpoint:
            raise FileExistsError(f"{str(out)!r} already holds a run (checkpoint.pt): pass --resume (resume=True in "
                                  f"Python) to continue it, or another output folder")
        return None
    if has_checkpoint:
        return f"resuming the run in {out}"
    if (out / CONFIG).is_file():
        return f"the run in {out} stopped before its first checkpoint: starting it afresh"
    raise FileNotFoundError(f"cannot resume: {str(out)!r} holds no checkpoint"
                            f"{'' if out.exists() else ' (the folder does not exist)'}; check --out, or start the run "
                            f"without --resume")


def where(done: int, epochs: int) -> str:
    """Where a resumed run stands, ``done`` of its ``epochs`` epochs finished, as the console
    counts epochs (from 1): ``at epoch 3/10``, or ``after its last epoch (10/10)``."""
    return f"after its last epoch ({epochs}/{epochs})" if done >= epochs else f"at epoch {done + 1}/{epochs}"


def described(items: Iterable[tuple[str, Any, Any]]) -> str:
    """``field old → new`` of each change, for a log line."""
    return ", ".join(f"{key} {a!r} → {b!r}" for key, a, b in items)
