"""The settings guard of ``guard.py``: a test that leaks a process-wide setting fails, names it,
and the tests after it start clean; ``scoped`` undoes every change even when one undo raises."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guard import Scoped, snapshot

TESTS = Path(__file__).resolve().parent

LEAKING_TESTS = '''
import os
import torch

def test_leaks_the_backend():
    os.environ["APSFAST_BACKEND"] = "triton"

def test_leaks_the_matmul_precision():
    torch.set_float32_matmul_precision("medium")

def test_after_the_leaks_everything_is_back():
    assert "APSFAST_BACKEND" not in os.environ
    assert torch.get_float32_matmul_precision() == "highest"

def test_scoped_changes_are_put_back(scoped):
    scoped.setenv("APSFAST_BACKEND", "cpu")
    scoped.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    scoped.set_num_threads(1)
'''


def test_a_leaked_setting_fails_the_test_that_leaked_it(pytester, scoped):
    pytester.makeconftest(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                          "from guard import scoped, settings_guard\n")
    pytester.makepyfile(test_leaky=LEAKING_TESTS)
    scoped.delenv("APSFAST_BACKEND")  # the subprocess starts from this environment
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=4, errors=2)
    out = result.stdout.str()
    assert "test_leaks_the_backend left process-wide settings changed" in out
    assert "APSFAST_BACKEND = 'triton' (was None)" in out
    assert "test_leaks_the_matmul_precision left process-wide settings changed" in out
    assert "torch.get_float32_matmul_precision() = 'medium' (was 'highest')" in out
    assert "test_scoped_changes_are_put_back left" not in out


def test_scoped_undoes_the_rest_when_one_undo_raises():
    class Refuses:
        value = 1

        def __setattr__(self, name, value):
            if getattr(self, "armed", False):
                raise RuntimeError("cannot put back")
            object.__setattr__(self, name, value)

    before, obj, changes = snapshot(), Refuses(), Scoped()
    changes.setenv("APSFAST_BACKEND", "reference")
    changes.setattr(obj, "value", 2)
    changes.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction",
                    not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    object.__setattr__(obj, "armed", True)
    with pytest.raises(RuntimeError, match="cannot put back"):
        changes.undo()
    assert snapshot() == before  # the environment and the flag, undone after the failing one
