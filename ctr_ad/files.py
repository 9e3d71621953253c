"""Writing artifact files safely: a reader sees the old file or the new one, never half of one.

Every file another process may read while we write it (manifests, results, checkpoints, the published
pointer) goes through these helpers: write a sibling temporary file, flush and fsync it, rename it over
the target. ``utc_timestamp`` is the one format for times recorded in those files.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def utc_timestamp(when: float | None = None) -> str:
    """ISO-8601 UTC to the second (``2026-11-26T21:10:57Z``); ``when`` is a POSIX time, None = now."""
    moment = _dt.datetime.now(_dt.UTC) if when is None else _dt.datetime.fromtimestamp(when, _dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def atomic_write_with(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(binary file)`` on a temporary sibling, fsync it and rename it onto ``path``."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with tmp.open("wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """JSON with ``allow_nan=False``: a bare ``NaN`` is not JSON and breaks strict readers; callers
    turn non-finite numbers into ``null`` first (see :func:`finite_or_none`)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def finite_or_none(obj: Any) -> Any:
    """A copy of a JSON-able structure with every NaN/±inf float replaced by None."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def replace_dir(staged: Path, target: Path) -> None:
    """Swap a fully written directory ``staged`` into place at ``target`` (an old ``target`` is removed).

    The rename of a directory over a non-empty one is not atomic on POSIX, so the old tree is first
    renamed aside; a crash between the two renames leaves ``target`` missing (never mixed), and the
    aside copy is removed on the next call.
    """
    aside = target.with_name(target.name + ".old")
    if aside.exists():
        shutil.rmtree(aside)
    if target.exists():
        os.replace(target, aside)
    os.replace(staged, target)
    if aside.exists():
        shutil.rmtree(aside)
