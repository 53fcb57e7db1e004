"""`foalnet train`: the lite model in three stages, or the paper model on IEMOCAP / a manifest.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model_export import augment, corpora, data
from model_export.encoders import masked_mean
from model_export.metrics import scores
from model_export.model import FoalNet, FoalNetConfig, load_checkpoint, save_checkpoint
from service.contract import LITE_SPEC, ModelSpec

Log = Callable[[str], None]


@dataclass
class StageConfig:
    epochs: int
    batch: int
    lr: float
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    ema_decay: float = 0.99
    seed: int = 0
    patience: int = 0  # early stopping on validation UA; 0 = run every epoch
    keep: str = "best"  # "best": the epoch (EMA or live) with the best validation UA; "last": the final EMA
    epoch_clips: int = 0  # training draws an epoch (0 = the training set's size; balanced samplers redraw)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _batches(n: int, size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - size + 1 if rng is not None and n >= size else n  # training drops the ragged tail
    for start in range(0, max(stop, 1), size):
        yield order[start : start + size]


# ---------------------------------------------------------------- batch makers (numpy -> torch)


def audio_batch(
    clips: list[np.ndarray], idx: np.ndarray, spec: ModelSpec, rng: np.random.Generator, mode: str
) -> tuple[Tensor, Tensor]:
    """mode: "train" (augmented view), "clean" (centre crop) or "perturbed" (fixed degradation)."""
    out = np.zeros((len(idx), spec.window_samples), dtype=np.float32)
    lengths = np.zeros(len(idx), dtype=np.int64)
    for row, i in enumerate(idx):
        if mode == "train":
            out[row], lengths[row] = augment.augment_audio(clips[i], spec, rng)
        elif mode == "perturbed":
            out[row], lengths[row] = augment.perturb_audio(clips[i], spec, rng)
        else:
            out[row], lengths[row] = augment.crop_or_pad(clips[i], spec.window_samples, None)
    return torch.from_numpy(out), torch.from_numpy(lengths)


def face_batch(faces: np.ndarray, idx: np.ndarray, rng: np.random.Generator, mode: str) -> Tensor:
    if mode == "train":
        return torch.from_numpy(np.stack([augment.augment_face(faces[i], rng) for i in idx]))
    if mode == "perturbed":
        return torch.from_numpy(np.stack([augment.perturb_face(faces[i], rng) for i in idx]))
    return torch.from_numpy(faces[idx])


def frames_batch(
    faces: np.ndarray, idx: np.ndarray, spec: ModelSpec, rng: np.random.Generator, mode: str
) -> tuple[Tensor, Tensor]:
    """Pseudo-clips: each face rendered into F frames with small seeded shifts/scales."""
    f = spec.frames_per_window
    out = np.stack(
        [
            augment.render_frames(
                augment.perturb_face(faces[i], rng) if mode == "perturbed" else faces[i],
                f,
                rng,
                augment=mode == "train",
            )
            for i in idx
        ]
    )
    return torch.from_numpy(out), torch.full((len(idx),), f, dtype=torch.int64)


# ---------------------------------------------------------------- unimodal logits through the model


def audio_logits(model: FoalNet, audio: Tensor, audio_len: Tensor) -> Tensor:
    tokens, mask = model.audio_encoder(audio, audio_len)
    return model.audio_head(masked_mean(tokens, mask))


def face_logits(model: FoalNet, faces: Tensor) -> Tensor:
    """Single images as one-frame clips through the video encoder, projection and video head."""
    ones = torch.ones(len(faces), dtype=torch.int64)
    tokens, mask = model.video_encoder(faces.unsqueeze(1), ones)
    return model.video_head(masked_mean(tokens, mask))


def class_weights(y: np.ndarray, k: int) -> Tensor:
    """Inverse-frequency weights, mean 1 (RAVDESS neutral+calm is 1.5x the other classes)."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = counts.sum() / (k * np.maximum(counts, 1))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


@torch.no_grad()
def predict(model: nn.Module, n: int, batch: int, make: Callable[[np.ndarray], Tensor]) -> np.ndarray:
    """Argmax predictions of `make(idx) -> logits` over 0..n-1 in eval mode."""
    model.eval()
    return np.concatenate([make(idx).argmax(-1).numpy() for idx in _batches(n, batch, None)])


