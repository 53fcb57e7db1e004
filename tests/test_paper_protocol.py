"""The paper's protocol end to end on tiny random WavLM / CLIP and a fabricated IEMOCAP tree:
`foalnet train --config paper --iemocap DIR --folds 5` and `foalnet ablate --config paper`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
typer = pytest.importorskip("typer")

from typer.testing import CliRunner

from model_export import ablate, protocol, train_cli
from model_export.model import load_checkpoint
from service.contract import PAPER_SPEC
from tests.test_iemocap import make_iemocap


@pytest.fixture(scope="module")
def iemocap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_iemocap(tmp_path_factory.mktemp("iemocap"), dialogs=1)


def invoke(*args: str) -> str:
    app = typer.Typer()
    train_cli.register(app)
    ablate.register(app)
    result = CliRunner().invoke(app, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    return result.output


def test_five_fold_protocol_writes_per_fold_and_mean_results(
    tmp_path: Path, iemocap: Path, paper_dirs: tuple[str, str]
) -> None:
    out = tmp_path / "run"
    wavlm, clip = paper_dirs
    invoke(
        "train", "--config", "paper", "--iemocap", str(iemocap), "--folds", "5", "--epochs", "paper=1",
        "--audio-encoder", wavlm, "--video-encoder", clip, "--out", str(out),
    )  # fmt: skip
    summary = json.loads((out / "folds.json").read_text())
    folds = summary["folds"]
    assert [f["name"] for f in folds] == [f"session {s}" for s in range(1, 6)]
    for fold in folds:
        session = int(fold["name"].split()[-1])
        assert fold["epoch"] == 1 and 0.0 <= fold["test_fused_ua"] <= 1.0
        assert not fold["val_speaker"].startswith(f"Ses{session:02d}")  # never the test session
        assert fold["n_test"] == 5 and fold["n_train"] + fold["n_val"] == 20  # 5 utterances a session
        assert load_checkpoint(out / f"fold{session}" / "fused.pt").cfg.spec == PAPER_SPEC
    uas = [f["test_fused_ua"] for f in folds]
    assert summary["mean"]["test_fused_ua"] == pytest.approx(sum(uas) / 5)
    assert summary["sd"]["test_fused_ua"] >= 0.0
    table = (out / "folds.md").read_text()
    assert table.count("| session ") == 5 and "mean ± sd" in table and "80.10" in table
    log = (out / "train.log").read_text()
    assert " avel " in log and " mem " in log and " ce " in log and "scored once, after selection" in log


def test_one_fold_with_deviations_and_switches(tmp_path: Path, iemocap: Path, paper_dirs) -> None:
    out = tmp_path / "run"
    wavlm, clip = paper_dirs
    invoke(
        "train", "--config", "paper", "--iemocap", str(iemocap), "--test-session", "3", "--epochs", "paper=1",
        "--audio-encoder", wavlm, "--video-encoder", clip, "--out", str(out), "--no-mem", "--mem-head", "mlp",
        "--avel-targets", "normalised", "--temperature", "clip", "--unimodal-ce", "--mem-weight", "0.5",
    )  # fmt: skip
    cfg = load_checkpoint(out / "fold3" / "fused.pt").cfg
    assert (cfg.mem, cfg.mem_head, cfg.avel_targets, cfg.temperature, cfg.unimodal_ce, cfg.mem_weight) == (
        False, "mlp", "normalised", "clip", True, 0.5,
    )  # fmt: skip
    assert cfg.fusion_on == "raw"  # what was not asked for stays the paper's
    log = (out / "train.log").read_text()
    assert " avel " in log and " mem " not in log


def test_bad_protocol_arguments_are_refused(tmp_path: Path, iemocap: Path, paper_dirs) -> None:
    app = typer.Typer()
    train_cli.register(app)
    ablate.register(app)
    wavlm, clip = paper_dirs
    base = ["train", "--config", "paper", "--audio-encoder", wavlm, "--video-encoder", clip]
    for extra, message in (
        (["--iemocap", str(iemocap), "--folds", "7"], "folds must be 1..5"),
        (["--iemocap", str(iemocap), "--mem-head", "deep"], "mem_head must be one of"),
        ([], "needs --iemocap DIR or --corpus"),
    ):
        result = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path)])
        assert result.exit_code != 0 and message in re.sub(r"\s+", " ", result.output), result.output


@pytest.mark.slow
def test_paper_ablation_table(tmp_path: Path, iemocap: Path, paper_dirs) -> None:
    """Two folds keep it short (4 variants x 2 runs); the five-fold loop is the test above."""
    out = tmp_path / "ablation"
    wavlm, clip = paper_dirs
    printed = invoke(
        "ablate", "--config", "paper", "--iemocap", str(iemocap), "--folds", "2", "--epochs", "1",
        "--audio-encoder", wavlm, "--video-encoder", clip, "--out", str(out),
    )  # fmt: skip
    summaries = json.loads((out / "ablation.json").read_text())
    assert list(summaries) == list(protocol.VARIANTS)
    for name, summary in summaries.items():
        assert len(summary["folds"]) == 2 and 0.0 <= summary["mean"]["test_fused_ua"] <= 1.0, name
    rows = [ln for ln in (out / "ablation.md").read_text().splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| Model | UA (%) | WA (%) | paper UA (%)") and len(rows) == 5
    for row, paper_ua in zip(rows[1:], ("77.85", "79.31", "78.10", "80.10"), strict=True):
        assert row.rstrip(" |").endswith(paper_ua) and "±" in row
    assert "+ AVEL + MEM (Foal-Net)" in printed
