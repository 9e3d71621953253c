"""Per-file checkpoints of an ingest's first pass, so that a killed run restarts from the last
finished file (``ctr-ad ingest --resume``), not from zero.

The work directory ``.<out>.ingest-resume`` sits beside the output and, unlike the staging
directory, survives a kill. It holds one folder per input file with that file's spilled blocks, its
quarantined lines and the statistics of its training rows, and a ``done.json`` marker written last
(atomically) that names the file's size and modification time. A rerun reuses a file's folder only
when its marker is there and the run key matches: the key covers the version, the source, every
option that changes the outputs, the block size and every input's path, size and mtime (a sequential
split's line positions depend on all files), so reused results are exactly what a fresh run would
compute and the output is byte-identical. Another key wipes the directory and starts over.

The second pass consumes (deletes) a file's spills; its marker is removed first, so a kill during
that pass redoes only the files whose spills were already consumed. The directory is removed when the
run succeeds. One ingest at a time may use it (an advisory lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctr_ad import __version__
from ctr_ad.errors import UserError
from ctr_ad.files import atomic_write_text

WORK_SUFFIX = ".ingest-resume"
MARKER = "done.json"
RESULT = "result.pkl"
STATISTICS = "statistics.pkl"
KEY_FILE = "key.json"


@dataclass
class FileResult:
    """The first pass over one input file, in block order."""

    spills: list[str] = field(default_factory=list)
    # Where the file's per-block FeatureProcessor.fit_statistics are kept for a resumed run (a pickle
    # stream, one record per block; "" without --resume). They are fitted as they arrive, never held
    # for the whole file: on one large file that list grew with its size (peak RSS 1.84x from 1M to 5M rows).
    statistics: str = ""
    per_split: list[int] = field(default_factory=lambda: [0, 0, 0])
    rows_read: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)  # the first few quarantined lines
    quarantine: str = ""  # path of this file's quarantine.jsonl part


class StatisticsLog:
    """Appends one file's block statistics to its checkpoint folder as they arrive (fsynced on close,
    before the file's marker is written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close()

    def append(self, statistics: Any) -> None:
        pickle.dump(statistics, self._fh, protocol=pickle.HIGHEST_PROTOCOL)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


def file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_key(inputs: list[Path], settings: dict[str, Any]) -> str:
    """What reused checkpoints must share with this run (see the module docstring)."""
    doc = {"ctr_ad": __version__, "settings": settings, "inputs": [file_identity(p) for p in inputs]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def work_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}{WORK_SUFFIX}")


class FileCheckpoints:
    """The work directory of one resumable ingest of ``inputs`` into ``out``."""

    def __init__(self, out: Path, inputs: list[Path], key: str) -> None:
        self.root = work_dir(out)
        self.inputs = inputs
        self.key = key
        self.root.mkdir(exist_ok=True)
        self._lock = open(self.root / "lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UserError(f"{self.root}: another ingest into {out} is running (--resume)") from None
        key_file = self.root / KEY_FILE
        old = json.loads(key_file.read_text()) if key_file.exists() else None
        if old != key:  # other inputs or options: nothing here can be reused
            for child in self.root.iterdir():
                if child.name != "lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            atomic_write_text(key_file, json.dumps(key) + "\n")

    def folder(self, index: int) -> Path:
        return self.root / f"file-{index:05d}"

    def fresh_folder(self, index: int) -> Path:
        """An empty folder for file ``index`` (a partial one from a killed run is discarded)."""
        folder = self.folder(index)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        return folder

    def load(self, index: int) -> FileResult | None:
        """File ``index``'s finished first pass, or None when it must be (re)done."""
        folder = self.folder(index)
        try:
            marker = json.loads((folder / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if marker != {"key": self.key, **file_identity(self.inputs[index])}:
            return None
        with open(folder / RESULT, "rb") as fh:
            result: FileResult = pickle.load(fh)  # written by this module, for this key
        if not isinstance(result.statistics, str):  # a checkpoint from before statistics.pkl: redo the file
            return None
        if not all(os.path.exists(s) for s in [*result.spills, result.quarantine, result.statistics]):
            return None
        return result

    @staticmethod
    def statistics(result: FileResult) -> Iterator[Any]:
        """A finished file's block statistics, in block order, read one at a time."""
        with open(result.statistics, "rb") as fh:
            while True:
                try:
                    yield pickle.load(fh)  # written by StatisticsLog for this key
                except EOFError:
                    return

    def save(self, index: int, result: FileResult) -> None:
        """Record file ``index`` as finished: the result first, the marker last."""
        folder = self.folder(index)
        tmp = folder / (RESULT + ".tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / RESULT)
        atomic_write_text(folder / MARKER, json.dumps({"key": self.key, **file_identity(self.inputs[index])}))

    def invalidate(self, index: int) -> None:
        """File ``index``'s spills are about to be consumed: it no longer counts as finished."""
        (self.folder(index) / MARKER).unlink(missing_ok=True)

    def close(self, success: bool) -> None:
        if success:
            shutil.rmtree(self.root, ignore_errors=True)
        self._lock.close()
