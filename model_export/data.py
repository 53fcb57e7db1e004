"""Datasets: RAVDESS speech, FER2013 faces, CSV manifests of real videos and IEMOCAP's release layout.

Every piece of media goes through the serving side's own decoders (`service.media.decode_audio`,
`service.faces.prepare_face`), so training sees exactly what serving sees. Decoded RAVDESS audio and
prepared FER faces are cached as .npy under a gitignored cache dir, keyed by the spec's preprocessing.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.contract import LABELS_7, ModelSpec
from service.errors import ApiError, ErrorCode

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "cache"

# RAVDESS `03-01-EE-II-SS-RR-AA`: EE emotion, II intensity, SS statement, RR repetition, AA actor.
RAVDESS_EMOTIONS: dict[str, str] = {
    "01": "neutral",
    "02": "neutral",  # calm
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
RAVDESS_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
AUDIO_SUFFIXES = (".wav", ".flac")

FER_CLASSES: dict[str, str] = {
    "angry": "angry",
    "disgust": "disgust",
    "fear": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "surprise": "surprised",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# IEMOCAP: excited is merged into happy; every other category (fru, sur, xxx, ...) is dropped.
IEMOCAP_EMOTIONS: dict[str, str] = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "happy",
    "sad": "sad",
    "ang": "angry",
}
IEMOCAP_LINE = re.compile(
    r"^\[(?P<start>[\d.]+)\s*-\s*(?P<end>[\d.]+)\]\s+(?P<utt>\S+)\s+(?P<emo>\S+)\s+\[[^\]]*\]\s*$"
)
IEMOCAP_SESSIONS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Item:
    """One labelled piece of media; `group` is the speaker/session used for splitting."""

    path: Path
    label: str
    group: int = 0
    start_s: float = 0.0  # with end_s > start_s: the span of `video` this item covers
    end_s: float = 0.0
    video: Path | None = None  # frames come from here when it is not `path` itself (IEMOCAP dialog avi)


def _invalid(detail: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_REQUEST, detail)


def label_index(label: str, labels: tuple[str, ...] = LABELS_7) -> int:
    if label not in labels:
        raise _invalid(f"label {label!r} is not one of {', '.join(labels)}")
    return labels.index(label)


# ---------------------------------------------------------------- RAVDESS


def parse_ravdess_name(name: str) -> tuple[str, int]:
    """`03-01-05-02-01-01-12.wav` -> ("angry", 12)."""
    match = RAVDESS_NAME.match(Path(name).stem)
    if match is None or match.group(3) not in RAVDESS_EMOTIONS:
        raise _invalid(f"{name!r} is not a RAVDESS name 03-01-EE-II-SS-RR-AA with EE in 01..08")
    return RAVDESS_EMOTIONS[match.group(3)], int(match.group(7))


def parse_actors(text: str) -> set[int]:
    """`"17-20"` or `"1,3,5-7"` -> a set of actor numbers."""
    actors: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise _invalid(f"bad actor range {part!r}; use e.g. 17-20 or 1,3,5-7")
        actors.update(range(int(lo), int(hi or lo) + 1))
    return actors


def scan_ravdess(root: Path, actors: set[int] | None = None) -> list[Item]:
    """Speech clips under `root/Actor_XX/` (wav or flac), optionally only the given actors."""
    root = Path(root)
    if not root.is_dir():
        raise _invalid(f"RAVDESS directory {root} does not exist")
    items = []
    for path in sorted(root.glob("Actor_*/*")):
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            continue
        label, actor = parse_ravdess_name(path.name)
        if actors is None or actor in actors:
            items.append(Item(path, label, actor))
    if not items:
        raise _invalid(f"no RAVDESS clips found under {root}")
    return items


def split_by_actor(items: list[Item], val_actors: set[int]) -> tuple[list[Item], list[Item]]:
    """Train / validation by speaker: no actor is ever on both sides."""
    train = [it for it in items if it.group not in val_actors]
    val = [it for it in items if it.group in val_actors]
    return train, val


def actor_folds(actors: list[int], k: int) -> list[set[int]]:
    """k disjoint validation actor sets covering all actors (contiguous blocks, both sexes each)."""
    ordered = sorted(actors)
    size = len(ordered) // k
    return [set(ordered[i * size : (i + 1) * size if i < k - 1 else len(ordered)]) for i in range(k)]


# ---------------------------------------------------------------- FER2013


def scan_fer(root: Path, split: str) -> list[Item]:
    """Faces under `root/<split>/<class>/*.jpg` with FER class names mapped to the 7 labels."""
    base = Path(root) / split
    if not base.is_dir():
        raise _invalid(f"FER directory {base} does not exist")
    items = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        if folder.name not in FER_CLASSES:
            raise _invalid(f"unknown FER class folder {folder.name!r}")
        label = FER_CLASSES[folder.name]
        items += [Item(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise _invalid(f"no face images found under {base}")
    return items


# ---------------------------------------------------------------- manifest


def read_manifest(path: Path, labels: tuple[str, ...] = LABELS_7) -> list[Item]:
    """A CSV with a `path,label` header; relative paths are taken from the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise _invalid(f"manifest {path} does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise _invalid(f"manifest {path} needs a header with the columns path,label")
        items = []
        for row in reader:
            media = Path(row["path"])
            label_index(row["label"], labels)
            items.append(Item(media if media.is_absolute() else path.parent / media, row["label"]))
    if not items:
        raise _invalid(f"manifest {path} lists no videos")
    return items


# ---------------------------------------------------------------- IEMOCAP


@dataclass(frozen=True)
class IemocapUtterance:
    session: int
    dialog: str
    utt_id: str
    start_s: float
    end_s: float
    label: str

    @property
    def speaker(self) -> str:
        """`Ses01F_impro01_M003` -> "Ses01M": each session has one female and one male actor, and the
        utterance id's last part starts with the speaker's letter."""
        return f"Ses{self.session:02d}{self.utt_id.rsplit('_', 1)[-1][:1]}"

    def wav(self, root: Path) -> Path:
        return (
            Path(root) / f"Session{self.session}" / "sentences" / "wav" / self.dialog / f"{self.utt_id}.wav"
        )

    def avi(self, root: Path) -> Path:
        return Path(root) / f"Session{self.session}" / "dialog" / "avi" / "DivX" / f"{self.dialog}.avi"


def parse_emo_evaluation(path: Path, session: int) -> list[IemocapUtterance]:
    """Label lines `[start - end]\\tUtterance_ID\\temotion\\t[V, A, D]` of one EmoEvaluation file."""
    dialog = Path(path).stem
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        match = IEMOCAP_LINE.match(line.strip())
        if match is None or match.group("emo") not in IEMOCAP_EMOTIONS:
            continue
        out.append(
            IemocapUtterance(
                session=session,
                dialog=dialog,
                utt_id=match.group("utt"),
                start_s=float(match.group("start")),
                end_s=float(match.group("end")),
                label=IEMOCAP_EMOTIONS[match.group("emo")],
            )
        )
    return out


def scan_iemocap(root: Path) -> list[IemocapUtterance]:
    """All 4-class utterances of Session1..5 under an IEMOCAP release root."""
    root = Path(root)
    utts: list[IemocapUtterance] = []
    for session in IEMOCAP_SESSIONS:
        folder = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        for txt in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
            utts += parse_emo_evaluation(txt, session)
    if not utts:
        raise _invalid(f"no IEMOCAP label files found under {root}/Session*/dialog/EmoEvaluation")
    return utts


def iemocap_val_speaker(test_session: int) -> str:
    """The validation speaker of a fold: one actor of the next session, F and M in turn."""
    session = test_session % len(IEMOCAP_SESSIONS) + 1
    return f"Ses{session:02d}{'F' if test_session % 2 else 'M'}"


def iemocap_fold(
    utts: list[IemocapUtterance], test_session: int, *, val_speaker: str | None = None
) -> tuple[list[IemocapUtterance], list[IemocapUtterance], list[IemocapUtterance]]:
    """Leave-one-session-out with a speaker-independent validation split: (train, val, test).

    test = the held-out session (both its speakers); val = one speaker of a training session
    (`iemocap_val_speaker` by default); train = everyone else. No speaker is on two sides, and the
    test session never reaches model selection (the released code selected epochs on it).
    """
    if test_session not in IEMOCAP_SESSIONS:
        raise _invalid(f"test session must be one of {IEMOCAP_SESSIONS}, not {test_session}")
    val_speaker = val_speaker or iemocap_val_speaker(test_session)
    if val_speaker.startswith(f"Ses{test_session:02d}"):
        raise _invalid(f"validation speaker {val_speaker} belongs to the test session {test_session}")
    test = [u for u in utts if u.session == test_session]
    val = [u for u in utts if u.session != test_session and u.speaker == val_speaker]
    train = [u for u in utts if u.session != test_session and u.speaker != val_speaker]
    return train, val, test


def iemocap_items(utts: list[IemocapUtterance], root: Path) -> list[Item]:
    """Utterances as items: the sentence wav for audio, the dialog avi cut at the utterance times."""
    return [Item(u.wav(root), u.label, u.session, u.start_s, u.end_s, u.avi(root)) for u in utts]


def labels_of(items: list[Item], labels: tuple[str, ...] = LABELS_7) -> np.ndarray:
    return np.array([label_index(it.label, labels) for it in items], dtype=np.int64)


# ---------------------------------------------------------------- caches


def _cache_file(cache_dir: Path, kind: str, items: list[Item], extra: str) -> Path:
    key = hashlib.sha1(("\n".join(str(it.path) for it in items) + extra).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{kind}-{key}.npy"


def load_audio(items: list[Item], spec: ModelSpec, cache_dir: Path = DEFAULT_CACHE) -> list[np.ndarray]:
    """Decoded float32 mono clips at the spec's rate (cached as one float16 array + offsets)."""
    from service.media import decode_audio

    path = _cache_file(cache_dir, "audio", items, f"sr={spec.sample_rate}")
    offsets_path = path.with_suffix(".offsets.npy")
    if path.is_file() and offsets_path.is_file():
        flat, offsets = np.load(path), np.load(offsets_path)
    else:
        with ThreadPoolExecutor(max_workers=4) as pool:  # ffmpeg subprocesses: threads overlap them
            clips = list(pool.map(lambda it: decode_audio(it.path, sample_rate=spec.sample_rate), items))
        offsets = np.cumsum([0] + [len(c) for c in clips])
        flat = np.concatenate(clips).astype(np.float16) if clips else np.zeros(0, np.float16)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, flat)
        np.save(offsets_path, offsets)
    return [flat[offsets[i] : offsets[i + 1]].astype(np.float32) for i in range(len(items))]


def load_faces(items: list[Item], spec: ModelSpec, cache_dir: Path = DEFAULT_CACHE) -> np.ndarray:
    """uint8 [N, S, S, C] faces prepared by the service's `prepare_face` (cached)."""
    import cv2

    from service.faces import prepare_face

    def frame(image: np.ndarray) -> np.ndarray:
        return prepare_face(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), spec)  # serving frames are RGB

    return cached_images(items, spec, cache_dir, "faces", frame, grayscale=False)


