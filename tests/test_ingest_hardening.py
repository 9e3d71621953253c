"""Ingest under hostile input and crashes (issue 9): bad lines, failed reruns, kill -9, disk errors."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctr_ad.dataset import verify_data_dir
from ctr_ad.errors import UserError
from ctr_ad.features import FeatureProcessor
from ctr_ad.ingest.reader import LABEL_STRIP, parse_block, resolve_layout
from ctr_ad.ingest.run import run_ingest
from ctr_ad.schema import CRITEO, CRITEO_CATEGORICAL, CRITEO_DENSE

REPO = Path(__file__).resolve().parents[1]
CRITEO_DIR = REPO / "data" / "criteo-kaggle-8k"
TRAIN = CRITEO_DIR / "train.tsv"
OUTPUTS = ("train.parquet", "valid.parquet", "test.parquet", "features.json", "quarantine.jsonl")
REAL_LINES = TRAIN.read_bytes().split(b"\n")[:-1]


def ingest(inputs, out, source="criteo", **kw):
    return run_ingest([Path(p) for p in inputs], source, Path(out), quiet=True, **kw)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ctr_ad.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [x for x in r.stderr.strip().splitlines() if not x.startswith("[ingest] ")]  # progress info
    assert len(errors) == 1 and errors[0].startswith("ctr-ad "), r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ------------------------------------------------------------------------------ item 1: labels
def test_label_with_a_space_is_parsed_never_a_null_label(tmp_path):
    lines = TRAIN.read_bytes().split(b"\n")
    fields = lines[99].split(b"\t")  # line 100, as in the issue
    assert fields[0] in (b"0", b"1")
    lines[99] = b"\t".join([fields[0] + b" ", *fields[1:]])
    path = tmp_path / "space.tsv"
    path.write_bytes(b"\n".join(lines))
    m = ingest([path], tmp_path / "out")
    assert m["rows"] == {"read": 7200, "written": 7200, "quarantined": 0}
    splits = ("train", "valid", "test")
    labels = pl.concat([pl.read_parquet(tmp_path / "out" / f"{s}.parquet")["label"] for s in splits])
    assert labels.null_count() == 0 and set(labels.unique().to_list()) == {0.0, 1.0}
    clean = ingest([TRAIN], tmp_path / "clean")
    for name in OUTPUTS:  # " 0" means 0: the dataset equals the clean one
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert m["fingerprint"] == clean["fingerprint"]


INT_RE = re.compile(r"[+-]?[0-9]+")


def reference_parse(line: bytes) -> tuple | None:
    """What a Criteo TSV line means, written independently of the reader: None = quarantined."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.rstrip("\r")
    if text == "":
        return None
    fields = text.split("\t")
    if not 15 <= len(fields) <= 40:
        return None
    values = [f if f != "" else None for f in fields] + [None] * (40 - len(fields))
    if values[0] is None or values[0].strip(LABEL_STRIP) not in ("0", "1"):
        return None
    label = float(values[0].strip(LABEL_STRIP))
    dense = []
    for v in values[1:14]:
        if v is None:
            dense.append(None)
        elif INT_RE.fullmatch(v) and -(2**63) <= int(v) < 2**63:
            dense.append(float(int(v)))
        else:
            return None
    return (label, *dense, *values[14:])


FIELD_VALUES = [b" 0", b"0 ", b" 1 ", b"1\x0b", b"+1", b"-1", b"-0", b"00", b"1e3", b"1.0", b".5", b"", b"\t",
                b"nan", b"inf", b"-", b"+", b" ", b"9" * 19, b"9" * 20, b"\xef\xbb\xbf1", b"\xc3\xa9", b"a b"]


