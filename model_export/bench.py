"""`foalnet bench`: how close the running service gets to what this machine can do, in one run.

Four measurements, all on clips the harness generates (h264 + aac, 30 fps, a real face, speech):
- the floor: decode alone, face detection alone, the model alone at each batch size (no HTTP, no
  queue), each as clips/s on this machine;
- the service: `foalnet serve` started as a subprocess on 127.0.0.1, loaded by an httpx async client
  at several concurrency levels (throughput, latency percentiles, batch sizes read from /metrics),
  its cold start (process start to /readyz 200) and its memory (peak RSS, RSS drift);
- the naive baseline (`model_export.naive_server`): torch eager, one request at a time;
- the ratios between them, checked against the targets (printed, never asserted).

How the floor is combined: decode and faces are timed with as many threads as cores (ffmpeg and
OpenCV release the GIL) and the model at its best batch size, so each stage alone saturates the
machine; doing all three needs the sum of their per-clip times, so the floor throughput is
1 / (1/decode + 1/faces + windows/model). The floor latency of one clip is the single-stream sum.
Every loop is bounded by a request count and a duration; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service import media
from service.engine import Engine, EngineError
from service.faces import FaceCropper
from service.metrics import STAGES
from service.settings import default_model_path, env_var
from service.windows import prepare

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0  # a cold start slower than this is a failure, not a number
REQUEST_TIMEOUT_S = 120.0

# The targets of the performance issue.
TARGET_SATURATION = 0.9  # service throughput >= 0.9 x floor
TARGET_VS_NAIVE = 3.0  # service throughput >= 3 x naive
TARGET_LONE_MS = 25.0  # lone 5 s clip p50 <= floor + 25 ms
TARGET_RSS_DRIFT_PCT = 5.0  # RSS after N requests within 5 % of RSS after N/10
TARGET_COLD_START_S = 5.0
TARGET_WINDOW_MS = 10.0  # the model issue: one window (batch 1) on this machine's cores
TARGET_VS_PHYSICAL = 0.75  # performance round two: service throughput >= 0.75 x physical floor
TARGET_LONE_P50_MS = 150.0  # performance round two: lone p50 of the first clip

TIMINGS = (*STAGES, "total")  # the service's own per-stage `timings_ms` of each answer
VERDICT = {True: "PASS", False: "FAIL", None: "N/A"}  # a target met, missed, or not measured


class BenchError(RuntimeError):
    """A server the bench started did not come up (its log tail is in the message)."""


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


# --- clips ------------------------------------------------------------------------------------


def make_clips(out_dir: Path, plan: Plan) -> dict[str, Path]:
    """Generate the plan's clips with the test-media generator (h264 + aac, 30 fps, face, speech).

    The generator lives in `tests/media.py` of the source checkout; an installed wheel does not ship
    `tests/`, so the bench needs a checkout (it says so when it has none).
    """
    if not (REPO / "tests" / "media.py").exists():
        raise typer.BadParameter("the bench generates its clips with tests/media.py: run it from a source checkout")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.media import make_clip

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


# --- the floor --------------------------------------------------------------------------------


def _timed(fn: Callable[[], object], workers: int, calls_per_worker: int) -> tuple[float, float]:
    """Run fn `workers x calls_per_worker` times on `workers` threads -> (median call s, calls/s)."""

    def one() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    n = workers * calls_per_worker
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        durations = list(pool.map(lambda _: one(), range(n)))
    wall = time.perf_counter() - t0
    return float(np.median(durations)), n / wall


def _tile(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The clip's windows repeated to exactly `batch` rows."""
    n = next(iter(feeds.values())).shape[0]
    idx = np.arange(batch) % n
    return {name: np.ascontiguousarray(array[idx]) for name, array in feeds.items()}


