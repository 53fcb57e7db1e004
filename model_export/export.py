"""ONNX export, ONNX Runtime parity check, Triton model repository, and the `foalnet export` command.

The exported graph takes the contract inputs with a dynamic batch axis and gives the contract
outputs; the model's `ModelSpec` rides along in metadata_props[METADATA_KEY], so the service and
the Triton config generator read every preprocessing fact from the file itself.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx
import torch
import typer
from torch import Tensor, nn

from model_export.model import FoalNet, FoalNetConfig, load_checkpoint
from model_export.weight_storage import onnx_weights, round_for_storage, store_compact
from service.contract import (
    INPUT_AUDIO,
    INPUT_AUDIO_LEN,
    INPUT_FRAMES,
    INPUT_FRAMES_LEN,
    INPUTS,
    LITE_SPEC,
    METADATA_KEY,
    OUTPUT_AUDIO_PROBS,
    OUTPUT_MATCH_A2V,
    OUTPUT_MATCH_V2A,
    OUTPUT_PROBS,
    OUTPUT_SIMILARITY,
    OUTPUT_VIDEO_PROBS,
    OUTPUTS,
    ModelSpec,
)

EXPORT_BATCH = 2  # example batch used while tracing; parity is checked at other sizes
PARITY_TOL = 1e-4
OPSET = 18


class ParityError(RuntimeError):
    """The ONNX graph disagrees with the torch model beyond tolerance."""


class _ContractOutputs(nn.Module):
    """The model with outputs as a tuple in contract order (ONNX outputs are positional)."""

    def __init__(self, model: FoalNet):
        super().__init__()
        self.model = model

    def forward(
        self, audio: Tensor, audio_len: Tensor, frames: Tensor, frames_len: Tensor
    ) -> tuple[Tensor, ...]:
        out = self.model(audio, audio_len, frames, frames_len)
        return tuple(out[name] for name in OUTPUTS)


def random_inputs(spec: ModelSpec, batch: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Contract feeds with mixed lengths: full, partial and (from batch 3 on) empty modalities."""
    rng = np.random.default_rng(seed)
    s, f = spec.window_samples, spec.frames_per_window
    audio_len = rng.integers(1, s + 1, batch)
    frames_len = rng.integers(1, f + 1, batch)
    audio_len[0], frames_len[0] = s, f
    if batch >= 3:
        audio_len[1], frames_len[2] = 0, 0
    return {
        INPUT_AUDIO: (rng.standard_normal((batch, s)) * 0.1).astype(np.float32),
        INPUT_AUDIO_LEN: audio_len.astype(np.int64),
        INPUT_FRAMES: rng.integers(0, 256, (batch, *spec.frames_shape), dtype=np.uint8),
        INPUT_FRAMES_LEN: frames_len.astype(np.int64),
    }


def export_onnx(
    model: FoalNet,
    path: str | Path,
    *,
    spec: ModelSpec | None = None,
    dynamo: bool = False,
    compact: bool = True,
) -> Path:
    """Export `model` (eval mode) to ONNX with a symbolic batch axis and the spec in metadata.

    `compact` (the default) first applies `round_for_storage` to `model` in place, so the file stores
    its large weights in int4 / int8 (a Whisper backbone) or float16 (the rest) and computes what
    `model` now computes (`verify_parity` holds). A Whisper backbone keeps only the position rows the spec's window
    reads (also in place).

    The TorchScript exporter is the default because it takes about a second for the lite model
    against tens of seconds for the torch.export-based one (`dynamo=True`); both give the same
    graph semantics, and both are checked for a symbolic batch axis here and for parity by tests.
    """
    spec = spec or model.cfg.spec
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compact:
        round_for_storage(model)
    if hasattr(model.audio_encoder, "whisper"):
        model.audio_encoder.whisper.fit_window(spec.window_samples)
    wrapper = _ContractOutputs(model.eval()).eval()
    feeds = random_inputs(spec, EXPORT_BATCH)
    device = next(model.parameters()).device  # trace where the model lives (CPU or GPU)
    args = tuple(torch.from_numpy(feeds[name]).to(device) for name in INPUTS)
    names = {"input_names": list(INPUTS), "output_names": list(OUTPUTS), "opset_version": OPSET}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, torch.jit.TracerWarning))
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            shapes = {name: {0: batch} for name in INPUTS}
            # optimize=False halves export time; ONNX Runtime applies its own graph optimisations.
            proto = torch.onnx.export(
                wrapper, args, dynamo=True, dynamic_shapes=shapes, optimize=False, verbose=False, **names
            )
            proto = proto.model_proto
        else:
            buffer = io.BytesIO()
            axes = {name: {0: "batch"} for name in (*INPUTS, *OUTPUTS)}
            torch.onnx.export(wrapper, args, buffer, dynamo=False, dynamic_axes=axes, **names)
            proto = onnx.load_from_string(buffer.getvalue())
    _check_dynamic_batch(proto)
    onnx.helper.set_model_props(proto, {METADATA_KEY: spec.to_json(), "labels": ",".join(spec.labels)})
    if compact:
        store_compact(proto)
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path))
    return path


