"""Helpers shared by the benchmarks: machine description, measured subprocess runs, medians, JSON, tables.

Kept free of anything ingest/train/serve specific so every ``bench_*.py`` can import it. The
benchmarks are run as scripts (``python benchmarks/bench_x.py``), so this module is imported as
``common`` from the script's own directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() is empty on most Linux builds)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """What a reader needs to compare numbers across machines."""
    vm = psutil.virtual_memory()
    try:
        usable = len(os.sched_getaffinity(0))  # a container may be pinned to fewer cores than exist
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": usable,
        "ram_gib": round(vm.total / 1024**3, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {p: package_version(p) for p in packages},
    }


def utc_timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------- measuring
@dataclass
class Measurement:
    """One run of a command: wall time and peak resident memory of its process tree."""

    wall_s: float
    #: Highest sum of RSS over the process and all its descendants, sampled every ``poll_s``.
    peak_tree_rss_bytes: int
    #: Highest per-process kernel high-water mark (``VmHWM``) seen in the tree: catches a spike between
    #: two samples, but is one process's peak, not a sum.
    max_process_hwm_bytes: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def peak_rss_bytes(self) -> int:
        """Best estimate of the tree's peak (a lower bound of it; exact for a single process)."""
        return max(self.peak_tree_rss_bytes, self.max_process_hwm_bytes)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("stdout")
        d.pop("stderr")
        d["peak_rss_bytes"] = self.peak_rss_bytes
        return d


def _vm_hwm(pid: int) -> int:
    """The kernel's peak RSS of ``pid`` since its last exec (0 if gone or not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


#: How often the list of a measured command's descendants is refreshed. Listing them scans every
#: process in /proc (2.9 ms a call here): done at every 20 ms sample it took 13 % of a core, a share
#: that a command busy on both cores of a 2-core machine loses to the sampler and a single-threaded
#: one (the pandas baseline) does not. Reading the RSS of the processes already known is cheap.
CHILDREN_REFRESH_S = 0.5


def _sample_tree(procs: list[psutil.Process], hwm: dict[int, int]) -> int:
    """Summed RSS of ``procs`` now; updates each process's high-water mark."""
    total = 0
    for p in procs:
        # A worker may exit between listing and reading: it holds no memory any more.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
        hwm[p.pid] = max(hwm.get(p.pid, 0), _vm_hwm(p.pid))
    return total


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_measured(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 poll_s: float = 0.02, timeout_s: float | None = None) -> Measurement:
    """Run ``cmd`` to completion, sampling the RSS of its whole process tree every ``poll_s`` seconds
    (the tree itself is listed again every ``CHILDREN_REFRESH_S``: a child that lives less than that
    can be missed by the sum, not by the command's own high-water mark).

    Output goes to temporary files rather than pipes so a chatty child can never block on a full pipe
    while we are busy sampling. We do not use ``ru_maxrss`` from ``wait4``/``RUSAGE_CHILDREN``: Linux
    carries the parent's high-water mark into a forked child across exec, so it would report this
    driver's own RSS for any child smaller than the driver.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        popen = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=err)
        proc = psutil.Process(popen.pid)
        peak = 0
        hwm: dict[int, int] = {}
        procs: list[psutil.Process] = []
        listed_at = -float("inf")
        while popen.poll() is None:
            now = time.perf_counter()
            if now - listed_at >= CHILDREN_REFRESH_S:
                procs, listed_at = _tree(proc), now
            peak = max(peak, _sample_tree(procs, hwm))
            if timeout_s is not None and now - start > timeout_s:
                for child in proc.children(recursive=True):
                    child.kill()
                popen.kill()
                popen.wait()
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Measurement(
            wall_s=wall,
            peak_tree_rss_bytes=peak,
            max_process_hwm_bytes=max(hwm.values(), default=0),
            returncode=popen.returncode,
            stdout=out.read(),
            stderr=err.read(),
        )


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def spread(values: Iterable[float]) -> dict[str, float]:
    """min / median / max of repeated measurements (what every benchmark stores, not just the median)."""
    v = [float(x) for x in values]
    return {"min": min(v), "median": float(statistics.median(v)), "max": max(v), "n": len(v)}


def interleaved_windows(variants: dict[str, Callable[[int], float]], warmup: Callable[[str], None],
                        rounds: int) -> dict[str, list[float]]:
    """Run every variant's timing window once per round, round-robin, rotating the order each round.

    ``warmup(name)`` is called for every variant (same order) before the first round, outside any
    timed window. ``variants[name](round)`` runs one timed window and returns its figure. Rotating the
    order means no variant always runs first (cold caches) or last (after the others heated the CPU),
    and a slow phase of a shared machine hits every variant alike instead of one variant's windows.
    """
    names = list(variants)
    for name in names:
        warmup(name)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            out[name].append(variants[name](r))
    return out


# --------------------------------------------------------------------------------------- output
def write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically, so an interrupted benchmark never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(r, widths, numeric, strict=True)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
