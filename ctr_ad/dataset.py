"""Checking an ingested data directory before anything reads it.

``ctr-ad ingest`` publishes a dataset as a whole, ``manifest.json`` last, and the manifest lists the
SHA-256 of every output file. :func:`verify_data_dir` refuses a directory whose manifest is missing
(an interrupted or hand-made dataset) or whose files do not match it (modified, truncated, or mixed
from two runs), so training and scoring never read half of one dataset and half of another.
"""

from __future__ import annotations

from pathlib import Path

from ctr_ad.artifacts import DatasetManifest, read_manifest
from ctr_ad.errors import UserError
from ctr_ad.hashing import sha256_file
from ctr_ad.layout import DataDir

REINGEST = "re-run `ctr-ad ingest` to rebuild it"

# An experiment verifies its dataset once and then every replica's training does again: hash each file
# once per process while its size and modification time stay the same.
_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def verify_data_dir(data_dir: str | Path) -> DatasetManifest:
    """The manifest of ``data_dir`` once every file it lists matches its SHA-256; UserError naming
    the file otherwise. A file is hashed again only when its size or modification time changed."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"{root}: data directory not found (run `ctr-ad ingest` first)")
    layout = DataDir(root)
    if not layout.manifest.is_file():
        raise UserError(f"{layout.manifest}: missing; {root} is not a complete ingested dataset "
                        f"(interrupted or hand-made): {REINGEST}")
    manifest = read_manifest(root)
    if not manifest.outputs:
        raise UserError(f"{layout.manifest}: lists no output files; {REINGEST}")
    expected = dict(manifest.outputs)
    quarantine_sha = getattr(manifest, "quarantine_sha256", None)  # written since the atomic publish
    if isinstance(quarantine_sha, str):
        expected[layout.quarantine.name] = quarantine_sha
    for name, sha in expected.items():
        path = root / name
        if Path(name).name != name:
            raise UserError(f"{layout.manifest}: output name {name!r} is not a file name")
        if not path.is_file():
            raise UserError(f"{path}: listed in {layout.manifest.name} but missing; {REINGEST}")
        if _file_sha256(path) != sha:
            raise UserError(f"{path}: does not match its SHA-256 in {layout.manifest.name} (modified, "
                            f"truncated or from another run); {REINGEST}")
    return manifest