def cached_images(
    items: list[Item],
    spec: ModelSpec,
    cache_dir: Path,
    kind: str,
    frame: Callable[[np.ndarray], np.ndarray],
    *,
    grayscale: bool,
) -> np.ndarray:
    """uint8 [N, S, S, C]: `frame(image)` of every image file, cached under `kind` (BGR or gray in)."""
    import cv2

    path = _cache_file(cache_dir, kind, items, f"size={spec.frame_size},colour={spec.colour}")
    if path.is_file():
        return np.load(path)
    faces = np.zeros((len(items), spec.frame_size, spec.frame_size, spec.channels), dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR
    for i, it in enumerate(items):
        image = cv2.imread(str(it.path), flag)
        if image is None:
            raise ApiError(ErrorCode.CORRUPT_MEDIA, f"cannot read image {it.path}")
        faces[i] = frame(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, faces)
    return faces


# Training decodes whole IEMOCAP dialogs (minutes long): a longer cap and time limit than an upload's.
TRAIN_DECODE_LIMITS_S = {"max_duration_s": 3600.0, "timeout_s": 900.0}


def iter_av(items: list[Item], spec: ModelSpec) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Real audio-visual items through the service's decoder and frame cropper, one at a time:
    (audio float32 [S], frames uint8 [n <= F, S, S, C]).

    The n frames are spread uniformly over the item's span among those where a face was found (all
    frames for whole-frame specs), as the service samples a window. One decoded video is kept at a
    time, so keep items of the same video together (IEMOCAP dialogs are).
    """
    from service.faces import FaceCropper
    from service.media import decode, decode_audio
    from service.media_limits import DecodeLimits

    cropper, limits = FaceCropper(spec), DecodeLimits(**TRAIN_DECODE_LIMITS_S)
    current: tuple[Path | None, object] = (None, None)
    for it in items:
        video = it.video or it.path
        if current[0] != video:
            current = (video, decode(video, spec, limits))
        media = current[1]
        span = it.end_s > it.start_s
        frames = np.zeros((0, *spec.frames_shape[1:]), np.uint8)
        if media.frames is not None:
            inside = np.ones(len(media.frames), bool)
            if span:
                inside &= (media.frame_times >= it.start_s) & (media.frame_times < it.end_s)
            crops, found = cropper(media.frames[inside])
            picks = np.flatnonzero(found)
            if len(picks) > spec.frames_per_window:
                picks = picks[np.linspace(0, len(picks) - 1, spec.frames_per_window).round().astype(int)]
            frames = crops[picks]
        if it.video is not None:
            audio = decode_audio(it.path, sample_rate=spec.sample_rate)
        else:
            audio = media.audio if media.audio is not None else np.zeros(0, np.float32)
            if span:
                audio = audio[int(it.start_s * spec.sample_rate) : int(it.end_s * spec.sample_rate)]
        yield audio, frames
