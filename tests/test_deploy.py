"""Deployment files checked with the tools that consume them: hadolint, promtool, kubernetes-validate.

Also the cross-file facts nothing else would catch: every FOALNET_* variable is a real setting, the
compose mounts exist and publish on loopback only, Prometheus scrapes the compose services and
loads the alerts, the dashboard reads real metrics (the Kubernetes manifests: test_k8s.py). The dashboard's queries and the alert rules run against
a live service in test_dashboard_live.py; the alerts' unit tests are in test_alerts.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.contract import INPUTS, LITE_SPEC, METADATA_KEY, ModelSpec
from service.metrics import Metrics
from service.settings import Settings, env_var

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "foalnet.json"
K8S = DOCKER / "k8s"
ADAPTER_VALUES = K8S / "adapter" / "values.yaml"
# preStop `sleep` (no binary needed in the image) is a Kubernetes 1.30 field: the oldest we support.
K8S_VERSIONS = ("1.30.0", None)  # None: the newest schemas kubernetes-validate ships

SETTINGS_ENV = {env_var(name) for name in Settings.model_fields}


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (`make test` installs it)")
    return found


def metric_series_names() -> set[str]:
    """Every series name our /metrics can expose (counter `_total`, histogram `_bucket`/`_sum`/`_count`)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def promql_metric_names(expr: str) -> set[str]:
    """Names of our, the process collector's and DCGM's series an expression reads (functions and
    labels never start so)."""
    return set(re.findall(r"\b(?:foalnet_|process_|DCGM_)[A-Za-z0-9_]+\b", expr))


def dashboard_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# ---- Dockerfile ----

def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped, and the build
    args' defaults substituted (`${DEVICE}` stays: it picks between stages)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]
    defaults = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    defaults.pop("DEVICE")

    def expand(args: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m[1], m[0]), args)

    return [(op, expand(args)) for op, args in instructions]


def test_hadolint_finds_nothing() -> None:
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runtime_shape() -> None:
    instructions = _dockerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert any(f.startswith("nvidia/cuda:") and "cudnn-runtime" in f for f in froms), froms
    assert any(f.startswith("python:3.11-slim") for f in froms), froms
    assert froms[-1].split()[0] == "runtime-${DEVICE}", "the image must start from a clean runtime stage"
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    ops = {op: args for op, args in final}  # last value of each instruction in the image stage
    assert "--from=builder /opt/venv" in " ".join(a for op, a in final if op == "COPY")
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert "/readyz" in ops["HEALTHCHECK"] and "python" in ops["HEALTHCHECK"]
    assert ops["ENTRYPOINT"] == '["foalnet", "serve"]'
    # The builder installs exactly one ONNX Runtime through the project's extras, and never torch.
    builder_env = " ".join(a for op, a in instructions if op == "ENV" and "ORT_REQUIREMENT" in a)
    assert "onnxruntime-gpu==" in builder_env and "onnxruntime==" in builder_env
    assert '".[${DEVICE},otel]"' in " ".join(a for op, a in instructions if op == "RUN")  # + trace export
    assert "torch" not in " ".join(a for op, a in instructions if op == "RUN").replace('import torch"', "")


def onnxruntime_gpu_cuda_major(version: str) -> int:
    """CUDA major the onnxruntime-gpu wheels on PyPI are built for (cuDNN 9 for both, since 1.19):
    the `cuda` extra of 1.19-1.26 wants nvidia-cuda-runtime-cu12, of 1.27 and later ~=13.0."""
    major, minor = (int(part) for part in version.split(".")[:2])
    assert (major, minor) >= (1, 19), "before 1.19 the PyPI default was CUDA 11.8 + cuDNN 8"
    return 12 if (major, minor) <= (1, 26) else 13


def test_cuda_base_matches_the_onnxruntime_gpu_pin() -> None:
    instructions = _dockerfile_instructions()
    (base,) = [a.split()[0] for op, a in instructions if op == "FROM" and a.endswith("AS runtime-gpu")]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)
    assert match, f"{base}: want an nvidia/cuda cuDNN runtime image"
    (pin,) = re.findall(r"onnxruntime-gpu==([\d.]+)", " ".join(a for op, a in instructions if op == "ENV"))
    assert int(match[1]) == onnxruntime_gpu_cuda_major(pin), f"{base} cannot run onnxruntime-gpu {pin}"


