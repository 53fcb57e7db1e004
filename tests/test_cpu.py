"""CPU quota detection (affinity, cgroup v2 cpu.max, v1 cfs quota) and the thread plan sized from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import cpu
from service.settings import Settings


def _cgroup(tmp_path: Path, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-cgroup"
    proc.write_text(lines)
    return root, proc


@pytest.mark.parametrize(
    "lines, files, expected",
    [
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),  # v2 in a container (cgroup namespace)
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # no limit
        # a parent's quota limits the child; the tightest one counts
        ("0::/pod/app\n", {"pod/cpu.max": "200000 100000", "pod/app/cpu.max": "max 100000"}, 2.0),
        ("0::/pod/app\n", {"pod/cpu.max": "400000 100000", "pod/app/cpu.max": "50000 100000"}, 0.5),
        # v1, limited and unlimited
        ("4:cpu,cpuacct:/x\n",
         {"cpu,cpuacct/x/cpu.cfs_quota_us": "1", "cpu,cpuacct/x/cpu.cfs_period_us": "-"}, None),
        ("4:cpu:/x\n", {"cpu/x/cpu.cfs_quota_us": "300000", "cpu/x/cpu.cfs_period_us": "100000"}, 3.0),
        ("2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ("0::/\n", {"unified/cpu.max": "100000 100000"}, 1.0),  # hybrid host
        ("0::/\n", {"cpu.max": "garbage"}, None),
    ],
)
def test_cpu_quota(tmp_path, lines, files, expected):
    root, proc = _cgroup(tmp_path, lines, files)
    assert cpu.cpu_quota(root, proc) == expected


@pytest.mark.parametrize(
    ("affinity", "quota", "expected"), [(8, None, 8), (8, 1.5, 1), (8, 0.3, 1), (2, 4.0, 2), (16, 6.0, 6)]
)
def test_available_cpus_is_affinity_capped_by_the_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(cpu, "affinity_cpus", lambda: affinity)
    monkeypatch.setattr(cpu, "cpu_quota", lambda: quota)
    assert cpu.available_cpus() == expected


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 64])
def test_the_plan_fits_the_cpus(cpus):
    plan = cpu.thread_plan(cpus)
    # A decode worker per CPU, each decoding on one thread; inference takes at most half the CPUs.
    assert plan.decode_workers == cpus and plan.ffmpeg_threads == 1 and plan.cv2_threads == 1
    assert 1 <= plan.intra_op_threads <= max(1, cpus // 2)


def test_settings_defaults_come_from_the_quota_not_the_node(monkeypatch):
    monkeypatch.setattr(cpu, "affinity_cpus", lambda: 64)  # a big node...
    monkeypatch.setattr(cpu, "cpu_quota", lambda: 2.0)  # ...and a 2-CPU container limit
    for name in ("FOALNET_DECODE_WORKERS", "FOALNET_INTRA_OP_THREADS", "FOALNET_FFMPEG_THREADS"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert (s.decode_workers, s.intra_op_threads, s.ffmpeg_threads) == (2, 1, 1)
