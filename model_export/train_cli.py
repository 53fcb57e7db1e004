"""`foalnet train`: the lite model in three stages (`train_lite`), or the paper model on IEMOCAP / a
manifest / real audio-visual corpora (`protocol`); the loop they share is `train.run_stage`.

lite (what ships):
  1. `audio`: the audio branch (lite encoder -> pooled tokens -> audio head) with CE on RAVDESS speech
     (training actors only), selected on validation-actor UA;
  2. `video`: the video branch (per-frame CNN -> pooled tokens -> video head) with CE on FER2013 train,
     selected on FER val UA;
  3. `fusion`: both branches loaded and frozen, then the rest of Foal-Net (projections, AVEL, fusion,
     MEM) trained on pseudo audio-visual pairs (a speech clip + a FER face of the same emotion rendered
     into F frames), selected on the validation pairs' fused UA.
Stages 1 and 2 are independent (run them as two processes to use two cores). Every stage keeps an
exponential moving average (EMA) of the weights and evaluates / saves that. Checkpoints are
`model.save_checkpoint` files (`audio.pt`, `video.pt`, `fused.pt` under --out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from model_export import data
from model_export.model import load_checkpoint
from model_export.train import _file_log


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        config: Annotated[
            str, typer.Option(help="lite (RAVDESS + FER pseudo-pairs) or paper (WavLM + CLIP)")
        ] = "lite",
        speech: Annotated[
            str,
            typer.Option(help="lite: speech corpora, e.g. ravdess,nemo,casia or nemo=/data/nemo (default roots: ../shared/data)"),
        ] = "ravdess,nemo,casia",
        hold_out: Annotated[
            str | None, typer.Option(help="lite audio: leave this corpus out entirely (cross-corpus protocol)")
        ] = None,
        fer: Annotated[Path, typer.Option(help="FER2013 (train/ and val/ class folders)")] = Path(
            "../shared/data/fer2013"
        ),
        stage: Annotated[
            list[str] | None, typer.Option(help="lite stages to run, in order (default: audio video fusion)")
        ] = None,
        epochs: Annotated[
            list[str] | None,
            typer.Option(help="per-stage epochs, e.g. --epochs audio=30 (paper: --epochs paper=40)"),
        ] = None,
        init: Annotated[
            list[str] | None,
            typer.Option(
                help="continue a stage from a checkpoint, e.g. --init video=runs/lite/video.pt; for the"
                " fusion stage: the branch to take (a face branch may be a released .onnx file)"
            ),
        ] = None,
        lr: Annotated[
            list[str] | None, typer.Option(help="per-stage peak learning rate, e.g. --lr video=1e-3")
        ] = None,
        out: Annotated[Path, typer.Option(help="checkpoints and train.log go here")] = Path("runs/lite"),
        export: Annotated[
            Path | None, typer.Option(help="after the fusion stage, export the best model to this ONNX path")
        ] = None,
        mem_weight: Annotated[
            float | None,
            typer.Option(help="λ of the MEM loss (default: lite fusion 1.0, paper 0.1)"),
        ] = None,
        seed: Annotated[int, typer.Option()] = 0,
        device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
        threads: Annotated[int, typer.Option(help="torch intra-op threads (0 = torch's default)")] = 0,
        cache: Annotated[Path, typer.Option(help="decoded-media cache (gitignored)")] = data.DEFAULT_CACHE,
        iemocap: Annotated[
            Path | None, typer.Option(help="paper: IEMOCAP release root (Session1..5)")
        ] = None,
        manifest: Annotated[Path | None, typer.Option(help="paper: CSV path,label of real videos")] = None,
        test_session: Annotated[int, typer.Option(help="paper + IEMOCAP: the held-out session (1-5)")] = 5,
        audio_encoder: Annotated[Path | None, typer.Option(help="paper: local WavLM directory")] = None,
        video_encoder: Annotated[Path | None, typer.Option(help="paper: local CLIP vision directory")] = None,
        folds: Annotated[
            int | None, typer.Option(help="paper + IEMOCAP: leave-one-session-out on sessions 1..N (5 = all)")
        ] = None,
        corpus: Annotated[
            tuple[str, Path] | None,
            typer.Option(help="real audio-visual pairs: crema-d DIR, ravdess-av DIR or manifest CSV"),
        ] = None,
        avel: Annotated[bool | None, typer.Option("--avel/--no-avel", help="AVEL loss on/off")] = None,
        mem: Annotated[bool | None, typer.Option("--mem/--no-mem", help="MEM loss on/off")] = None,
        avel_targets: Annotated[
            str | None, typer.Option(help="deviation: normalised (paper: binary)")
        ] = None,
        temperature: Annotated[str | None, typer.Option(help="deviation: clip (paper: paper)")] = None,
        unimodal_ce: Annotated[
            bool | None,
            typer.Option("--unimodal-ce/--no-unimodal-ce", help="deviation: unimodal CEs train the encoders"),
        ] = None,
        mem_head: Annotated[str | None, typer.Option(help="deviation: mlp (paper: linear)")] = None,
        fusion_on: Annotated[str | None, typer.Option(help="deviation: projected (paper: raw)")] = None,
        pool_then_project: Annotated[
            bool | None, typer.Option("--pool-then-project/--project-then-pool", help="deviation: AVEL order")
        ] = None,
        projection_bias: Annotated[bool | None, typer.Option(help="deviation: biased projections")] = None,
        attention_dropout_on: Annotated[
            str | None, typer.Option(help="deviation: weights (paper: output)")
        ] = None,
    ) -> None:
        """Train Foal-Net; logs CE / AVEL / MEM per epoch and keeps the best validation-UA checkpoint."""
        if threads:
            torch.set_num_threads(threads)
        if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            raise typer.BadParameter(f"device {device!r} is not available here: use cpu or cuda")
        if config == "lite" and device != "cpu":
            raise typer.BadParameter("the lite stages run on the CPU; --device cuda is for --config paper")
        per_stage = dict(e.split("=", 1) for e in epochs or [])
        if config == "paper" or corpus is not None:  # real audio-visual clips: model_export.protocol
            from model_export.protocol import train_real
            from service.errors import ApiError

            switches = dict(avel=avel, mem=mem, mem_weight=mem_weight, avel_targets=avel_targets)
            switches |= dict(temperature=temperature, unimodal_ce=unimodal_ce, mem_head=mem_head)
            switches |= dict(fusion_on=fusion_on, pool_then_project=pool_then_project)
            switches |= dict(projection_bias=projection_bias, attention_dropout_on=attention_dropout_on)
            branches = {k: Path(v) for k, v in (e.split("=", 1) for e in init or [])}
            lite_run = Path("runs/lite")  # where the lite audio / video stages write by default
            try:
                summary = train_real(
                    config,
                    iemocap=iemocap,
                    corpus=corpus if corpus is not None else (("manifest", manifest) if manifest else None),
                    folds=folds,
                    test_session=test_session,
                    audio_encoder=audio_encoder,
                    video_encoder=video_encoder,
                    branches={"audio": lite_run / "audio.pt", "video": lite_run / "video.pt"} | branches,
                    overrides={k: v for k, v in switches.items() if v is not None},
                    epochs=int(per_stage.get("paper" if config == "paper" else "fusion", 0)) or None,
                    seed=seed,
                    out=out,
                    device=device,
                    log=_file_log(out / "train.log"),
                )
            except (ValueError, ApiError) as e:
                raise typer.BadParameter(getattr(e, "detail", str(e))) from e
            typer.echo(json.dumps(summary, indent=2))
            return
        if config == "lite":
            from model_export import corpora
            from model_export.train_lite import LITE_MEM_WEIGHT, STAGES, train_lite

            stage = stage or list(STAGES)
            unknown = [s for s in stage if s not in STAGES]
            if unknown:
                raise typer.BadParameter(f"unknown stage(s) {unknown}; choose from {STAGES}")
            results = train_lite(
                corpora.parse_corpora(speech),
                fer,
                out,
                stages=tuple(stage),
                hold_out=hold_out,
                epochs={k: int(v) for k, v in per_stage.items()},
                seed=seed,
                cache=cache,
                init={k: Path(v) for k, v in (e.split("=", 1) for e in init or [])},
                stage_overrides={k: {"lr": float(v)} for k, v in (e.split("=", 1) for e in lr or [])},
                mem_weight=LITE_MEM_WEIGHT if mem_weight is None else mem_weight,
            )
            typer.echo(json.dumps(results, indent=2))
            if export is not None and "fusion" in stage:
                from model_export.export import export_onnx, verify_parity

                model = load_checkpoint(out / "fused.pt")
                export_onnx(model, export, spec=model.cfg.spec)
                typer.echo(json.dumps({"exported": str(export), "parity": verify_parity(model, export)}))
            return
        raise typer.BadParameter(f"unknown config {config!r}: expected lite or paper")
