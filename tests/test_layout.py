"""The layout holds: `foalnet serve` loads neither torch, the training package, the harnesses nor
httpx (a real server is started through the `foalnet` entry point and its `sys.modules` read),
the command list still shows every command, and no module of the packages grows past 400 lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.server import free_port

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
NOT_IN_SERVE = ("torch", "model_export", "bench", "httpx", "transformers", "matplotlib", "skimage")

# Runs `foalnet serve` (foalnet_cli.main, as the console script does) in a thread, waits for
# /readyz 200 with the standard library, then prints the imported top-level packages.
SERVE = """
import json, sys, threading, time, urllib.request
sys.argv = ["foalnet", "serve", "--port", "{port}", "--model", "{model}", "--decode-workers", "1",
            "--buckets", "1", "--intra-op-threads", "1", "--log-level", "warning"]
from foalnet_cli import main
threading.Thread(target=main, daemon=True).start()
deadline = time.monotonic() + 120
while True:
    try:
        if urllib.request.urlopen("http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
            break
    except OSError:
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.1)
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


def test_serving_loads_no_training_harness_or_client_code(tiny_model, tmp_path):
    code = SERVE.format(port=free_port(), model=tiny_model)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert {"service", "foalnet_cli", "onnxruntime", "uvicorn"} <= loaded  # it did serve
    assert not loaded & set(NOT_IN_SERVE), loaded & set(NOT_IN_SERVE)


def test_the_command_list_names_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "foalnet_cli", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    from foalnet_cli import COMMANDS

    for command in COMMANDS:
        assert command in proc.stdout, command


def test_no_package_module_is_over_400_lines():
    sources = [
        path
        for package in ("service", "model_export", "bench", "foalnet_cli")
        for path in (ROOT / package).rglob("*.py")
    ]
    lines = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in sources}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, long
