"""Compact storage of exported weights (`model_export.weight_storage`: int8 rows, float16) and what
`export_onnx` does with it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from model_export.encoders import LiteAudioConfig
from model_export.export import export_onnx, verify_parity
from model_export.model import FoalNet, FoalNetConfig
from model_export.weight_storage import (
    HALF_MIN_SIZE,
    INT4_GROUP,
    INT4_MAX,
    onnx_weights,
    round_for_storage,
    round_to_half,
    round_to_int4,
    round_to_int8,
    store_compact,
)
from service.contract import LITE_SPEC


def _two_matmuls() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """y = x @ exact + x @ inexact + bias: one weight float16 holds exactly, one it does not, one small."""
    rng = np.random.default_rng(0)
    weights = {
        "exact": rng.standard_normal((64, 64)).astype(np.float16).astype(np.float32),
        "inexact": (rng.standard_normal((64, 64)) / 3).astype(np.float32),
        "bias": rng.standard_normal(64).astype(np.float16).astype(np.float32),  # exact, but small
    }
    nodes = [
        helper.make_node("MatMul", ["x", "exact"], ["a"]),
        helper.make_node("MatMul", ["x", "inexact"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["ab", "bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), weights


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_store_compact_stores_only_large_exact_weights_in_float16_and_computes_the_same():
    proto, weights = _two_matmuls()
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    before = _run(proto, x)
    store_compact(proto)
    onnx.checker.check_model(proto)
    stored = {i.name: i.data_type for i in proto.graph.initializer}
    assert stored == {
        "exact.fp16": TensorProto.FLOAT16,
        "inexact": TensorProto.FLOAT,
        "bias": TensorProto.FLOAT,
    }
    np.testing.assert_array_equal(_run(proto, x), before)
    read = onnx_weights(proto)
    for name, w in weights.items():
        assert read[name].dtype == np.float32
        np.testing.assert_array_equal(read[name], w)


def test_round_to_half_rounds_large_weights_only():
    big = torch.nn.Linear(64, 64)  # weight 4,096 values: rounded; bias 64: kept
    huge = torch.nn.Parameter(torch.full((HALF_MIN_SIZE,), 1e5))  # beyond float16's range: kept
    module = torch.nn.Module()
    module.big, module.huge = big, huge
    with torch.no_grad():
        big.weight.copy_(torch.randn(64, 64) / 3)
        big.bias.copy_(torch.randn(64) / 3)
    weight, bias = big.weight.detach().clone(), big.bias.detach().clone()
    assert round_to_half(module) is module
    assert torch.equal(big.weight, weight.half().float()) and not torch.equal(big.weight, weight)
    assert torch.equal(big.bias, bias)
    assert torch.equal(huge, torch.full((HALF_MIN_SIZE,), 1e5))


def _both_layouts(w: np.ndarray) -> tuple[onnx.ModelProto, np.ndarray]:
    """y = x @ w.T twice: `w` stored as a torch weight [out, in] (Gemm) and transposed [in, out]
    (MatMul), as exporters write them; and an input x."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w_out_in"], ["a"], transB=1),
            helper.make_node("MatMul", ["x", "w_in_out"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[0]])],
        [numpy_helper.from_array(w, "w_out_in"), numpy_helper.from_array(w.T.copy(), "w_in_out")],
    )
    x = np.random.default_rng(1).standard_normal((5, w.shape[1])).astype(np.float32)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), x


def test_round_to_int8_rounds_large_matrices_per_output_channel():
    module = torch.nn.Module()
    module.big = torch.nn.Linear(512, 128)  # 65,536 weights: rounded per row; bias: kept
    module.small = torch.nn.Linear(64, 64)  # under INT8_MIN_SIZE: kept
    module.kernel = torch.nn.Conv1d(128, 256, 3)  # 98,304 weights: rounded per output channel
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    assert round_to_int8(module) is module
    for name in ("big.weight", "kernel.weight"):
        w = module.state_dict()[name].reshape(before[name].shape[0], -1)
        scale = w.abs().amax(1, keepdim=True) / 127
        torch.testing.assert_close(w / scale, (w / scale).round(), atol=1e-4, rtol=0)  # integer levels
        assert (w / scale).abs().max() <= 127 + 1e-4
        error = (w - before[name].reshape(w.shape)).abs()
        assert 0 < error.max() <= scale.max() / 2 + 1e-7  # at most half a level off
    for name in ("big.bias", "small.weight", "small.bias", "kernel.bias"):
        assert torch.equal(module.state_dict()[name], before[name]), name


def test_store_compact_stores_int8_rows_in_either_layout_and_computes_the_same():
    """A rounded matrix stored as a torch weight [out, in] (Gemm) or transposed [in, out] (MatMul)."""
    linear = round_to_int8(torch.nn.Linear(256, 256, bias=False))
    w = linear.weight.detach().numpy()
    proto, x = _both_layouts(w)
    before = _run(proto, x)
    store_compact(proto)
    onnx.checker.check_model(proto)
    stored = {i.name: (i.data_type, tuple(i.dims)) for i in proto.graph.initializer}
    assert stored == {
        "w_out_in.int8": (TensorProto.INT8, (256, 256)),
        "w_out_in.scale": (TensorProto.FLOAT, (256, 1)),
        "w_in_out.int8": (TensorProto.INT8, (256, 256)),
        "w_in_out.scale": (TensorProto.FLOAT, (1, 256)),
    }
    np.testing.assert_allclose(_run(proto, x), before, rtol=1e-5, atol=1e-5)
    read = onnx_weights(proto)
    np.testing.assert_allclose(read["w_out_in"], w, rtol=1e-6, atol=0)
    np.testing.assert_allclose(read["w_in_out"], w.T, rtol=1e-6, atol=0)
    # A matrix that was not rounded to int8 levels is not stored so: float16 or float32 instead.
    plain = _both_layouts(w + 1e-3)[0]
    store_compact(plain)
    assert {i.data_type for i in plain.graph.initializer} == {TensorProto.FLOAT}