@st.composite
def corrupted_line(draw) -> bytes:
    line = draw(st.sampled_from(REAL_LINES[:500]))
    for _ in range(draw(st.integers(0, 3))):
        fields = line.split(b"\t")
        kind = draw(st.sampled_from(["field", "label", "bytes", "tab", "drop-tab", "truncate", "cr", "empty"]))
        i = draw(st.integers(0, len(fields) - 1))
        if kind == "field":
            fields[i] = draw(st.sampled_from(FIELD_VALUES))
        elif kind == "label":
            fields[0] = draw(st.sampled_from([b" ", b"", b"\x0c", b"\xc2\xa0"])) + fields[0] + draw(
                st.sampled_from([b" ", b"", b"  ", b"\r"]))
        elif kind == "bytes":
            pos = draw(st.integers(0, len(fields[i])))
            fields[i] = fields[i][:pos] + draw(st.binary(min_size=1, max_size=3)).replace(b"\n", b"") + fields[i][pos:]
        elif kind == "tab":
            fields.insert(i, b"")
        elif kind == "drop-tab" and len(fields) > 1:
            fields[i : i + 2] = [fields[i] + fields[i + 1]] if i + 1 < len(fields) else [fields[i]]
        elif kind == "truncate":
            fields = fields[: draw(st.integers(1, len(fields)))]
        elif kind == "cr":
            fields[-1] += b"\r"
        elif kind == "empty":
            return b""
        line = b"\t".join(fields)
    return line


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(corrupted_line(), min_size=1, max_size=12))
def test_corrupted_real_lines_are_parsed_as_the_reference_says_or_quarantined(lines):
    layout = resolve_layout(TRAIN, CRITEO, REAL_LINES[0], labeled=True)
    block = b"\n".join(lines)
    parsed = parse_block(layout, 1, block)
    assert parsed.lines_read == len(lines) == parsed.frame.height + len(parsed.quarantine)
    expected = {i + 1: reference_parse(line) for i, line in enumerate(lines)}
    assert sorted(r["line"] for r in parsed.quarantine) == [n for n, v in expected.items() if v is None]
    cols = ["label", *CRITEO_DENSE, *CRITEO_CATEGORICAL]
    assert parsed.frame["label"].null_count() == 0
    for row in parsed.frame.select("_line", *cols).iter_rows():
        assert row[1:] == expected[row[0]], row[0]


# ------------------------------------------------------------------------------ items 5, 6: publish
def test_failed_rerun_leaves_the_old_dataset_untouched_quarantine_included(tmp_path):
    out = tmp_path / "data"
    ingest([TRAIN], out)
    before = snapshot(out)
    verify_data_dir(out)
    lines = TRAIN.read_bytes().split(b"\n")
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"\n".join([b"7\t1"] * 200 + lines))
    with pytest.raises(UserError, match="above --max-bad-fraction"):
        ingest([bad], out)
    assert snapshot(out) == before
    assert len((tmp_path / "data.failed-quarantine.jsonl").read_text().splitlines()) == 200
    assert verify_data_dir(out).rows["quarantined"] == 0
    assert [p.name for p in tmp_path.iterdir() if ".ingest-tmp" in p.name] == []


def test_unrelated_files_in_out_are_refused_not_silently_kept(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"notes\.txt"):
        ingest([TRAIN], out)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_help_says_out_is_replaced_only_by_a_successful_run():
    r = cli("ingest", "--help")
    assert r.returncode == 0
    assert "replaced only by a complete, successful run" in " ".join(r.stdout.split())


def test_verify_data_dir_refuses_missing_manifest_and_mismatched_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ingest([TRAIN], a)
    ingest([TRAIN], b, split="random", seed=5)
    m = verify_data_dir(a)
    assert m.fingerprint == json.loads((a / "manifest.json").read_text())["fingerprint"]
    # A split from another run (what a kill between per-file renames used to leave)
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(b / "train.parquet", mixed / "train.parquet")
    with pytest.raises(UserError, match=r"mixed/train\.parquet: does not match"):
        verify_data_dir(mixed)
    # A tampered quarantine
    shutil.copytree(a, tmp_path / "q")
    (tmp_path / "q" / "quarantine.jsonl").write_text('{"line": 1}\n')
    with pytest.raises(UserError, match=r"quarantine\.jsonl: does not match"):
        verify_data_dir(tmp_path / "q")
    # No manifest
    (mixed / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"manifest\.json: missing"):
        verify_data_dir(mixed)
    # A missing file
    (a / "features.json").unlink()
    with pytest.raises(UserError, match=r"features\.json: listed in manifest\.json but missing"):
        verify_data_dir(a)


