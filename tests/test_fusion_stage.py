"""The fusion stage's pseudo pairs: conflicting pairs and the shares that set them."""

from __future__ import annotations

import numpy as np
import pytest

from model_export import fusion_stage
from model_export.fusion_stage import PseudoAV


def pairs(conflict: tuple[float, float] = (0.0, 0.0)) -> PseudoAV:
    y = np.repeat(np.arange(4), 50)
    faces = np.zeros((40, 8, 8, 1), dtype=np.uint8)
    return PseudoAV([np.zeros(16, np.float32)] * len(y), y, faces, np.arange(40) % 4, conflict=conflict)


def test_conflicting_pairs_show_one_branch_wrong_at_the_asked_shares():
    p = pairs((0.3, 0.1))
    idx = np.random.default_rng(0).integers(len(p.y), size=20_000)
    labels, face_y, agree = p.conflicts(idx, np.random.default_rng(1))
    voice_y = p.y[idx]
    voice_wrong = labels != voice_y  # the face shows the truth, the voice another emotion
    face_wrong = (labels == voice_y) & (face_y != voice_y)
    assert voice_wrong.mean() == pytest.approx(0.3, abs=0.015)
    assert face_wrong.mean() == pytest.approx(0.1, abs=0.01)
    assert (labels[voice_wrong] == face_y[voice_wrong]).all()
    assert (agree == (face_y == voice_y)).all() and (labels[agree] == voice_y[agree]).all()
    others = face_y[~agree]
    assert set(np.unique(others)) == {0, 1, 2, 3}  # any other class, not one fixed neighbour
    partners = p.partners(face_y, np.random.default_rng(2))
    assert (p.face_y[partners] == face_y).all()


def test_no_conflict_leaves_every_pair_agreeing_and_draws_nothing():
    p, idx = pairs(), np.arange(12)
    rng = np.random.default_rng(0)
    labels, face_y, agree = p.conflicts(idx, rng)
    assert agree.all() and (labels == p.y[idx]).all() and (face_y == labels).all()
    assert rng.random() == np.random.default_rng(0).random()  # the recipe's random stream is unchanged


def test_conflict_shares_match_each_branch_to_its_validation_ua(monkeypatch):
    def evaluate(model, pairs, mode="clean"):
        ua = {"augmented": (0.9, 0.7), "clean": (0.6, 0.75)}[mode]  # the face does better on validation
        return {"audio": {"ua": ua[0]}, "video": {"ua": ua[1]}}

    monkeypatch.setattr(fusion_stage, "evaluate_pairs", evaluate)
    voice, face = fusion_stage.conflict_shares(None, pairs(), pairs())
    assert voice == pytest.approx(1 - 0.6 / 0.9) and face == 0.0
