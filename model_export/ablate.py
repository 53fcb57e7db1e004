"""`foalnet ablate`: the paper's Table 2 (fusion baseline / +AVEL / +MEM / both) at CPU cost.

What it does, exactly:
1. Loads the trained lite checkpoint (`--checkpoint`, e.g. runs/lite/fused.pt) and FREEZES its two
   encoders. Runs them once to cache tokens: every training speech clip (centre window plus
   `--views` augmented views), `--faces-per-class` FER-train faces each rendered into F frames, and
   the validation pairs (validation-actor speech + a seeded same-label FER-val face, `--val-repeats`
   pairings per clip).
2. For each variant and seed, builds a fresh Foal-Net on top of those tokens, as the fusion stage of
   `foalnet train` does: the unimodal heads copied from the checkpoint and frozen (they belong to the
   branches and never reach the fused head), projections / cross-attention fusion / classifier / MEM
   heads freshly initialised with the seed, and trains them for `--epochs` epochs with the variant's
   loss (CE_fused, plus AVEL and/or MEM), re-pairing faces every epoch.
3. Scores the last epoch's fused head on the validation pairs (no selection on them) and reports UA
   and WA, mean ± std over seeds, as Markdown.
Same data, same cached tokens and the same seeds for every variant; only the loss terms differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from torch import Tensor, nn

from model_export import augment, data
from model_export.encoders import lengths_to_mask
from model_export.metrics import scores
from model_export.model import FoalNet, load_checkpoint
from model_export.protocol import VARIANTS
from model_export.train import _batches, audio_batch
from model_export.train_lite import lite_data



class Cached(nn.Module):
    """Stands in for a frozen encoder: its 'input' is already the token tensor, its 'length' the count."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return tokens, lengths_to_mask(lengths, tokens.shape[1])


@dataclass
class Tokens:
    x: Tensor  # [N, T, d]
    n: Tensor  # [N] valid tokens


@torch.no_grad()
def _encode_audio(model: FoalNet, clips: list[np.ndarray], rng: np.random.Generator, mode: str) -> Tokens:
    xs, ns = [], []
    for idx in _batches(len(clips), 64, None):
        tokens, mask = model.audio_encoder(*audio_batch(clips, idx, model.cfg.spec, rng, mode))
        xs.append(tokens)
        ns.append(mask.sum(1))
    return Tokens(torch.cat(xs), torch.cat(ns))


@torch.no_grad()
def _encode_faces(model: FoalNet, faces: np.ndarray, rng: np.random.Generator, train: bool) -> Tokens:
    f = model.cfg.spec.frames_per_window
    xs = []
    for idx in _batches(len(faces), 64, None):
        frames = np.stack([augment.render_frames(faces[i], f, rng, augment=train) for i in idx])
        tokens, _ = model.video_encoder(torch.from_numpy(frames), torch.full((len(idx),), f))
        xs.append(tokens)
    x = torch.cat(xs)
    return Tokens(x, torch.full((len(x),), f))


def _per_class(y: np.ndarray, k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:count] for c in range(k) if (y == c).any()]
    )


