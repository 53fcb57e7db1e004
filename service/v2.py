"""Open Inference Protocol (KServe v2 / Triton HTTP) routes: health, model metadata, tensor inference.

A client that already speaks v2 (tritonclient, KServe's InferenceRESTClient, curl) calls the model
with the contract's tensors (service/contract.py), skipping the media pipeline: the windows go
through the same batcher and engine as POST /predict. Tensors come as JSON `data` or in the binary
tensor extension (a JSON header of `Inference-Header-Content-Length` bytes, then each tensor's raw
little-endian bytes in input order); outputs are answered the same way, binary where asked.

Errors are the service's own typed answers (`{"error": code, "detail": ..., "request_id": ...}`
with the status of the error table); v2 clients read the `error` field as the message.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import observability
from service.contract import INPUT_AUDIO, INPUT_AUDIO_LEN, INPUT_FRAMES_LEN, INPUTS, OUTPUTS
from service.engine import Engine
from service.errors import ApiError, ErrorCode
from service.schemas import ErrorBody

if TYPE_CHECKING:
    from service.runtime import Service

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"
PLATFORM = "onnxruntime_onnx"

# ONNX Runtime's element types -> v2 datatypes -> numpy (little-endian, as the extension sends them).
_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(uint8)": "UINT8"}
_NUMPY = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8"), "UINT8": np.dtype("u1")}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
_ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": ErrorBody}, "5XX": {"model": ErrorBody}}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for the batch axis

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def tensors(engine: Engine) -> tuple[list[Tensor], list[Tensor]]:
    """The contract's inputs and outputs, in contract order, with the loaded graph's types and
    shapes (the exporter checks those against the model's spec)."""

    def read(args: list[Any], names: tuple[str, ...]) -> list[Tensor]:
        by_name = {a.name: a for a in args}
        return [
            Tensor(
                n,
                _DATATYPES[by_name[n].type],
                (-1, *(d if isinstance(d, int) else -1 for d in by_name[n].shape[1:])),
            )
            for n in names
        ]

    return read(engine.session.get_inputs(), INPUTS), read(engine.session.get_outputs(), OUTPUTS)


def _service(request: Request) -> Service:
    return request.app.state.service


def _engine(request: Request, name: str, version: str | None = None) -> Engine:
    """The engine when `name` (and `version`, if given) is the loaded model; 404 otherwise."""
    service = _service(request)
    engine = service.engine
    if engine is None:
        raise ApiError(ErrorCode.NOT_READY, service.not_ready_reason())
    spec = engine.spec
    if name != spec.name or version not in (None, spec.version):
        wanted = name + (f" version {version}" if version else "")
        raise ApiError(ErrorCode.NOT_FOUND, f"no model {wanted}; this server has {spec.name} {spec.version}")
    return engine


@router.get("/health/live", summary="v2 liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="v2 readiness", responses={503: {"model": ErrorBody}})
async def ready(request: Request) -> dict:
    service = _service(request)
    if not service.ready:
        raise ApiError(ErrorCode.NOT_READY, service.not_ready_reason())
    return {"ready": True}


@router.get("", summary="v2 server metadata")
async def server_metadata() -> dict:
    from importlib.metadata import version

    return {"name": "foalnet", "version": version("foalnet"), "extensions": [BINARY_EXTENSION]}


@router.get("/models/{name}", summary="v2 model metadata", responses=_ERRORS)
@router.get("/models/{name}/versions/{version}", summary="v2 model metadata", responses=_ERRORS)
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict:
    engine = _engine(request, name, version)
    inputs, outputs = tensors(engine)
    return {
        "name": engine.spec.name,
        "versions": [engine.spec.version],
        "platform": PLATFORM,
        "inputs": [t.metadata() for t in inputs],
        "outputs": [t.metadata() for t in outputs],
    }


@router.get("/models/{name}/ready", summary="v2 model readiness", responses=_ERRORS)
@router.get("/models/{name}/versions/{version}/ready", summary="v2 model readiness", responses=_ERRORS)
async def model_ready(request: Request, name: str, version: str | None = None) -> dict:
    engine = _engine(request, name, version)
    service = _service(request)
    if not service.ready:
        raise ApiError(ErrorCode.NOT_READY, service.not_ready_reason())
    return {"name": engine.spec.name, "ready": True}


@router.post("/models/{name}/infer", summary="v2 inference on the contract's tensors", responses=_ERRORS)
@router.post("/models/{name}/versions/{version}/infer", summary="v2 inference", responses=_ERRORS)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    """Inputs `audio`, `audio_len`, `frames`, `frames_len` with a shared batch axis (see
    `GET /v2/models/{name}`); JSON `data` or binary tensors. Same auth, deadline and 429 as /predict."""
    service = _service(request)
    engine = _engine(request, name, version)
    service._authorize(request)
    if not (service.ready and service.batcher):
        raise ApiError(ErrorCode.NOT_READY, service.not_ready_reason())
    deadline = asyncio.get_running_loop().time() + service._timeout(request)
    body = await _read_body(request, service.settings.max_upload_bytes)
    inputs, outputs = tensors(engine)
    header, feeds = parse_request(body, request.headers.get(HEADER_LENGTH), inputs)
    _check_values(feeds, engine)
    result = await service.batcher.submit(feeds, deadline=deadline)
    observability.record_timings({"queue": result.queue_s * 1000, "infer": result.infer_s * 1000})
    return _response(header, result.outputs, outputs, engine)


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(ErrorCode.TOO_LARGE, f"the request is larger than the limit of {limit / 1e6:g} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(ErrorCode.TOO_LARGE, f"the request is larger than the limit of {limit / 1e6:g} MB")
        chunks.append(chunk)
    if not size:
        raise ApiError(ErrorCode.INVALID_REQUEST, "empty request body: send a v2 inference request")
    return b"".join(chunks)


def _invalid(detail: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_REQUEST, detail)


def parse_request(
    body: bytes, header_length: str | None, inputs: list[Tensor]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The request's JSON header and its input arrays, checked against the model's tensors."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _invalid(f"{HEADER_LENGTH} must be the JSON header's byte length, at most the body's")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(f"the inference request is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise _invalid("the inference request needs an `inputs` list")
    given = {t.get("name") if isinstance(t, dict) else None: t for t in header["inputs"]}
    if set(given) != {t.name for t in inputs} or len(given) != len(header["inputs"]):
        raise _invalid(f"inputs must be exactly {[t.name for t in inputs]}, got {list(given)}")
    feeds, offset, batch = {}, 0, None
    for tensor in header["inputs"]:  # binary tensors follow the header in this order
        meta = next(t for t in inputs if t.name == tensor["name"])
        array, offset = _array(tensor, meta, binary, offset)
        if batch is None:
            batch = array.shape[0]
        elif array.shape[0] != batch:
            raise _invalid(f"{meta.name} has batch {array.shape[0]}, {inputs[0].name} has {batch}")
        feeds[meta.name] = array
    if offset != len(binary):
        raise _invalid(f"{len(binary) - offset} bytes of binary data follow the tensors they were sized for")
    if not batch:
        raise _invalid("the batch is empty")
    return header, feeds


def _array(tensor: dict[str, Any], meta: Tensor, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    name, shape, datatype = meta.name, tensor.get("shape"), tensor.get("datatype")
    if datatype != meta.datatype:
        raise _invalid(f"{name} must be {meta.datatype}, got {datatype}")
    ok = isinstance(shape, list) and len(shape) == len(meta.shape) and all(type(d) is int for d in shape)
    if not ok or shape[0] < 0 or any(d != m for d, m in zip(shape[1:], meta.shape[1:]) if m != -1):
        raise _invalid(f"{name} must have shape {list(meta.shape)} (-1: any batch), got {shape}")
    dtype, count = _NUMPY[datatype], int(np.prod(shape))
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or offset + size > len(binary):
            raise _invalid(f"{name}: binary_data_size {size} does not match shape {shape} or the body")
        return np.frombuffer(binary, dtype, count, offset).reshape(shape), offset + size
    try:
        array = np.asarray(tensor.get("data"), dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _invalid(f"{name}: data is not a {datatype} array: {exc}") from None
    if array.size != count:
        raise _invalid(f"{name}: {array.size} values for shape {shape}")
    return array.reshape(shape), offset


def _check_values(feeds: dict[str, np.ndarray], engine: Engine) -> None:
    spec = engine.spec
    if not np.isfinite(feeds[INPUT_AUDIO]).all():
        raise _invalid(f"{INPUT_AUDIO} has NaN or infinite samples")
    for name, top in ((INPUT_AUDIO_LEN, spec.window_samples), (INPUT_FRAMES_LEN, spec.frames_per_window)):
        if ((feeds[name] < 0) | (feeds[name] > top)).any():
            raise _invalid(f"{name} must be in [0, {top}]")


def _response(
    header: dict[str, Any], values: dict[str, np.ndarray], outputs: list[Tensor], engine: Engine
) -> Response:
    wanted = header.get("outputs") or [{"name": t.name} for t in outputs]
    known = {t.name: t for t in outputs}
    unknown = [o.get("name") for o in wanted if o.get("name") not in known]
    if unknown:
        raise _invalid(f"no outputs {unknown}; the model gives {list(known)}")
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    answer: dict[str, Any] = {"model_name": engine.spec.name, "model_version": engine.spec.version}
    if "id" in header:
        answer["id"] = header["id"]
    answer["outputs"], blobs = [], []
    for requested in wanted:
        meta, array = known[requested["name"]], values[requested["name"]]
        array = array.astype(_NUMPY[meta.datatype], copy=False)
        tensor = {"name": meta.name, "datatype": meta.datatype, "shape": list(array.shape)}
        if (requested.get("parameters") or {}).get("binary_data", binary_default):
            blobs.append(array.tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = array.ravel().tolist()
        answer["outputs"].append(tensor)
    if not blobs:
        return JSONResponse(answer)
    head = json.dumps(answer).encode()
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )
