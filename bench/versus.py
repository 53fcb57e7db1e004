"""`python -m bench.versus`: this checkout's service against an older commit's, in one run, and a
long HD clip through this checkout's streaming answer.

1. Both services (the old one from a git worktree of `--old-rev`, started through its console-script
   entry point with this venv's Python and the worktree first on the path) get the same 5 s 640x360 clip: lone p50 (concurrency 1) and
   closed-loop throughput at each `--concurrency`; the best level is the saturation throughput.
   They run one after the other, never together, on the same model file.
2. A `--long-s` clip (default 10 minutes) at 1920x1080 is posted once with
   `Accept: application/x-ndjson`: when the first segment line and the summary line arrive, and the
   peak resident memory of the service and its decode workers over the request, against before it.

Prints one JSON object. Leave the machine idle while it runs: both services share its cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from bench.load import load
from bench.media import ffmpeg, make_clip
from bench.server import HOST, ServerProcess, children, free_port, rss_bytes, serve_command

ROOT = Path(__file__).resolve().parent.parent


def _tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (the decode workers sit under a forkserver)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            total += rss_bytes(p)
            stack += children(p)
        except OSError:
            pass
    return total


def _levels(url: str, clip: Path, concurrency: list[int], seconds: float) -> dict:
    load(url, clip, 1, 5, 30.0, False)  # warm: first decode, first batches
    lone = load(url, clip, 1, 40, seconds, False)
    levels = [load(url, clip, c, 2000, seconds, False).summary() for c in concurrency]
    return {
        "lone_p50_ms": lone.percentile(50),
        "lone_stages_ms": lone.summary()["stages_ms"],
        "levels": [
            {k: lv[k] for k in ("concurrency", "ok", "errors", "clips_per_s", "p50_ms")} for lv in levels
        ],
        "saturation_clips_per_s": max(lv["clips_per_s"] for lv in levels),
    }


def _long_clip(work: Path, seconds: float) -> Path:
    """A 1080p face-and-speech clip: 10 s generated, then stream-copied end to end (no re-encode)."""
    piece = make_clip(work / "piece.mp4", seconds=10, width=1920, height=1080)
    out = work / f"long-{int(seconds)}s.mp4"
    ffmpeg(
        "-stream_loop", str(int(seconds // 10) - 1), "-i", str(piece), "-c", "copy", str(out), timeout_s=600
    )
    return out


def _stream_long(model: Path, clip: Path, work: Path) -> dict:
    size_mb = clip.stat().st_size / 1e6
    with ServerProcess.serve(model, work, "--max-upload-mb", str(int(size_mb) + 50)) as server:
        load(server.url, make_clip(work / "warm.mp4", seconds=4), 1, 3, 30.0, False)
        before = _tree_rss(server.pid)
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(_tree_rss(server.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        lines: list[tuple[float, dict]] = []
        start = time.perf_counter()
        try:
            with (
                clip.open("rb") as body,
                httpx.stream(
                    "POST",
                    server.url + "/predict",
                    content=body,
                    headers={"Content-Type": "video/mp4", "Accept": "application/x-ndjson"},
                    timeout=1200,
                ) as response,
            ):
                status = response.status_code
                for line in response.iter_lines():
                    if line.strip():
                        lines.append((time.perf_counter() - start, json.loads(line)))
        finally:
            done.set()
            sampler.join()
    summary = lines[-1][1] if lines else {}
    return {
        "clip_s": summary.get("duration_s"),
        "clip_mb": round(size_mb, 1),
        "status": status,
        "lines": len(lines),
        "first_segment_s": lines[0][0] if lines else None,
        "summary_s": lines[-1][0] if lines else None,
        "service_decode_ms": summary.get("timings_ms", {}).get("decode"),
        "rss_before_mb": before / 2**20,
        "rss_peak_mb": max(peak) / 2**20,
        "rss_growth_mb": (max(peak) - before) / 2**20,
    }


def _compare(
    report: dict,
    work: Path,
    old_rev: str,
    old_entry: str,
    model: Path,
    concurrency: list[int],
    level_s: float,
) -> None:
    """The old commit's service, then this checkout's, on the same 5 s 640x360 clip."""
    clip = make_clip(work / "c5.mp4", seconds=5, width=640, height=360)
    tree = work / "old"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), old_rev],
        check=True,
        capture_output=True,
    )
    try:
        port = free_port()
        module, function = old_entry.split(":")
        entry = f"from {module} import {function}; {function}()"
        old = [
            sys.executable,
            "-c",
            entry,
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--model",
            str(model),
            "--tmp-dir",
            str(work),
            "--log-level",
            "warning",
        ]
        env = {"PYTHONPATH": str(tree)}
        with ServerProcess(old, port, env=env, cwd=tree, log_path=work / "old.log") as server:
            report["old"] = _levels(server.url, clip, concurrency, level_s)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    port = free_port()
    new = serve_command(model, port, "--tmp-dir", str(work), "--log-level", "warning")
    with ServerProcess(new, port, log_path=work / "new.log") as server:
        report["new"] = _levels(server.url, clip, concurrency, level_s)
    report["saturation_ratio"] = (
        report["new"]["saturation_clips_per_s"] / report["old"]["saturation_clips_per_s"]
    )


def main(
    old_rev: Annotated[str, typer.Option(help="the commit to compare with")] = "8070f53",
    old_entry: Annotated[
        str, typer.Option(help="its console-script entry point, MODULE:FUNCTION")
    ] = "model_export.cli:main",
    model: Annotated[Path, typer.Option(help="one model file both services load")] = (
        ROOT / "weights" / "foalnet-lite.onnx"
    ),
    concurrency: Annotated[list[int], typer.Option()] = [4, 16],  # noqa: B006 (typer reads the default)
    level_s: Annotated[float, typer.Option(help="seconds per level (0: skip the comparison)")] = 30.0,
    long_s: Annotated[
        float, typer.Option(help="length of the long clip, under the service's 600 s cap (0: skip it)")
    ] = 590.0,
) -> None:
    report: dict = {"old_rev": old_rev, "model": str(model), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if level_s:
            _compare(report, work, old_rev, old_entry, model, concurrency, level_s)
        if long_s:
            report["long"] = _stream_long(model, _long_clip(work, long_s), work)
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
