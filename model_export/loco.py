"""`foalnet loco`: the leave-one-corpus-out speech protocol, the figure that says how the audio branch
does on a voice, language and studio it has never heard.

For each speech corpus in turn: train the lite audio branch (the shipped recipe, `train_lite`'s audio
stage) on the other corpora, selecting epochs on their validation speakers only; export it; score every
clip of the held-out corpus through the service's engine. Baseline ONNX files (`--baseline`, e.g. an
earlier shipped model) are scored on the same clips. A finished corpus is not retrained (its
`audio.pt` is kept); an interrupted one resumes from its last epoch.

With `--fer` and `--video` each fold also runs the fusion stage (that face branch, the fold's voice
branch, pairs of the fold's corpora) and scores fused, voice and face answers on every held-out clip
paired with FER validation faces of its emotion: how the fused head does when the voice is one it has
never heard, as a user's is (`held_out_pairs`).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from model_export import corpora, crosscorpus, data
from model_export.model import FoalNet, FoalNetConfig
from model_export.train_lite import lite_data, train_lite

RECIPE = "this recipe, trained on the other corpora"


def held_out_pairs(
    model: FoalNet, speech: corpora.Speech, faces: np.ndarray, face_y: np.ndarray, cache: Path
) -> dict[str, float]:
    """UA6 of the fused, voice and face answers on every clip of `speech` paired twice with a face of its
    emotion (seeded draws), and the shares of answers where the fused one differs from each branch's."""
    from model_export.fusion_stage import PseudoAV, pair_probs
    from model_export.train_adapter import corpus_views

    frozen = model.cfg.frozen_audio_backbone  # the adapter reads cached backbone views, as in training
    views = corpus_views(model, speech, 1, seed=0, codecs=False, cache=cache) if frozen else None
    y, probs = pair_probs(model, PseudoAV(speech.clips, speech.y, faces, face_y, views=views), repeats=2)
    labels = model.cfg.spec.labels
    out = {name: crosscorpus.corpus_scores(y, p, labels)["ua6"] for name, p in probs.items()}
    answer = {name: crosscorpus.shared_argmax(p, labels) for name, p in probs.items()}
    for branch in ("audio", "video"):
        out[f"fused_differs_from_{branch}"] = float((answer["fused"] != answer[branch]).mean())
    return {**out, "n": len(y)}


def run_loco(
    speech: dict[str, Path],
    out: Path,
    *,
    baselines: dict[str, Path],
    seed: int = 0,
    cache: Path = data.DEFAULT_CACHE,
    val_speakers: dict[str, frozenset[str]] = corpora.VAL_SPEAKERS,
    stage_overrides: dict[str, dict] | None = None,
    model_cfg: FoalNetConfig | None = None,
    fer: Path | None = None,
    video: Path | None = None,
    conflict: bool = True,
) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """({held-out corpus: {model name: corpus_scores}}, {held-out corpus: `held_out_pairs`} when `fer` and
    `video` are given); also writes loco.json, loco.md (and pairs[-no-conflict].json / .md) under `out`."""
    from model_export.export import export_onnx
    from model_export.model import load_checkpoint
    from service.contract import LITE_SPEC
    from service.engine import Engine

    rows: dict[str, dict[str, dict]] = {}
    pairs: dict[str, dict] = {}
    faces = lite_data(None, fer, LITE_SPEC, cache) if fer is not None and video is not None else None
    train = partial(
        train_lite, val_speakers=val_speakers, seed=seed, cache=cache, stage_overrides=stage_overrides
    )
    for held, root in speech.items():
        run = out / held
        if not (run / "audio.pt").is_file() or (run / "audio.resume.pt").is_file():
            train(speech, None, run, stages=("audio",), hold_out=held, model_cfg=model_cfg)
        onnx_path = export_onnx(load_checkpoint(run / "audio.pt"), run / "audio.onnx")
        test = corpora.load_speech({held: root}, LITE_SPEC, cache)
        models = {RECIPE: onnx_path, **baselines}
        rows[held] = {
            name: crosscorpus.speech_report(Engine(path, device="cpu"), test)[held]
            for name, path in models.items()
        }
        if faces is not None:
            fusion = run / ("fusion" if conflict else "fusion-no-conflict")
            if not (fusion / "fused.pt").is_file() or (fusion / "fused.resume.pt").is_file():
                init = {"audio": run / "audio.pt", "video": video}
                train(speech, fer, fusion, stages=("fusion",), hold_out=held, init=init, conflict=conflict)
            fused = load_checkpoint(fusion / "fused.pt")
            pairs[held] = held_out_pairs(fused, test, faces.f_val, faces.yf_val, cache)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loco.json").write_text(json.dumps(rows, indent=2))
    (out / "loco.md").write_text(crosscorpus.loco_markdown(rows) + "\n")
    if pairs:
        name = "pairs" if conflict else "pairs-no-conflict"
        (out / f"{name}.json").write_text(json.dumps(pairs, indent=2))
        (out / f"{name}.md").write_text(pairs_markdown(pairs) + "\n")
    return rows, pairs


