"""IEMOCAP release layout on a tiny fabricated fixture: label parsing, 4-class mapping, LOSO folds."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.media import ffmpeg, tone_wav
from model_export import data
from service.contract import LABELS_IEMOCAP
from service.media import decode_audio

# (utterance suffix, start, end, emotion) per dialog; fru/xxx/sur must be dropped, exc -> happy.
LINES = [
    ("F000", 0.5, 1.5, "neu"),
    ("M001", 1.6, 2.4, "exc"),
    ("F002", 2.5, 3.1, "fru"),
    ("M003", 3.2, 4.0, "ang"),
    ("F004", 4.1, 4.6, "sad"),
    ("M005", 4.7, 5.5, "hap"),
    ("F006", 5.6, 6.0, "xxx"),
]


def make_iemocap(root: Path, sessions: tuple[int, ...] = (1, 2, 3, 4, 5), dialogs: int = 2) -> Path:
    """Session1..5 with `dialogs` dialogs each: EmoEvaluation txt, sentence wavs, one tiny DivX avi."""
    root.mkdir(parents=True, exist_ok=True)
    avi = root / "tiny.avi"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=5:d=6",
        "-f",
        "lavfi",
        "-i",
        "sine=f=300:d=6",
        "-c:v",
        "mpeg4",
        "-c:a",
        "pcm_s16le",
        "-shortest",
        str(avi),
        timeout_s=60,
    )
    for s in sessions:
        for d in range(dialogs):
            dialog = f"Ses0{s}F_impro0{d + 1}"
            base = root / f"Session{s}"
            lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            for suffix, start, end, emo in LINES:
                utt = f"{dialog}_{suffix}"
                lines += [
                    f"[{start:.4f} - {end:.4f}]\t{utt}\t{emo}\t[2.5000, 3.0000, 3.0000]",
                    f"C-E1:\t{emo};\t()",
                    "",
                ]
                tone_wav(base / "sentences" / "wav" / dialog / f"{utt}.wav", 200 + 50 * s, end - start)
            emo_dir = base / "dialog" / "EmoEvaluation"
            emo_dir.mkdir(parents=True, exist_ok=True)
            (emo_dir / f"{dialog}.txt").write_text("\n".join(lines))
            video_dir = base / "dialog" / "avi" / "DivX"
            video_dir.mkdir(parents=True, exist_ok=True)
            (video_dir / f"{dialog}.avi").write_bytes(avi.read_bytes())
    return root


@pytest.fixture(scope="module")
def iemocap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_iemocap(tmp_path_factory.mktemp("iemocap"))


def test_label_lines_and_mapping(iemocap: Path) -> None:
    utts = data.scan_iemocap(iemocap)
    assert len(utts) == 5 * 2 * 5  # 5 of the 7 lines per dialog are in the 4 classes
    assert {u.label for u in utts} == set(LABELS_IEMOCAP)
    first = next(u for u in utts if u.utt_id.endswith("M001"))
    assert first.label == "happy" and (first.start_s, first.end_s) == (1.6, 2.4)
    assert not any(u.utt_id.endswith(("F002", "F006")) for u in utts)
    wav, avi = first.wav(iemocap), first.avi(iemocap)
    assert wav.is_file() and avi.is_file()
    assert len(decode_audio(wav)) == pytest.approx(0.8 * 16_000, abs=2)
    items = data.iemocap_items(utts, iemocap)
    assert items[0].path.suffix == ".wav" and items[0].end_s > items[0].start_s


@pytest.mark.parametrize("test_session", [1, 2, 3, 4, 5])
def test_leave_one_session_out_with_a_speaker_independent_validation_split(
    iemocap: Path, test_session: int
) -> None:
    utts = data.scan_iemocap(iemocap)
    train, val, test = data.iemocap_fold(utts, test_session)
    assert {u.session for u in test} == {test_session}
    assert test_session not in {u.session for u in train} | {u.session for u in val}
    assert val and train and len(train) + len(val) + len(test) == len(utts)
    speakers = [{u.speaker for u in part} for part in (train, val, test)]
    assert len(speakers[1]) == 1 and len(speakers[2]) == 2  # one validation actor; the test session's two
    assert not speakers[0] & speakers[1] and not speakers[0] & speakers[2] and not speakers[1] & speakers[2]
    assert len(speakers[0]) == 7  # everyone else trains


def test_the_five_folds_validate_on_five_different_speakers(iemocap: Path) -> None:
    val = {data.iemocap_val_speaker(s) for s in data.IEMOCAP_SESSIONS}
    assert len(val) == 5 and {v[-1] for v in val} == {"F", "M"}
    assert next(u for u in data.scan_iemocap(iemocap) if u.utt_id.endswith("M003")).speaker[-1] == "M"


def test_bad_fold_and_empty_root(tmp_path: Path, iemocap: Path) -> None:
    from service.errors import ApiError

    with pytest.raises(ApiError):
        data.iemocap_fold(data.scan_iemocap(iemocap), 6)
    with pytest.raises(ApiError, match="test session"):
        data.iemocap_fold(data.scan_iemocap(iemocap), 2, val_speaker="Ses02F")
    with pytest.raises(ApiError):
        data.scan_iemocap(tmp_path)
