"""`foalnet soak`: mixed valid and hostile traffic against a real server, then leak checks.

It starts `foalnet serve` itself (or targets `--url`), sends the `bench.corpus` cases (valid
clips, malformed and hostile files, odd file names) from a few client threads for the given time,
and checks what a long-running service must keep true: no 5xx, every answer one the case allows,
no local file content in a response, the playlists' local listener never contacted, and, when the
server process is on this machine (started here, or `--pid`), no file descriptors leaked, no temp
files left (`--tmp-dir`) and RSS growth under a bound. Exit status 1 when any check fails.

The server is a `bench.server.ServerProcess`, as in the end-to-end tests.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from bench.corpus import LOCAL_SECRET_MARK, OK, Case, Listener, build_corpus, multipart, plain_clip
from bench.server import ServerError, ServerProcess, metric, open_fds, rss_bytes

SETTLE_TIMEOUT_S = 30.0  # after the traffic, how long the server may take to finish in-flight work
FD_SLACK = 4  # descriptors that may come and go on their own (log files, the metrics socket)


# --- traffic ----------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # "case: got X, allowed Y", first few kept
    unexpected_count: int = 0
    leaked_secret: int = 0
    slowest_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, case: Case, status: int, code: str | None, body: str, seconds: float) -> None:
        outcome = OK if status == 200 else code
        with self.lock:
            self.sent += 1
            self.statuses[status] += 1
            self.slowest_s = max(self.slowest_s, seconds)
            if LOCAL_SECRET_MARK in body:
                self.leaked_secret += 1
            if outcome not in case.expect and status not in (429, 499):
                self.unexpected_count += 1
                if len(self.unexpected) < 10:
                    self.unexpected.append(f"{case.name}: got {status} {code}, allowed {case.expect}")


def send(http: httpx.Client, url: str, case: Case, headers: dict[str, str]) -> tuple[int, str | None, str]:
    """POST one case as multipart with its file name; (status, error code or None, body)."""
    body, content_type = multipart(case.path.read_bytes(), case.filename)
    response = http.post(url + "/predict", content=body, headers={"Content-Type": content_type, **headers})
    code = None
    if response.status_code != 200:
        try:
            code = response.json().get("error")
        except ValueError:
            code = None
    return response.status_code, code, response.text


def run_traffic(
    url: str, cases: list[Case], *, seconds: float, concurrency: int, api_key: str | None, tally: Tally
) -> None:
    """`concurrency` client threads cycle through `cases` (valid and hostile interleaved)."""
    valid = [c for c in cases if c.valid]
    hostile = [c for c in cases if not c.valid]
    order = [c for pair in zip(hostile, itertools.cycle(valid)) for c in pair] or valid
    stop_at = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    counter = itertools.count()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop_at:
                case = order[next(counter) % len(order)]
                start = time.monotonic()
                try:
                    status, code, text = send(http, url, case, headers)
                except httpx.TransportError as exc:
                    status, code, text = 0, f"transport error: {exc}", ""
                tally.record(case, status, code, text, time.monotonic() - start)

    threads = [threading.Thread(target=client, name=f"soak-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- the command ------------------------------------------------------------------------------


@dataclass
class Report:
    seconds: float
    requests: int
    statuses: dict[str, int]
    server_errors: int
    unexpected: int
    unexpected_examples: list[str]
    leaked_secret: int
    listener_contacts: int
    slowest_s: float
    fd_before: int | None = None
    fd_after: int | None = None
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    temp_files_left: int | None = None
    failures: list[str] = field(default_factory=list)


def _wait_idle(url: str) -> None:
    """Until the server has no request in flight (or SETTLE_TIMEOUT_S passes)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline and metric(url, "foalnet_in_flight_requests") > 0:
        time.sleep(0.2)
    time.sleep(0.5)  # let closed connections' descriptors go


def soak(
    *,
    url: str,
    pid: int | None,
    tmp_dir: Path | None,
    work_dir: Path,
    seconds: float,
    concurrency: int,
    api_key: str | None,
    max_rss_growth_mb: float,
) -> Report:
    with Listener() as listener:
        cases = build_corpus(
            work_dir / "corpus", plain_clip(work_dir / "base.mp4"), listener_url=listener.url
        )
        # One warm-up round first: caches, thread pools and arenas fill before the baseline.
        warm = Tally()
        with httpx.Client(timeout=120) as http:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            for case in cases:
                warm.record(case, *send(http, url, case, headers), 0.0)
        _wait_idle(url)
        fd_before = open_fds(pid) if pid else None
        rss_before = rss_bytes(pid) if pid else None

        tally = Tally()
        start = time.monotonic()
        run_traffic(url, cases, seconds=seconds, concurrency=concurrency, api_key=api_key, tally=tally)
        elapsed = time.monotonic() - start
        _wait_idle(url)
        contacts = listener.contacts

    both = Counter(warm.statuses) + tally.statuses
    report = Report(
        seconds=round(elapsed, 1),
        requests=warm.sent + tally.sent,
        statuses={str(k): v for k, v in sorted(both.items())},
        server_errors=sum(v for k, v in both.items() if k >= 500 or k == 0),
        unexpected=warm.unexpected_count + tally.unexpected_count,
        unexpected_examples=(warm.unexpected + tally.unexpected)[:10],
        leaked_secret=warm.leaked_secret + tally.leaked_secret,
        listener_contacts=contacts,
        slowest_s=round(max(warm.slowest_s, tally.slowest_s), 2),
    )
    if pid:
        report.fd_before, report.fd_after = fd_before, open_fds(pid)
        report.rss_before_mb = round(rss_before / 2**20, 1)
        report.rss_after_mb = round(rss_bytes(pid) / 2**20, 1)
    if tmp_dir is not None:
        report.temp_files_left = sum(1 for _ in tmp_dir.rglob("*")) if tmp_dir.exists() else 0
    report.failures = _failures(report, max_rss_growth_mb)
    return report