def test_dockerfile_settings_are_real_and_model_is_copied_where_configured() -> None:
    env = {}
    for op, args in _dockerfile_instructions():
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    assert env["ORT_DISABLE_TELEMETRY"] == "1", "a server image must not phone home"
    foalnet_env = {k: v for k, v in env.items() if k.startswith("FOALNET_")}
    assert set(foalnet_env) <= SETTINGS_ENV, set(foalnet_env) - SETTINGS_ENV
    copies = [args.split() for op, args in _dockerfile_instructions() if op == "COPY"]
    assert ["weights/foalnet-lite.onnx", foalnet_env["FOALNET_MODEL_PATH"]] in copies
    Settings(**{k.removeprefix("FOALNET_").lower(): v for k, v in foalnet_env.items()})  # values parse


def test_dockerignore_keeps_every_copied_source() -> None:
    """.dockerignore is an allow-list: ignore everything, then re-include what COPY reads."""
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "**"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    sources = [
        source.rstrip("/")
        for op, args in _dockerfile_instructions()
        if op == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert sources
    for source in sources:
        in_context = any(source == a or source.startswith(a + "/") for a in allowed)
        assert in_context, f"{source} is left out of the build context"
        if source != "weights/foalnet-lite.onnx":
            assert (ROOT / source).exists(), source


def test_shipped_model_is_the_lite_model() -> None:
    """The file the image copies is a Foal-Net model carrying the lite contract in its metadata."""
    path = ROOT / "weights" / "foalnet-lite.onnx"
    if not path.exists():
        pytest.skip("weights/foalnet-lite.onnx is not trained yet: `docker build` needs it")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = ModelSpec.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert spec == LITE_SPEC
    assert [i.name for i in session.get_inputs()] == list(INPUTS)
    assert path.stat().st_size < 20_000_000  # what a tracked file may take (int8 / float16 storage)


def test_image_entry_point_runs_without_torch() -> None:
    """The image has no torch, `model_export` or `bench`: `foalnet serve` must still load, the
    command list names the commands it lacks, and asking for one says what to install."""
    code = (
        "import sys\n"
        "for name in ('torch', 'model_export', 'bench'): sys.modules[name] = None\n"
        "sys.argv = ['foalnet', *sys.argv[1:]]\n"
        "from foalnet_cli import main\n"
        "main()\n"
    )

    def foalnet(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", code, *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)

    serve = foalnet("serve", "--help")
    assert serve.returncode == 0, serve.stderr[-2000:]
    assert "--port" in serve.stdout
    listing = foalnet("--help")
    assert listing.returncode == 0 and "serve" in listing.stdout
    assert "Not installed here: train" in listing.stdout
    train = foalnet("train")
    assert train.returncode == 2 and "pip install '.[train]'" in train.stderr


# ---- compose, Prometheus, Grafana ----

def test_promtool_accepts_the_prometheus_config() -> None:
    cmd = [_tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_gpu_and_health() -> None:
    services = _compose()["services"]
    assert {"foalnet", "prometheus", "grafana", "dcgm-exporter"} <= set(services)
    app = services["foalnet"]
    assert app["build"]["args"]["DEVICE"] == "gpu"
    assert (COMPOSE.parent / app["build"]["context"] / app["build"].get("dockerfile", "Dockerfile")).is_file()
    for name in ("foalnet", "dcgm-exporter"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices), name
    health = " ".join(app["healthcheck"]["test"])
    assert "/readyz" in health and f":{app['environment']['FOALNET_PORT']}/" in health
    assert set(app["environment"]) <= SETTINGS_ENV, set(app["environment"]) - SETTINGS_ENV
    drain_s = Settings.model_fields["graceful_timeout_s"].default
    assert float(app["stop_grace_period"].removesuffix("s")) > drain_s, "SIGKILL would cut the drain short"
    assert app["read_only"] and any(t.startswith("/tmp") for t in app["tmpfs"])
    published = {p.split(":")[-1] for svc in services.values() for p in svc.get("ports", [])}
    assert {"8000", "9090", "3000", "9400"} <= published


_VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def _interpolate(tree: object, env: dict[str, str]) -> object:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` in the parsed file's strings, as
    compose does it (after parsing: a value stays a string); an unset required one raises."""

    def value(match: re.Match) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == "-" else ""

    if isinstance(tree, dict):
        return {k: _interpolate(v, env) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_interpolate(v, env) for v in tree]
    return _VARIABLE.sub(value, tree) if isinstance(tree, str) else tree


def test_compose_publishes_on_loopback_and_grafana_needs_a_password() -> None:
    parsed = _compose()
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        _interpolate(parsed, {})
    compose = _interpolate(parsed, {"GRAFANA_ADMIN_PASSWORD": "s3cret"})
    ports = [p for svc in compose["services"].values() for p in svc.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    # Opening up is explicit.
    public = {"GRAFANA_ADMIN_PASSWORD": "x", "FOALNET_BIND": "0.0.0.0", "GRAFANA_ANONYMOUS": "true"}
    opened = _interpolate(parsed, public)
    assert all(p.startswith("0.0.0.0:") for svc in opened["services"].values() for p in svc.get("ports", []))
    assert opened["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"


def test_compose_mounts_exist_in_the_repo() -> None:
    compose = _compose()
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source in named:
                continue
            assert (COMPOSE.parent / source).exists(), f"{name}: {source} is missing"


def test_prometheus_scrapes_the_compose_services() -> None:
    services = _compose()["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    mounted = " ".join(services["prometheus"]["volumes"])
    assert f"./{PROMETHEUS_CONFIG.relative_to(COMPOSE.parent)}:" in mounted
    targets = {
        job["job_name"]: t
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for t in static["targets"]
    }
    app_port = services["foalnet"]["environment"]["FOALNET_PORT"]
    assert targets["foalnet"] == f"foalnet:{app_port}"
    (rules,) = config["rule_files"]  # the alerts, mounted beside the config
    assert (PROMETHEUS_CONFIG.parent / rules).is_file()
    assert f"./prometheus/{rules}:/etc/prometheus/{rules}:ro" in services["prometheus"]["volumes"]
    (foalnet_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "foalnet"]
    assert foalnet_job["static_configs"][0]["labels"]["accelerator"] == "gpu"  # for FoalnetCpuFallback
    assert targets["dcgm"].split(":")[0] in services
    assert f":{targets['dcgm'].split(':')[1]}" in " ".join(services["dcgm-exporter"]["ports"])


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    import json

    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    provisioning = COMPOSE.parent / next(s for s, t in mounts.items() if t == "/etc/grafana/provisioning")
    (datasource,) = _yaml_docs(provisioning / "datasources" / "prometheus.yaml")[0]["datasources"]
    (provider,) = _yaml_docs(provisioning / "dashboards" / "foalnet.yaml")[0]["providers"]
    dashboards_dir = next(s for s, t in mounts.items() if t == provider["options"]["path"])
    assert (COMPOSE.parent / dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in _compose()["services"]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for _, t in dashboard_targets(dashboard)}
    assert uids == {datasource["uid"]}


def test_dashboard_covers_the_issue_and_reads_real_metrics() -> None:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    known = metric_series_names()
    used: set[str] = set()
    for panel in panels:
        assert len(panel.get("description", "")) > 60, f"{panel['title']}: say what the panel tells"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            ours = {n for n in names if n.startswith("foalnet_")}
            assert ours <= known, f"{panel['title']}: unknown series {ours - known}"
            used |= names
    # Every metric family of ours is on the dashboard, plus process CPU and memory and two GPU series.
    families = {f.name for f in Metrics().registry.collect() if f.name.startswith("foalnet_")}
    assert all(any(u.startswith(f) for u in used) for f in families), families
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= used
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= used & known
    exprs = " ".join(t["expr"] for _, t in dashboard_targets(dashboard))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(foalnet_request_duration_seconds_bucket" in exprs
    assert "sum by (le, stage)" in exprs and "sum by (reason)" in exprs and "provider" in exprs


# ---- Kubernetes ----
