"""Helpers of the service tests: tiny bundles trained on the real 8k Criteo sample, real server processes.

Import as ``from service_helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl

REPO = Path(__file__).resolve().parents[1]
CRITEO_8K = REPO / "data" / "criteo-kaggle-8k"
LISTEN_LINE = re.compile(r"on http://([^:\s]+):(\d+) ")


def ingest_8k(out: Path) -> Path:
    from ctr_ad.ingest.run import run_ingest

    run_ingest([CRITEO_8K / "train.tsv", CRITEO_8K / "dev.tsv", CRITEO_8K / "test.tsv"], "criteo", out,
               split="files", quiet=True)
    return out


def train_tiny(data_dir: Path, run_dir: Path, seed: int) -> Path:
    """A K=3 ensemble of small MLPs, one epoch: trains in seconds on 2 cores."""
    from ctr_ad.config import load_config
    from ctr_ad.train import train

    cfg = load_config(REPO / "pipelines" / "configs" / "demo.yaml", [
        "model.components=3", "model.embedding_dim=4", "model.mlp=[16]", "train.epochs=1",
        "train.batch_size=512", "train.progress=false", "train.threads=1",
        f"train.seed_init={seed}", f"train.seed_data={seed}",
    ])
    result = train(data_dir, cfg, run_dir, log=False)
    assert result.bundle_dir is not None
    return run_dir


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def cli(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctr_ad.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=subprocess_env(**env))


@dataclass
class Server:
    """A real ``ctr-ad serve`` process on a free loopback port."""

    proc: subprocess.Popen
    host: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(args: list[str], log_path: Path, timeout: float = 90, **env: str) -> Server:
    """Start ``ctr-ad serve ARGS --port 0``; wait for the port it prints, then for /readyz."""
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctr_ad.cli", "serve", *args, "--port", "0", "--log-level", "warning"],
        cwd=REPO, env=subprocess_env(**env), stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + timeout
    host = port = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        m = LISTEN_LINE.search(log_path.read_text(errors="replace"))
        if m:
            host, port = m.group(1), int(m.group(2))
            try:
                if httpx.get(f"http://{host}:{port}/readyz", timeout=2).status_code == 200:
                    return Server(proc, host, port, log_path)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()}")


def raw_rows(path: Path) -> pl.DataFrame:
    """The validated raw rows of a Criteo TSV, as ``ctr-ad predict`` reads them (``_line`` kept)."""
    from ctr_ad.ingest.reader import read_raw

    frame, _ = read_raw([path], "criteo")
    return frame


def instances(frame: pl.DataFrame, fields: list[str]) -> list[dict[str, Any]]:
    """JSON instances of raw rows: missing values are left out (a missing field is a missing value);
    integral dense values are sent as JSON integers, as a client copying the log would."""
    out = []
    for row in frame.select(fields).iter_rows(named=True):
        inst: dict[str, Any] = {}
        for k, v in row.items():
            if v is None:
                continue
            inst[k] = int(v) if isinstance(v, float) and v.is_integer() else v
        out.append(inst)
    return out
