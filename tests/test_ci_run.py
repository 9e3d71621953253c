""".ci/run, run by bash with stand-ins for apt-get, chromium and make: a failed browser install stops CI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("dirname") is None, reason="no bash")


def run_ci(tmp_path: Path, apt_rc: int, apt_installs: bool = True, chromium: bool = False) -> tuple[int, str]:
    """Run a copy of .ci/run with only the stand-ins (and dirname) on PATH; (exit code, calls logged)."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls.log"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    stand_ins = {
        "apt-get": f'echo "apt-get $*" >> {log}\n'
        + (f'[ "$1" = install ] && printf "#!/bin/sh\\n" > {bin_dir}/chromium && chmod +x {bin_dir}/chromium\n'
           if apt_installs else "")
        + f"exit {apt_rc}\n",
        "make": f'echo "make $* CI=$CI" >> {log}\n',
    }
    if chromium:
        stand_ins["chromium"] = "exit 0\n"
    for name, body in stand_ins.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    bash = shutil.which("bash")
    assert bash
    proc = subprocess.run(
        [bash, str(repo / ".ci" / "run")], env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=30
    )
    return proc.returncode, log.read_text() if log.exists() else ""



def test_a_failed_chromium_install_fails_ci_before_the_tests(tmp_path: Path) -> None:
    rc, calls = run_ci(tmp_path, apt_rc=100)
    assert rc != 0
    assert "apt-get" in calls and "make" not in calls


def test_an_install_without_a_chromium_command_fails_ci(tmp_path: Path) -> None:
    rc, calls = run_ci(tmp_path, apt_rc=0, apt_installs=False)
    assert rc != 0 and "make" not in calls


def test_ci_installs_chromium_then_runs_the_tests_with_ci_set(tmp_path: Path) -> None:
    rc, calls = run_ci(tmp_path, apt_rc=0)
    assert rc == 0
    assert calls.splitlines()[-1] == "make test CI=true"


def test_ci_uses_an_installed_chromium_without_apt(tmp_path: Path) -> None:
    rc, calls = run_ci(tmp_path, apt_rc=100, chromium=True)
    assert rc == 0 and calls == "make test CI=true\n"
