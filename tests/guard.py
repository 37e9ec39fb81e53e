"""Tests that cannot leak: one way to change process-wide settings in a test, and a guard that
fails the test that leaves one changed.

A test that sets ``APSFAST_BACKEND``, the float32 matmul precision, a cuda/cudnn/oneDNN flag or
the thread count does it through the ``scoped`` fixture (:class:`Scoped`), which puts every
change back at teardown — each one, even when putting back another raised. The autouse
``settings_guard`` fixture takes a snapshot of those settings before every test and compares
after all of the test's fixtures are torn down: a test that left one changed fails at teardown,
naming the setting, its value and the value it had; the guard then restores it so that the
next test starts clean. (A leaked ``APSFAST_BACKEND`` once sent a worker's later tests onto
the Triton interpreter, where they ran ten times slower and on the wrong backend.)

``conftest.py`` imports the fixtures from here; ``test_guard.py`` runs the guard on a leaking
test in a pytester subprocess.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest
import torch

_MISSING = object()
_BACKENDS = torch.backends


def _env(name: str) -> Callable[[], Any]:
    return lambda: os.environ.get(name)


def _set_env(name: str) -> Callable[[Any], None]:
    def put(value: Any) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return put


def _attribute(obj: Any, name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    return (lambda: getattr(obj, name)), (lambda value: setattr(obj, name, value))


def _matmul_precision() -> Any:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # set through the per-backend API to a mix the global getter cannot read
        return None


def _set_matmul_precision(value: Any) -> None:
    if value is not None:
        torch.set_float32_matmul_precision(value)


# Every process-wide setting a test might change, as name -> (read, write), restored in this
# order: the global matmul precision before the per-backend ones it writes, which then get
# their own saved values back.
GUARDED: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "APSFAST_BACKEND": (_env("APSFAST_BACKEND"), _set_env("APSFAST_BACKEND")),
    "torch.get_float32_matmul_precision()": (_matmul_precision, _set_matmul_precision),
    "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.are_deterministic_algorithms_enabled()": (torch.are_deterministic_algorithms_enabled,
                                                     torch.use_deterministic_algorithms),
    **{f"torch.backends.{path}.{flag}": _attribute(module, flag) for path, module, flags in (
        ("cuda.matmul", _BACKENDS.cuda.matmul, ("fp32_precision", "allow_fp16_reduced_precision_reduction",
                                                "allow_bf16_reduced_precision_reduction")),
        ("cudnn", _BACKENDS.cudnn, ("enabled", "benchmark", "deterministic")),
        ("cudnn.conv", _BACKENDS.cudnn.conv, ("fp32_precision",)),
        ("mkldnn", _BACKENDS.mkldnn, ("enabled",)),
        ("mkldnn.matmul", _BACKENDS.mkldnn.matmul, ("fp32_precision",)),
    ) for flag in flags},
}


# What torch.set_float32_matmul_precision writes: the global knob and the per-backend settings.
MATMUL_PRECISION = ("torch.get_float32_matmul_precision()", "torch.backends.cuda.matmul.fp32_precision",
                    "torch.backends.mkldnn.matmul.fp32_precision")


def snapshot() -> dict[str, Any]:
    """The value of every guarded setting now."""
    return {name: read() for name, (read, _) in GUARDED.items()}


def restore(saved: dict[str, Any]) -> list[str]:
    """Put back every setting that differs from ``saved``; the descriptions of those that did,
    with the values found."""
    found = snapshot()
    changed = [f"{name} = {found[name]!r} (was {value!r})" for name, value in saved.items() if found[name] != value]
    for name, value in saved.items():
        read, write = GUARDED[name]
        if read() != value:  # an earlier write (the global precision) may have put it back
            write(value)
    return changed


class Scoped:
    """Changes made for one test, each put back at teardown even when another's undo raises.

    Unlike ``monkeypatch.setattr``, an attribute is put back by assignment, never deleted: the
    torch.backends flags are properties of module objects, which ``delattr`` cannot remove.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setenv(self, name: str, value: str) -> None:
        self._undo.append(lambda before=os.environ.get(name): _set_env(name)(before))
        os.environ[name] = value

    def delenv(self, name: str) -> None:
        self._undo.append(lambda before=os.environ.get(name): _set_env(name)(before))
        os.environ.pop(name, None)

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        before = getattr(obj, name, _MISSING)
        self._undo.append(lambda: delattr(obj, name) if before is _MISSING else setattr(obj, name, before))
        setattr(obj, name, value)

    def set_num_threads(self, threads: int) -> None:
        self._undo.append(lambda before=torch.get_num_threads(): torch.set_num_threads(before))
        torch.set_num_threads(threads)

    def keep(self, *names: str) -> None:
        """Put the guarded settings ``names`` back as they are now, whatever the test sets them to
        (e.g. :data:`MATMUL_PRECISION` around ``torch.set_float32_matmul_precision``)."""
        saved = {name: GUARDED[name][0]() for name in names}
        self._undo.append(lambda: restore(saved))

    def undo(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as error:  # keep undoing the rest; report the first afterwards
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
def scoped() -> Iterator[Scoped]:
    """The one way a test changes an environment variable or a torch flag: undone at teardown."""
    changes = Scoped()
    yield changes
    changes.undo()


@pytest.fixture(autouse=True)
def settings_guard(request) -> Iterator[None]:
    """Fail the test that leaves a guarded setting changed (autouse fixtures are set up first,
    so this runs after every other fixture of the test has been torn down)."""
    saved = snapshot()
    yield
    changed = restore(saved)
    if changed:
        pytest.fail(f"{request.node.nodeid} left process-wide settings changed (change them through "
                    f"the `scoped` fixture): {'; '.join(changed)}", pytrace=False)
