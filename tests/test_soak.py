"""`foalnet soak`, short: it starts a server, sends the hostile corpus and valid clips, and passes;
and a failing check (a stray temp file) makes it exit 1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from foalnet_cli import build_app
from tests.server import start_server

app = build_app("soak")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
runner = CliRunner()


def test_short_soak_passes(lite_model, monkeypatch):
    monkeypatch.setenv("FOALNET_INTRA_OP_THREADS", "1")
    result = runner.invoke(app, ["soak", "--seconds", "6", "--model", str(lite_model), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["failures"] == [] and report["server_errors"] == 0 and report["unexpected"] == 0
    assert report["listener_contacts"] == 0 and report["leaked_secret"] == 0
    assert report["fd_after"] is not None and report["temp_files_left"] == 0
    assert report["requests"] > 20
    statuses = report["statuses"]
    assert statuses.get("200", 0) > 0 and sum(v for k, v in statuses.items() if k.startswith("4")) > 0


def test_a_failing_check_exits_1(lite_model, tmp_path):
    uploads = tmp_path / "uploads"
    with start_server(lite_model, uploads) as server:
        uploads.mkdir(exist_ok=True)
        stray = uploads / "foalnet-upload-stray"
        stray.write_bytes(b"left behind")
        result = runner.invoke(
            app,
            [
                "soak",
                "--seconds",
                "1",
                "--url",
                server.url,
                "--pid",
                str(server.pid),
                "--tmp-dir",
                str(uploads),
            ],
        )
        stray.unlink()
    assert result.exit_code == 1, result.output
    assert "FAILED: 1 temporary files left" in result.output
    assert "5xx / no answer: 0" in result.output
