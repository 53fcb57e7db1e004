"""The evaluation protocols on real audio-visual clips, each one command:

- IEMOCAP leave-one-session-out (`foalnet train --config paper --iemocap DIR --folds 5`): fold s tests
  on session s, selects its epoch on one speaker of another session (`data.iemocap_fold`) and trains
  on the other seven speakers; per-fold and mean ± sd UA/WA go to folds.json + folds.md.
- The ablation (`foalnet ablate --config paper`): baseline / +AVEL / +MEM / both over the same folds,
  as the paper's Table 2, its numbers beside ours.
- A corpus split by speaker (`foalnet train --corpus crema-d DIR`): one run, scored once on test.
The frozen video encoder embeds every clip once per command; each fold (and variant) starts from a
fresh model built by `make_model`, seeded the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export import data
from model_export.av_corpora import Clip, speaker_split
from model_export.model import FoalNet, save_checkpoint
from model_export.train_paper import AVFeatures, FitConfig, Log, embed_clips, evaluate_split, fit
from service.contract import LABELS_IEMOCAP

MakeModel = Callable[..., FoalNet]  # make_model(**config_overrides) -> a fresh FoalNet
# name -> (avel, mem): the paper's Table 2 rows, and its UA for each.
VARIANTS: dict[str, tuple[bool, bool]] = {
    "Fusion baseline": (False, False),
    "+ AVEL": (True, False),
    "+ MEM": (False, True),
    "+ AVEL + MEM (Foal-Net)": (True, True),
}
PAPER_TABLE2_UA: dict[str, float] = {
    "Fusion baseline": 77.85,
    "+ AVEL": 79.31,
    "+ MEM": 78.10,
    "+ AVEL + MEM (Foal-Net)": 80.10,
}
PAPER_WA = 79.45  # Foal-Net's WA; the paper's ablation reports UA only
METRICS = ("test_fused_ua", "test_fused_wa")


def iemocap_clips(root: Path) -> tuple[list[data.IemocapUtterance], list[Clip]]:
    """IEMOCAP's 4-class utterances and the same as clips (sentence wav + dialog avi span)."""
    utts = data.scan_iemocap(root)
    return utts, [Clip(item, u.speaker) for item, u in zip(data.iemocap_items(utts, root), utts, strict=True)]


def iemocap_folds(utts: list[data.IemocapUtterance], sessions: tuple[int, ...]) -> list[dict[str, Any]]:
    """The leave-one-session-out folds testing on `sessions`, as index arrays into `utts`."""
    index = {u.utt_id: i for i, u in enumerate(utts)}
    out = []
    for session in sessions:
        parts = data.iemocap_fold(utts, session)
        idx = [np.array([index[u.utt_id] for u in part], int) for part in parts]
        out.append(
            {"name": f"session {session}", "val_speaker": data.iemocap_val_speaker(session), "idx": idx}
        )
    return out


