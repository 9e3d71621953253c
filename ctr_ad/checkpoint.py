"""Training checkpoints: one file that a kill cannot half-write, a flipped bit cannot slip through,
and a tampered run directory cannot use to run code.

File layout (``RUN_DIR/checkpoint.pt``)::

    b"CTR-AD-CHECKPOINT 1\\n" <64 hex digits: SHA-256 of the payload> b"\\n" <payload: torch.save bytes>

The payload is loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples
and dicts only, so unpickling cannot call arbitrary code. The checksum is verified before that, so a
truncated, corrupted or edited file is refused with a message naming it instead of resuming from
silently different weights.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any

import torch

from ctr_ad.errors import UserError
from ctr_ad.files import atomic_write_with

MAGIC = b"CTR-AD-CHECKPOINT 1\n"
FORMAT = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted: missing header, bad checksum, unreadable payload."""


def save(path: Path, payload: dict[str, Any]) -> None:
    """Serialise ``payload`` and write it atomically with its checksum."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()

    def write(fh: Any) -> None:
        fh.write(MAGIC)
        fh.write(digest + b"\n")
        fh.write(data)

    atomic_write_with(path, write)


def load(path: Path) -> dict[str, Any]:
    """Read, verify and safely unpickle a checkpoint written by :func:`save`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
    header_len = len(MAGIC) + 65
    if not raw.startswith(MAGIC) or len(raw) < header_len:
        raise CheckpointError(
            f"{path}: not a ctr-ad checkpoint (empty, truncated, or written by another program); "
            "delete it to start fresh"
        )
    digest, payload = raw[len(MAGIC) : header_len - 1], raw[header_len:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path}: checksum mismatch — the checkpoint is damaged or was modified")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler's refusal of a forbidden type, or a damaged payload
        raise CheckpointError(f"{path}: unreadable checkpoint payload ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return state


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator a training step draws from (dropout, Python's ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_python_state(state: Any) -> tuple[Any, ...]:
    # random.setstate wants (version, tuple of ints, gauss) exactly as getstate returned it.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
