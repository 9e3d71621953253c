"""The Makefile's install path, run for real through make and the shell, with stand-ins for python and pip.

The stand-in ``python3`` answers ``-m venv DIR`` by creating ``DIR/bin/python`` as a copy of itself; every
call of either records its argument vector, so the test sees exactly what pip would have been given,
without a network or a real virtual environment.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The Makefile's variables come from the command line only, whatever the caller's environment holds.
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "VENV", "PYTHON", "MAKEFLAGS", "MFLAGS")}
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")

STAND_IN = """#!{python}
import json, os, shutil, sys
from pathlib import Path
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["-m", "venv"]:
    (Path(sys.argv[3]) / "bin").mkdir(parents=True)
    shutil.copy(__file__, Path(sys.argv[3]) / "bin" / "python")
"""


def make_venv(tmp_path: Path, *overrides: str) -> list[list[str]]:
    """Run ``make venv`` with the stand-in python; the argument vectors of its pip calls."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "python3"
    fake.write_text(STAND_IN.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    proc = subprocess.run(
        ["make", "-C", str(REPO), "venv", f"PYTHON={fake}", f"VENV={venv}", *overrides],
        capture_output=True,
        text=True,
        timeout=60,
        env=MAKE_ENV,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (venv / ".installed").is_file()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0] == ["-m", "venv", str(venv)]
    return [c for c in calls if c[:2] == ["-m", "pip"]]


def test_default_torch_spec_installs_the_cpu_build(tmp_path: Path) -> None:
    pip = make_venv(tmp_path)
    assert ["-m", "pip", "install", "-q", "torch==2.13.0"] in pip
    # The optional extras the tests exercise (ONNX, MLflow, Ray) are installed too, so their tests run in CI.
    assert pip[-1] == ["-m", "pip", "install", "-q", "-e", ".[dev,bench,onnx,mlflow,ray]"]


def test_torch_spec_with_an_index_option_reaches_pip_as_separate_arguments(tmp_path: Path) -> None:
    # The README's CUDA recipe: a requirement and a pip option in one variable.
    spec = "torch==2.13.0 --index-url https://example.invalid/simple"
    pip = make_venv(tmp_path, f"TORCH_SPEC={spec}")
    torch_calls = [c for c in pip if any(a.startswith("torch") for a in c)]
    assert torch_calls == [
        ["-m", "pip", "install", "-q", "torch==2.13.0", "--index-url", "https://example.invalid/simple"]
    ]


def test_make_test_prints_the_slowest_tests(tmp_path: Path) -> None:
    # CI runs `make test`: its output must carry the per-test durations (issue: keep the suite under 15 min).
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # newer than pyproject.toml: make does not rebuild it
    proc = subprocess.run(
        ["make", "-C", str(REPO), "-n", "test", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=MAKE_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    pytest_lines = [shlex.split(line) for line in proc.stdout.splitlines() if " -m pytest " in line]
    assert len(pytest_lines) == 1
    assert pytest_lines[0][:3] == [f"{venv}/bin/python", "-m", "pytest"] and "--durations=15" in pytest_lines[0]
