"""`foalnet eval`: score an ONNX model through the service's own inference code (torch-free).

- `--speech ravdess,nemo,casia [--speakers val|all]`: speech clips, one centred window each, scored on
  `audio_probs` with no frames (`frames_len` 0), pooled and per corpus (`--robustness`: also through
  each recording-chain change of `model_export.crosscorpus`);
- `--fer DIR [--fer-split val]`: face images framed as the service crops video faces, as still clips
  (the face in all F frames), scored on `video_probs` with no audio (`audio_len` 0), against the FER+
  majority label and the FER2013 label;
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

from model_export import augment, corpora, data, faces_data
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


def select_speakers(speech: corpora.Speech, speakers: str) -> corpora.Speech:
    """"val": each corpus's validation speakers (all of a corpus that names none); "all": every clip."""
    if speakers == "all":
        return speech
    if speakers != "val":
        raise data._invalid(f"speakers must be 'val' or 'all', not {speakers!r}")
    keep = speech.is_val()
    for c in np.unique(speech.corpus):  # a corpus with no validation speakers here is scored whole
        if not keep[speech.corpus == c].any():
            keep |= speech.corpus == c
    return speech.take(keep)


def evaluate(
    model: Path,
    *,
    speech: dict[str, Path] | None = None,
    speakers: str = "val",
    fer: Path | None = None,
    fer_split: str = "val",
    manifest: Path | None = None,
    pairs: int = 0,
    perturb: bool = False,
    robustness: bool = False,
    threads: int | None = None,
    cache: Path = data.DEFAULT_CACHE,
) -> dict[str, dict]:
    """Scores of an ONNX model, each {ua, wa, macro_f1, n, confusion, labels}:
    - "audio" (speech clips of `speakers`, pooled) and "speech_corpora" ({corpus: UA/WA over all outputs
      and over the 6 shared classes}); with `robustness`, "speech_robustness" ({condition: {corpus: ...}});
    - "video" (FER faces framed as the service crops video faces, against the FER+ majority label) and
      "video_fer2013" (against the FER2013 folder label);
    - with `pairs` > 0 and both: "pseudo_av_fused" / "_audio" / "_video" on the same pairs,
      "pseudo_av_agreement" (matched vs mismatched AUCs) and "pseudo_av_disagreement" (how often the
      fused answer differs from each branch's);
    - "audio" / "video" / "fused" of a video manifest through the serving pipeline."""
    from service.engine import Engine

    engine = Engine(model, device="cpu", intra_op_threads=threads)
    spec = engine.spec
    k = len(spec.labels)
    report: dict[str, dict] = {}

    def add(name: str, truth: np.ndarray, probs: np.ndarray) -> None:
        report[name] = {**scores(truth, probs.argmax(-1), k), "labels": list(spec.labels)}

    if speech is not None:
        from model_export import crosscorpus

        chosen = select_speakers(corpora.load_speech(speech, spec, cache), speakers)
        clips, speech_y = chosen.clips, chosen.y
        probs = speech_probs(engine, clips, perturb=perturb)
        add("audio", speech_y, probs)
        report["speech_corpora"] = {
            c: crosscorpus.corpus_scores(speech_y[chosen.corpus == c], probs[chosen.corpus == c], spec.labels)
            for c in np.unique(chosen.corpus)
        }
        if robustness:
            report["speech_robustness"] = crosscorpus.robustness(engine, chosen)
    if fer is not None:
        items = data.scan_fer(fer, fer_split)
        faces = faces_data.load_framed_faces(items, spec, cache)
        face_y = faces_data.ferplus_targets(fer, fer_split, items, spec.labels)[0].argmax(1)
        face_p = face_probs(engine, faces, perturb=perturb)
        add("video", face_y, face_p)
        add("video_fer2013", data.labels_of(items, spec.labels), face_p)
    if pairs > 0 and speech is not None and fer is not None:
        truth, probs, agreement = pair_probs(
            engine, clips, speech_y, faces, face_y, repeats=pairs, perturb=perturb
        )
        for name, p in probs.items():
            add(f"pseudo_av_{name}", truth, p)
        report["pseudo_av_agreement"] = agreement
        fused = probs["fused"].argmax(-1)
        report["pseudo_av_disagreement"] = {
            f"fused_vs_{b}": float(np.mean(fused != probs[b].argmax(-1))) for b in ("audio", "video")
        }
    if manifest is not None:
        items = data.read_manifest(manifest, spec.labels)
        truth = data.labels_of(items, spec.labels)
        for name, probs in manifest_probs(engine, items).items():
            if name in report:  # --speech/--fer already filled it: keep both apart
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
        speech: Annotated[
            str | None, typer.Option(help="speech corpora, e.g. ravdess,nemo,casia or ravdess=DIR: audio scores")
        ] = None,
        speakers: Annotated[
            str, typer.Option(help="val: each corpus's validation speakers only; all: every clip")
        ] = "val",
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
        robustness: Annotated[
            bool, typer.Option(help="with --speech: score the clips clean and through each recording-chain change")
        ] = False,
        threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print exactly one JSON object")] = False,
        cache: Annotated[Path, typer.Option(help="decoded-media cache (gitignored)")] = data.DEFAULT_CACHE,
        plots: Annotated[Path | None, typer.Option(help="write confusion-matrix PNGs here")] = None,
    ) -> None:
        """UA / WA / macro-F1 / confusion of a model on speech corpora, FER and/or a video manifest."""
        if speech is None and fer is None and manifest is None:
            raise typer.BadParameter("give at least one of --speech, --fer, --manifest")
        report = evaluate(
            model,
            speech=corpora.parse_corpora(speech) if speech else None,
            speakers=speakers,
            fer=fer,
            fer_split=fer_split,
            manifest=manifest,
            pairs=pairs,
            perturb=perturb,
            robustness=robustness,
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
        if per_corpus := report.get("speech_corpora"):
            Console().print(
                "speech per corpus (UA over 7 / over the 6 shared classes): "
                + ", ".join(f"{c} {r['ua']:.3f} / {r['ua6']:.3f}" for c, r in per_corpus.items())
            )
        if table := report.get("speech_robustness"):
            from model_export.crosscorpus import robustness_markdown

            Console().print(robustness_markdown(table, "ua6"))
