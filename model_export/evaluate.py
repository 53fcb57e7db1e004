"""`foalnet eval`: score an ONNX model through the service's own inference code (torch-free).

- `--ravdess DIR [--actors 17-20]`: speech clips, one centred window each, scored on `audio_probs`
  with no frames (`frames_len` 0);
- `--fer DIR [--fer-split val]`: face images as still clips (the face in all F frames), scored on
  `video_probs` with no audio (`audio_len` 0);
- `--manifest CSV` (`path,label`): real videos through `service.windows.prepare` (decode, faces,
  windows) exactly as `/predict` does, window probabilities averaged per video; scored on `audio`,
  `video` and `fused`.
`--perturb` applies the fixed robustness condition of `model_export.augment` to speech and faces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from model_export import augment, data
from model_export.metrics import auc, scores
from service.contract import (
    INPUT_AUDIO,
    INPUT_AUDIO_LEN,
    INPUT_FRAMES,
    INPUT_FRAMES_LEN,
    OUTPUT_AUDIO_PROBS,
    OUTPUT_MATCH_A2V,
    OUTPUT_MATCH_V2A,
    OUTPUT_PROBS,
    OUTPUT_SIMILARITY,
    OUTPUT_VIDEO_PROBS,
    ModelSpec,
)

CHUNK = 256  # items decoded and sent to the engine at a time (bounds memory on big sets)
AGREEMENT = (OUTPUT_SIMILARITY, OUTPUT_MATCH_A2V, OUTPUT_MATCH_V2A)  # scored by matched-vs-mismatched AUC


def _feeds(spec: ModelSpec, n: int) -> dict[str, np.ndarray]:
    return {
        INPUT_AUDIO: np.zeros((n, spec.window_samples), dtype=np.float32),
        INPUT_AUDIO_LEN: np.zeros(n, dtype=np.int64),
        INPUT_FRAMES: np.zeros((n, *spec.frames_shape), dtype=np.uint8),
        INPUT_FRAMES_LEN: np.zeros(n, dtype=np.int64),
    }


def speech_probs(engine, clips: list[np.ndarray], *, perturb: bool = False, seed: int = 0) -> np.ndarray:
    """[N, K] `audio_probs` of one centred window per clip."""
    spec, rng = engine.spec, np.random.default_rng(seed)
    out = []
    for start in range(0, len(clips), CHUNK):
        part = clips[start : start + CHUNK]
        feeds = _feeds(spec, len(part))
        for i, clip in enumerate(part):
            feeds[INPUT_AUDIO][i], feeds[INPUT_AUDIO_LEN][i] = (
                augment.perturb_audio(clip, spec, rng)
                if perturb
                else augment.crop_or_pad(clip, spec.window_samples, None)
            )
        out.append(engine.infer(feeds)[OUTPUT_AUDIO_PROBS])
    return np.concatenate(out) if out else np.zeros((0, len(spec.labels)), np.float32)


def face_probs(engine, faces: np.ndarray, *, perturb: bool = False, seed: int = 0) -> np.ndarray:
    """[N, K] `video_probs` of each face shown as a still clip (the same crop in all F frames)."""
    spec, rng = engine.spec, np.random.default_rng(seed)
    out = []
    for start in range(0, len(faces), CHUNK):
        part = faces[start : start + CHUNK]
        if perturb:
            part = np.stack([augment.perturb_face(f, rng) for f in part])
        feeds = _feeds(spec, len(part))
        feeds[INPUT_FRAMES][:] = part[:, None]
        feeds[INPUT_FRAMES_LEN][:] = spec.frames_per_window
        out.append(engine.infer(feeds)[OUTPUT_VIDEO_PROBS])
    return np.concatenate(out) if out else np.zeros((0, len(spec.labels)), np.float32)


def pair_probs(
    engine,
    clips: list[np.ndarray],
    y: np.ndarray,
    faces: np.ndarray,
    face_y: np.ndarray,
    *,
    repeats: int,
    perturb: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Pseudo audio-visual pairs as training validates them: each clip `repeats` times with a seeded
    same-label face rendered into F slightly shifted frames, and once more with a face of another
    label (where the faces have one). Returns (labels, {fused, audio, video} probs of the matched
    pairs, agreement): agreement holds the pair counts and, for each agreement output, the AUC with
    which it tells the matched pairs from the mismatched ones."""
    spec, rng = engine.spec, np.random.default_rng(seed)
    by_label = {c: np.flatnonzero(face_y == c) for c in np.unique(y)}
    other_label = {c: np.flatnonzero(face_y != c) for c in np.unique(y)}
    truth, out = [], {"fused": [], "audio": [], "video": []}
    agree: dict[bool, dict[str, list[np.ndarray]]] = {m: {k: [] for k in AGREEMENT} for m in (True, False)}
    for _ in range(repeats):
        for start in range(0, len(clips), CHUNK):
            idx = np.arange(start, min(start + CHUNK, len(clips)))
            for matched in (True, False):
                rows = idx if matched else idx[[len(other_label[y[i]]) > 0 for i in idx]]
                feeds = _feeds(spec, len(rows))
                for row, i in enumerate(rows):
                    feeds[INPUT_AUDIO][row], feeds[INPUT_AUDIO_LEN][row] = (
                        augment.perturb_audio(clips[i], spec, rng)
                        if perturb
                        else augment.crop_or_pad(clips[i], spec.window_samples, None)
                    )
                    face = faces[rng.choice((by_label if matched else other_label)[y[i]])]
                    face = augment.perturb_face(face, rng) if perturb else face
                    feeds[INPUT_FRAMES][row] = augment.render_frames(
                        face, spec.frames_per_window, rng, augment=False
                    )
                feeds[INPUT_FRAMES_LEN][:] = spec.frames_per_window
                result = engine.infer(feeds) if len(rows) else {k: np.zeros(0) for k in AGREEMENT}
                for key in AGREEMENT:
                    agree[matched][key].append(result[key])
                if matched:
                    for name, key in (
                        ("fused", OUTPUT_PROBS),
                        ("audio", OUTPUT_AUDIO_PROBS),
                        ("video", OUTPUT_VIDEO_PROBS),
                    ):
                        out[name].append(result[key])
                    truth.append(y[idx])
    pos = {k: np.concatenate(v) for k, v in agree[True].items()}
    neg = {k: np.concatenate(v) for k, v in agree[False].items()}
    n_neg = len(neg[OUTPUT_SIMILARITY])
    agreement: dict[str, float] = {"n_matched": len(pos[OUTPUT_SIMILARITY]), "n_mismatched": n_neg}
    if n_neg:
        agreement |= {f"auc_{key}": auc(pos[key], neg[key]) for key in AGREEMENT}
    return np.concatenate(truth), {k: np.concatenate(v) for k, v in out.items()}, agreement


