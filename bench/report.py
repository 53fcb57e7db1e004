"""The `foalnet bench` report: tables, target verdicts, Markdown for docs/benchmarks.md and plots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.load import batch_counts, mean_batch
from bench.plan import (
    TARGET_COLD_START_S,
    TARGET_LONE_MS,
    TARGET_LONE_P50_MS,
    TARGET_RSS_DRIFT_PCT,
    TARGET_SATURATION,
    TARGET_VS_NAIVE,
    TARGET_VS_PHYSICAL,
    TARGET_WINDOW_MS,
)
from service.metrics import STAGES

TIMINGS = (*STAGES, "total")  # the service's own per-stage `timings_ms` of each answer
VERDICT = {True: "PASS", False: "FAIL", None: "N/A"}  # a target met, missed, or not measured


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
                   "decode + faces, a one-thread decoder in one process per core)", ["clip", "windows", "decode ms", "decode clips/s", "faces ms",
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
