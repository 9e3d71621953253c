"""Progress of an ingest's first pass, file by file: a tqdm bar on stderr with rows, rows/s and ETA.

The bar's total is the inputs' size on disk; it advances by a file's size when that file is done, so
the ETA is per file (24 days of Criteo 1TB: one step per day), while rows and rows/s update with every
block. Shown on an interactive stderr by default; ``progress=True`` forces it (e.g. into a log file),
``False`` turns it off.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def progress_wanted(progress: bool | None, quiet: bool) -> bool:
    if progress is not None:
        return progress
    return not quiet and sys.stderr.isatty()


class FileProgress:
    """Per-file progress of reading ``inputs`` (a no-op when not ``enabled``)."""

    def __init__(self, inputs: list[Path], enabled: bool) -> None:
        self.inputs = inputs
        self.rows = 0
        self.started = time.monotonic()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            total = sum(p.stat().st_size for p in inputs)
            self._bar = tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, desc="ingest: read",
                             mininterval=0.5, dynamic_ncols=True)

    def start_file(self, index: int) -> None:
        if self._bar is not None:
            self._bar.set_description(f"ingest: {self.inputs[index].name} ({index + 1}/{len(self.inputs)})")

    def rows_done(self, rows: int) -> None:
        self.rows += rows
        if self._bar is not None:
            rate = self.rows / max(time.monotonic() - self.started, 1e-9)
            self._bar.set_postfix_str(f"{self.rows:,} rows, {rate:,.0f} rows/s", refresh=False)

    def file_done(self, index: int, resumed: bool = False) -> None:
        if self._bar is not None:
            if resumed:
                self._bar.write(f"ingest: {self.inputs[index].name}: finished by an earlier run, reused",
                                file=sys.stderr)
            self._bar.update(self.inputs[index].stat().st_size)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
