"""Every dashboard query, run by a real Prometheus against a real service.

A `foalnet serve` process (configured by FOALNET_* variables, as in the image) serves the untrained
lite model on a free port; Debian's `prometheus` scrapes it every second from its own temp dir;
real clips (and a broken upload, so error series exist) go through POST /predict in two waves;
then each panel's PromQL must return a finite number. Panels that read DCGM_* series need the
NVIDIA DCGM exporter and a GPU: there Prometheus only checks their syntax and the test is skipped.
The same Prometheus loads docker/prometheus/alerts.yaml and evaluates it against the live series,
and the autoscaler's adapter query runs too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from service.metrics import STAGES
from tests.test_alerts import ALERTS
from tests.test_deploy import ADAPTER_VALUES, DASHBOARD, dashboard_targets, promql_metric_names

SCRAPE_S = 1.0
RATE_WINDOW = "1m"  # stands in for Grafana's $__rate_interval; spans the whole test run
GRAFANA_VARIABLES = {"$__rate_interval": RATE_WINDOW}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(
    check: Callable[[], object], timeout_s: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a process logging to a file (a pipe nobody reads would block it once full)."""
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


def _ok(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == 200


def _stop(proc: subprocess.Popen, log: Path) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return log.read_text(errors="replace")[-3000:]


@dataclass
class Stack:
    service: str
    prometheus: str

    def query(self, expr: str) -> dict:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]


