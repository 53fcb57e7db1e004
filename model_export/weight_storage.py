"""Compact storage of an exported file's large weights: int8 rows for the pretrained voice backbone,
float16 for the rest.

`export_onnx` first rounds the model's weights to what the file will hold, in the model itself
(`round_for_storage`): every large weight to float16 precision (`round_to_half`), then each matrix of
the frozen Whisper backbone to int8 per output channel (`round_to_int8`), as CTranslate2 runs Whisper
in int8. `store_compact` then writes each initializer in the smallest form that holds it: int8 plus a
float32 scale per row, read through Cast and Mul; or float16, read through a Cast. ONNX Runtime folds
those nodes at load, so the arithmetic stays float32 on every execution provider, and the file
computes what the rounded model computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

# Smaller weights (biases, norms) stay float32: they cost little and some carry folded statistics.
# Whisper's weights came as float16, so for them the float16 rounding is lossless.
HALF_MIN_SIZE = 1024
FLOAT16_MAX = 65504.0
# Matrices at least this large are rounded to int8 rows (Whisper base's smallest is its first
# convolution, 80 x 512 x 3); the per-row scales are then under 1 % of the file.
INT8_MIN_SIZE = 65536
INT8_MAX = 127
# `store_compact` recomputes each row's scale from the rounded row; it may land one float32 ulp off
# the scale `round_to_int8` used, so a row counts as int8 when it is reproduced to this relative error.
INT8_RTOL = 1e-6


def round_to_half(model: nn.Module) -> nn.Module:
    """Round every large floating weight (parameters and buffers) of `model` to float16 precision, in
    place; returns `model`."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point() and t.numel() >= HALF_MIN_SIZE and t.abs().max() < FLOAT16_MAX:
                t.copy_(t.half().float())
    return model


def round_to_int8(module: nn.Module) -> nn.Module:
    """Round every large weight matrix or kernel of `module` to int8 per output channel (dim 0),
    symmetric: row ≈ q · max|row| / 127 with q in [-127, 127]. In place; returns `module`."""
    with torch.no_grad():
        for t in module.parameters():
            if t.is_floating_point() and t.dim() >= 2 and t.numel() >= INT8_MIN_SIZE:
                rows = t.reshape(t.shape[0], -1)
                scale = rows.abs().amax(1, keepdim=True) / INT8_MAX
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                t.copy_(((rows / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale).reshape(t.shape))
    return module


def round_for_storage(model: nn.Module) -> nn.Module:
    """What `export_onnx` does to `model` before it writes the file: float16 precision everywhere,
    int8 rows in a frozen Whisper backbone. In place; returns `model`."""
    round_to_half(model)
    whisper = getattr(getattr(model, "audio_encoder", None), "whisper", None)
    if whisper is not None:
        round_to_int8(whisper)
    return model


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(q int8, scale float32) with q · scale == w to INT8_RTOL, per channel of the first or the last
    axis (a torch weight, or one an exporter transposed for MatMul); None if `w` is not so rounded."""
    for axis in dict.fromkeys((0, w.ndim - 1)):
        others = tuple(a for a in range(w.ndim) if a != axis)
        scale = np.abs(w).max(axis=others, keepdims=True) / np.float32(INT8_MAX)
        scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX)
        if np.allclose(q.astype(np.float32) * scale, w, rtol=INT8_RTOL, atol=0):
            return q.astype(np.int8), scale
    return None


def store_compact(proto: onnx.ModelProto) -> None:
    """Store each large float32 initializer as int8 rows plus scales (when `_int8_rows` finds them),
    else as float16 plus a Cast (when float16 holds it exactly), else leave it float32."""
    decoders = []
    for init in list(proto.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.size < HALF_MIN_SIZE:
            continue
        rows = _int8_rows(w) if w.ndim >= 2 and w.size >= INT8_MIN_SIZE else None
        if rows is not None:
            q, scale = rows
            stored = [
                numpy_helper.from_array(q, f"{init.name}.int8"),
                numpy_helper.from_array(scale, f"{init.name}.scale"),
            ]
            decoders += [
                helper.make_node("Cast", [stored[0].name], [f"{init.name}.dequant"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{init.name}.dequant", stored[1].name], [init.name]),
            ]
        elif np.array_equal(w.astype(np.float16), w):
            stored = [numpy_helper.from_array(w.astype(np.float16), f"{init.name}.fp16")]
            decoders.append(helper.make_node("Cast", [stored[0].name], [init.name], to=TensorProto.FLOAT))
        else:
            continue
        proto.graph.initializer.remove(init)
        proto.graph.initializer.extend(stored)
    nodes = [*decoders, *proto.graph.node]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def onnx_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by the name the graph reads them under (through `store_compact`'s Cast and Mul
    nodes), as float32."""
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if not all(name in arrays for name in node.input):
            continue
        if node.op_type == "Cast":
            arrays[node.output[0]] = arrays[node.input[0]].astype(np.float32)
        elif node.op_type == "Mul":
            arrays[node.output[0]] = arrays[node.input[0]] * arrays[node.input[1]]
    return arrays
