"""Smoke test of `foalnet bench --quick`: the whole harness runs once and reports every measurement.

The numbers themselves are machine-dependent and never asserted against the targets; what is checked
is that each measurement happened and that the numbers agree with each other.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from service.contract import LITE_SPEC

pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def test_quick_bench_measures_floor_service_naive_and_writes_reports(lite_model, tmp_path):
    from foalnet_cli import build_app

    app = build_app("bench")
    out, plots, md = tmp_path / "bench.json", tmp_path / "plots", tmp_path / "bench.md"
    args = ["bench", "--quick", "--model", str(lite_model), "--json", str(out), "--plots", str(plots)]
    args += ["--markdown", str(md)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())

    assert r["mode"] == "quick"
    (clip,) = r["clips"]
    floor = r["floor"]["clips"][clip["name"]]
    # A 2 s clip is one lite window (4 s) with frames sampled at the spec's rate.
    assert (floor["windows"], floor["frames"]) == (1, round(2 * LITE_SPEC.frames_fps))
    keys = ("decode_clips_per_s", "faces_clips_per_s", "model_clips_per_s", "clips_per_s")
    for key in (*keys, "physical_clips_per_s", "physical_floor_clips_per_s"):
        assert floor[key] > 0, key
    assert [row["batch"] for row in r["floor"]["model"]] == [1, 2]

    for level in r["service"] + r["naive"]:
        assert level["ok"] == level["sent"] > 0, level
        assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
    # Every window of every answered request went through one of the batches counted in /metrics.
    for level in r["service"]:
        assert level["batch_sizes"]["sum"] == level["ok"] * floor["windows"]
    # The untrained lite export and the naive server's seeded torch model hold the same weights.
    assert r["naive_info"]["parity"] is True

    memory = r["memory"]
    assert memory["requests_b"] > memory["requests_a"] > 0 and memory["failed"] == 0
    assert memory["peak_kb"] >= memory["rss_b_kb"] > 0
    assert r["cold_start_s"] > 0 and r["naive_cold_start_s"] > 0
    assert set(r["ratios"]) == {
        "saturation", "vs_physical", "lone_p50_ms", "vs_naive", "lone_minus_floor_ms", "rss_drift_pct",
        "cold_start_s", "window_ms",
    }
    assert r["ratios"]["vs_physical"] > 0
    assert result.output.count("PASS") + result.output.count("FAIL") == 8
    text = md.read_text()
    assert text.count("**PASS**") + text.count("**FAIL**") == 8
    assert f"| {clip['name']} | 1 |" in text  # the floor row of the clip, as a Markdown table

    for name in ("latency_vs_concurrency.png", "throughput_vs_batch.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
