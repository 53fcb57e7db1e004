"""Speech corpora (RAVDESS, nEMO, CASIA layouts), the shared label map, balanced sampling, the
recording-chain augmentations and the FER+ face targets, on tiny generated trees."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from bench.media import tone_wav
from model_export import augment, corpora, data, faces_data
from model_export.crosscorpus import CONDITIONS, corpus_scores, loco_markdown
from service.contract import LABELS_7, LITE_SPEC


def make_corpora(root: Path) -> dict[str, Path]:
    """A few clips in each corpus's own layout and naming (RAVDESS, nEMO, CASIA)."""
    for actor in (1, 17):
        for code, freq in (("02", 200.0), ("07", 300.0), ("05", 400.0)):  # calm, disgust, angry
            tone_wav(root / "ravdess" / f"Actor_{actor:02d}" / f"03-01-{code}-01-01-01-{actor:02d}.wav", freq)
    for speaker in ("EB0", "IC0"):
        for emotion in ("anger", "happiness", "sadness"):
            for n in (1, 2):
                tone_wav(root / "nemo" / f"{speaker}_{emotion}_{n}.wav", 250.0)
    for speaker in ("liuchanhg", "wangzhe"):
        for emotion in ("fear", "surprise", "neutral"):
            tone_wav(root / "casia" / speaker / emotion / "201.wav", 350.0)
    return {name: root / name for name in corpora.SPEECH_CORPORA}


def test_each_layout_maps_to_the_shared_labels_with_its_speakers(tmp_path: Path) -> None:
    roots = make_corpora(tmp_path)
    nemo = corpora.scan_nemo(roots["nemo"])
    assert {(u.speaker, u.label) for u in nemo} == {
        (s, e) for s in ("EB0", "IC0") for e in ("angry", "happy", "sad")
    }
    casia = corpora.scan_casia(roots["casia"])
    assert {u.label for u in casia} == {"fearful", "surprised", "neutral"}
    assert {u.speaker for u in casia} == {"liuchanhg", "wangzhe"}
    ravdess = corpora.scan_ravdess(roots["ravdess"])
    assert {u.label for u in ravdess} == {"neutral", "disgust", "angry"}  # calm -> neutral
    assert {*corpora.NEMO_EMOTIONS.values(), *corpora.CASIA_EMOTIONS.values()} <= set(LABELS_7)
    assert set(corpora.SHARED_LABELS) == set(corpora.NEMO_EMOTIONS.values()) == set(corpora.CASIA_EMOTIONS.values())


def test_bad_names_and_folders_are_typed_errors(tmp_path: Path) -> None:
    tone_wav(tmp_path / "nemo" / "EB0_boredom_1.wav", 200.0)
    with pytest.raises(data.ApiError, match="nEMO name"):
        corpora.scan_nemo(tmp_path / "nemo")
    tone_wav(tmp_path / "casia" / "spk" / "bored" / "1.wav", 200.0)
    with pytest.raises(data.ApiError, match="CASIA emotion"):
        corpora.scan_casia(tmp_path / "casia")
    with pytest.raises(data.ApiError, match="unknown speech corpus"):
        corpora.parse_corpora("ravdess,iemocap")
    assert corpora.parse_corpora("nemo=/x/y,casia") == {"nemo": Path("/x/y"), "casia": corpora.DEFAULT_ROOTS["casia"]}


def test_validation_is_by_speaker_inside_every_corpus(tmp_path: Path) -> None:
    speech = corpora.load_speech(make_corpora(tmp_path), LITE_SPEC, tmp_path / "cache")
    assert len(speech) == 6 + 12 + 6 and all(len(c) == 8000 for c in speech.clips)
    is_val = speech.is_val()
    val, train = speech.take(is_val), speech.take(~is_val)
    assert set(val.speaker) == {"17", "IC0", "wangzhe"}  # VAL_SPEAKERS of each corpus
    assert not set(zip(val.corpus, val.speaker)) & set(zip(train.corpus, train.speaker))
    assert set(val.corpus) == set(train.corpus) == set(corpora.SPEECH_CORPORA)


def test_sampler_balances_corpora_and_classes() -> None:
    # nEMO-like corpus 4x larger and one rare class: draws are still ~even over corpora and classes.
    corpus = np.array(["a"] * 400 + ["b"] * 100)
    y = np.array([0] * 390 + [1] * 10 + [0] * 50 + [2] * 50)
    picks = corpora.BalancedSampler(corpus, y)(6000, np.random.default_rng(0))
    assert abs(np.mean(corpus[picks] == "a") - 0.5) < 0.03
    a = picks[corpus[picks] == "a"]
    assert abs(np.mean(y[a] == 1) - 0.5) < 0.04  # the rare class is half of corpus a's draws


def test_recording_chain_augmentations_keep_length_and_level() -> None:
    rng = np.random.default_rng(0)
    clip = (0.2 * np.sin(np.arange(16_000) / 16_000 * 2 * np.pi * 220)).astype(np.float32)
    wet = augment.reverb(clip, 0.6, 16_000, rng)
    assert wet.shape == clip.shape and np.isclose(np.sqrt(np.mean(wet**2)), np.sqrt(np.mean(clip**2)), rtol=1e-3)
    assert not np.allclose(wet, clip)
    assert np.isclose(np.abs(augment.peak_normalise(clip)).max(), 0.89)
    for codec in augment.CODECS:  # a real encoder and decoder, aligned back to the input
        coded = augment.codec_roundtrip([clip, clip[:4000]], codec, 16_000)
        assert [len(c) for c in coded] == [16_000, 4000]
        assert np.corrcoef(coded[0], clip)[0, 1] > 0.8, codec
    view, length = augment.augment_audio(clip, LITE_SPEC, rng, coded=clip * 0.5)
    assert view.shape == (LITE_SPEC.window_samples,) and 0 < length <= LITE_SPEC.window_samples