def test_round_to_int4_rounds_each_group_of_inputs_to_7_levels_a_side():
    torch.manual_seed(0)
    # Two large matrices; a small one and one whose inputs do not split into groups are kept.
    module = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    module.append(torch.nn.Linear(64, 64)).append(torch.nn.Linear(300, 300))
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    assert round_to_int4(module) is module
    for name in ("0.weight", "2.weight"):
        w = module.state_dict()[name]
        groups = w.reshape(w.shape[0], -1, INT4_GROUP)
        scale = groups.abs().amax(-1, keepdim=True) / INT4_MAX
        assert torch.equal(scale, scale.half().float())  # float16 scales
        levels = groups / scale
        assert torch.equal(levels, levels.round()) and levels.abs().max() <= INT4_MAX
        error = (groups - before[name].reshape(groups.shape)).abs()
        assert (error <= scale / 2 * 1.01 + 1e-8).all()  # to the nearest level
    for name in ("0.bias", "2.bias", "3.weight", "4.weight"):
        assert torch.equal(module.state_dict()[name], before[name]), name


def test_store_compact_packs_int4_groups_in_either_layout_and_onnx_runtime_folds_them(tmp_path: Path):
    torch.manual_seed(0)
    w = round_to_int4(torch.nn.Linear(512, 256, bias=False)).weight.detach().numpy()
    proto, x = _both_layouts(w)
    before = _run(proto, x)
    store_compact(proto)
    onnx.checker.check_model(proto)
    inits = proto.graph.initializer
    packed = {i.name: (i.data_type, tuple(i.dims)) for i in inits if i.name.endswith(".int4")}
    assert packed == {n: (TensorProto.UINT8, (512 * 256 // 2,)) for n in ("w_out_in.int4", "w_in_out.int4")}
    np.testing.assert_array_equal(_run(proto, x), before)
    read = onnx_weights(proto)
    np.testing.assert_array_equal(read["w_out_in"], w)
    np.testing.assert_array_equal(read["w_in_out"], w.T)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & {"BitShift", "Cast", "Concat", "Transpose"}, ops  # unpacked once, at load


def test_whisper_export_stores_int4_int8_and_half_keeps_the_window_positions_and_parity(tmp_path: Path):
    spec = replace(LITE_SPEC, window_s=0.5, frames_per_window=3)
    # 160-d: the MLP matrices (160 x 640) become int4 groups; the attention's qkv (160 x 480) and the
    # second convolution (160 x 160 x 3) reach INT8_MIN_SIZE and become int8 rows; the attention's
    # output projection (160 x 160) stays float16.
    audio = LiteAudioConfig(backbone="whisper", whisper_dim=160, whisper_heads=2, whisper_layers=2, dim=16)
    torch.manual_seed(0)
    cfg = FoalNetConfig(spec=spec, lite_audio=audio)
    full = export_onnx(FoalNet(cfg), tmp_path / "float32.onnx", compact=False)
    torch.manual_seed(0)
    model = FoalNet(cfg)
    path = export_onnx(model, tmp_path / "compact.onnx")
    assert verify_parity(model, path)["probs"] < 1e-4
    assert model.audio_encoder.whisper.positions.shape[0] == 25  # 0.5 s: 50 frames of 10 ms, halved
    proto = onnx.load(str(path))
    kinds = {i.name.rsplit(".", 1)[-1]: [] for i in proto.graph.initializer}
    for init in proto.graph.initializer:
        kinds[init.name.rsplit(".", 1)[-1]].append(int(np.prod(init.dims)))
    assert sorted(kinds["int4"]) == [160 * 640 // 2] * 4  # each block's two MLP matrices, two a byte
    assert sorted(kinds["int8"]) == [160 * 480] * 3  # each block's qkv, the second convolution
    assert len(kinds["fp16"]) > 0
    weights = onnx_weights(proto)
    assert weights["model.audio_encoder.whisper.positions"].shape == (25, 160)
    mlp = model.audio_encoder.whisper.blocks[1].mlp[0].weight.detach().numpy()  # as rounded in place
    # Rounding is idempotent: the audio stage trains on a backbone rounded as stored, which the export
    # then leaves bit for bit as it is.
    rounded = {k: v.clone() for k, v in model.state_dict().items()}
    round_for_storage(model)
    assert all(torch.equal(rounded[k], v) for k, v in model.state_dict().items())
    assert any(np.array_equal(w, mlp) or np.array_equal(w, mlp.T) for w in weights.values())
    for init in proto.graph.initializer:  # nothing float16 could hold exactly was left in float32
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size >= HALF_MIN_SIZE:
            assert not np.array_equal(w.astype(np.float16), w), init.name
    # The rest of this tiny model is its face branch, whose BatchNorm-folded weights stay float32.
    assert path.stat().st_size < 0.75 * full.stat().st_size
