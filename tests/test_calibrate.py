"""Temperature scaling: the fit, the calibration error, and the calibrated graph the service reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.contract import OUTPUT_AUDIO_PROBS, OUTPUT_PROBS, OUTPUT_VIDEO_PROBS

pytest.importorskip("onnx")
from model_export import calibrate  # noqa: E402


def _overconfident(n: int, seed: int = 0, t_true: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), reported as softmax(z * t_true): too sure by a factor t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 7))
    truth = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(7, p=p) for p in truth])
    sharp = np.exp(z * t_true)
    return sharp / sharp.sum(1, keepdims=True), y


def test_the_fitted_temperature_undoes_overconfidence_and_lowers_ece() -> None:
    probs, y = _overconfident(4000)
    t = calibrate.fit_temperature(probs, y)
    assert 2.2 < t < 2.8  # the factor it was sharpened by
    report = calibrate.fit_and_report(probs, y)
    assert report["ece_after"] < 0.03 < report["ece_before"]
    assert report["nll_after"] < report["nll_before"]
    scaled = calibrate.scale(probs, t)
    assert np.allclose(scaled.sum(1), 1) and (scaled.argmax(1) == probs.argmax(1)).all()  # ranking kept


def test_ece_of_a_calibrated_predictor_is_small_and_of_a_liar_is_large() -> None:
    y = np.zeros(1000, int)
    honest = np.tile([0.8, 0.2], (1000, 1))
    y[:200] = 1  # right 80 % of the time at confidence 0.8
    assert calibrate.ece(honest, y) < 1e-9
    liar = np.tile([0.99, 0.01], (1000, 1))
    assert abs(calibrate.ece(liar, y) - 0.19) < 1e-6


def test_the_calibrated_file_gives_scaled_probabilities_and_refuses_a_second_pass(
    lite_model: Path, tmp_path: Path
) -> None:
    from service.engine import Engine
    from model_export.export import random_inputs

    temps = {OUTPUT_PROBS: 1.7, OUTPUT_AUDIO_PROBS: 0.8, OUTPUT_VIDEO_PROBS: 3.0}
    calibrated = calibrate.write_temperatures(lite_model, tmp_path / "cal.onnx", temps)
    before, after = Engine(lite_model, device="cpu"), Engine(calibrated, device="cpu")
    assert after.spec.extra["temperature.probs"] == "1.7000"
    assert after.spec.labels == before.spec.labels and after.spec.version == before.spec.version
    feeds = random_inputs(before.spec, 3)
    raw, out = before.infer(feeds), after.infer(feeds)
    for name, t in temps.items():
        assert np.allclose(out[name], calibrate.scale(raw[name], t), atol=1e-5), name
    assert np.array_equal(out["similarity"], raw["similarity"])  # agreement outputs untouched
    with pytest.raises(ValueError, match="already calibrated"):
        calibrate.write_temperatures(calibrated, tmp_path / "twice.onnx", temps)


def test_repeated_halvings_steady_the_reported_ece() -> None:
    """One random halving moves the after-scaling ECE by about a point on a validation-sized set;
    the average over repeated halvings is what a rerun with another seed reproduces."""
    probs, y = _overconfident(800, seed=3)
    single = [calibrate.fit_and_report(probs, y, seed=s, repeats=1)["ece_after"] for s in range(8)]
    repeated = [calibrate.fit_and_report(probs, y, seed=s, repeats=10) for s in range(8)]
    assert np.std([r["ece_after"] for r in repeated]) < np.std(single) / 2
    assert 0 < repeated[0]["ece_after_sd"] < 0.03