def run_split(
    make_model: MakeModel,
    feats: AVFeatures,
    idx: list[np.ndarray],
    cfg: FitConfig,
    log: Log,
    device: str,
    *,
    name: str,
    checkpoint: Path | None = None,
    freeze_branches: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """One fresh model trained on idx[0], selected on idx[1], scored once on idx[2]."""
    train, val, test = (feats.subset(i) for i in idx)
    if not len(train.y) or not len(val.y):
        raise ValueError(f"{name}: empty training or validation split")
    torch.manual_seed(cfg.seed)
    model = make_model(**overrides)
    result = {"name": name, "n_train": len(train.y), "n_val": len(val.y), "n_test": len(test.y)}
    result |= fit(model, train, val, cfg, log, device, freeze_branches=freeze_branches, name=name)
    if len(test.y):
        result |= evaluate_split(model, test, device)
        log(
            f"{name}: test (scored once, after selection) "
            + json.dumps({k: round(result[k], 4) for k in METRICS})
        )
    if checkpoint is not None:
        save_checkpoint(model, checkpoint, val=result)
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-fold results with the mean and (population) sd of the test metrics over folds."""
    table = {m: np.array([r[m] for r in runs]) for m in METRICS if all(m in r for r in runs)}
    return {
        "folds": runs,
        "mean": {m: float(v.mean()) for m, v in table.items()},
        "sd": {m: float(v.std()) for m, v in table.items()},
    }


def _pct(summary: dict[str, Any], metric: str) -> str:
    if metric not in summary["mean"]:
        return "—"
    return f"{100 * summary['mean'][metric]:.2f} ± {100 * summary['sd'][metric]:.2f}"


def folds_markdown(summary: dict[str, Any], setup: str, title: str, paper_row: bool = True) -> str:
    lines = [f"# {title}", "", setup, ""]
    lines += [
        "| fold | validation speaker | epoch | val UA (%) | test UA (%) | test WA (%) |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["folds"]:
        test = [100 * r.get(m, float("nan")) for m in METRICS]
        lines.append(
            f"| {r['name']} | {r.get('val_speaker', '—')} | {r['epoch']} | {100 * r['val_ua']:.2f} "
            f"| {test[0]:.2f} | {test[1]:.2f} |"
        )
    lines.append(f"| **mean ± sd** | | | | {_pct(summary, METRICS[0])} | {_pct(summary, METRICS[1])} |")
    if paper_row:
        lines.append(
            f"| paper (Foal-Net, epochs selected on the test session) | | | | 80.10 | {PAPER_WA:.2f} |"
        )
    return "\n".join(lines) + "\n"


def ablation_markdown(summaries: dict[str, dict[str, Any]], setup: str) -> str:
    lines = ["# Ablation (paper's Table 2): Foal-Net, paper configuration", "", setup, ""]
    lines += ["| Model | UA (%) | WA (%) | paper UA (%) |", "|---|---|---|---|"]
    for name, summary in summaries.items():
        ours = " | ".join(_pct(summary, m) for m in METRICS)
        lines.append(f"| {name} | {ours} | {PAPER_TABLE2_UA[name]:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, stem: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    return out / f"{stem}.json", out / f"{stem}.md"


def iemocap_protocol(
    make_model: MakeModel,
    root: Path,
    sessions: tuple[int, ...],
    cfg: FitConfig,
    out: Path,
    log: Log,
    device: str,
    *,
    save_checkpoints: bool = True,
) -> dict[str, Any]:
    """Leave-one-session-out folds testing on `sessions`; folds.json / folds.md and fold<s>/fused.pt
    under out."""
    utts, clips = iemocap_clips(root)
    feats = embed_clips(make_model(), clips, device, log)
    runs = []
    for fold in iemocap_folds(utts, sessions):
        ckpt = out / f"fold{fold['name'].split()[-1]}" / "fused.pt" if save_checkpoints else None
        run = run_split(make_model, feats, fold["idx"], cfg, log, device, name=fold["name"], checkpoint=ckpt)
        runs.append({**run, "val_speaker": fold["val_speaker"]})
    summary = summarise(runs)
    setup = (
        f"IEMOCAP at {root}, 4 classes, test sessions {list(sessions)}; validation = one speaker of "
        "another session, "
        f"epoch selected on it, test session scored once. {cfg.epochs} epochs, batch {cfg.batch}, "
        f"AdamW {cfg.lr:g}, seed {cfg.seed}."
    )
    title = "Foal-Net (paper configuration): IEMOCAP leave-one-session-out"
    write_report(out, "folds", summary, folds_markdown(summary, setup, title))
    return summary


def iemocap_ablation(
    make_model: MakeModel,
    root: Path,
    sessions: tuple[int, ...],
    cfg: FitConfig,
    out: Path,
    log: Log,
    device: str,
) -> dict[str, dict[str, Any]]:
    """The four Table-2 variants over the same folds and seed (no checkpoints kept)."""
    utts, clips = iemocap_clips(root)
    feats = embed_clips(make_model(), clips, device, log)
    plan = iemocap_folds(utts, sessions)
    summaries = {}
    for variant, (avel, mem) in VARIANTS.items():
        runs = [
            run_split(
                make_model,
                feats,
                f["idx"],
                cfg,
                log,
                device,
                name=f"{variant} / {f['name']}",
                avel=avel,
                mem=mem,
            )
            for f in plan
        ]
        summaries[variant] = summarise(runs)
    setup = (
        f"IEMOCAP at {root}, leave-one-session-out on sessions {list(sessions)}, "
        "speaker-independent validation; "
        f"{cfg.epochs} epochs, batch {cfg.batch}, AdamW {cfg.lr:g}, seed {cfg.seed}; mean ± sd over folds. "
        "The paper's numbers come from its released code, which selected epochs on the test session."
    )
    write_report(out, "ablation", summaries, ablation_markdown(summaries, setup))
    return summaries


def corpus_run(
    make_model: MakeModel,
    clips: list[Clip],
    cfg: FitConfig,
    out: Path,
    log: Log,
    device: str,
    *,
    freeze_branches: bool = False,
) -> dict[str, Any]:
    """One speaker-grouped train / val / test run on a corpus; corpus.json / corpus.md and fused.pt."""
    model = make_model()
    feats = embed_clips(model, clips, device, log)
    idx = list(speaker_split(clips, seed=cfg.seed))
    run = run_split(
        lambda **kw: model,
        feats,
        idx,
        cfg,
        log,
        device,
        name="corpus",
        checkpoint=out / "fused.pt",
        freeze_branches=freeze_branches,
    )
    speakers = [sorted({clips[i].speaker for i in part}) for part in idx]
    summary = summarise([{**run, "val_speaker": ", ".join(speakers[1])}])
    setup = (
        f"{len(clips)} clips; {len(speakers[0])} training speakers; "
        f"validation speakers {speakers[1]}; test speakers {speakers[2]}."
    )
    title = f"Foal-Net ({model.cfg.encoders} configuration) on real audio-visual pairs"
    write_report(out, "corpus", summary, folds_markdown(summary, setup, title, paper_row=False))
    return summary


# ---------------------------------------------------------------- the commands' entry points


def sessions_of(folds: int | None, test_session: int) -> tuple[int, ...]:
    """`--folds N`: test sessions 1..N (5 = the full protocol); without it the one `--test-session`."""
    if folds is None:
        return (test_session,)
    if not 1 <= folds <= len(data.IEMOCAP_SESSIONS):
        raise ValueError(f"--folds must be 1..{len(data.IEMOCAP_SESSIONS)}, not {folds}")
    return data.IEMOCAP_SESSIONS[:folds]


def paper_factory(audio_encoder: Path, video_encoder: Path, overrides: dict[str, Any]) -> MakeModel:
    """make_model for the paper configuration with the user's deviations (`overrides`)."""
    from model_export.model import paper_config

    return lambda **kw: FoalNet(paper_config(str(audio_encoder), str(video_encoder), **{**overrides, **kw}))


BRANCHES = ("audio_encoder", "video_encoder", "audio_head", "video_head")


def lite_factory(audio_ckpt: Path, video_ckpt: Path, overrides: dict[str, Any]) -> MakeModel:
    """make_model for lite on real pairs: the pretrained branches of the lite audio and video stages,
    fresh projections / fusion / MEM heads (the lite fusion stage's λ unless overridden)."""
    from dataclasses import replace

    from model_export.train_lite import LITE_MEM_WEIGHT, merge_branches

    def make(**kw: Any) -> FoalNet:
        merged = merge_branches(audio_ckpt, video_ckpt)
        model = FoalNet(replace(merged.cfg, **{"mem_weight": LITE_MEM_WEIGHT, **overrides, **kw}))
        own = model.state_dict()
        own.update({k: v for k, v in merged.state_dict().items() if k.split(".")[0] in BRANCHES})
        model.load_state_dict(own)
        return model

    return make


def train_real(
    config: str,
    *,
    iemocap: Path | None,
    corpus: tuple[str, Path] | None,
    folds: int | None,
    test_session: int,
    audio_encoder: Path | None,
    video_encoder: Path | None,
    branches: dict[str, Path],
    overrides: dict[str, Any],
    epochs: int | None,
    seed: int,
    out: Path,
    device: str,
    log: Log,
) -> dict[str, Any]:
    """`foalnet train` on real audio-visual clips: paper on IEMOCAP folds or a corpus; lite (its
    pretrained branches from `branches`, default runs/lite) on a corpus."""
    from dataclasses import replace

    from model_export.av_corpora import scan_corpus
    from model_export.train_paper import LITE_FIT, PAPER_FIT

    cfg = replace(PAPER_FIT if config == "paper" else LITE_FIT, seed=seed)
    cfg = cfg if epochs is None else replace(cfg, epochs=epochs)
    if config == "paper":
        if audio_encoder is None or video_encoder is None:
            raise ValueError(
                "--config paper needs --audio-encoder (WavLM dir) and --video-encoder (CLIP dir)"
            )
        make_model = paper_factory(audio_encoder, video_encoder, overrides)
    elif config == "lite":
        if corpus is None:
            raise ValueError("lite on real pairs needs --corpus KIND DIR")
        make_model = lite_factory(branches["audio"], branches["video"], overrides)
    else:
        raise ValueError(f"unknown config {config!r}: expected lite or paper")
    if corpus is not None:
        kind, root = corpus
        labels = make_model().cfg.spec.labels if config == "lite" else LABELS_IEMOCAP
        clips = scan_corpus(kind, root, labels)
        return corpus_run(make_model, clips, cfg, out, log, device, freeze_branches=config == "lite")
    if iemocap is None or config != "paper":
        raise ValueError("--config paper needs --iemocap DIR or --corpus KIND DIR")
    return iemocap_protocol(make_model, iemocap, sessions_of(folds, test_session), cfg, out, log, device)