def measure_floor(model: Path, clips: dict[str, Path], plan: Plan, device: str) -> dict:
    engine = Engine(model, device=device)
    engine.warmup()
    spec = engine.spec
    cropper = FaceCropper(spec)
    limits = media.DEFAULT_LIMITS
    cores = os.cpu_count() or 1
    result: dict = {"cores": cores, "provider": engine.provider, "clips": {}, "model": []}

    feeds_by_clip = {}
    for name, path in clips.items():
        decoded = media.decode(path, spec, limits)
        prepared = prepare(path, spec, cropper, limits)
        feeds = prepared.windows.feeds()
        feeds_by_clip[name] = feeds
        windows = int(next(iter(feeds.values())).shape[0])
        decode, faces = partial(media.decode, path, spec, limits), partial(cropper, decoded.frames)
        decode_s, _ = _timed(decode, 1, plan.stage_repeats)
        _, decode_tp = _timed(decode, cores, plan.stage_repeats)
        faces_s, _ = _timed(faces, 1, plan.stage_repeats)
        _, faces_tp = _timed(faces, cores, plan.stage_repeats)
        model_s, _ = _timed(partial(engine.infer, feeds), 1, plan.stage_repeats)
        # The physical floor: PyAV in-process (one thread, every frame decoded, only the sampled
        # ones converted by libswscale) with faces found frame by frame, as the decode workers do.
        physical = partial(prepare, path, spec, cropper, limits)
        physical_s, _ = _timed(physical, 1, plan.stage_repeats)
        _, physical_tp = _timed(physical, cores, plan.stage_repeats)
        result["clips"][name] = {
            "windows": windows,
            "frames": 0 if decoded.frames is None else int(decoded.frames.shape[0]),
            "decode_ms": decode_s * 1e3,
            "decode_clips_per_s": decode_tp,
            "faces_ms": faces_s * 1e3,
            "faces_clips_per_s": faces_tp,
            "model_ms": model_s * 1e3,
            "latency_ms": (decode_s + faces_s + model_s) * 1e3,
            "physical_ms": physical_s * 1e3,
            "physical_clips_per_s": physical_tp,
            "physical_latency_ms": (physical_s + model_s) * 1e3,
        }

    first = next(iter(feeds_by_clip.values()))
    for batch in plan.batch_sizes:
        batch_s, _ = _timed(partial(engine.infer, _tile(first, batch)), 1, plan.stage_repeats)
        result["model"].append({"batch": batch, "ms": batch_s * 1e3, "windows_per_s": batch / batch_s})
    best = max(row["windows_per_s"] for row in result["model"])
    for row in result["clips"].values():
        row["model_clips_per_s"] = best / row["windows"]
        per_clip_s = 1 / row["decode_clips_per_s"] + 1 / row["faces_clips_per_s"] + 1 / row["model_clips_per_s"]
        row["clips_per_s"] = 1 / per_clip_s
        row["physical_floor_clips_per_s"] = 1 / (1 / row["physical_clips_per_s"] + 1 / row["model_clips_per_s"])
    return result


# --- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def rss_kb(pid: int) -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, in kB (Linux /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return {"rss_kb": fields["VmRSS"], "peak_kb": fields["VmHWM"]}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    cold_start_s: float


@contextmanager
def run_server(argv: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[Server]:
    """Start a server process, wait for /readyz 200 (timed: the cold start), stop it on exit."""
    url = f"http://{HOST}:{port}"
    with log.open("wb") as sink:
        t0 = time.perf_counter()
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            cold = _wait_ready(url, process, t0, log)
            yield Server(url, process, cold)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen, t0: float, log: Path) -> float:
    with httpx.Client(timeout=2.0) as client:
        while time.perf_counter() - t0 < READY_TIMEOUT_S:
            if process.poll() is not None:
                raise BenchError(f"server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    raise BenchError(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-2000:]}")


def service_server(model: Path, device: str, work: Path) -> tuple[list[str], dict[str, str], int]:
    """`foalnet serve` with the service's own defaults, on a free port of 127.0.0.1.

    Started as `python -m service.cli serve`: the serving side's commands alone, as in the torch-free
    image. (`foalnet` from a training install also imports torch for the training commands.)
    """
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve"]
    env = {
        env_var("host"): HOST,
        env_var("port"): str(port),
        env_var("model_path"): str(model),
        env_var("device"): device,
        env_var("log_level"): "warning",
        env_var("tmp_dir"): str(work),
    }
    return argv, env, port


def naive_server(model: Path, checkpoint: Path | None) -> tuple[list[str], dict[str, str], int]:
    port = free_port()
    argv = [sys.executable, "-m", "model_export.naive_server", "--model", str(model), "--host", HOST]
    argv += ["--port", str(port)] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
    return argv, {}, port


# --- load -------------------------------------------------------------------------------------


