"""Open Inference Protocol v2 through a real `foalnet serve`, spoken by tritonclient's HTTP client.

The contract's tensors go in (binary tensor extension and plain JSON) and must come out equal to
what the engine itself gives for the same batch; errors are the service's typed answers.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from service.contract import INPUTS, OUTPUTS, ModelSpec
from service.engine import Engine
from tests.conftest import TINY_SPEC
from tests.server import start_server

tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(180)
SPEC: ModelSpec = TINY_SPEC


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    server = start_server(tiny_model, tmp_path_factory.mktemp("v2"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    client = tritonclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(tiny_model, device="cpu", intra_op_threads=1, buckets=(1, 2, 4))


def _batch(n: int = 2) -> dict[str, np.ndarray]:
    """Two different windows: one with voice and face, one with half the audio and no face."""
    rng = np.random.default_rng(7)
    return {
        "audio": rng.uniform(-0.5, 0.5, (n, SPEC.window_samples)).astype(np.float32),
        "audio_len": np.array([SPEC.window_samples, SPEC.window_samples // 2][:n], np.int64),
        "frames": rng.integers(0, 256, (n, *SPEC.frames_shape), dtype=np.uint8),
        "frames_len": np.array([SPEC.frames_per_window, 0][:n], np.int64),
    }


def _inputs(feeds: dict[str, np.ndarray], binary: bool) -> list:
    datatypes = {"float32": "FP32", "int64": "INT64", "uint8": "UINT8"}
    inputs = []
    for name in INPUTS:
        tensor = tritonclient.InferInput(name, list(feeds[name].shape), datatypes[str(feeds[name].dtype)])
        tensor.set_data_from_numpy(feeds[name], binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_health_and_model_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(SPEC.name) and client.is_model_ready(SPEC.name, SPEC.version)
    assert not client.is_model_ready("no-such-model")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(SPEC.name)
    assert meta["name"] == SPEC.name and meta["versions"] == [SPEC.version]
    shapes = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]}
    k = len(SPEC.labels)
    assert [t["name"] for t in meta["inputs"]] == list(INPUTS)
    assert [t["name"] for t in meta["outputs"]] == list(OUTPUTS)
    assert shapes == {
        "audio": ("FP32", [-1, SPEC.window_samples]),
        "audio_len": ("INT64", [-1]),
        "frames": ("UINT8", [-1, *SPEC.frames_shape]),
        "frames_len": ("INT64", [-1]),
        "probs": ("FP32", [-1, k]),
        "audio_probs": ("FP32", [-1, k]),
        "video_probs": ("FP32", [-1, k]),
        "similarity": ("FP32", [-1]),
        "match_a2v": ("FP32", [-1]),
        "match_v2a": ("FP32", [-1]),
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_the_engine(client, engine, server, binary):
    feeds = _batch(2)
    outputs = [tritonclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    windows_before = server.metric("foalnet_windows_total")
    result = client.infer(SPEC.name, _inputs(feeds, binary), outputs=outputs, request_id="v2-test")
    assert server.metric("foalnet_windows_total") == windows_before + 2  # through the service's batcher
    assert result.get_response()["id"] == "v2-test"
    expected = engine.infer(feeds)
    for name in OUTPUTS:
        got = result.as_numpy(name)
        assert got.shape == expected[name].shape and got.dtype == np.float32, name
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(result.as_numpy("probs")[0], result.as_numpy("probs")[1])


def test_infer_without_requested_outputs_answers_all_in_binary(client, engine):
    feeds = _batch(1)
    result = client.infer(SPEC.name, _inputs(feeds, True))
    np.testing.assert_allclose(result.as_numpy("probs"), engine.infer(feeds)["probs"], rtol=1e-5, atol=1e-6)


def test_bad_tensors_are_typed_errors(client, server):
    feeds = _batch(2)
    feeds["audio"] = feeds["audio"][:, :100]  # wrong window length
    with pytest.raises(InferenceServerException) as bad_shape:
        client.infer(SPEC.name, _inputs(feeds, True))
    assert bad_shape.value.status() == "400" and bad_shape.value.message() == "invalid_request"
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", _inputs(_batch(1), True))
    assert unknown.value.status() == "404"

    # The same answers in full, over plain HTTP.
    url = f"{server.url}/v2/models/{SPEC.name}/infer"
    audio_only = {"name": "audio", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}
    header = json.dumps({"inputs": [audio_only]})
    response = httpx.post(url, content=header, headers={"X-Request-Id": "v2-bad"})
    body = response.json()
    assert response.status_code == 400 and body["error"] == "invalid_request"
    assert body["request_id"] == "v2-bad"
    assert "inputs must be exactly" in body["detail"]
    lying = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "999"})
    assert lying.status_code == 400 and "Inference-Header-Content-Length" in lying.json()["detail"]
    feeds = _batch(1)
    feeds["audio_len"][:] = SPEC.window_samples + 1
    with pytest.raises(InferenceServerException, match="invalid_request"):
        client.infer(SPEC.name, _inputs(feeds, False))
    not_json = httpx.post(url, content=b"\xff\x00garbage")
    assert not_json.status_code == 400 and not_json.json()["error"] == "invalid_request"
