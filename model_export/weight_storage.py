"""Compact storage of an exported file's large weights: int4 and int8 for the pretrained voice
backbone, float16 for the rest.

`export_onnx` first rounds the model's weights to what the file will hold, in the model itself
(`round_for_storage`): every large weight to float16 precision (`round_to_half`); then each matrix of
the frozen Whisper encoder to int8 per output channel (`round_to_int8`), as CTranslate2 runs Whisper
in int8; then its MLP matrices, two thirds of its weights, to int4 in groups of 32 inputs with a
float16 scale each (`round_to_int4`, the layout of GPTQ-style 4-bit checkpoints, rounded to nearest).
`store_compact` then writes each initializer in the smallest form that holds it exactly: int4 pairs
packed into bytes, int8 rows, or float16, each followed by the few nodes that turn it back into the
float32 tensor. ONNX Runtime folds those nodes at load, so the arithmetic stays float32 on every
execution provider, and the file computes what the rounded model computes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

# Smaller weights (biases, norms) stay float32: they cost little and some carry folded statistics.
# Whisper's weights came as float16, so for them the float16 rounding is lossless.
HALF_MIN_SIZE = 1024
FLOAT16_MAX = 65504.0
# Matrices at least this large are rounded to int8 rows or int4 groups (Whisper base's smallest is its
# first convolution, 80 x 512 x 3); the scales are then a small part of the file.
INT8_MIN_SIZE = 65536
INT8_MAX = 127
# `store_compact` recomputes each row's scale from the rounded row; it may land one float32 ulp off
# the scale `round_to_int8` used, so a row counts as int8 when it is reproduced to this relative error.
INT8_RTOL = 1e-6
INT4_MAX = 7
INT4_GROUP = 32  # int4 values share one float16 scale per this many consecutive inputs


def round_to_half(model: nn.Module, exclude: Iterable[Tensor] = ()) -> nn.Module:
    """Round every large floating weight (parameters and buffers) of `model` but `exclude` to float16
    precision, in place; returns `model`."""
    skip = {id(t) for t in exclude}
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if id(t) in skip:
                continue
            if t.is_floating_point() and t.numel() >= HALF_MIN_SIZE and t.abs().max() < FLOAT16_MAX:
                t.copy_(t.half().float())
    return model


def _quantise(
    x: np.ndarray, reduce: tuple[int, ...], levels: int, *, half_scale: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric rounding of float32 `x`: (q, scale) with q integers in [-levels, levels] and one scale
    per slice, max|slice| / levels, over the axes `reduce` (float16-exact with `half_scale`; 1 for an
    all-zero slice). The rounding and `store_compact`'s check both call this, so the scales agree."""
    scale = np.abs(x).max(axis=reduce, keepdims=True) / np.float32(levels)
    if half_scale:
        scale = scale.astype(np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    return np.clip(np.rint(x / scale), -levels, levels), scale


def _round_in_place(
    t: Tensor, shape: tuple[int, ...], reduce: tuple[int, ...], levels: int, *, half_scale: bool = False
) -> None:
    """`t` viewed as `shape`, replaced by q · scale of `_quantise`."""
    q, scale = _quantise(t.detach().cpu().numpy().reshape(shape), reduce, levels, half_scale=half_scale)
    t.copy_(torch.from_numpy(q * scale).reshape(t.shape))


def round_to_int8(module: nn.Module, exclude: Iterable[Tensor] = ()) -> nn.Module:
    """Round every large weight matrix or kernel of `module` but `exclude` to int8 per output channel
    (dim 0), symmetric: row ≈ q · max|row| / 127 with q in [-127, 127]. In place; returns `module`."""
    skip = {id(t) for t in exclude}
    with torch.no_grad():
        for t in module.parameters():
            if id(t) not in skip and t.is_floating_point() and t.dim() >= 2 and t.numel() >= INT8_MIN_SIZE:
                _round_in_place(t, (t.shape[0], -1), (1,), INT8_MAX)
    return module


def round_to_int4(module: nn.Module) -> nn.Module:
    """Round every large nn.Linear weight of `module` (INT8_MIN_SIZE values or more, inputs a multiple
    of INT4_GROUP) to int4, symmetric, in groups of INT4_GROUP inputs with one float16 scale each. In
    place; returns `module`."""
    _round_to_int4(_int4_weights(module))
    return module


def _round_to_int4(weights: list[Tensor]) -> None:
    with torch.no_grad():
        for w in weights:
            _round_in_place(w, (w.shape[0], -1, INT4_GROUP), (2,), INT4_MAX, half_scale=True)


def _int4_weights(module: nn.Module) -> list[Tensor]:
    """The nn.Linear weights of `module` that `round_to_int4` rounds."""
    return [
        m.weight
        for m in module.modules()
        if isinstance(m, nn.Linear) and m.weight.numel() >= INT8_MIN_SIZE and m.weight.shape[1] % INT4_GROUP == 0
    ]


def round_for_storage(model: nn.Module) -> nn.Module:
    """What `export_onnx` does to `model` before it writes the file: float16 precision everywhere,
    int8 rows in a frozen Whisper backbone, int4 groups in its MLPs. In place; returns `model`.

    An int4 matrix is rounded to int4 only (a float16 or int8 pass first would move its group maxima,
    and so its scales, on every call), which makes the rounding idempotent: the audio stage computes its
    backbone views with the Whisper the file will hold, and the export leaves that Whisper as it is."""
    whisper = getattr(getattr(model, "audio_encoder", None), "whisper", None)
    int4 = [w for block in whisper.blocks for w in _int4_weights(block.mlp)] if whisper is not None else []
    round_to_half(model, exclude=int4)
    if whisper is not None:
        round_to_int8(whisper, exclude=int4)
        _round_to_int4(int4)
    return model


def _int4_groups(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(q [M, INT4_GROUP] in [-7, 7], scale float16 [M, 1], transposed) with q · scale == the matrix's
    groups of INT4_GROUP inputs, inputs being the last axis (a torch weight) or the first (transposed
    for MatMul); None if `w` was not so rounded."""
    if w.ndim != 2:
        return None
    for transposed, rows in ((False, w), (True, w.T)):
        if rows.shape[1] % INT4_GROUP:
            continue
        groups = np.ascontiguousarray(rows).reshape(-1, INT4_GROUP)
        q, scale = _quantise(groups, (1,), INT4_MAX, half_scale=True)
        if np.array_equal(q * scale, groups):
            return q.astype(np.int8), scale.astype(np.float16), transposed
    return None


def _int4_nodes(name: str, q: np.ndarray, scale: np.ndarray, transposed: bool, shape: tuple) -> tuple:
    """Initializers (two int4 values a byte, low nibble first, stored + 8; the scales) and the nodes
    that unpack them into the float32 tensor `name` of `shape`."""
    nibbles = (q.reshape(-1) + 8).astype(np.uint8)
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    rows = (shape[1], shape[0]) if transposed else shape
    stored = [
        numpy_helper.from_array(packed, f"{name}.int4"),
        numpy_helper.from_array(scale, f"{name}.int4scale"),
        numpy_helper.from_array(np.array([4], np.uint8), f"{name}.four"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), f"{name}.column"),
        numpy_helper.from_array(np.array([8.0], np.float32), f"{name}.eight"),
        numpy_helper.from_array(np.array(q.shape, np.int64), f"{name}.groups"),
        numpy_helper.from_array(np.array(rows, np.int64), f"{name}.rows"),
    ]
    p = f"{name}.unpack"
    nodes = [
        helper.make_node("BitShift", [stored[0].name, stored[2].name], [f"{p}.high"], direction="RIGHT"),
        helper.make_node("BitShift", [stored[0].name, stored[2].name], [f"{p}.up"], direction="LEFT"),
        helper.make_node("BitShift", [f"{p}.up", stored[2].name], [f"{p}.low"], direction="RIGHT"),
        helper.make_node("Reshape", [f"{p}.low", stored[3].name], [f"{p}.low2"]),
        helper.make_node("Reshape", [f"{p}.high", stored[3].name], [f"{p}.high2"]),
        helper.make_node("Concat", [f"{p}.low2", f"{p}.high2"], [f"{p}.pairs"], axis=1),
        helper.make_node("Cast", [f"{p}.pairs"], [f"{p}.float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{p}.float", stored[4].name], [f"{p}.centred"]),
        helper.make_node("Reshape", [f"{p}.centred", stored[5].name], [f"{p}.q"]),
        helper.make_node("Cast", [stored[1].name], [f"{p}.scale"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}.q", f"{p}.scale"], [f"{p}.scaled"]),
        helper.make_node("Reshape", [f"{p}.scaled", stored[6].name], [f"{p}.rows" if transposed else name]),
    ]
    if transposed:
        nodes.append(helper.make_node("Transpose", [f"{p}.rows"], [name], perm=[1, 0]))
    return stored, nodes


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(q int8, scale float32) with q · scale == w to INT8_RTOL, per channel of the first or the last
    axis (a torch weight, or one an exporter transposed for MatMul); None if `w` is not so rounded."""
    for axis in dict.fromkeys((0, w.ndim - 1)):
        q, scale = _quantise(w, tuple(a for a in range(w.ndim) if a != axis), INT8_MAX)
        if np.allclose(q.astype(np.float32) * scale, w, rtol=INT8_RTOL, atol=0):
            return q.astype(np.int8), scale
    return None


def store_compact(proto: onnx.ModelProto) -> None:
    """Store each large float32 initializer as int4 groups (when `_int4_groups` finds them), int8 rows
    (when `_int8_rows` does), else as float16 plus a Cast (when float16 holds it exactly), else leave it
    float32."""
    decoders = []
    for init in list(proto.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.size < HALF_MIN_SIZE:
            continue
        large = w.ndim >= 2 and w.size >= INT8_MIN_SIZE
        groups = _int4_groups(w) if large else None
        rows = _int8_rows(w) if large and groups is None else None
        if groups is not None:
            stored, nodes = _int4_nodes(init.name, *groups, w.shape)
            decoders += nodes
        elif rows is not None:
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


# What `store_compact`'s decoding nodes compute, in numpy (their inputs are all stored constants).
_DECODE = {
    "Cast": lambda node, a: a.astype(np.float32),
    "Mul": lambda node, a, b: a * b,
    "Sub": lambda node, a, b: a - b,
    "BitShift": lambda node, a, b: (
        np.right_shift(a, b) if _attr(node, "direction") == b"RIGHT" else np.left_shift(a, b)
    ),
    "Reshape": lambda node, a, shape: a.reshape(shape),
    "Concat": lambda node, *parts: np.concatenate(parts, axis=_attr(node, "axis")),
    "Transpose": lambda node, a: a.transpose(_attr(node, "perm")),
}


def _attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def onnx_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by the name the graph reads them under (through `store_compact`'s decoding nodes),
    as float32."""
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in _DECODE and all(name in arrays for name in node.input):
            arrays[node.output[0]] = _DECODE[node.op_type](node, *(arrays[name] for name in node.input))
    return arrays
