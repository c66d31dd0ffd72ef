"""The soup and ensemble commands answer --help and argument errors without importing torch, MONAI or Lightning
(the cases of tests/test_packaging.py's check for these three commands, runnable on their own)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Importing any of these raises: a command that needs them before parsing fails the test.
BLOCK = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in ('torch', 'monai', 'pytorch_lightning', 'lightning'):\n"
         "            raise ImportError(f'{name} is blocked in this test')\n"
         "sys.meta_path.insert(0, Block())\n")
COMMANDS = ("souping/greedy.py", "souping/uniform.py", "ensembling/cli.py")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    code = BLOCK + f"sys.argv = [{script!r}, *{list(args)!r}]\nimport runpy\nrunpy.run_path({script!r}, run_name='__main__')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", COMMANDS)
def test_help_without_torch(script):
    result = _run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--allow-seen-test-cases" in result.stdout


@pytest.mark.parametrize("script, args, message", [
    ("souping/greedy.py", ["--out", "s.ckpt"], "--ckpts"),
    ("souping/greedy.py", ["--ckpts", "no-such-dir", "--out", "s.ckpt"], "not a directory"),
    ("souping/uniform.py", ["--ckpts", ".", "--out", "s.ckpt", "--fold", "1", "--test-fold", "1"], "--test-fold"),
    ("ensembling/cli.py", ["--models", "a.ckpt", "--fold", "0", "--out", "x"], "options of --fit"),
    ("ensembling/cli.py", ["--models", "a.ckpt", "--fit", "--out", "x"], "--datalist"),
])
def test_argument_errors_without_torch(script, args, message):
    result = _run(script, *args)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()) and "blocked" not in result.stderr
