"""One file, one module object: from a checkout, ``import <folder>.x`` and ``import brats_ugrip.<folder>.x`` give
the same module, whichever is imported first, for every folder of the design (a class, an enum, a patch or an
``isinstance`` seen through one name is the same through the other). Each case runs in a fresh interpreter, so
nothing imported by the test session decides the answer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = {  # a module of each folder that imports without torch or a scheduler
    "sweeps": "run_ids", "slurm": "sacct", "souping": "soup_cli", "ensembling": "spec", "synthetic": "anatomy",
    "mlcube": "schema", "tools": "make_datalist", "bench": "halving",
}

PROBE = r'''
import importlib, sys
folder, name, first = sys.argv[1], sys.argv[2], sys.argv[3]
order = [f"{folder}.{name}", f"brats_ugrip.{folder}.{name}"]
if first == "brats_ugrip":
    order.reverse()
a, b = (importlib.import_module(m) for m in order)
assert a is b, (a, b)
assert sys.modules[folder] is sys.modules[f"brats_ugrip.{folder}"]
assert a.__spec__.name == f"brats_ugrip.{folder}.{name}", a.__spec__.name
print("same")
'''


@pytest.mark.parametrize("first", ["top-level", "brats_ugrip"])
@pytest.mark.parametrize("folder", sorted(MODULES))
def test_a_file_is_one_module_under_both_names(folder, first):
    result = subprocess.run([sys.executable, "-c", PROBE, folder, MODULES[folder], first], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stderr


def test_a_class_is_the_same_class_under_both_names():
    """The issue's own case: a soup step built through one name is an instance of the class seen through the other."""
    probe = ("import souping.soups as a, brats_ugrip.souping.soups as b; "
             "print(a is b, a.GreedyStep is b.GreedyStep)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "True"], result.stderr
