"""ONNX export (symbolic batch, metadata), ONNX Runtime parity, Triton repository, `foalnet export`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from model_export.export import (
    LABELS_FILE,
    ParityError,
    export_onnx,
    export_untrained_lite,
    read_spec,
    verify_parity,
    write_triton_repo,
)
from model_export.model import FoalNet, FoalNetConfig, save_checkpoint
from model_export.weight_storage import round_for_storage
from service.contract import INPUTS, LITE_SPEC, METADATA_KEY, OUTPUT_PROBS, OUTPUTS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> tuple[FoalNet, Path]:
    """The untrained lite model (seed 0) and its export, built the way export_untrained_lite builds it
    (the export rounds the model's weights to what the file stores first)."""
    path = export_untrained_lite(tmp_path_factory.mktemp("lite") / "foalnet-lite.onnx", seed=0)
    torch.manual_seed(0)
    return round_for_storage(FoalNet(FoalNetConfig())).eval(), path


def test_export_has_symbolic_batch_and_spec_metadata(lite):
    model, path = lite
    proto = onnx.load(str(path))
    assert [v.name for v in proto.graph.input] == list(INPUTS)
    assert [v.name for v in proto.graph.output] == list(OUTPUTS)
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param, f"{value.name} has a fixed batch axis"
    audio = proto.graph.input[0].type.tensor_type.shape.dim
    assert audio[1].dim_value == LITE_SPEC.window_samples
    props = {p.key: p.value for p in proto.metadata_props}
    assert read_spec(path) == LITE_SPEC and METADATA_KEY in props
    assert props["labels"].split(",") == list(LITE_SPEC.labels)
    # Every weight at most once in float32 (the file stores int8 and float16): duplicated or float64
    # weights would show here (tests/test_deploy.py holds the shipped file to 20 MB).
    weight_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    assert path.stat().st_size < 1.1 * weight_bytes and path.stat().st_size < 50_000_000


def test_untrained_lite_export_matches_torch_at_unseen_batch_sizes(lite):
    model, path = lite
    diffs = verify_parity(model, path, batch_sizes=(1, 3, 5))  # exported with batch 2
    assert set(diffs) == set(OUTPUTS)
    assert max(diffs.values()) <= 1e-4


def test_parity_check_catches_a_model_that_drifted(lite):
    model, path = lite
    drifted = FoalNet(FoalNetConfig()).eval()
    drifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        drifted.classifier.bias += 1.0 * torch.arange(len(LITE_SPEC.labels))
    with pytest.raises(ParityError, match=OUTPUT_PROBS):
        verify_parity(drifted, path, batch_sizes=(1,))


def test_untrained_lite_is_deterministic_per_seed(tmp_path: Path):
    a = export_untrained_lite(tmp_path / "a.onnx", seed=0).read_bytes()
    b = export_untrained_lite(tmp_path / "b.onnx", seed=0).read_bytes()
    assert a == b


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["cnn", "whisper"])
def test_dynamo_exporter_keeps_the_batch_axis_symbolic(tmp_path: Path, backbone: str):
    from model_export.encoders import LiteAudioConfig, LiteVideoConfig

    torch.manual_seed(0)
    tiny_whisper = {"whisper_dim": 32, "whisper_heads": 2, "whisper_layers": 1}
    audio = {"widths": (4,)} if backbone == "cnn" else tiny_whisper
    cfg = FoalNetConfig(
        dim=16,
        lite_audio=LiteAudioConfig(backbone=backbone, dim=8, adapter_hidden=16, **audio),
        lite_video=LiteVideoConfig(widths=(4, 4, 4, 4), convs_per_block=(1, 1, 1, 1), dim=8),
    )
    model = FoalNet(cfg).eval()
    path = export_onnx(model, tmp_path / "dynamo.onnx", dynamo=True)
    assert max(verify_parity(model, path, batch_sizes=(1, 3)).values()) <= 1e-4


def test_triton_repository_is_generated_from_the_contract(lite, tmp_path: Path):
    _, path = lite
    model_dir = write_triton_repo(path, tmp_path / "repo")
    assert model_dir == tmp_path / "repo" / LITE_SPEC.name
    assert (model_dir / "1" / "model.onnx").read_bytes() == path.read_bytes()
    assert (model_dir / LABELS_FILE).read_text().splitlines() == list(LITE_SPEC.labels)
    text = (model_dir / "config.pbtxt").read_text()
    assert text.count("{") == text.count("}") and text.count("[") == text.count("]")
    assert f'name: "{LITE_SPEC.name}"' in text and 'platform: "onnxruntime_onnx"' in text
    assert re.search(r"max_batch_size: \d+", text) and "dynamic_batching" in text and "instance_group" in text
    found = re.findall(r'name: "(\w+)"\s+data_type: (TYPE_\w+)\s+dims: \[ ([\d, ]+) \]', text)
    blocks = {name: (dtype, dims) for name, dtype, dims in found}
    k = str(len(LITE_SPEC.labels))
    f, s, _, c = LITE_SPEC.frames_shape
    assert blocks == {
        "audio": ("TYPE_FP32", str(LITE_SPEC.window_samples)),
        "audio_len": ("TYPE_INT64", "1"),
        "frames": ("TYPE_UINT8", f"{f}, {s}, {s}, {c}"),
        "frames_len": ("TYPE_INT64", "1"),
        "probs": ("TYPE_FP32", k),
        "audio_probs": ("TYPE_FP32", k),
        "video_probs": ("TYPE_FP32", k),
        "similarity": ("TYPE_FP32", "1"),
        "match_a2v": ("TYPE_FP32", "1"),
        "match_v2a": ("TYPE_FP32", "1"),
    }
    probs_block = text[text.index('name: "probs"') :].split("}")[0]
    assert f'label_filename: "{LABELS_FILE}"' in probs_block


def test_triton_config_refuses_a_file_that_contradicts_its_spec(lite, tmp_path: Path):
    from dataclasses import replace

    _, path = lite
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {METADATA_KEY: replace(LITE_SPEC, window_s=2.0).to_json()})
    onnx.save_model(proto, str(tmp_path / "lying.onnx"))
    with pytest.raises(ValueError, match="audio has dims"):
        write_triton_repo(tmp_path / "lying.onnx", tmp_path / "repo")


def test_triton_config_parses_with_tritons_own_schema(lite, tmp_path: Path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    _, path = lite
    model_dir = write_triton_repo(path, tmp_path / "repo", max_batch_size=16)
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.max_batch_size == 16
    assert [i.name for i in config.input] == list(INPUTS) and [o.name for o in config.output] == list(OUTPUTS)
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]


def test_export_command_writes_onnx_and_triton_repo(lite, tmp_path: Path):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from model_export import export

    app = typer.Typer()
    export.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `export` a named subcommand

    model, _ = lite
    ckpt = save_checkpoint(model, tmp_path / "fused.pt")
    out, repo = tmp_path / "out" / "m.onnx", tmp_path / "triton"
    result = CliRunner().invoke(
        app, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--triton", str(repo), "--version", "9.1.0"]
    )
    assert result.exit_code == 0, result.output
    assert out.exists() and (repo / LITE_SPEC.name / "config.pbtxt").exists()
    stamped = read_spec(out)  # the release version is set at export; everything else is the checkpoint's
    assert stamped.version == "9.1.0" and dataclasses.replace(stamped, version=model.cfg.spec.version) == model.cfg.spec
    assert "similarity" in result.output  # the parity table lists every output
    assert np.isfinite(verify_parity(model, out, batch_sizes=(1,))[OUTPUT_PROBS])
