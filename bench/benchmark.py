"""`foalnet bench`: how close the running service gets to what this machine can do, in one run.

Four measurements, all on clips the harness generates (h264 + aac, 30 fps, a real face, speech):
- the floor (`bench.floor`): decode alone, face detection alone, the model alone at each batch size
  (no HTTP, no queue), each as clips/s on this machine;
- the service: `foalnet serve` started as a subprocess on 127.0.0.1, loaded by an httpx async client
  (`bench.load`) at several concurrency levels (throughput, latency percentiles, batch sizes read
  from /metrics), its cold start (process start to /readyz 200) and its memory (peak RSS, drift);
- the naive baseline (`bench.naive_server`): torch eager, one request at a time;
- the ratios between them, checked against the targets (printed, never asserted).

Every loop is bounded by a request count and a duration; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from bench.floor import measure_floor
from bench.load import load
from bench.plan import FULL, QUICK, Plan, make_clips
from bench.report import markdown, print_report, report, write_plots
from bench.server import ServerError, ServerProcess, free_port, memory_kb
from service.engine import EngineError
from service.settings import default_model_path


def naive_server(model: Path, checkpoint: Path | None, log_path: Path) -> ServerProcess:
    """The naive baseline (`bench.naive_server`, torch) on a free port of 127.0.0.1."""
    port = free_port()
    command = [sys.executable, "-m", "bench.naive_server", "--model", str(model), "--port", str(port)]
    command += ["--checkpoint", str(checkpoint)] if checkpoint else []
    return ServerProcess(command, port, log_path=log_path)


def run(model: Path, plan: Plan, *, device: str, checkpoint: Path | None, work: Path, say: Callable) -> dict:
    results: dict = {"mode": plan.mode, "model": str(model), "device": device, "machine": machine()}
    say("generating clips")
    clips = make_clips(work, plan)
    first = plan.clips[0].name
    results["clips"] = [asdict(c) | {"bytes": clips[c.name].stat().st_size} for c in plan.clips]

    say("floor: decode, faces, model")
    results["floor"] = measure_floor(model, clips, plan, device)

    say("service: cold start, memory, concurrency")
    with ServerProcess.serve(model, work, "--device", device, log_path=work / "service.log") as server:
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
        results["memory"]["peak_kb"] = memory_kb(server.pid)["peak_kb"]

    say("naive baseline")
    with naive_server(model, checkpoint, work / "naive.log") as server:
        results["naive_cold_start_s"] = server.cold_start_s
        results["naive_info"] = httpx.get(f"{server.url}/info", timeout=10).json()
        results["naive"] = [
            load(server.url, clips[first], c, plan.requests_per_level, plan.level_s, False).summary()
            for c in plan.naive_concurrency
        ]
    results["ratios"] = ratios(results, first)
    results["load_avg_end"] = os.getloadavg()
    return results


def memory_run(server: ServerProcess, clip: Path, plan: Plan) -> dict:
    """RSS after the first `a` requests and after `b` requests in all (sent at a fixed concurrency)."""
    a, b = plan.memory_after
    start = time.perf_counter()
    first = load(server.url, clip, plan.memory_concurrency, a, plan.memory_s, False)
    rss_a = memory_kb(server.pid)["rss_kb"]
    left = max(plan.memory_s - (time.perf_counter() - start), 1.0)
    rest = load(server.url, clip, plan.memory_concurrency, b - a, left, False)
    rss_b = memory_kb(server.pid)["rss_kb"]
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


def machine() -> dict:
    model_name = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    return {"cpu": model_name, "cores": os.cpu_count(), "load_avg": os.getloadavg()}


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
        except (ServerError, EngineError) as exc:
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
