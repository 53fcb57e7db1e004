"""Float16 storage of an exported file's large weights.

`export_onnx` rounds the model's large weights to float16 precision (`round_to_half`) and then stores
every initializer float16 holds exactly as float16, read through a Cast to float32 that ONNX Runtime
folds at load (`store_half`): the file is half the size on any execution provider, and it computes in
float32 exactly what the rounded model computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

# Smaller weights (biases, norms) stay float32: they cost little and some carry folded statistics.
# Whisper's weights came as float16, so for them the rounding is lossless.
HALF_MIN_SIZE = 1024
FLOAT16_MAX = 65504.0


def round_to_half(model: nn.Module) -> nn.Module:
    """Round every large floating weight (parameters and buffers) of `model` to float16 precision, in
    place; returns `model`."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point() and t.numel() >= HALF_MIN_SIZE and t.abs().max() < FLOAT16_MAX:
                t.copy_(t.half().float())
    return model


def store_half(proto: onnx.ModelProto) -> None:
    """Store each large float32 initializer that float16 holds exactly as float16 plus a Cast."""
    casts = []
    for init in list(proto.graph.initializer):
        w = onnx.numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.size < HALF_MIN_SIZE or not np.array_equal(w.astype(np.float16), w):
            continue
        half = onnx.numpy_helper.from_array(w.astype(np.float16), f"{init.name}.fp16")
        proto.graph.initializer.remove(init)
        proto.graph.initializer.append(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
    nodes = [*casts, *proto.graph.node]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def onnx_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by the name the graph reads them under (float16 ones through their Cast) as float32."""
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Cast" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]].astype(np.float32)
    return arrays