@dataclass
class Load:
    concurrency: int
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)  # the service's own timings_ms
    batch_sizes: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> dict:
        data = asdict(self)
        del data["latencies_ms"]
        data.update(
            clips_per_s=self.throughput, p50_ms=self.percentile(50), p95_ms=self.percentile(95),
            p99_ms=self.percentile(99),
            stages_ms={stage: float(np.median(values)) for stage, values in self.stages_ms.items()},
        )
        return data


async def _load(url: str, clip: Path, concurrency: int, max_requests: int, max_s: float) -> Load:
    """Closed-loop load: `concurrency` clients each send the clip again as soon as answered.

    A client told 429 waits the answer's Retry-After first, as a well-behaved client does, so an
    overloaded service is measured at its saturation throughput rather than at rejecting retries."""
    body = clip.read_bytes()
    result = Load(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + max_s

        async def client_loop() -> None:
            while result.sent < max_requests and time.perf_counter() < deadline:
                result.sent += 1
                start = time.perf_counter()
                try:
                    response = await client.post(f"{url}/predict", files={"file": (clip.name, body, "video/mp4")})
                    outcome = "ok" if response.status_code == 200 else str(response.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                if outcome == "ok":
                    result.ok += 1
                    result.latencies_ms.append((time.perf_counter() - start) * 1e3)
                    for stage, ms in response.json().get("timings_ms", {}).items():
                        result.stages_ms.setdefault(stage, []).append(ms)
                else:
                    result.errors[outcome] = result.errors.get(outcome, 0) + 1
                    if outcome == "429":
                        wait = float(response.headers.get("retry-after", 1))
                        await asyncio.sleep(max(0.0, min(wait, deadline - time.perf_counter())))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - t0
    return result


def load(url: str, clip: Path, concurrency: int, max_requests: int, max_s: float, metrics: bool) -> Load:
    before = batch_histogram(url) if metrics else {}
    result = asyncio.run(_load(url, clip, concurrency, max_requests, max_s))
    if metrics:
        after = batch_histogram(url)
        result.batch_sizes = {le: after[le] - before.get(le, 0.0) for le in after}
    return result


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative `foalnet_batch_size` bucket counts (le -> count) and the sum, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "foalnet_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                counts[sample.labels["le"]] = sample.value
            elif sample.name.endswith("_sum"):
                counts["sum"] = sample.value
    return counts


def batch_counts(histogram: dict[str, float]) -> dict[int, int]:
    """Batches per size bucket (size -> count) from cumulative bucket counts; empty buckets left out."""
    counts, below = {}, 0.0
    for le, cumulative in sorted(((k, v) for k, v in histogram.items() if k not in ("sum", "+Inf")),
                                 key=lambda kv: float(kv[0])):
        if cumulative > below:
            counts[int(float(le))] = int(cumulative - below)
        below = cumulative
    return counts


def mean_batch(histogram: dict[str, float]) -> float | None:
    total = histogram.get("+Inf", 0.0)
    return histogram["sum"] / total if total else None


# --- the run ----------------------------------------------------------------------------------


def run(model: Path, plan: Plan, *, device: str, checkpoint: Path | None, work: Path, say: Callable) -> dict:
    results: dict = {"mode": plan.mode, "model": str(model), "device": device, "machine": machine()}
    say("generating clips")
    clips = make_clips(work, plan)
    first = plan.clips[0].name
    results["clips"] = [asdict(c) | {"bytes": clips[c.name].stat().st_size} for c in plan.clips]

    say("floor: decode, faces, model")
    results["floor"] = measure_floor(model, clips, plan, device)

    say("service: cold start, memory, concurrency")
    argv, env, port = service_server(model, device, work)
    with run_server(argv, env, port, work / "service.log") as server:
        results["cold_start_s"] = server.cold_start_s
        results["memory"] = memory_run(server, clips[first], plan)
        results["service"] = []
        for concurrency in plan.concurrency:
            say(f"service: concurrency {concurrency}")
            level = load(server.url, clips[first], concurrency, plan.requests_per_level, plan.level_s, True)
            results["service"].append(level.summary())
        results["lone"] = {first: next(lv["p50_ms"] for lv in results["service"] if lv["concurrency"] == 1)}
        for clip in plan.clips[1:]:
            say(f"service: lone {clip.name}")
            lone = load(server.url, clips[clip.name], 1, plan.lone_requests, plan.level_s, False)
            results["lone"][clip.name] = lone.percentile(50)
        results["memory"]["peak_kb"] = rss_kb(server.process.pid)["peak_kb"]

    say("naive baseline")
    argv, env, port = naive_server(model, checkpoint)
    with run_server(argv, env, port, work / "naive.log") as server:
        results["naive_cold_start_s"] = server.cold_start_s
        results["naive_info"] = httpx.get(f"{server.url}/info", timeout=10).json()
        results["naive"] = [
            load(server.url, clips[first], c, plan.requests_per_level, plan.level_s, False).summary()
            for c in plan.naive_concurrency
        ]
    results["ratios"] = ratios(results, first)
    results["load_avg_end"] = os.getloadavg()
    return results


def memory_run(server: Server, clip: Path, plan: Plan) -> dict:
    """RSS after the first `a` requests and after `b` requests in all (sent at a fixed concurrency)."""
    a, b = plan.memory_after
    start = time.perf_counter()
    first = load(server.url, clip, plan.memory_concurrency, a, plan.memory_s, False)
    rss_a = rss_kb(server.process.pid)["rss_kb"]
    left = max(plan.memory_s - (time.perf_counter() - start), 1.0)
    rest = load(server.url, clip, plan.memory_concurrency, b - a, left, False)
    rss_b = rss_kb(server.process.pid)["rss_kb"]
    return {
        "requests_a": first.sent, "rss_a_kb": rss_a, "requests_b": first.sent + rest.sent, "rss_b_kb": rss_b,
        "failed": first.sent + rest.sent - first.ok - rest.ok,
        "drift_pct": 100.0 * (rss_b - rss_a) / rss_a,
    }


def ratios(results: dict, first: str) -> dict:
    floor = results["floor"]["clips"][first]
    service_best = max(level["clips_per_s"] for level in results["service"])
    naive_best = max(level["clips_per_s"] for level in results["naive"])
    lone_p50 = results["lone"][first]
    return {
        "saturation": service_best / floor["clips_per_s"],
        "vs_physical": service_best / floor["physical_floor_clips_per_s"],
        "lone_p50_ms": lone_p50,
        "vs_naive": service_best / naive_best if naive_best else None,
        "lone_minus_floor_ms": None if lone_p50 is None else lone_p50 - floor["latency_ms"],
        "rss_drift_pct": results["memory"]["drift_pct"],
        "cold_start_s": results["cold_start_s"],
        "window_ms": next((row["ms"] for row in results["floor"]["model"] if row["batch"] == 1), None),
    }


def verdicts(r: dict) -> list[tuple[str, str, bool | None]]:
    """(what, measured, passed) for each target; passed is None when it could not be measured."""
    def check(value: float | None, ok: Callable[[float], bool], fmt: str) -> tuple[str, bool | None]:
        return ("n/a", None) if value is None else (fmt.format(value), ok(value))

    rows = [
        (f"service / floor throughput >= {TARGET_SATURATION:.1f}", r["saturation"],
         lambda v: v >= TARGET_SATURATION, "{:.2f}"),
        (f"service / physical floor throughput >= {TARGET_VS_PHYSICAL:.2f}", r.get("vs_physical"),
         lambda v: v >= TARGET_VS_PHYSICAL, "{:.2f}"),
        (f"lone p50 <= {TARGET_LONE_P50_MS:.0f} ms", r.get("lone_p50_ms"),
         lambda v: v <= TARGET_LONE_P50_MS, "{:.0f} ms"),
        (f"service / naive throughput >= {TARGET_VS_NAIVE:.0f}", r["vs_naive"],
         lambda v: v >= TARGET_VS_NAIVE, "{:.2f}"),
        (f"lone p50 - floor <= {TARGET_LONE_MS:.0f} ms", r["lone_minus_floor_ms"],
         lambda v: v <= TARGET_LONE_MS, "{:+.1f} ms"),
        (f"RSS drift <= {TARGET_RSS_DRIFT_PCT:.0f} %", r["rss_drift_pct"],
         lambda v: v <= TARGET_RSS_DRIFT_PCT, "{:+.1f} %"),
        (f"cold start <= {TARGET_COLD_START_S:.0f} s", r["cold_start_s"],
         lambda v: v <= TARGET_COLD_START_S, "{:.2f} s"),
        (f"model, one window (batch 1) <= {TARGET_WINDOW_MS:.0f} ms", r["window_ms"],
         lambda v: v <= TARGET_WINDOW_MS, "{:.1f} ms"),
    ]
    return [(what, *check(value, ok, fmt)) for what, value, ok, fmt in rows]


def machine() -> dict:
    model_name = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    return {"cpu": model_name, "cores": os.cpu_count(), "load_avg": os.getloadavg()}


# --- report -----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


@dataclass
class Report:
    """The run as text: a heading, notes, tables (title, columns, rows) and the target verdicts."""

    heading: str
    notes: list[str]
    tables: list[tuple[str, list[str], list[list[str]]]]
    lines: list[str]
    verdicts: list[tuple[str, str, bool | None]]


def report(r: dict) -> Report:
    m, first = r["machine"], r["clips"][0]["name"]
    heading = (
        f"foalnet bench ({r['mode']}) on {m['cpu']}, {m['cores']} cores, load average {m['load_avg'][0]:.2f} "
        f"at the start and {r['load_avg_end'][0]:.2f} at the end; provider {r['floor']['provider']}"
    )
    notes = []
    if max(m["load_avg"][0], r["load_avg_end"][0]) >= 1.0:
        notes.append("The machine was busy (load average >= 1): these numbers are noisy.")
    tables = []

    rows = [
        [name, str(row["windows"]), _ms(row["decode_ms"]), f"{row['decode_clips_per_s']:.1f}", _ms(row["faces_ms"]),
         f"{row['faces_clips_per_s']:.1f}", f"{row['model_ms']:.1f}", f"{row['clips_per_s']:.1f}",
         _ms(row["latency_ms"]), _ms(row["physical_ms"]), f"{row['physical_floor_clips_per_s']:.1f}",
         _ms(row["physical_latency_ms"]), _ms(r["lone"].get(name))]
        for name, row in r["floor"]["clips"].items()
    ]
    tables.append(("Floor (no HTTP): per clip; ffmpeg-process floor, then the physical floor (PyAV in-process "
                   "decode + faces, one thread)", ["clip", "windows", "decode ms", "decode clips/s", "faces ms",
                   "faces clips/s", "model ms", "floor clips/s", "floor latency ms", "PyAV decode+faces ms",
                   "physical floor clips/s", "physical latency ms", "service lone p50 ms"], rows))

    windows = r["floor"]["clips"][first]["windows"]
    rows = [[str(row["batch"]), f"{row['ms']:.1f}", f"{row['windows_per_s']:.0f}",
             f"{row['windows_per_s'] / windows:.1f}"] for row in r["floor"]["model"]]
    tables.append(("Model alone (ONNX Runtime)",
                   ["batch", "ms / batch", "windows/s", f"{first} clips/s ({windows} win/clip)"], rows))

    for title, levels in (("Service (foalnet serve)", r["service"]), ("Naive baseline (torch eager)", r["naive"])):
        batched = any(level["batch_sizes"] for level in levels)
        columns = ["concurrency", "sent", "ok", "errors", "clips/s", "p50 ms", "p95 ms", "p99 ms"]
        columns += ["mean batch", "batches (size: count)"] if batched else []
        rows = []
        for level in levels:
            hist = level["batch_sizes"]
            cells = [
                str(level["concurrency"]), str(level["sent"]), str(level["ok"]),
                ", ".join(f"{k}: {v}" for k, v in level["errors"].items()) or "0",
                f"{level['clips_per_s']:.2f}", _ms(level["p50_ms"]), _ms(level["p95_ms"]), _ms(level["p99_ms"]),
            ]
            if batched:
                cells += [f"{mean_batch(hist) or 0:.1f}", " ".join(f"{k}: {v}" for k, v in batch_counts(hist).items())]
            rows.append(cells)
        tables.append((f"{title}: {first} clips", columns, rows))

    rows = [[str(level["concurrency"]), *(_ms(level["stages_ms"].get(t)) for t in TIMINGS), _ms(level["p50_ms"])]
            for level in r["service"]]
    tables.append(("Service: where the time goes (median ms per answer, the service's own timings_ms)",
                   ["concurrency", *TIMINGS, "client latency p50"], rows))

    mem = r["memory"]
    lines = [
        f"Memory: peak RSS {mem['peak_kb'] / 1024:.0f} MiB; RSS {mem['rss_a_kb'] / 1024:.0f} MiB after "
        f"{mem['requests_a']} requests, {mem['rss_b_kb'] / 1024:.0f} MiB after {mem['requests_b']}"
        + (" (quick mode: fewer requests than the target's 100 / 1,000)" if r["mode"] == "quick" else ""),
        f"Cold start to /readyz 200: service {r['cold_start_s']:.2f} s, naive {r['naive_cold_start_s']:.2f} s",
        f"Naive baseline weights: {r['naive_info']['weights']} (same as the ONNX file's: {r['naive_info']['parity']})",
    ]
    return Report(heading, notes, tables, lines, verdicts(r["ratios"]))


def print_report(rep: Report, console: Console) -> None:
    console.print(f"[bold]{escape(rep.heading)}[/]")
    for note in rep.notes:
        console.print(f"[yellow]{escape(note)}[/]")
    for title, columns, rows in rep.tables:
        table = Table(title=title)
        for col in columns:
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in rep.lines:
        console.print(escape(line))
    for what, measured, passed in rep.verdicts:
        colour = {True: "green", False: "red", None: "yellow"}[passed]
        console.print(f"[{colour}]{VERDICT[passed]}[/]  {what}: {measured}")


def markdown(rep: Report) -> str:
    """The same report as Markdown, to paste into docs/benchmarks.md."""
    out = [rep.heading + ".", "", *(f"> {note}" for note in rep.notes)]
    for title, columns, rows in rep.tables:
        out += ["", f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", *(f"- {line}" for line in rep.lines), ""]
    out += [f"- **{VERDICT[passed]}** {what}: {measured}" for what, measured, passed in rep.verdicts]
    return "\n".join(out) + "\n"


def write_plots(r: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, colour in (("service", "tab:blue"), ("naive", "tab:red")):
        xs = [level["concurrency"] for level in r[key]]
        for q, style in (("p50", "-o"), ("p95", "--"), ("p99", ":")):
            ax.plot(xs, [level[f"{q}_ms"] for level in r[key]], style, color=colour, label=f"{key} {q}")
    ticks = sorted({level["concurrency"] for level in r["service"] + r["naive"]})
    ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)",
           title=f"Latency vs concurrency ({r['clips'][0]['name']} clips)")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.legend(fontsize=7)
    latency = out_dir / "latency_vs_concurrency.png"
    fig.tight_layout()
    fig.savefig(latency, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = r["floor"]["model"]
    ax.plot([row["batch"] for row in rows], [row["windows_per_s"] for row in rows], "-o")
    ax.set(xscale="log", xlabel="batch size", ylabel="windows / s",
           title=f"Model throughput vs batch size ({r['floor']['provider']})")
    ax.set_xticks([row["batch"] for row in rows], [str(row["batch"]) for row in rows])
    throughput = out_dir / "throughput_vs_batch.png"
    fig.tight_layout()
    fig.savefig(throughput, dpi=100)
    plt.close(fig)
    return [latency, throughput]


Opt = typer.Option


def bench(
    model: Annotated[Path | None, Opt(help="ONNX model (default: the service's, weights/foalnet-lite.onnx).")] = None,
    quick: Annotated[bool, Opt("--quick", help="Smoke run: tiny clip, few requests (not the targets').")] = False,
    json_out: Annotated[Path | None, Opt("--json", help="Also write every number to this JSON file.")] = None,
    plots: Annotated[Path | None, Opt(help="Write the latency and throughput PNG plots here.")] = None,
    markdown_out: Annotated[Path | None, Opt("--markdown", help="Also write the tables as Markdown here.")] = None,
    device: Annotated[str, Opt(help="Floor and service device: auto (the service's default), cuda, cpu.")] = "auto",
    checkpoint: Annotated[Path | None, Opt(help="Naive baseline's torch weights (default: see the docs).")] = None,
) -> None:
    """Measure the floor, the service and a naive baseline, and check the performance targets."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)  # the tables stay readable when piped to a file
    model = Path(model or default_model_path())
    if not model.exists():
        raise typer.BadParameter(f"no model at {model}", param_hint="--model")
    with tempfile.TemporaryDirectory(prefix="foalnet-bench-") as tmp:
        try:
            results = run(model.resolve(), QUICK if quick else FULL, device=device, checkpoint=checkpoint,
                          work=Path(tmp), say=console.log)
        except (BenchError, EngineError) as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from exc
    rep = report(results)
    print_report(rep, console)
    if markdown_out:
        markdown_out.write_text(markdown(rep))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    if plots:
        for path in write_plots(results, plots):
            console.print(f"plot: {path}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