def test_stale_spills_are_removed_on_start(tmp_path):
    out = tmp_path / "data"
    ingest([TRAIN], out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".data.ingest-tmp-{dead.pid}"
    (stale / ".spills").mkdir(parents=True)
    (stale / ".spills" / "spill-000000.arrow").write_bytes(b"x" * 1000)
    ingest([TRAIN], out)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# ------------------------------------------------------------------------------ item 7: kill -9
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_leaves_no_worker_no_spill_and_the_old_dataset(tmp_path):
    big = tmp_path / "big.tsv"
    data = TRAIN.read_bytes()
    with open(big, "wb") as fh:
        for _ in range(40):  # ~70 MB: several 16 MB blocks
            fh.write(data)
    out = tmp_path / "data"
    ingest([TRAIN], out)
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ctr_ad.cli", "ingest", "--source", "criteo", "--input",
                             str(big), "--out", str(out), "--workers", "2", "--quiet"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    spawned: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        spawned |= _descendants(proc.pid)
        spills = list(tmp_path.glob(".data.ingest-tmp-*/.spills/*.arrow"))
        workers = [p for p in spawned if _running(p) and "multiprocessing" in
                   Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        if len(workers) >= 2 and spills:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    spawned |= _descendants(proc.pid)
    assert len(spawned) >= 3  # 2 workers, the resource tracker, the janitor
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_running(p) for p in spawned):
        time.sleep(0.1)
    assert [p for p in spawned if _running(p)] == []
    while time.time() < deadline and list(tmp_path.glob(".data.ingest-tmp-*")):
        time.sleep(0.1)
    assert list(tmp_path.glob(".data.ingest-tmp-*")) == []
    assert snapshot(out) == before
    verify_data_dir(out)


# ------------------------------------------------------------------------------ item 8: one-line errors
def test_truncated_gzip_is_one_line(tmp_path):
    gz = tmp_path / "train.tsv.gz"
    full = gzip.compress(TRAIN.read_bytes())
    gz.write_bytes(full[: len(full) // 2])
    for split in ("sequential", "random"):
        r = cli("ingest", "--source", "criteo", "--input", str(gz), "--out", str(tmp_path / "o"), "--split", split)
        one_line_error(r, 2, str(gz), "truncated or corrupt gzip")
    assert not (tmp_path / "o").exists()


def test_out_naming_a_file_is_one_line(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    r = cli("ingest", "--source", "criteo", "--input", str(TRAIN), "--out", str(target))
    one_line_error(r, 2, str(target), "not a directory")
    assert target.read_text() == "x"


@contextlib.contextmanager
def tmpfs(path: Path, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "small", "size=256k") as mnt:
        r = cli("ingest", "--source", "criteo", "--input", str(TRAIN), "--out", str(mnt / "data"))
        one_line_error(r, 1, "o space left on device")
        assert list(mnt.iterdir()) == []


def test_disk_full_in_process_is_one_line(tmp_path, monkeypatch, capsys):
    """The same without a mount (any platform): the Parquet writer hits ENOSPC."""
    import errno

    import pyarrow.parquet as pq

    from ctr_ad.cli import main

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    code = main(["ingest", "--source", "criteo", "--input", str(TRAIN), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no space left on device" in err.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_only_output_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    if os.geteuid() == 0:
        with tmpfs(ro, "ro", "size=1m") as mnt:
            r = cli("ingest", "--source", "criteo", "--input", str(TRAIN), "--out", str(mnt / "data"))
    else:
        ro.mkdir()
        ro.chmod(0o555)
        r = cli("ingest", "--source", "criteo", "--input", str(TRAIN), "--out", str(ro / "data"))
        ro.chmod(0o755)
    one_line_error(r, 2, str(ro))


# ------------------------------------------------------------------------------ item 9
def test_features_with_zero_std_are_refused_at_load(tmp_path):
    ingest([TRAIN], tmp_path / "d")
    d = json.loads((tmp_path / "d" / "features.json").read_text())
    d["dense_stats"]["I7"]["std"] = 0.0
    (tmp_path / "f.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=r"f\.json.*'I7'.*std"):
        FeatureProcessor.load(tmp_path / "f.json")


def _peak_rss_mb(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    code = ("import resource, subprocess, sys, json\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, r.stderr]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    kb, rc, err = json.loads(r.stdout)
    return kb / 1024, subprocess.CompletedProcess(args, rc, "", err)


def test_a_50_mb_line_is_quarantined_with_bounded_memory(tmp_path):
    lines = TRAIN.read_bytes().split(b"\n")[:2000]
    path = tmp_path / "long.tsv"
    with open(path, "wb") as fh:
        fh.write(b"\n".join(lines[:1000]) + b"\n")
        fh.write(b"0\t" + b"7" * (50 << 20) + b"\n")
        fh.write(b"\n".join(lines[1000:]) + b"\n")
    base = [sys.executable, "-m", "ctr_ad.cli", "ingest", "--source", "criteo", "--quiet"]
    ref_mb, r = _peak_rss_mb([*base, "--input", str(TRAIN), "--out", str(tmp_path / "ref")])
    assert r.returncode == 0, r.stderr
    peak_mb, r = _peak_rss_mb([*base, "--input", str(path), "--out", str(tmp_path / "o"),
                               "--max-bad-fraction", "0.01"])
    assert r.returncode == 0, r.stderr
    assert peak_mb < ref_mb + 150, (peak_mb, ref_mb)
    records = [json.loads(x) for x in (tmp_path / "o" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["bytes"]) for q in records] == [(1001, 2 + (50 << 20))]
    assert "longer than" in records[0]["reason"] and records[0]["raw"].startswith("0\t777")
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["rows"] == {"read": 2001, "written": 2000, "quarantined": 1}


@pytest.mark.parametrize("block_bytes", [4096, 1 << 20])
def test_long_lines_across_block_boundaries(tmp_path, block_bytes):
    """Lines over the limit are read past wherever they fall, also in small blocks; the rest is intact."""
    from ctr_ad.ingest import reader

    lines = TRAIN.read_bytes().split(b"\n")[:300]
    long_line = b"1\t" + b"5" * (reader.MAX_LINE_BYTES + 10)
    body = [*lines[:100], long_line, *lines[100:200], long_line + b"7", *lines[200:]]
    path = tmp_path / "long.tsv"
    path.write_bytes(b"\n".join(body))  # no trailing newline
    m = ingest([path], tmp_path / "o", block_bytes=block_bytes, max_bad_fraction=0.1)
    clean = tmp_path / "clean.tsv"
    clean.write_bytes(b"\n".join(lines))
    records = [json.loads(x) for x in (tmp_path / "o" / "quarantine.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [101, 202]
    assert [r["bytes"] for r in records] == [len(long_line), len(long_line) + 1]
    assert m["rows"] == {"read": 302, "written": 300, "quarantined": 2}
    blocks = list(reader.iter_raw_blocks(path, CRITEO, block_bytes=block_bytes))
    got = pl.concat([b.frame for b in blocks]).drop("_line")
    assert got.equals(reader.read_raw([clean], "criteo")[0].drop("_line"))


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=40), limit=st.integers(1, 25))
def test_long_lines_found_inside_a_block_whatever_their_place(lengths, limit):
    """Inside one block (bigger than the limit), exactly the lines over ``max_line_bytes`` become empty
    lines and are reported; the quick window check in front of the exact scan never hides one."""
    from ctr_ad.ingest import reader

    lines = [bytes([97 + i % 26]) * n for i, n in enumerate(lengths)]
    block = b"\n".join(lines)
    blanked, found = reader._blank_long_lines(block, 10, limit, [])
    long_ones = [i for i, line in enumerate(lines) if len(line) > limit]
    if len(block) > limit:
        assert [x.line for x in found] == [10 + i for i in long_ones]
        assert [x.length for x in found] == [lengths[i] for i in long_ones]
        assert blanked == b"\n".join(b"" if i in long_ones else line for i, line in enumerate(lines))
        assert reader._may_hold_long_line(block, limit) or not long_ones
    else:  # a block no longer than the limit cannot hold a long line
        assert (blanked, found) == (block, ())


# ------------------------------------------------------------------------------ item 14 (part)
def test_one_and_two_workers_write_identical_bytes_quarantine_included(tmp_path):
    lines = TRAIN.read_bytes().split(b"\n")[:-1]
    for i in range(3, len(lines), 97):  # a bad line every 97, spread over many blocks
        lines[i] = b"x\t" + lines[i]
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    runs = {}
    for workers in (1, 2):
        runs[workers] = ingest([path], tmp_path / f"w{workers}", block_bytes=64 * 1024, workers=workers,
                               split="random", seed=1, max_bad_fraction=0.05)
    assert runs[1]["rows"]["quarantined"] == len(range(3, len(lines), 97)) > 0
    assert runs[1]["fingerprint"] == runs[2]["fingerprint"]
    for name in (*OUTPUTS, ):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    strip = ("run",)
    m1, m2 = (json.loads((tmp_path / f"w{w}" / "manifest.json").read_text()) for w in (1, 2))
    assert {k: v for k, v in m1.items() if k not in strip} == {k: v for k, v in m2.items() if k not in strip}


# ------------------------------------------------------------------------------ issue 8: FeatureProcessor
def test_partial_fit_equals_ingest_and_encode_is_the_one_conversion(tmp_path):
    from ctr_ad.features import SMALL_BATCH_ROWS, model_arrays
    from ctr_ad.ingest.reader import read_raw

    ingest([TRAIN], tmp_path / "d", min_count=3)
    fitted = FeatureProcessor.load(tmp_path / "d" / "features.json")
    raw, _ = read_raw([TRAIN], "criteo")
    train_rows = raw.head(raw.height - 2 * round(raw.height * 0.1))  # sequential split: first 80 %
    fp = FeatureProcessor.unfitted("criteo", CRITEO, list(CRITEO_DENSE), 3)
    for chunk in train_rows.iter_slices(1000):
        fp.partial_fit(chunk)
    assert fp.vocab == fitted.vocab
    for f in CRITEO_DENSE:  # sums in another order: equal up to rounding
        assert fp.dense_stats[f]["count"] == fitted.dense_stats[f]["count"]
        assert fp.dense_stats[f]["mean"] == pytest.approx(fitted.dense_stats[f]["mean"], rel=1e-12)
        assert fp.dense_stats[f]["std"] == pytest.approx(fitted.dense_stats[f]["std"], rel=1e-9)
    one_shot = FeatureProcessor.unfitted("criteo", CRITEO, list(CRITEO_DENSE), 3).fit(train_rows)
    assert one_shot.dumps() == fitted.dumps()
    # encode: raw small batch, raw large batch and model-ready frames give the same arrays.
    small = raw.head(SMALL_BATCH_ROWS // 2)
    ref_cat, ref_dense = model_arrays(fitted.transform(small), fitted.categorical_columns, fitted.dense_columns)
    for frame in (small, fitted.transform(small)):
        cat, dense = fitted.encode(frame)
        assert cat.dtype.name == "int64" and dense.dtype.name == "float32"
        assert (cat == ref_cat).all() and (dense == ref_dense).all()
    big_cat, big_dense = fitted.encode(raw)
    assert raw.height > SMALL_BATCH_ROWS
    assert (big_cat[: small.height] == ref_cat).all() and (big_dense[: small.height] == ref_dense).all()


# ------------------------------------------------------------------------------ issue 8: one IngestOptions
def test_one_ingest_options_model_for_cli_run_ingest_and_pipeline(tmp_path):
    from ctr_ad.ingest.options import IngestOptions
    from ctr_ad.pipeline import DatasetSpec

    spec = DatasetSpec(name="d", source="criteo", inputs=["x.tsv"], split="random", max_bad_fraction=0.2)
    assert isinstance(spec, IngestOptions)
    assert spec.ingest_options() == IngestOptions(split="random", max_bad_fraction=0.2)
    with pytest.raises(UserError, match="valid_frac"):
        IngestOptions.of({"valid_frac": 0.6, "test_frac": 0.5})
    with pytest.raises(UserError, match="unknown key 'min_cout'"):
        IngestOptions.of({"min_cout": 3})
    r = cli("ingest", "--source", "criteo", "--input", str(TRAIN), "--out", str(tmp_path / "o"), "--min-count", "0")
    one_line_error(r, 2, "min_count")
    m = run_ingest([TRAIN], "criteo", tmp_path / "o", IngestOptions(split="random", seed=4), quiet=True)
    assert m["options"] == IngestOptions(split="random", seed=4).manifest_options()