def pairs_markdown(pairs: dict[str, dict]) -> str:
    """`held_out_pairs` of every fold as a Markdown table."""
    lines = [
        "| held-out voice + FER val face (UA6, %) | fused | voice | face | fused ≠ voice | ≠ face |",
        "|---|---|---|---|---|---|",
    ]
    cells = ("fused", "audio", "video", "fused_differs_from_audio", "fused_differs_from_video")
    for corpus, row in {**pairs, "mean": {k: np.mean([p[k] for p in pairs.values()]) for k in cells}}.items():
        lines.append(f"| {corpus} | " + " | ".join(f"{100 * row[k]:.1f}" for k in cells) + " |")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("loco")
    def loco_command(
        speech: Annotated[str, typer.Option(help="corpora, e.g. ravdess,nemo,casia or nemo=/data/nemo")] = (
            "ravdess,nemo,casia"
        ),
        out: Annotated[Path, typer.Option(help="one run folder per held-out corpus, loco.md / loco.json")] = Path(
            "runs/loco"
        ),
        epochs: Annotated[int, typer.Option(help="audio epochs per run (0: the audio stage's default)")] = 0,
        epoch_clips: Annotated[int, typer.Option(help="balanced draws per epoch (0: the audio stage's default)")] = 0,
        baseline: Annotated[
            list[str] | None, typer.Option(help="NAME=model.onnx scored on the same held-out clips")
        ] = None,
        seed: Annotated[int, typer.Option()] = 0,
        threads: Annotated[int, typer.Option(help="torch intra-op threads (0 = torch's default)")] = 0,
        cache: Annotated[Path, typer.Option(help="decoded-media cache (gitignored)")] = data.DEFAULT_CACHE,
        fer: Annotated[Path | None, typer.Option(help="FER2013 folder: also train and score fusion")] = None,
        video: Annotated[
            Path | None, typer.Option(help="face branch for the fusion folds (video.pt or a shipped .onnx)")
        ] = None,
        conflict: Annotated[bool, typer.Option(help="fusion with conflicting pairs (the recipe)")] = True,
    ) -> None:
        """Leave-one-corpus-out speech UA: train on all corpora but one, test on that one, each in turn."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        if (fer is None) != (video is None):
            raise typer.BadParameter("--fer and --video go together")
        audio = {k: v for k, v in {"epochs": epochs, "epoch_clips": epoch_clips}.items() if v}  # 0 = default
        rows, pairs = run_loco(
            corpora.parse_corpora(speech),
            out,
            baselines={k: Path(v) for k, v in (b.split("=", 1) for b in baseline or [])},
            seed=seed,
            cache=cache,
            stage_overrides={"audio": audio} if audio else None,
            fer=fer,
            video=video,
            conflict=conflict,
        )
        typer.echo(crosscorpus.loco_markdown(rows) + ("\n\n" + pairs_markdown(pairs) if pairs else ""))
