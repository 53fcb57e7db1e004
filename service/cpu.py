"""How many CPUs this process may use, and the thread pools sized together from that number.

`os.cpu_count()` is the node's core count, not what a container gets: CPU affinity (taskset,
cpuset, Kubernetes' static CPU manager) and the cgroup quota (`docker --cpus`, Kubernetes
`limits.cpu`) can be far lower. Sizing decode workers, ONNX Runtime and OpenCV pools from the
node's count oversubscribes the quota, and the kernel throttles the whole process.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
CV2_THREADS = 1  # OpenCV's own pool, per process: its threads would come on top of the workers'


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's cgroup directories (v2 unified, v1 cpu controller) and their ancestors:
    a quota set on a parent limits the child too."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    dirs = [root]
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path" (under "unified" on a hybrid v1/v2 host)
            bases = [root, root / "unified"]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            bases = [root / "cpu,cpuacct", root / "cpu"]
        else:
            continue
        parts = Path(path).parts[1:]
        for base in bases:
            dirs += [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _quota(folder: Path) -> float | None:
    """CPUs allowed by this cgroup directory's own quota, or None."""
    try:
        if (folder / "cpu.max").is_file():  # v2: "max 100000" or "150000 100000"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 without a limit
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs the tightest cgroup quota on this process allows (1.5 for `--cpus 1.5`), or None."""
    quotas = [q for q in map(_quota, _cgroup_dirs(root, proc_cgroup)) if q is not None and q > 0]
    return min(quotas) if quotas else None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available_cpus() -> int:
    """Whole CPUs this process can keep busy: affinity, capped by the quota rounded down, >= 1."""
    quota = cpu_quota()
    cpus = affinity_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


@dataclass(frozen=True)
class ThreadPlan:
    """The service's thread pools, sized together so they fit the CPUs.

    Decoding and the face detector take ~90 % of a clip's CPU and inference ~5 %, so every CPU gets
    a decode worker (one upload each, its decoder on one thread: parallelism comes from the
    workers, which scale better than a decoder's threads), and inference's threads share the CPUs
    with them. OpenCV's own pool stays at one thread for the same reason."""

    cpus: int
    decode_workers: int
    intra_op_threads: int
    ffmpeg_threads: int
    cv2_threads: int = CV2_THREADS


def thread_plan(cpus: int | None = None) -> ThreadPlan:
    cpus = cpus or available_cpus()
    return ThreadPlan(cpus=cpus, decode_workers=cpus, intra_op_threads=max(1, cpus // 2), ffmpeg_threads=1)


def pin_opencv_threads() -> None:
    """Size OpenCV's pool in this process (the setting is per process: the service calls it at
    start, and so does every decode worker, where the face detector runs)."""
    import cv2

    cv2.setNumThreads(CV2_THREADS)


def apply_threads(*, decode_workers: int, intra_op: int | None, ffmpeg: int) -> None:
    """At start: pin OpenCV's pool and log the pools as configured next to what the plan derived."""
    plan = thread_plan()
    pin_opencv_threads()
    log.info(
        "threads: %d usable CPUs (affinity %d, cgroup quota %s) -> %d decode workers, %s ORT intra-op, "
        "%d ffmpeg, %d OpenCV (derived: %d / %d / %d)",
        plan.cpus,
        affinity_cpus(),
        cpu_quota() or "none",
        decode_workers,
        intra_op,
        ffmpeg,
        plan.cv2_threads,
        plan.decode_workers,
        plan.intra_op_threads,
        plan.ffmpeg_threads,
    )