def manifest_probs(engine, items: list[data.Item]) -> dict[str, np.ndarray]:
    """Per video: window-averaged fused / audio / video probabilities via the serving pipeline."""
    from service.faces import FaceCropper
    from service.media import DecodeLimits
    from service.windows import prepare

    cropper = FaceCropper(engine.spec)
    keys = {"fused": OUTPUT_PROBS, "audio": OUTPUT_AUDIO_PROBS, "video": OUTPUT_VIDEO_PROBS}
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for item in items:
        prepared = prepare(item.path, engine.spec, cropper, DecodeLimits())
        result = engine.infer(prepared.windows.feeds())
        for name, key in keys.items():
            out[name].append(result[key].mean(0))
    return {k: np.stack(v) for k, v in out.items()}


def evaluate(
    model: Path,
    *,
    ravdess: Path | None = None,
    actors: str | None = None,
    fer: Path | None = None,
    fer_split: str = "val",
    manifest: Path | None = None,
    pairs: int = 0,
    perturb: bool = False,
    threads: int | None = None,
    cache: Path = data.DEFAULT_CACHE,
) -> dict[str, dict]:
    """{"audio"|"video"|"fused": {ua, wa, macro_f1, n, confusion, labels}} for the data given; with
    `pairs` > 0 and both RAVDESS and FER, also "pseudo_av_fused" / "_audio" / "_video" on the same pairs
    and "pseudo_av_agreement" (matched vs mismatched pairs: n_matched, n_mismatched and the AUC of
    similarity, match_a2v and match_v2a)."""
    from service.engine import Engine

    engine = Engine(model, device="cpu", intra_op_threads=threads)
    spec = engine.spec
    k = len(spec.labels)
    report: dict[str, dict] = {}

    def add(name: str, truth: np.ndarray, probs: np.ndarray) -> None:
        report[name] = {**scores(truth, probs.argmax(-1), k), "labels": list(spec.labels)}

    if ravdess is not None:
        items = data.scan_ravdess(ravdess)  # all actors: one cache file whatever the selection
        keep = data.parse_actors(actors) if actors else {it.group for it in items}
        clips = [c for c, it in zip(data.load_audio(items, spec, cache), items) if it.group in keep]
        speech_y = data.labels_of([it for it in items if it.group in keep], spec.labels)
        add("audio", speech_y, speech_probs(engine, clips, perturb=perturb))
    if fer is not None:
        items = data.scan_fer(fer, fer_split)
        faces, face_y = data.load_faces(items, spec, cache), data.labels_of(items, spec.labels)
        add("video", face_y, face_probs(engine, faces, perturb=perturb))
    if pairs > 0 and ravdess is not None and fer is not None:
        truth, probs, agreement = pair_probs(
            engine, clips, speech_y, faces, face_y, repeats=pairs, perturb=perturb
        )
        for name, p in probs.items():
            add(f"pseudo_av_{name}", truth, p)
        report["pseudo_av_agreement"] = agreement
    if manifest is not None:
        items = data.read_manifest(manifest, spec.labels)
        truth = data.labels_of(items, spec.labels)
        for name, probs in manifest_probs(engine, items).items():
            if name in report:  # --ravdess/--fer already filled it: keep both apart
                name = f"{name}_manifest"
            add(name, truth, probs)
    return report