def ablate(
    checkpoint: Path,
    ravdess: Path,
    fer: Path,
    *,
    val_actors: set[int],
    seeds: tuple[int, ...] = (0, 1, 2),
    epochs: int = 6,
    views: int = 2,
    faces_per_class: int = 150,
    val_repeats: int = 3,
    cache: Path = data.DEFAULT_CACHE,
    log=print,
) -> dict[str, dict[str, list[float]]]:
    """{variant: {"ua": [per seed], "wa": [per seed]}} of the fused head on the validation pairs."""
    trained = load_checkpoint(checkpoint)
    spec, k = trained.cfg.spec, trained.cfg.num_classes
    d = lite_data(
        {"ravdess": ravdess}, fer, spec, cache, val_speakers={"ravdess": frozenset(map(str, val_actors))}
    )
    rng = np.random.default_rng(1234)
    start = time.time()
    a_train = [_encode_audio(trained, d.s_train.clips, rng, "clean")]
    a_train += [_encode_audio(trained, d.s_train.clips, rng, "train") for _ in range(views)]
    face_idx = _per_class(d.yf_train, k, faces_per_class, rng)
    v_train = _encode_faces(trained, d.f_train[face_idx], rng, train=True)
    v_train_y = d.yf_train[face_idx]
    by_label = {c: np.flatnonzero(v_train_y == c) for c in range(k)}
    ya_train = torch.from_numpy(d.s_train.y)

    val_clips = [c for _ in range(val_repeats) for c in d.s_val.clips]
    ya_val = np.tile(d.s_val.y, val_repeats)
    val_faces = np.array([rng.choice(np.flatnonzero(d.yf_val == c)) for c in ya_val])
    a_val = _encode_audio(trained, val_clips, rng, "clean")
    v_val = _encode_faces(trained, d.f_val[val_faces], rng, train=False)
    log(
        f"cached encoder tokens in {time.time() - start:.0f}s: {len(ya_train)} train clips x {views + 1} views, "
        f"{len(face_idx)} train faces, {len(ya_val)} validation pairs"
    )

    results: dict[str, dict[str, list[float]]] = {}
    for name, (avel, mem) in VARIANTS.items():
        results[name] = {"ua": [], "wa": []}
        for seed in seeds:
            torch.manual_seed(seed)
            model = FoalNet(replace(trained.cfg, avel=avel, mem=mem))
            own = model.state_dict()
            own.update(
                {
                    key: v
                    for key, v in trained.state_dict().items()
                    if key.split(".")[0] in ("audio_head", "video_head")
                }
            )
            model.load_state_dict(own)
            model.audio_head.requires_grad_(False)
            model.video_head.requires_grad_(False)
            model.audio_encoder, model.video_encoder = (
                Cached(trained.audio_encoder.dim),
                Cached(trained.video_encoder.dim),
            )
            opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05
            )
            pair_rng = np.random.default_rng(seed)
            for _ in range(epochs):
                model.train()
                for idx in _batches(len(ya_train), 32, pair_rng):
                    view = a_train[int(pair_rng.integers(len(a_train)))]
                    faces = np.array([pair_rng.choice(by_label[int(c)]) for c in ya_train[idx]])
                    total, _ = model.loss(
                        view.x[idx], view.n[idx], v_train.x[faces], v_train.n[faces], ya_train[idx]
                    )
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
            model.eval()
            with torch.no_grad():
                probs = model(a_val.x, a_val.n, v_val.x, v_val.n)["probs"]
            s = scores(ya_val, probs.argmax(-1).numpy(), k)
            results[name]["ua"].append(s["ua"])
            results[name]["wa"].append(s["wa"])
            log(f"{name} seed {seed}: UA {s['ua']:.4f} WA {s['wa']:.4f}")
    return results


def markdown(results: dict[str, dict[str, list[float]]], setup: str) -> str:
    lines = [
        "# Ablation (Table-2 style): lite Foal-Net on pseudo audio-visual pairs",
        "",
        setup,
        "",
        "| Model | UA (%) | WA (%) |",
        "|---|---|---|",
    ]
    for name, res in results.items():
        ua, wa = np.array(res["ua"]) * 100, np.array(res["wa"]) * 100
        lines.append(f"| {name} | {ua.mean():.2f} ± {ua.std():.2f} | {wa.mean():.2f} ± {wa.std():.2f} |")
    return "\n".join(lines) + "\n"


def _ablate_paper(
    iemocap: Path | None,
    audio_encoder: Path | None,
    video_encoder: Path | None,
    folds: int,
    epochs: int | None,
    seed: int,
    out: Path | None,
    device: str,
) -> None:
    """`foalnet ablate --config paper`: the four variants over IEMOCAP folds (model_export.protocol)."""
    from dataclasses import replace

    from model_export import protocol
    from model_export.train_paper import PAPER_FIT

    if iemocap is None or audio_encoder is None or video_encoder is None:
        raise typer.BadParameter("--config paper needs --iemocap, --audio-encoder and --video-encoder")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: no CUDA device here")
    cfg = replace(PAPER_FIT, seed=seed, epochs=PAPER_FIT.epochs if epochs is None else epochs)
    out = out or Path("runs/paper")
    make_model = protocol.paper_factory(audio_encoder, video_encoder, {})
    try:
        sessions = protocol.sessions_of(folds, 0)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    summaries = protocol.iemocap_ablation(make_model, iemocap, sessions, cfg, out, typer.echo, device)
    typer.echo(protocol.ablation_markdown(summaries, f"Written to {out}/ablation.json and ablation.md."))


