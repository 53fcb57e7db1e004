"""The ONNX Runtime engine: spec from metadata, buckets, provider choice and fallback, failures."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from service.contract import INPUT_AUDIO, INPUT_AUDIO_LEN, OUTPUT_PROBS, OUTPUTS
from service.engine import CPU, CUDA, Engine, EngineError
from service.errors import ApiError, ErrorCode
from tests.conftest import TINY_SPEC

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, device="cpu", intra_op_threads=1, buckets=(1, 2, 4))


def feeds_of(engine: Engine, n: int) -> dict[str, np.ndarray]:
    feeds = engine.dummy_feeds(n)
    feeds[INPUT_AUDIO] = np.linspace(-1, 1, n, dtype=np.float32)[:, None].repeat(
        feeds[INPUT_AUDIO].shape[1], 1
    )
    return feeds


def test_spec_comes_from_the_model_metadata(engine):
    assert engine.spec == TINY_SPEC
    assert engine.provider == CPU
    assert engine.fallback_reason is None


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_any_batch_size_matches_one_by_one(engine, n):
    feeds = feeds_of(engine, n)
    batched = engine.infer(feeds)
    assert set(batched) == set(OUTPUTS)
    assert all(len(v) == n for v in batched.values())
    singles = [engine.infer({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(n)]
    np.testing.assert_allclose(
        batched[OUTPUT_PROBS], np.concatenate([s[OUTPUT_PROBS] for s in singles]), rtol=1e-5
    )
    np.testing.assert_allclose(batched[OUTPUT_PROBS].sum(1), 1.0, rtol=1e-5)


def test_batches_are_padded_to_buckets(engine, monkeypatch):
    seen = []
    run = engine.session.run
    monkeypatch.setattr(
        engine.session,
        "run",
        lambda names, feeds: seen.append(len(feeds[INPUT_AUDIO])) or run(names, feeds),
        raising=False,
    )
    engine.infer(feeds_of(engine, 3))
    engine.infer(feeds_of(engine, 9))
    assert seen == [4, 4, 4, 1]
    assert [engine.bucket_for(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]


def test_warmup_runs_every_bucket(tiny_model):
    engine = Engine(tiny_model, device="cpu", intra_op_threads=1, buckets=(4, 1, 2))
    assert not engine.warm
    assert sorted(engine.warmup()) == [1, 2, 4]
    assert engine.warm


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this machine has the CUDA provider")
def test_auto_falls_back_to_cpu_visibly(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="service.engine"):
        engine = Engine(tiny_model, device="auto", intra_op_threads=1)
    assert engine.provider == CPU
    assert CUDA in engine.fallback_reason
    assert any("running on CPU" in r.message for r in caplog.records)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this machine has the CUDA provider")
def test_explicit_cuda_fails_at_start(tiny_model):
    with pytest.raises(EngineError, match="device=cuda"):
        Engine(tiny_model, device="cuda")


def test_a_file_that_is_no_foalnet_model_is_refused(tmp_path, tiny_model):
    import onnx

    model = onnx.load(str(tiny_model))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(EngineError, match="metadata"):
        Engine(tmp_path / "bare.onnx", device="cpu")
    with pytest.raises(EngineError, match="not found"):
        Engine(tmp_path / "missing.onnx", device="cpu")


def test_inference_failure_is_typed_and_drops_health(tiny_model):
    engine = Engine(tiny_model, device="cpu", intra_op_threads=1, buckets=(1, 2))
    bad = engine.dummy_feeds(2)
    bad[INPUT_AUDIO_LEN] = bad[INPUT_AUDIO_LEN].astype(np.float32)  # wrong dtype: ORT refuses
    with pytest.raises(ApiError) as caught:
        engine.infer(bad)
    assert caught.value.code is ErrorCode.INFERENCE_FAILED and caught.value.status == 503
    assert not engine.healthy
    engine.infer(engine.dummy_feeds(2))
    assert engine.healthy
