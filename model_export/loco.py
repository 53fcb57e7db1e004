"""`foalnet loco`: the leave-one-corpus-out speech protocol, the figure that says how the audio branch
does on a voice, language and studio it has never heard.

For each speech corpus in turn: train the lite audio branch (the shipped recipe, `train_lite`'s audio
stage) on the other corpora, selecting epochs on their validation speakers only; export it; score every
clip of the held-out corpus through the service's engine. Baseline ONNX files (`--baseline`, e.g. an
earlier shipped model) are scored on the same clips. A finished corpus is not retrained (its
`audio.pt` is kept); an interrupted one resumes from its last epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from model_export import corpora, crosscorpus, data
from model_export.model import FoalNetConfig
from model_export.train_lite import train_lite


RECIPE = "this recipe, trained on the other corpora"


def run_loco(
    speech: dict[str, Path],
    out: Path,
    *,
    epochs: int,
    baselines: dict[str, Path],
    seed: int = 0,
    cache: Path = data.DEFAULT_CACHE,
    val_speakers: dict[str, frozenset[str]] = corpora.VAL_SPEAKERS,
    stage_overrides: dict | None = None,
    model_cfg: FoalNetConfig | None = None,
) -> dict[str, dict[str, dict]]:
    """{held-out corpus: {model name: corpus_scores}}; also writes loco.json and loco.md under `out`."""
    from model_export.export import export_onnx
    from model_export.model import load_checkpoint
    from service.contract import LITE_SPEC
    from service.engine import Engine

    rows: dict[str, dict[str, dict]] = {}
    for held in speech:
        run = out / held
        if not (run / "audio.pt").is_file() or (run / "audio.resume.pt").is_file():
            train_lite(
                speech,
                None,
                run,
                stages=("audio",),
                hold_out=held,
                val_speakers=val_speakers,
                epochs={"audio": epochs},
                seed=seed,
                cache=cache,
                stage_overrides={"audio": stage_overrides or {}},
                model_cfg=model_cfg,
            )
        onnx_path = export_onnx(load_checkpoint(run / "audio.pt"), run / "audio.onnx")
        test = corpora.load_speech({held: speech[held]}, LITE_SPEC, cache)
        models = {RECIPE: onnx_path, **baselines}
        rows[held] = {name: crosscorpus.speech_report(Engine(path, device="cpu"), test)[held] for name, path in models.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "loco.json").write_text(json.dumps(rows, indent=2))
    (out / "loco.md").write_text(crosscorpus.loco_markdown(rows) + "\n")
    return rows


def register(app: typer.Typer) -> None:
    @app.command("loco")
    def loco_command(
        speech: Annotated[str, typer.Option(help="corpora, e.g. ravdess,nemo,casia or nemo=/data/nemo")] = (
            "ravdess,nemo,casia"
        ),
        out: Annotated[Path, typer.Option(help="one run folder per held-out corpus, loco.md / loco.json")] = Path(
            "runs/loco"
        ),
        epochs: Annotated[int, typer.Option(help="audio epochs per run")] = 14,
        epoch_clips: Annotated[int, typer.Option(help="balanced draws per epoch (0: the audio stage's default)")] = 0,
        baseline: Annotated[
            list[str] | None, typer.Option(help="NAME=model.onnx scored on the same held-out clips")
        ] = None,
        seed: Annotated[int, typer.Option()] = 0,
        threads: Annotated[int, typer.Option(help="torch intra-op threads (0 = torch's default)")] = 0,
        cache: Annotated[Path, typer.Option(help="decoded-media cache (gitignored)")] = data.DEFAULT_CACHE,
    ) -> None:
        """Leave-one-corpus-out speech UA: train on all corpora but one, test on that one, each in turn."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        rows = run_loco(
            corpora.parse_corpora(speech),
            out,
            epochs=epochs,
            baselines={k: Path(v) for k, v in (b.split("=", 1) for b in baseline or [])},
            seed=seed,
            cache=cache,
            stage_overrides={"epoch_clips": epoch_clips} if epoch_clips else None,
        )
        typer.echo(crosscorpus.loco_markdown(rows))