def _expand(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


@pytest.fixture(scope="module")
def stack(lite_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.skip("prometheus is not installed (`make test` installs Debian's package)")
    from bench.media import make_clip, write_bytes

    tmp = tmp_path_factory.mktemp("live")
    app_port, prom_port = _free_port(), _free_port()
    env = dict(
        os.environ,
        FOALNET_HOST="127.0.0.1",
        FOALNET_PORT=str(app_port),
        FOALNET_MODEL_PATH=str(lite_model),
        FOALNET_DEVICE="cpu",
        FOALNET_INTRA_OP_THREADS="1",
        FOALNET_BUCKETS="1,2,4",
        FOALNET_MAX_WAIT_MS="50",
        FOALNET_LOG_LEVEL="warning",
        OMP_NUM_THREADS="1",
        ORT_DISABLE_TELEMETRY="1",  # as in the image
    )
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": f"{SCRAPE_S:g}s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            # Labelled as the compose stack's GPU target: a CPU provider here is a fallback.
            {
                "job_name": "foalnet",
                "static_configs": [{"targets": [f"127.0.0.1:{app_port}"], "labels": {"accelerator": "gpu"}}],
            },
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    live = Stack(f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{prom_port}")
    procs: dict[str, subprocess.Popen] = {}
    try:
        # The service as the image runs it: `foalnet serve`, configured by environment.
        foalnet = Path(sys.executable).parent / "foalnet"
        service = procs["service"] = _start([str(foalnet), "serve"], tmp / "service.log", env)
        prometheus = procs["prometheus"] = _start(
            [
                prometheus_bin,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            tmp / "prometheus.log",
        )
        _wait_for(lambda: _ok(f"{live.service}/readyz"), 180, "service ready", service)
        _wait_for(lambda: _ok(f"{live.prometheus}/-/ready"), 60, "prometheus ready", prometheus)
        _wait_for(lambda: live.query('up{job="foalnet"} == 1')["result"], 30, "first scrape", prometheus)

        clips = [make_clip(tmp / f"clip{i}.mp4", seconds=2.0) for i in range(2)]
        broken = write_bytes(tmp / "broken.mp4", b"\x00\x01 this is not a video " * 64)

        def predict(path: Path) -> int:
            with path.open("rb") as f:
                files = {"file": (path.name, f, "video/mp4")}
                return httpx.post(f"{live.service}/predict", files=files, timeout=120).status_code

        def scraped_requests() -> float:
            result = live.query("sum(foalnet_requests_total)")["result"]
            return float(result[0]["value"][1]) if result else 0.0

        # Two waves, each until Prometheus has scraped it, so rates and quantiles see counters move
        # (a labelled series is born with its first request: only the second wave raises its rate).
        with ThreadPoolExecutor(3) as pool:
            for wave in (1, 2):
                statuses = list(pool.map(predict, [*clips, broken]))
                assert statuses[:2] == [200, 200] and statuses[2] >= 400, statuses
                scraped = lambda n=3 * wave: scraped_requests() == n  # noqa: E731
                _wait_for(scraped, 30, f"scrape of wave {wave}", prometheus)
        yield live
    finally:
        # Shown by pytest when a test of this module fails.
        for name, proc in procs.items():
            print(f"--- {name} log tail ---\n{_stop(proc, tmp / f'{name}.log')}", file=sys.stderr)


def _panel_queries() -> list[pytest.param]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        pytest.param(panel["title"], target["expr"], id=f"{panel['title']}[{target['refId']}]")
        for panel, target in dashboard_targets(dashboard)
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("title", "expr"), _panel_queries())
def test_dashboard_query_returns_data(stack: Stack, title: str, expr: str) -> None:
    data = stack.query(_expand(expr))  # a syntax error fails here, for every panel
    if any(name.startswith("DCGM_") for name in promql_metric_names(expr)):
        assert data["result"] == [], "nothing here exports DCGM series"
        pytest.skip(f"{title}: needs the NVIDIA DCGM exporter and a GPU (syntax checked by Prometheus)")
    values = [float(v) for series in data["result"] for v in [series["value"][1]]]
    assert values, f"{title}: no data for {expr}"
    assert any(math.isfinite(v) for v in values), f"{title}: only NaN/Inf for {expr}: {data['result']}"


@pytest.mark.slow
def test_every_stage_shows_on_the_stage_panel(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (expr,) = [t["expr"] for _, t in dashboard_targets(dashboard) if "stage" in t["expr"]]
    stages = {series["metric"]["stage"] for series in stack.query(_expand(expr))["result"]}
    assert stages == set(STAGES)


@pytest.mark.slow
def test_autoscaler_metric_query_returns_one_value_per_pod(stack: Stack) -> None:
    """The prometheus-adapter rule's query, with the labels a scrape here has in place of namespace/pod."""
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    expr = (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["name"]["as"])
        .replace("<<.LabelMatchers>>", 'job="foalnet"')
        .replace("<<.GroupBy>>", "instance")
    )
    (series,) = stack.query(expr)["result"]
    assert math.isfinite(float(series["value"][1]))


@pytest.mark.slow
def test_load_gauges_and_process_metrics_are_scraped(stack: Stack) -> None:
    def value(expr: str) -> float:
        (series,) = stack.query(expr)["result"]
        return float(series["value"][1])

    # Between waves nothing is decoding or queued: the gauges exist and read zero.
    for name in ("foalnet_decode_in_flight", "foalnet_decode_queue_depth", "foalnet_saturation"):
        assert value(f'{name}{{job="foalnet"}}') == 0.0, name
    assert value('process_cpu_seconds_total{job="foalnet"}') > 0
    assert value('process_resident_memory_bytes{job="foalnet"}') > 50 * 2**20  # a loaded model


@pytest.mark.slow
def test_prometheus_evaluates_the_alert_rules(stack: Stack) -> None:
    """Every rule loads and evaluates cleanly on live series, and the one whose condition holds
    here (a CPU provider on a target labelled accelerator="gpu") turns into an alert."""

    def rules() -> list[dict]:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    _wait_for(lambda: rules() and all(r["lastEvaluation"] > "2000" for r in rules()), 30, "rule evaluation")
    loaded = rules()
    assert {r["name"] for r in loaded} == {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
                                          for r in g["rules"]}
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]

    def fallback_alerts() -> list[dict]:
        alerts = httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "FoalnetCpuFallback"]

    _wait_for(fallback_alerts, 30, "the CPU-fallback alert")
    (alert,) = fallback_alerts()
    assert alert["state"] in ("pending", "firing") and alert["labels"]["provider"] == "CPUExecutionProvider"
    alerts = httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    names = {a["labels"]["alertname"] for a in alerts}
    assert "FoalnetNotReady" not in names and "FoalnetHighErrorRatio" not in names
