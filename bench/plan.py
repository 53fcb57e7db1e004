"""What one `foalnet bench` run measures (the full plan and a quick smoke plan), the clips it
generates, and the targets it checks the measurements against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.media import make_clip

# The targets of the performance issue.
TARGET_SATURATION = 0.9  # service throughput >= 0.9 x floor
TARGET_VS_NAIVE = 3.0  # service throughput >= 3 x naive
TARGET_LONE_MS = 25.0  # lone 5 s clip p50 <= floor + 25 ms
TARGET_RSS_DRIFT_PCT = 5.0  # RSS after N requests within 5 % of RSS after N/10
TARGET_COLD_START_S = 5.0
# One window (batch 1) on this machine's cores. The model issue's budget was 10 ms; 2.1.0's voice branch
# (Whisper's encoder) takes ~35 ms on 2 cores and buys the cross-corpus accuracy (docs/model.md, Latency).
TARGET_WINDOW_MS = 50.0
TARGET_VS_PHYSICAL = 0.75  # performance round two: service throughput >= 0.75 x physical floor
TARGET_LONE_P50_MS = 150.0  # performance round two: lone p50 of the first clip


@dataclass(frozen=True)
class ClipSpec:
    name: str
    seconds: float
    width: int
    height: int


@dataclass(frozen=True)
class Plan:
    """How much one run measures. The first clip is the one the ratios are about."""

    mode: str
    clips: tuple[ClipSpec, ...]
    batch_sizes: tuple[int, ...]
    stage_repeats: int  # timed calls per stage and per worker
    concurrency: tuple[int, ...]
    requests_per_level: int  # upper bound of requests at one concurrency level
    level_s: float  # upper bound of seconds at one concurrency level
    lone_requests: int  # concurrency-1 requests for the other clips' lone latency
    naive_concurrency: tuple[int, ...]
    memory_after: tuple[int, int]  # RSS read after this many requests, then after this many
    memory_concurrency: int
    memory_s: float  # upper bound of seconds for the memory run


FULL = Plan(
    mode="full",
    clips=(
        ClipSpec("5s-640x360", 5, 640, 360),
        ClipSpec("5s-1280x720", 5, 1280, 720),
        ClipSpec("30s-640x360", 30, 640, 360),
        ClipSpec("30s-1280x720", 30, 1280, 720),
    ),
    batch_sizes=(1, 2, 4, 8, 16, 32),
    stage_repeats=8,
    concurrency=(1, 4, 16, 64),
    requests_per_level=1000,
    level_s=45.0,
    lone_requests=15,
    naive_concurrency=(1, 4),
    memory_after=(100, 1000),
    memory_concurrency=8,
    memory_s=600.0,
)
QUICK = Plan(
    mode="quick",
    clips=(ClipSpec("2s-320x180", 2, 320, 180),),
    batch_sizes=(1, 2),
    stage_repeats=2,
    concurrency=(1, 2),
    requests_per_level=3,
    level_s=15.0,
    lone_requests=2,
    naive_concurrency=(1,),
    memory_after=(3, 9),
    memory_concurrency=2,
    memory_s=30.0,
)


def make_clips(out_dir: Path, plan: Plan) -> dict[str, Path]:
    """Generate the plan's clips with the test-media generator (h264 + aac, 30 fps, face, speech)."""
    paths = {}
    for clip in plan.clips:
        path = out_dir / f"{clip.name}.mp4"
        make_clip(
            path,
            seconds=clip.seconds,
            width=clip.width,
            height=clip.height,
            fps=30,
            container="mp4",
            vcodec="libx264",
            acodec="aac",
            audio="speech",
            video="face",
        )
        paths[clip.name] = path
    return paths
