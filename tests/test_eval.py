"""`foalnet eval --json` on tiny generated RAVDESS / FER / manifest data with the untrained lite model."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import cv2
import numpy as np
import typer
from typer.testing import CliRunner

from model_export import evaluate

SCORE_KEYS = {"ua", "wa", "macro_f1", "n", "confusion", "labels"}


def _app() -> typer.Typer:
    app = typer.Typer()
    evaluate.register(app)

    @app.callback()
    def root() -> None:  # keeps `eval` a named sub-command
        """test app"""

    return app


def _ravdess(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for actor in (1, 2):
        folder = root / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for emotion in ("01", "03", "05"):
            pcm = (rng.normal(0, 0.1, 16_000) * 32767).astype(np.int16)
            with wave.open(str(folder / f"03-01-{emotion}-01-01-01-{actor:02d}.wav"), "wb") as handle:
                handle.setnchannels(1)
                handle.setsampwidth(2)
                handle.setframerate(16_000)
                handle.writeframes(pcm.tobytes())
    return root


def _fer(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("angry", "fear", "happy", "surprise"):
        (root / "val" / cls).mkdir(parents=True)
        cv2.imwrite(
            str(root / "val" / cls / "PublicTest_1.jpg"), rng.integers(0, 255, (48, 48), dtype=np.uint8)
        )
    return root


def _run(args: list[str]) -> dict:
    result = CliRunner().invoke(_app(), ["eval", *args, "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # exactly one JSON object on stdout


def test_eval_json_ravdess_and_fer(lite_model: Path, tmp_path: Path) -> None:
    ravdess, fer, cache = _ravdess(tmp_path / "ravdess"), _fer(tmp_path / "fer"), tmp_path / "cache"
    report = _run(
        [
            "--model",
            str(lite_model),
            "--speech",
            f"ravdess={ravdess}",
            "--speakers",
            "all",
            "--fer",
            str(fer),
            "--cache",
            str(cache),
            "--plots",
            str(tmp_path / "plots"),
        ]
    )
    assert set(report) == {"audio", "speech_corpora", "video", "video_fer2013"}
    assert set(report["audio"]) == SCORE_KEYS and report["audio"]["n"] == 6
    assert report["speech_corpora"]["ravdess"]["n"] == 6 and 0.0 <= report["speech_corpora"]["ravdess"]["ua6"] <= 1
    assert report["video"]["n"] == report["video_fer2013"]["n"] == 4
    assert np.array(report["audio"]["confusion"]).shape == (7, 7)
    assert 0.0 <= report["video"]["ua"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion_audio.png",
        "confusion_video.png",
        "confusion_video_fer2013.png",
    ]

    # No actor of the tiny tree is a validation speaker (17-20): "val" then scores the corpus whole.
    only = _run(["--model", str(lite_model), "--speech", f"ravdess={ravdess}", "--cache", str(cache)])
    assert set(only) == {"audio", "speech_corpora"} and only["audio"]["n"] == 6
    robust = _run(
        ["--model", str(lite_model), "--speech", f"ravdess={ravdess}", "--robustness", "--cache", str(cache)]
    )
    from model_export.crosscorpus import CONDITIONS

    assert set(robust["speech_robustness"]) == set(CONDITIONS)
    assert all(r["ravdess"]["n"] == 6 for r in robust["speech_robustness"].values())
    perturbed = _run(["--model", str(lite_model), "--fer", str(fer), "--perturb", "--cache", str(cache)])
    assert perturbed["video"]["n"] == 4
    # Pseudo pairs need a face for every speech label (neutral, happy, angry): add a neutral face.
    (fer / "val" / "neutral").mkdir()
    cv2.imwrite(str(fer / "val" / "neutral" / "PublicTest_2.jpg"), np.full((48, 48), 90, np.uint8))
    paired = _run(
        [
            "--model",
            str(lite_model),
            "--speech",
            f"ravdess={ravdess}",
            "--fer",
            str(fer),
            "--pairs",
            "2",
            "--cache",
            str(tmp_path / "cache2"),
        ]
    )
    assert set(paired) == {
        "audio",
        "speech_corpora",
        "video",
        "video_fer2013",
        "pseudo_av_disagreement",
        "pseudo_av_fused",
        "pseudo_av_audio",
        "pseudo_av_video",
        "pseudo_av_agreement",
    }
    assert paired["pseudo_av_fused"]["n"] == 12
    # Every clip is also paired with a face of another label: the agreement outputs are scored by
    # how well they tell the two apart.
    agreement = paired["pseudo_av_agreement"]
    assert agreement["n_matched"] == agreement["n_mismatched"] == 12
    assert all(0.0 <= agreement[f"auc_{k}"] <= 1.0 for k in ("similarity", "match_a2v", "match_v2a"))


def test_eval_manifest_gives_all_three(lite_model: Path, tmp_path: Path) -> None:
    from bench.media import make_clip

    make_clip(tmp_path / "a.mp4", seconds=2)
    (tmp_path / "m.csv").write_text("path,label\na.mp4,happy\n")
    report = _run(
        ["--model", str(lite_model), "--manifest", str(tmp_path / "m.csv"), "--cache", str(tmp_path / "c")]
    )
    assert set(report) == {"audio", "video", "fused"}
    assert all(report[k]["n"] == 1 for k in report)


def test_eval_needs_data(lite_model: Path) -> None:
    result = CliRunner().invoke(_app(), ["eval", "--model", str(lite_model)])
    assert result.exit_code != 0
