"""Processes and scratch space of an ingest that must not outlive it, even after ``kill -9``.

* Worker processes die with their parent: on Linux the kernel sends them SIGKILL when the parent
  dies (``prctl(PR_SET_PDEATHSIG)``), and a watchdog thread in each worker exits when its parent pid
  changes (other platforms, or a parent that died before the ``prctl``). With the workers gone, the
  multiprocessing resource tracker sees its pipe close and exits too.
* The staging directory (spills and the outputs being written) is removed by a tiny janitor process
  that waits on a pipe from the ingest: when the ingest ends, however it ends, the pipe closes and the
  janitor removes whatever is left. A later run also removes stale staging directories on start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
WATCHDOG_PERIOD_S = 0.5
STAGING_INFIX = ".ingest-tmp-"

_JANITOR = (
    "import shutil, sys\n"
    "sys.stdin.buffer.read()\n"  # returns at EOF: the ingest closed the pipe or died
    "shutil.rmtree(sys.argv[1], ignore_errors=True)\n"
)


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` (its parent) dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def worker_init(parent_pid: int) -> None:
    """Initializer of ingest worker processes."""
    # Worker processes split the cores between them: one polars thread each avoids oversubscription.
    os.environ["POLARS_MAX_THREADS"] = "1"
    die_with_parent(parent_pid)


def staging_dir(out: Path) -> Path:
    """This process's staging directory for ``out``: a hidden sibling, so the final swap is a rename."""
    return out.with_name(f".{out.name}{STAGING_INFIX}{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging directories of ``out`` left by ingests that no longer run (and the spill
    directory ``out/.ingest-tmp`` of older versions); returns what was removed."""
    removed = []
    legacy = out / ".ingest-tmp"
    if legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)
        removed.append(legacy)
    if out.parent.is_dir():
        prefix = f".{out.name}{STAGING_INFIX}"
        for path in out.parent.iterdir():
            pid = path.name[len(prefix):]
            if path.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


class Janitor:
    """Removes ``path`` when this process ends, normally or not (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen | None = None
        with contextlib.suppress(OSError):
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _JANITOR, str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of the terminal reaches the ingest, not the janitor
            )

    def close(self) -> None:
        """Remove the directory now and let the janitor exit."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            self._proc = None