def test_every_robustness_condition_returns_the_same_clips(tmp_path: Path) -> None:
    clips = [np.random.default_rng(i).normal(0, 0.1, 8000 + 800 * i).astype(np.float32) for i in range(3)]
    for name, condition in CONDITIONS.items():
        out = condition(clips, LITE_SPEC, np.random.default_rng(0))
        assert [len(c) for c in out] == [len(c) for c in clips], name


def test_corpus_scores_restrict_to_the_shared_classes() -> None:
    labels = LABELS_7
    y = np.array([labels.index("happy"), labels.index("sad")])
    probs = np.zeros((2, 7), np.float32)
    probs[0, labels.index("disgust")] = 0.6  # disgust wins over 7 outputs, happy over the shared 6
    probs[0, labels.index("happy")] = 0.4
    probs[1, labels.index("sad")] = 1.0
    s = corpus_scores(y, probs, labels)
    assert s["ua"] == 0.5 and s["ua6"] == 1.0
    table = loco_markdown({"nemo": {"m": s}})
    assert "| nemo (n=2) | 100.0 / 50.0 |" in table and "mean UA6 | 100.0" in table


def test_ferplus_votes_become_targets_and_non_faces_are_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("happy", "angry"):
        (tmp_path / "train" / name).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "train" / name / "Training_1.jpg"), rng.integers(0, 255, (48, 48), dtype=np.uint8))
    (tmp_path / "ferplus_train.csv").write_text(
        "path,ferplus_file,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,not_face\n"
        "happy/Training_1.jpg,a.png,2,6,0,0,0,0,0,2,0,0\n"
        "angry/Training_1.jpg,b.png,0,0,0,0,1,0,0,0,0,9\n"
    )
    items = data.scan_fer(tmp_path, "train")
    targets, usable = faces_data.ferplus_targets(tmp_path, "train", items)
    happy = next(i for i, it in enumerate(items) if it.label == "happy")
    assert np.allclose(targets[happy][[LABELS_7.index("neutral"), LABELS_7.index("happy")]], [0.25, 0.75])
    assert np.allclose(targets.sum(1), 1.0)  # contempt votes dropped, the rest renormalised
    assert usable.tolist() == [i == happy for i in range(2)]  # 9 of 10 said "not a face"
    framed = faces_data.load_framed_faces(items, LITE_SPEC, tmp_path / "cache")
    assert framed.shape == (2, 48, 48, 1) and framed.dtype == np.uint8


def test_leave_one_corpus_out_trains_on_two_and_scores_the_third(tmp_path: Path, tiny_model: Path) -> None:
    """`foalnet loco` end to end on the tiny trees: three runs, each held-out corpus scored whole, a
    baseline file scored on the same clips, the table written."""
    pytest.importorskip("torch")
    from model_export.encoders import LiteAudioConfig
    from model_export.loco import run_loco
    from model_export.model import FoalNetConfig

    roots = make_corpora(tmp_path)
    tiny_audio = LiteAudioConfig(backbone="cnn", widths=(4, 8), dim=16)
    tiny = FoalNetConfig(dim=16, heads=2, layers=1, lite_audio=tiny_audio)
    fer = tmp_path / "fer"
    for split in ("train", "val"):
        for n, emotion in enumerate(("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")):
            folder = fer / split / emotion
            folder.mkdir(parents=True)
            for i in range(2):
                cv2.imwrite(str(folder / f"{i}.png"), np.full((48, 48), 30 * n + i, np.uint8))
    small = {"batch": 4, "epoch_clips": 8}
    rows, pairs = run_loco(
        roots,
        tmp_path / "loco",
        baselines={"baseline": tiny_model},
        cache=tmp_path / "cache",
        stage_overrides={"audio": {**small, "epochs": 1}, "fusion": {**small, "epochs": 1}},
        model_cfg=tiny,
        fer=fer,
        video=Path("weights/foalnet-lite.onnx"),  # the shipped face branch
    )
    assert list(rows) == list(corpora.SPEECH_CORPORA)
    assert rows["nemo"]["baseline"]["n"] == 12 and rows["casia"]["baseline"]["n"] == 6
    assert all(len(by_model) == 2 for by_model in rows.values())
    for held in rows:
        assert (tmp_path / "loco" / held / "audio.onnx").is_file()
    assert "mean UA6" in (tmp_path / "loco" / "loco.md").read_text()
    assert "fused ≠ voice" in (tmp_path / "loco" / "pairs.md").read_text()
    # Fusion per fold, scored on every held-out clip paired twice with a face of its emotion.
    assert list(pairs) == list(rows) and pairs["nemo"]["n"] == 24 and pairs["casia"]["n"] == 12
    for held, row in pairs.items():
        assert (tmp_path / "loco" / held / "fusion" / "fused.pt").is_file()
        assert all(0.0 <= row[k] <= 1.0 for k in ("fused", "audio", "video", "fused_differs_from_audio"))
