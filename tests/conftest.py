"""Shared fixtures: model files (a real untrained lite export, and a tiny hand-built graph)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.contract import (
    INPUT_AUDIO,
    INPUT_AUDIO_LEN,
    INPUT_FRAMES,
    INPUT_FRAMES_LEN,
    LITE_SPEC,
    METADATA_KEY,
    OUTPUT_AUDIO_PROBS,
    OUTPUT_MATCH_A2V,
    OUTPUT_MATCH_V2A,
    OUTPUT_PROBS,
    OUTPUT_SIMILARITY,
    OUTPUT_VIDEO_PROBS,
    PAPER_SPEC,
    ModelSpec,
)

# Two cores shared by several workers: keep every test's thread pools small.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_SPEC = replace(LITE_SPEC, name="foalnet-tiny", version="0.0.1")


@pytest.fixture(scope="session")
def lite_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real lite architecture, untrained (seed 0), exported to ONNX."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: cannot export the lite model")
    from model_export.export import export_untrained_lite

    return export_untrained_lite(tmp_path_factory.mktemp("lite") / "foalnet-lite.onnx", seed=0)


def build_tiny_model(path: Path, spec: ModelSpec = TINY_SPEC) -> Path:
    """A few-node ONNX graph with the contract's inputs, outputs and metadata.

    Its outputs depend on every input (audio level, valid lengths, frame brightness), so tests can
    tell windows apart; it accepts any window/frame size, so it can carry any spec.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    k = len(spec.labels)
    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=(4, k)).astype(np.float32) for name in ("w_fused", "w_audio", "w_video")}
    inits = [numpy_helper.from_array(v, name) for name, v in weights.items()]
    inits.append(numpy_helper.from_array(np.array([1e-4, 1e-4, 0.01, 0.1], np.float32), "scale"))
    n = helper.make_node
    nodes = [
        n("ReduceMean", [INPUT_AUDIO], ["a"], axes=[1], keepdims=1),
        n("Cast", [INPUT_AUDIO_LEN], ["al_f"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["al_f", "axis1"], ["al"]),
        n("Cast", [INPUT_FRAMES], ["fr_f"], to=TensorProto.FLOAT),
        n("ReduceMean", ["fr_f"], ["fm_k"], axes=[1, 2, 3, 4], keepdims=0),
        n("Unsqueeze", ["fm_k", "axis1"], ["fm"]),
        n("Cast", [INPUT_FRAMES_LEN], ["fl_f"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["fl_f", "axis1"], ["fl"]),
        n("Concat", ["a", "al", "fm", "fl"], ["x0"], axis=1),
        n("Mul", ["x0", "scale"], ["x"]),
        n("MatMul", ["x", "w_fused"], ["l_fused"]),
        n("Softmax", ["l_fused"], [OUTPUT_PROBS], axis=1),
        n("MatMul", ["x", "w_audio"], ["l_audio"]),
        n("Softmax", ["l_audio"], [OUTPUT_AUDIO_PROBS], axis=1),
        n("MatMul", ["x", "w_video"], ["l_video"]),
        n("Softmax", ["l_video"], [OUTPUT_VIDEO_PROBS], axis=1),
        n("ReduceMean", ["x"], ["x_mean"], axes=[1], keepdims=0),
        n("Tanh", ["x_mean"], [OUTPUT_SIMILARITY]),
        n("Sigmoid", [OUTPUT_SIMILARITY], [OUTPUT_MATCH_A2V]),
        n("Neg", [OUTPUT_SIMILARITY], ["neg_sim"]),
        n("Sigmoid", ["neg_sim"], [OUTPUT_MATCH_V2A]),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    f, s = spec.frames_per_window, spec.frame_size
    inputs = [
        helper.make_tensor_value_info(INPUT_AUDIO, TensorProto.FLOAT, ["B", spec.window_samples]),
        helper.make_tensor_value_info(INPUT_AUDIO_LEN, TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info(INPUT_FRAMES, TensorProto.UINT8, ["B", f, s, s, spec.channels]),
        helper.make_tensor_value_info(INPUT_FRAMES_LEN, TensorProto.INT64, ["B"]),
    ]
    outputs = [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B", k])
        for o in (OUTPUT_PROBS, OUTPUT_AUDIO_PROBS, OUTPUT_VIDEO_PROBS)
    ]
    outputs += [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B"])
        for o in (OUTPUT_SIMILARITY, OUTPUT_MATCH_A2V, OUTPUT_MATCH_V2A)
    ]
    graph = helper.make_graph(nodes, "foalnet_tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {METADATA_KEY: spec.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny contract-shaped model carrying TINY_SPEC (the lite spec under another name)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def paper_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Tiny randomly initialised WavLM and CLIP vision encoders saved as local dirs (never downloaded)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("paper")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    wavlm = transformers.WavLMConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8,) * 7,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        num_buckets=16,
        max_bucket_distance=50,
    )
    transformers.WavLMModel(wavlm).save_pretrained(root / "wavlm")
    clip = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=PAPER_SPEC.frame_size,
        patch_size=56,
        projection_dim=12,  # the projected image embedding the paper reads; unlike WavLM's 16
    )
    transformers.CLIPVisionModelWithProjection(clip).save_pretrained(root / "clip")
    return str(root / "wavlm"), str(root / "clip")