def _check_dynamic_batch(proto: onnx.ModelProto) -> None:
    names = [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    if names != (list(INPUTS), list(OUTPUTS)):
        raise RuntimeError(f"exported graph I/O {names} does not match the contract {INPUTS}, {OUTPUTS}")
    for value in (*proto.graph.input, *proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        if not dim0.dim_param:
            raise RuntimeError(f"{value.name}: batch axis was specialised to {dim0.dim_value}, not symbolic")


def read_spec(onnx_path: str | Path) -> ModelSpec:
    """The ModelSpec stored in an exported file's metadata."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{onnx_path}: no {METADATA_KEY!r} metadata; not a Foal-Net export")
    return ModelSpec.from_json(props[METADATA_KEY])


def verify_parity(
    model: FoalNet,
    onnx_path: str | Path,
    batch_sizes: tuple[int, ...] = (1, 3, 5),
    *,
    tol: float = PARITY_TOL,
) -> dict[str, float]:
    """Max |torch - onnxruntime| per output over random feeds at batch sizes other than the export's.

    Raises ParityError naming the worst output when any difference exceeds `tol`.
    """
    import onnxruntime as ort

    spec = read_spec(onnx_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    model = model.eval()
    device = next(model.parameters()).device
    diffs = dict.fromkeys(OUTPUTS, 0.0)
    for batch in batch_sizes:
        feeds = random_inputs(spec, batch, seed=batch)
        with torch.no_grad():
            out = model(*(torch.from_numpy(feeds[name]).to(device) for name in INPUTS))
        expected = {name: value.cpu() for name, value in out.items()}
        got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), feeds), strict=True))
        for name in OUTPUTS:
            if got[name].shape != tuple(expected[name].shape) or not np.isfinite(got[name]).all():
                raise ParityError(f"{name} at batch {batch}: shape {got[name].shape} or non-finite values")
            diffs[name] = max(diffs[name], float(np.abs(got[name] - expected[name].numpy()).max()))
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > tol:
        raise ParityError(f"ONNX/torch mismatch: {worst} differs by {diffs[worst]:.3g} > {tol:g} ({diffs})")
    return diffs


# ---- Triton -----------------------------------------------------------------------------------

_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
}
LABELS_FILE = "labels.txt"


def _contract_dims(spec: ModelSpec) -> dict[str, list[int]]:
    """Per-tensor dims without the batch axis, from the spec ([] for per-sample scalars)."""
    k = len(spec.labels)
    return {
        INPUT_AUDIO: [spec.window_samples],
        INPUT_AUDIO_LEN: [],
        INPUT_FRAMES: list(spec.frames_shape),
        INPUT_FRAMES_LEN: [],
        OUTPUT_PROBS: [k],
        OUTPUT_AUDIO_PROBS: [k],
        OUTPUT_VIDEO_PROBS: [k],
        OUTPUT_SIMILARITY: [],
        OUTPUT_MATCH_A2V: [],
        OUTPUT_MATCH_V2A: [],
    }


def _tensor_block(name: str, data_type: str, dims: list[int], extra: str = "") -> str:
    # Triton needs at least one dim: a per-sample scalar is [1] reshaped to [] in the model.
    shape = f"dims: [ {', '.join(map(str, dims or [1]))} ]"
    reshape = "\n    reshape: { shape: [ ] }" if not dims else ""
    return f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    {shape}{reshape}{extra}\n  }}'


def triton_config(
    onnx_path: str | Path,
    *,
    max_batch_size: int = 32,
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16, 32),
    max_queue_delay_us: int = 5000,
    instances: int = 1,
    kind: str = "KIND_GPU",
) -> str:
    """config.pbtxt text for an exported file: names from the contract, dtypes from the graph."""
    spec = read_spec(onnx_path)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    types = {v.name: _TRITON_TYPES[v.type.tensor_type.elem_type] for v in (*graph.input, *graph.output)}
    dims = _contract_dims(spec)
    for value in (*graph.input, *graph.output):  # the file must agree with the spec it carries
        static = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
        if static != dims[value.name]:
            raise ValueError(f"{onnx_path}: {value.name} has dims {static}, its spec says {dims[value.name]}")
    inputs = ",\n".join(_tensor_block(n, types[n], dims[n]) for n in INPUTS)
    label_ref = f'\n    label_filename: "{LABELS_FILE}"'
    outputs = ",\n".join(
        _tensor_block(n, types[n], dims[n], label_ref if n == OUTPUT_PROBS else "") for n in OUTPUTS
    )
    preferred = ", ".join(str(b) for b in preferred_batch_sizes if b <= max_batch_size)
    return (
        f'name: "{spec.name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
        f'parameters {{ key: "{METADATA_KEY}" value: {{ string_value: {_pb_string(spec.to_json())} }} }}\n'
    )


def _pb_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_triton_repo(onnx_path: str | Path, out_dir: str | Path, **config_kwargs) -> Path:
    """`<out>/<model name>/{config.pbtxt, labels.txt, 1/model.onnx}`; returns the model directory."""
    spec = read_spec(onnx_path)
    model_dir = Path(out_dir) / spec.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    (model_dir / LABELS_FILE).write_text("\n".join(spec.labels) + "\n")
    (model_dir / "config.pbtxt").write_text(triton_config(onnx_path, **config_kwargs))
    return model_dir


# ---- Untrained lite model for tests -----------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _untrained_lite_bytes(seed: int) -> bytes:
    torch.manual_seed(seed)
    model = FoalNet(FoalNetConfig())
    with tempfile.TemporaryDirectory() as tmp:
        return export_onnx(model, Path(tmp) / "model.onnx", spec=LITE_SPEC).read_bytes()


def video_branch_from_onnx(path: Path) -> FoalNet:
    """A FoalNet whose lite face branch (encoder and video head) is read back from an exported file, so a
    released face branch can be carried into a new release. The exporter folded each BatchNorm into its
    convolution; the BatchNorm is set to add the folded bias and scale by one. The branch must have the
    default `LiteVideoConfig` sizes (the file's metadata carries the spec, not the sizes)."""
    proto = onnx.load(str(path))
    weights = {name: torch.from_numpy(a.copy()) for name, a in onnx_weights(proto).items()}
    meta = {p.key: p.value for p in proto.metadata_props}
    cfg = FoalNetConfig.from_dict({"spec": json.loads(meta[METADATA_KEY])} if METADATA_KEY in meta else {})
    model = FoalNet(dataclasses.replace(cfg, lite_audio=dataclasses.replace(cfg.lite_audio, backbone="cnn")))
    state = model.state_dict()
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.name.startswith("/model/video_encoder/cnn/"):
            block = node.name.split("/")[4]  # "/model/video_encoder/cnn/cnn.3/cnn.3.0/Conv" -> "cnn.3"
            prefix = f"video_encoder.cnn.{block.split('.')[1]}"
            w, b = weights[node.input[1]], weights[node.input[2]]
            bn = model.get_submodule(prefix + ".1")
            state[prefix + ".0.weight"] = w
            state[prefix + ".1.weight"] = torch.ones_like(b)
            state[prefix + ".1.bias"] = b
            state[prefix + ".1.running_mean"] = torch.zeros_like(b)
            state[prefix + ".1.running_var"] = torch.full_like(b, 1.0 - bn.eps)
    for name in ("video_encoder.out.2", "video_head"):
        for part in ("weight", "bias"):
            state[f"{name}.{part}"] = weights[f"model.{name}.{part}"]
    model.load_state_dict(state)
    return model.eval()


def export_untrained_lite(path: str | Path, *, seed: int = 0) -> Path:
    """A real (randomly initialised) lite model file, for tests; cached per process and seed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_untrained_lite_bytes(seed))
    return path


# ---- CLI --------------------------------------------------------------------------------------


def register(app) -> None:
    """Add `foalnet export` to the typer app."""

    @app.command("export")
    def export_command(
        checkpoint: Annotated[
            Path, typer.Option(exists=True, dir_okay=False, help="Torch checkpoint from `foalnet train`.")
        ],
        out: Annotated[Path, typer.Option(help="Where to write the ONNX file.")] = Path(
            "weights/foalnet-lite.onnx"
        ),
        triton: Annotated[
            Path | None, typer.Option(help="Also write a Triton model repository here.")
        ] = None,
        version: Annotated[
            str | None,
            typer.Option(help="release version stamped in the file's spec (default: the checkpoint's)"),
        ] = None,
    ) -> None:
        """Export a trained checkpoint to ONNX, check ONNX Runtime parity, optionally write a Triton repo."""
        from rich.console import Console
        from rich.table import Table

        console = Console()
        model = load_checkpoint(checkpoint)
        spec = model.cfg.spec if version is None else dataclasses.replace(model.cfg.spec, version=version)
        path = export_onnx(model, out, spec=spec)
        diffs = verify_parity(model, path)
        table = Table(title=f"ONNX parity ({path}, batch 1/3/5)")
        table.add_column("output")
        table.add_column("max |diff|", justify="right")
        for name, diff in diffs.items():
            table.add_row(name, f"{diff:.2e}")
        console.print(table)
        if triton is not None:
            console.print(f"Triton model repository: {write_triton_repo(path, triton)}")