def write_plots(report: dict[str, dict], out_dir: Path) -> list[Path]:
    """One confusion-matrix PNG (row-normalised, counts annotated) per modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, res in report.items():
        if "confusion" not in res:
            continue
        matrix = np.array(res["confusion"], dtype=np.float64)
        norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        labels = res["labels"]
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                int(count),
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: UA {res['ua']:.3f}  WA {res['wa']:.3f}  n={res['n']}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / f"confusion_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def register(app) -> None:
    @app.command("eval")
    def eval_command(
        model: Annotated[Path, typer.Option(help="ONNX model file (e.g. weights/foalnet-lite.onnx)")],
        ravdess: Annotated[
            Path | None, typer.Option(help="RAVDESS speech dir (Actor_XX/): audio scores")
        ] = None,
        actors: Annotated[str | None, typer.Option(help="only these RAVDESS actors, e.g. 17-20")] = None,
        fer: Annotated[
            Path | None, typer.Option(help="FER2013 dir (<split>/<class>/*.jpg): video scores")
        ] = None,
        fer_split: Annotated[str, typer.Option(help="FER split folder")] = "val",
        manifest: Annotated[
            Path | None, typer.Option(help="CSV path,label of real videos: audio, video, fused")
        ] = None,
        pairs: Annotated[
            int, typer.Option(help="with --ravdess and --fer: score N same-label pseudo pairs per clip")
        ] = 0,
        perturb: Annotated[
            bool, typer.Option(help="apply the fixed noise / codec / blur / lighting degradation")
        ] = False,
        threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print exactly one JSON object")] = False,
        cache: Annotated[Path, typer.Option(help="decoded-media cache (gitignored)")] = data.DEFAULT_CACHE,
        plots: Annotated[Path | None, typer.Option(help="write confusion-matrix PNGs here")] = None,
    ) -> None:
        """UA / WA / macro-F1 / confusion of a model on RAVDESS, FER and/or a video manifest."""
        if ravdess is None and fer is None and manifest is None:
            raise typer.BadParameter("give at least one of --ravdess, --fer, --manifest")
        report = evaluate(
            model,
            ravdess=ravdess,
            actors=actors,
            fer=fer,
            fer_split=fer_split,
            manifest=manifest,
            pairs=pairs,
            perturb=perturb,
            threads=threads,
            cache=cache,
        )
        if plots is not None:
            write_plots(report, plots)
        if as_json:
            typer.echo(json.dumps(report))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("modality", "n", "UA", "WA", "macro-F1")
        for name, res in report.items():
            if "ua" in res:
                table.add_row(
                    name, str(res["n"]), f"{res['ua']:.4f}", f"{res['wa']:.4f}", f"{res['macro_f1']:.4f}"
                )
        Console().print(table)
        if agreement := report.get("pseudo_av_agreement"):
            Console().print(
                "agreement (AUC, matched vs mismatched pseudo pairs): "
                + ", ".join(f"{k[4:]} {v:.3f}" for k, v in agreement.items() if k.startswith("auc_"))
            )