# ---------------------------------------------------------------- the generic stage loop


def run_stage(
    model: FoalNet,
    params: list[nn.Parameter],
    n_train: int,
    step_loss: Callable[[FoalNet, np.ndarray, np.random.Generator], tuple[Tensor, dict[str, Tensor]]],
    validate: Callable[[FoalNet], dict[str, float]],
    cfg: StageConfig,
    ckpt: Path,
    log: Log,
    name: str,
    extra: dict | None = None,
) -> dict[str, float]:
    """AdamW + one-cycle LR + EMA; validate the EMA and the live weights each epoch; keep the best by
    validation `ua` (`cfg.keep == "last"`: the final EMA, whatever its score)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rng = seed_everything(cfg.seed)
    n_train = cfg.epoch_clips or n_train
    steps_per_epoch = max(1, n_train // cfg.batch)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    best: dict[str, float] = {"ua": -1.0}
    stale, first = 0, 1
    resume = ckpt.with_suffix(".resume.pt")  # written every epoch; a stopped run continues from it
    if resume.is_file():
        state = torch.load(resume, weights_only=False)
        for obj, key in ((model, "model"), (ema, "ema"), (opt, "opt"), (sched, "sched")):
            obj.load_state_dict(state[key])
        rng.bit_generator.state, best, stale, first = state["rng"], state["best"], state["stale"], state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
        log(f"{name}: resumed from {resume} after epoch {state['epoch']}")
    with Progress(
        TextColumn(f"[bold]{name}[/] epoch {{task.fields[epoch]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(name, total=steps_per_epoch, epoch=0, info="")
        for epoch in range(first, cfg.epochs + 1):
            model.train()
            progress.reset(task, total=steps_per_epoch, epoch=epoch, info="")
            sums: dict[str, float] = {}
            start = time.time()
            for step, idx in enumerate(_batches(n_train, cfg.batch, rng)):
                if step >= steps_per_epoch:
                    break
                total, parts = step_loss(model, idx, rng)
                opt.zero_grad(set_to_none=True)
                total.backward()
                nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                sched.step()
                ema.update_parameters(model)
                for key, value in {"loss": total.detach(), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                progress.update(task, advance=1, info=f"loss {sums['loss'] / (step + 1):.3f}")
            # Both the EMA and the live weights are candidates: a short run's EMA can still lag.
            vals = {"ema": validate(ema.module), "live": validate(model)}
            pick = max(vals, key=lambda key: vals[key]["ua"])
            val = vals[pick]
            means = {k: v / steps_per_epoch for k, v in sums.items()}
            log(
                f"{name} epoch {epoch}/{cfg.epochs} "
                + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                + "".join(
                    f" | val {tag} " + " ".join(f"{k} {v:.4f}" for k, v in res.items())
                    for tag, res in vals.items()
                )
                + f" | {time.time() - start:.0f}s"
            )
            if cfg.keep == "last":
                if epoch == cfg.epochs:
                    best = {**vals["ema"], "epoch": float(epoch), "ema": 1.0}
                    save_checkpoint(ema.module, ckpt, stage=name, val=best, **(extra or {}))
            elif val["ua"] > best["ua"]:
                best, stale = {**val, "epoch": float(epoch), "ema": float(pick == "ema")}, 0
                save_checkpoint(
                    ema.module if pick == "ema" else model, ckpt, stage=name, val=best, **(extra or {})
                )
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience:
                    log(f"{name}: early stop, no validation UA gain for {stale} epochs")
                    break
            torch.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "best": best,
                    "stale": stale,
                    "epoch": epoch,
                },
                resume,
            )
    resume.unlink(missing_ok=True)
    log(
        f"{name}: {'kept' if cfg.keep == 'last' else 'best'} epoch {int(best['epoch'])} val "
        + json.dumps({k: round(v, 4) for k, v in best.items()})
    )
    return best


# ---------------------------------------------------------------- logging


def _file_log(path: Path) -> Log:
    from rich.console import Console

    console = Console()
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)
        with path.open("a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    return log


# ---------------------------------------------------------------- CLI


def register(app) -> None:
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
            typer.Option(help="continue a stage from a checkpoint, e.g. --init video=runs/lite/video.pt"),
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
