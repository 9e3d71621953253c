"""Thread choice: cgroup v1/v2 quotas read from a fake root, affinity, work size, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctr_ad.config import ModelConfig
from ctr_ad.threads import (
    ENV_THREADS,
    MIN_WORK_PER_THREAD,
    apply_threads,
    available_cpus,
    cgroup_cpu_limit,
    choose_threads,
    model_step_flops,
    step_flops,
    thread_choice,
)


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_root(tmp_path: Path, cpu_max: str, cgroup: str = "/", mount: str = "sys/fs/cgroup") -> Path:
    write(tmp_path, "proc/self/cgroup", f"0::{cgroup}\n")
    write(tmp_path, f"{mount}/{cgroup.strip('/')}/cpu.max".replace("//", "/"), cpu_max + "\n")
    return tmp_path


def v1_root(
    tmp_path: Path,
    quota: int,
    period: int = 100_000,
    cgroup: str = "/",
    mount: str = "sys/fs/cgroup/cpu,cpuacct",
    controllers: str = "cpu,cpuacct",
) -> Path:
    write(tmp_path, "proc/self/cgroup", f"12:memory:/x\n4:{controllers}:{cgroup}\n0::/\n")
    base = f"{mount}/{cgroup.strip('/')}".rstrip("/")
    write(tmp_path, f"{base}/cpu.cfs_quota_us", f"{quota}\n")
    write(tmp_path, f"{base}/cpu.cfs_period_us", f"{period}\n")
    return tmp_path


# --------------------------------------------------------------------------------------- cgroups
def test_v2_quota(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "150000 100000")
    assert cgroup_cpu_limit(root) == pytest.approx(1.5)
    assert available_cpus(root, affinity=8) == 1  # rounded down: 1.5 CPUs give 1 thread


def test_v2_unlimited(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "max 100000")
    assert cgroup_cpu_limit(root) is None
    assert available_cpus(root, affinity=6) == 6


def test_v2_nested_cgroup_takes_tightest_ancestor(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "max 100000", cgroup="/kubepods/pod1/ctr")
    write(root, "sys/fs/cgroup/kubepods/pod1/cpu.max", "300000 100000\n")
    write(root, "sys/fs/cgroup/kubepods/cpu.max", "800000 100000\n")
    assert cgroup_cpu_limit(root) == pytest.approx(3.0)
    assert available_cpus(root, affinity=16) == 3


def test_v2_hybrid_mount(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "200000 100000", mount="sys/fs/cgroup/unified")
    assert cgroup_cpu_limit(root) == pytest.approx(2.0)


def test_v2_path_missing_under_mount_falls_back_to_mount(tmp_path: Path) -> None:
    # No cgroup namespace: /proc/self/cgroup names the host path, the mount is the container's cgroup.
    write(tmp_path, "proc/self/cgroup", "0::/system.slice/docker-abc.scope\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == pytest.approx(2.0)


def test_v1_quota(tmp_path: Path) -> None:
    root = v1_root(tmp_path, quota=250_000)
    assert cgroup_cpu_limit(root) == pytest.approx(2.5)
    assert available_cpus(root, affinity=4) == 2


def test_v1_unlimited_and_separate_cpu_mount(tmp_path: Path) -> None:
    root = v1_root(tmp_path, quota=-1, mount="sys/fs/cgroup/cpu", controllers="cpu")
    assert cgroup_cpu_limit(root) is None
    assert available_cpus(root, affinity=2) == 2


def test_v1_docker_path(tmp_path: Path) -> None:
    root = v1_root(tmp_path, quota=100_000, cgroup="/docker/abc")
    assert available_cpus(root, affinity=32) == 1


def test_quota_below_one_cpu_still_gives_one_thread(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "50000 100000")
    assert cgroup_cpu_limit(root) == pytest.approx(0.5)
    assert available_cpus(root, affinity=4) == 1


def test_affinity_tighter_than_quota(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "800000 100000")
    assert available_cpus(root, affinity=3) == 3


@pytest.mark.parametrize("content", ["", "garbage", "0::/\n", "not:a:cgroup:line\n"])
def test_unreadable_or_missing_files(tmp_path: Path, content: str) -> None:
    if content:
        write(tmp_path, "proc/self/cgroup", content)
    write(tmp_path, "sys/fs/cgroup/cpu.max", "nonsense\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert available_cpus(tmp_path, affinity=2) == 2


def test_real_machine_does_not_raise() -> None:
    assert available_cpus() >= 1
    assert 1 <= choose_threads() <= available_cpus()


# --------------------------------------------------------------------------------------- work size
def test_step_flops_counts_mlp_matmuls() -> None:
    # widths 2*3+1 = 7 -> 4 -> 1: 28 + 4 = 32 MACs; x2 FLOPs x3 (fwd+bwd) x K=2 x batch 10
    assert step_flops(n_fields=2, n_dense=1, embedding_dim=3, mlp=[4], components=2, batch=10) == 32 * 2 * 3 * 2 * 10
    assert (
        step_flops(n_fields=2, n_dense=1, embedding_dim=3, mlp=[4], components=2, batch=10, training=False)
        == 32 * 2 * 2 * 10
    )


def test_model_step_flops_matches_config() -> None:
    cfg = ModelConfig(components=4, embedding_dim=8, mlp=[64, 32])
    assert model_step_flops(cfg, 26, 13, 256) == step_flops(
        n_fields=26, n_dense=13, embedding_dim=8, mlp=[64, 32], components=4, batch=256
    )


def test_demo_step_is_single_threaded_and_large_step_uses_every_cpu() -> None:
    demo = model_step_flops(ModelConfig(components=4, embedding_dim=8, mlp=[64, 32]), 26, 13, 256)
    assert demo < MIN_WORK_PER_THREAD
    assert choose_threads(demo, cpus=2) == 1
    assert choose_threads(demo, cpus=64) == 1
    large = model_step_flops(ModelConfig(components=4, embedding_dim=16, mlp=[400, 400, 400]), 26, 13, 4096)
    assert choose_threads(large, cpus=2) == 2
    assert choose_threads(large, cpus=16) == 16


def test_threads_grow_with_work_up_to_the_cpus() -> None:
    counts = [choose_threads(w, cpus=8) for w in (0.0, 0.5e9, 1e9, 2.5e9, 4e9, 1e12)]
    assert counts == [1, 1, 1, 2, 4, 8]
    assert choose_threads(3e9, cpus=8, min_work_per_thread=1e8) == 8


def test_unknown_work_uses_every_available_cpu(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "300000 100000")
    choice = thread_choice(None, root=root, affinity=8)
    assert (choice.threads, choice.available, choice.cgroup_limit) == (3, 3, pytest.approx(3.0))
    assert choice.as_dict()["threads"] == 3


# --------------------------------------------------------------------------------------- applying
@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_apply_precedence(restore_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_THREADS, raising=False)
    assert apply_threads(None, 1e3, cpus=4) == 1 and torch.get_num_threads() == 1
    assert apply_threads(2, 1e3, cpus=4) == 2 and torch.get_num_threads() == 2  # config wins
    assert apply_threads(None, 1e3, cpus=4, environ={ENV_THREADS: "3"}) == 3  # env beats the choice
    assert apply_threads(1, 1e12, cpus=4, environ={ENV_THREADS: "3"}) == 1  # config beats env
    assert apply_threads(None, 1e12, cpus=2, environ={}) == 2


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_env_value(restore_threads, bad: str) -> None:
    with pytest.raises(ValueError, match=ENV_THREADS):
        apply_threads(None, 1e3, cpus=2, environ={ENV_THREADS: bad})


def test_bad_config_value(restore_threads) -> None:
    with pytest.raises(ValueError):
        apply_threads(0, 1e3, cpus=2)


def test_processes_share_the_cpus(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "max 100000")
    assert choose_threads(1e12, root=root, affinity=8, processes=2) == 4
    assert choose_threads(1e12, root=root, affinity=8, processes=3) == 2
    assert choose_threads(1e12, cpus=2, processes=4) == 1