def _failures(r: Report, max_rss_growth_mb: float) -> list[str]:
    checks = [
        (r.server_errors == 0, f"{r.server_errors} answers were 5xx or no answer"),
        (r.unexpected == 0, f"{r.unexpected} answers were not among those the case allows"),
        (r.leaked_secret == 0, f"{r.leaked_secret} answers contained {LOCAL_SECRET_MARK!r}"),
        (r.listener_contacts == 0, f"the local listener was contacted {r.listener_contacts} times"),
    ]
    if r.fd_before is not None:
        checks.append(
            (r.fd_after <= r.fd_before + FD_SLACK, f"open descriptors grew {r.fd_before} -> {r.fd_after}")
        )
    if r.rss_before_mb is not None:
        growth = r.rss_after_mb - r.rss_before_mb
        checks.append(
            (growth <= max_rss_growth_mb, f"RSS grew {growth:.1f} MB (limit {max_rss_growth_mb:g})")
        )
    if r.temp_files_left is not None:
        checks.append((r.temp_files_left == 0, f"{r.temp_files_left} temporary files left"))
    return [message for ok, message in checks if not ok]


def register(app: typer.Typer) -> None:
    """Add `foalnet soak` to the CLI."""

    @app.command("soak")
    def soak_command(
        minutes: Annotated[float, typer.Option(help="How long to send traffic.")] = 0.0,
        seconds: Annotated[float, typer.Option(help="Added to --minutes (short runs, tests).")] = 0.0,
        url: Annotated[str | None, typer.Option(help="Target this server instead of starting one.")] = None,
        pid: Annotated[
            int | None, typer.Option(help="With --url: the server's pid on this machine (fd/RSS checks).")
        ] = None,
        tmp_dir: Annotated[
            Path | None, typer.Option(help="With --url: the server's FOALNET_TMP_DIR (temp-file check).")
        ] = None,
        model: Annotated[
            Path | None, typer.Option(help="Model for the server started here (default: the service's).")
        ] = None,
        concurrency: Annotated[int, typer.Option(min=1, help="Client threads.")] = 2,
        api_key: Annotated[
            str | None, typer.Option(envvar="FOALNET_API_KEY", help="Bearer key, if the server needs one.")
        ] = None,
        max_rss_growth_mb: Annotated[float, typer.Option(help="Allowed RSS growth of the server.")] = 64.0,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    ) -> None:
        """Soak a server with valid and hostile uploads; exit 1 when a check fails."""
        total = minutes * 60 + seconds
        if total <= 0:
            raise typer.BadParameter("give --minutes and/or --seconds")
        with tempfile.TemporaryDirectory(prefix="foalnet-soak-") as work:
            work_dir = Path(work)
            server = None
            if url is None:
                from service.settings import Settings

                tmp_dir = work_dir / "uploads"
                model_path = model or Settings().model_path
                extra = ["--api-key", api_key] if api_key else []
                try:
                    server = ServerProcess.serve(model_path, tmp_dir, *extra)
                except ServerError as exc:
                    typer.echo(f"error: the server did not start: {exc}", err=True)
                    raise typer.Exit(2) from exc
                url, pid = server.url, server.pid
            try:
                report = soak(
                    url=url.rstrip("/"),
                    pid=pid,
                    tmp_dir=tmp_dir,
                    work_dir=work_dir,
                    seconds=total,
                    concurrency=concurrency,
                    api_key=api_key,
                    max_rss_growth_mb=max_rss_growth_mb,
                )
            finally:
                if server is not None:
                    server.stop()
        _print(report, as_json)
        if report.failures:
            raise typer.Exit(1)


def _print(report: Report, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=2))
        return
    lines: list[tuple[str, Any]] = [
        ("requests", f"{report.requests} in {report.seconds} s (slowest {report.slowest_s} s)"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in report.statuses.items())),
        ("5xx / no answer", report.server_errors),
        ("unexpected answers", report.unexpected),
        ("local file in a response", report.leaked_secret),
        ("listener contacted", report.listener_contacts),
        ("open fds before -> after", _pair(report.fd_before, report.fd_after)),
        ("RSS MB before -> after", _pair(report.rss_before_mb, report.rss_after_mb)),
        ("temp files left", "not checked" if report.temp_files_left is None else report.temp_files_left),
    ]
    for name, value in lines:
        typer.echo(f"{name:>26}: {value}")
    for example in report.unexpected_examples:
        typer.echo(f"  unexpected: {example}")
    typer.echo("FAILED: " + "; ".join(report.failures) if report.failures else "PASSED")


def _pair(a: object, b: object) -> str:
    return "not checked" if a is None else f"{a} -> {b}"