def register(app) -> None:
    @app.command("ablate")
    def ablate_command(
        checkpoint: Annotated[
            Path, typer.Option(help="trained lite checkpoint (encoders are frozen)")
        ] = Path("runs/lite/fused.pt"),
        ravdess: Annotated[Path, typer.Option()] = Path("../shared/data/ravdess-speech"),
        fer: Annotated[Path, typer.Option()] = Path("../shared/data/fer2013"),
        val_actors: Annotated[str, typer.Option()] = "17-20",
        seeds: Annotated[str, typer.Option(help="comma-separated seeds (>= 3 for a mean ± std)")] = "0,1,2",
        epochs: Annotated[
            int | None, typer.Option(help="training epochs (default: lite 6, paper 40)")
        ] = None,
        views: Annotated[int, typer.Option(help="augmented speech views cached per training clip")] = 2,
        faces_per_class: Annotated[int, typer.Option()] = 150,
        val_repeats: Annotated[int, typer.Option(help="face pairings per validation clip")] = 3,
        threads: Annotated[int, typer.Option(help="torch intra-op threads (0 = default)")] = 0,
        out: Annotated[
            Path | None,
            typer.Option(help="lite: write the Markdown table here; paper: folder for ablation.json + .md"),
        ] = None,
        config: Annotated[
            str, typer.Option(help="lite (frozen lite encoders) or paper (IEMOCAP folds)")
        ] = "lite",
        iemocap: Annotated[Path | None, typer.Option(help="paper: IEMOCAP release root")] = None,
        folds: Annotated[int, typer.Option(help="paper: test sessions 1..N (5 = the paper's protocol)")] = 5,
        audio_encoder: Annotated[Path | None, typer.Option(help="paper: local WavLM directory")] = None,
        video_encoder: Annotated[Path | None, typer.Option(help="paper: local CLIP directory")] = None,
        device: Annotated[str, typer.Option(help="paper: cpu or cuda")] = "cpu",
    ) -> None:
        """Baseline / +AVEL / +MEM / both: lite on frozen lite encoders (mean ± std over seeds), or the
        paper configuration over IEMOCAP's leave-one-session-out folds (mean ± sd over folds)."""
        if threads:
            torch.set_num_threads(threads)
        if config == "paper":
            seed = int(seeds.split(",")[0])
            _ablate_paper(iemocap, audio_encoder, video_encoder, folds, epochs, seed, out, device)
            return
        epochs = 6 if epochs is None else epochs
        seed_list = tuple(int(s) for s in seeds.split(","))
        results = ablate(
            checkpoint,
            ravdess,
            fer,
            val_actors=data.parse_actors(val_actors),
            seeds=seed_list,
            epochs=epochs,
            views=views,
            faces_per_class=faces_per_class,
            val_repeats=val_repeats,
            log=typer.echo,
        )
        setup = (
            f"Frozen encoders and unimodal heads from `{checkpoint}`; projections, fusion and MEM heads "
            f"trained from a fresh start for {epochs} epochs "
            f"(AdamW 1e-3, batch 32) on cached tokens of RAVDESS training actors' speech ({views} augmented views + "
            f"clean) paired with {faces_per_class} FER-train faces per class of the same emotion; scored on "
            f"RAVDESS actors {val_actors} paired {val_repeats}x with FER-val faces (fused head, last epoch, "
            f"no selection). Seeds {', '.join(map(str, seed_list))}; mean ± std over seeds. "
            f"Command: `foalnet ablate --checkpoint {checkpoint} --seeds {seeds} --epochs {epochs}"
            + (f" --out {out}`." if out else "`.")
        )
        table = markdown(results, setup)
        typer.echo(table)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
