"""`foalnet serve` flags mirror the settings; `foalnet predict` runs the service pipeline in-process."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
import typer
import uvicorn
from typer.testing import CliRunner

from bench.media import make_clip, write_bytes
from foalnet_cli import build_app
from service.cli import DrainingServer
from service.schemas import Prediction
from service.settings import Settings, env_var

app = build_app("serve", "predict")

pytestmark = pytest.mark.timeout(120)
runner = CliRunner()


def test_every_setting_is_a_serve_flag_with_its_env_var():
    serve = typer.main.get_command(app).commands["serve"]
    by_name = {p.name: p for p in serve.params}
    assert set(by_name) == set(Settings.model_fields)
    for name, param in by_name.items():
        assert param.envvar == env_var(name)
        assert "--" + name.replace("_", "-") in param.opts


def test_env_vars_reach_the_settings(monkeypatch):
    monkeypatch.setenv("FOALNET_MAX_BATCH", "3")
    monkeypatch.setenv("FOALNET_BUCKETS", "8,1,2")
    monkeypatch.setenv("FOALNET_API_KEY", "s3cret-token")
    settings = Settings()
    assert settings.max_batch == 3 and settings.buckets == (1, 2, 8)
    assert settings.api_key.get_secret_value() == "s3cret-token" and "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("max_batch", "expected"), [(16, (1, 2, 4, 8, 16)), (12, (1, 2, 4, 8, 16)), (64, (1, 2, 4, 8, 16, 32))]
)
def test_engine_warms_only_buckets_a_batch_can_use(max_batch, expected):
    settings = Settings(max_batch=max_batch, buckets=(1, 2, 4, 8, 16, 32))
    assert settings.engine_buckets == expected


def test_serve_fails_clearly_without_a_model_or_a_gpu(tiny_model, tmp_path):
    missing = runner.invoke(app, ["serve", "--model", str(tmp_path / "none.onnx")])
    assert missing.exit_code == 2 and "model file not found" in missing.output
    bad = runner.invoke(app, ["serve", "--max-batch", "0", "--model", str(tiny_model)])
    assert bad.exit_code == 2 and "max_batch" in bad.output
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        cuda = runner.invoke(app, ["serve", "--device", "cuda", "--model", str(tiny_model)])
        assert cuda.exit_code == 2 and "device=cuda" in cuda.output


def test_sigterm_turns_readiness_off_first():
    service = SimpleNamespace(draining=False)
    server = DrainingServer(uvicorn.Config(app=None), service)
    server.handle_exit(signal.SIGTERM, None)
    assert service.draining and server.should_exit


def test_predict_prints_a_table_and_json(lite_model, tmp_path):
    clip = make_clip(tmp_path / "talk.mp4", seconds=2)
    table = runner.invoke(app, ["predict", str(clip), "--model", str(lite_model), "--intra-op-threads", "1"])
    assert table.exit_code == 0, table.output
    assert "talk.mp4" in table.output and "fused" in table.output and "voice" in table.output

    out = runner.invoke(
        app, ["predict", str(clip), "--json", "--model", str(lite_model), "--intra-op-threads", "1"]
    )
    assert out.exit_code == 0, out.output
    body = json.loads(out.stdout)
    assert body.pop("file") == str(clip)
    prediction = Prediction.model_validate(body)
    assert prediction.modalities.audio.present and prediction.modalities.video.present
    assert prediction.timings_ms.upload == 0 and prediction.timings_ms.queue == 0


def test_predict_reports_each_failure_and_exits_non_zero(lite_model, tmp_path):
    good = make_clip(tmp_path / "good.mp4", seconds=2, video=None)
    bad = write_bytes(tmp_path / "bad.mp4", b"not a video at all" * 50)
    result = runner.invoke(
        app, ["predict", str(bad), str(good), "--json", "--model", str(lite_model), "--intra-op-threads", "1"]
    )
    assert result.exit_code == 1
    assert "bad.mp4" in result.stderr and "not_media" in result.stderr
    answers = json.loads(result.stdout)
    assert [a["file"] for a in answers] == [str(bad), str(good)]
    assert answers[0]["error"] == "not_media" and answers[1]["emotion"]
