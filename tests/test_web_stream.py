"""The try-it page reading streamed (NDJSON) answers in Debian's Chromium: the timeline filling as a
long clip streams, "not sure" for uncertain answers, an older server's plain JSON, and errors inside
a stream. Same server, browser and fixtures as test_web.py."""

# ruff: noqa: F811 (the fixtures imported below are parameters by name)
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from bench.media import make_clip
from service.contract import LABELS_7
from service.schemas import Prediction, Timings
from service.streaming import NDJSON
from tests.test_web import (  # noqa: F401 (module fixtures, used by name)
    RESULT_TIMEOUT_MS,
    _axe_violations,
    _drop,
    _pct,
    _upload,
    _verdict,
    base_url,
    browser,
    clip,
    model_file,
    page,
    sync_api,
)

pytestmark = pytest.mark.slow


WATCH_PROGRESS = """() => {
    window.seen = [];
    const record = () => window.seen.push({
        text: document.getElementById('stream-count').textContent,
        blocks: document.querySelectorAll('#segments .segment').length,
        partial: document.getElementById('result').classList.contains('partial'),
    });
    const observer = new MutationObserver(record);
    for (const id of ['stream-count', 'segments']) {
        const what = { childList: true, characterData: true, subtree: true };
        observer.observe(document.getElementById(id), what);
    }
}"""


def test_long_clip_fills_the_timeline_as_it_streams(page: sync_api.Page, tmp_path: Path) -> None:
    """A minute-long clip: windows appear on the timeline while the rest is still being read, with
    "n of ~m windows" from the clip's length (15 windows of 4 s), then the summary fills the page."""
    long_clip = make_clip(tmp_path / "long.mp4", seconds=60, width=640, height=360, fps=25)
    page.evaluate(WATCH_PROGRESS)
    body = _upload(page, long_clip)
    sync_api.expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    sync_api.expect(page.locator("#result")).not_to_have_class(re.compile("partial"))
    windows = len(body["segments"])
    expected = math.ceil(60 / 4)
    assert windows == expected
    seen = page.evaluate("window.seen")
    during = [s for s in seen if s["partial"] and 0 < s["blocks"] < windows]
    assert during, f"no window was drawn before the summary: {seen}"
    for s in during:
        assert s["text"] in ("", f"{s['blocks']} of ~{expected} windows"), s
    assert any(s["text"] == f"{s['blocks']} of ~{expected} windows" for s in during), seen
    sync_api.expect(page.locator("#segments .segment")).to_have_count(windows)
    sync_api.expect(page.locator("#status")).to_have_text(f"Done: {_verdict(body)}.")
    sync_api.expect(page.locator("#progress-block")).to_be_hidden()
    sync_api.expect(page.locator("#winner-label")).to_have_text(body["emotion"])


def _probabilities(top: str, p: float) -> dict[str, float]:
    rest = (1 - p) / (len(LABELS_7) - 1)
    return {label: p if label == top else rest for label in LABELS_7}


def _segment(start: float, end: float, emotion: str, p: float, uncertain: bool) -> dict:
    return {
        "start": start, "end": end, "emotion": emotion, "probabilities": _probabilities(emotion, p),
        "confidence": p, "uncertain": uncertain, "alignment": None,
    }


def _prediction(segments: list[dict], emotion: str, p: float, uncertain: bool) -> dict:
    """A complete answer for the 10 s `clip` (voice only), checked against the API's schema."""
    answer = {
        "emotion": emotion, "probabilities": _probabilities(emotion, p), "confidence": p,
        "uncertain": uncertain,
        "modalities": {
            "audio": {"present": True, "probabilities": _probabilities(emotion, p)},
            "video": {"present": False, "frames_with_face": 0, "frames": 15, "probabilities": None},
        },
        "alignment": None, "segments": segments, "duration_s": 10.0,
        "model": {"name": "foalnet-lite", "version": "1.2.0", "provider": "CPUExecutionProvider"},
        "timings_ms": dict.fromkeys(Timings.model_fields, 1.0),
    }
    Prediction.model_validate(answer)
    return answer


UNSURE_SEGMENTS = [
    _segment(0.0, 4.0, "happy", 0.41, uncertain=True),
    _segment(4.0, 8.0, "sad", 0.72, uncertain=False),
    _segment(8.0, 10.0, "happy", 0.38, uncertain=True),
]


def _stream_answer(page: sync_api.Page, lines: list[dict]) -> None:
    body = "".join(json.dumps(line) + "\n" for line in lines)
    headers = {"Content-Type": NDJSON}
    page.route("**/predict", lambda route: route.fulfill(status=200, body=body, headers=headers))


def test_not_sure_is_said_for_the_clip_and_each_window(page: sync_api.Page, clip: Path) -> None:
    """An answer whose clip and two of whose windows are uncertain (replayed: the real model's
    confidence depends on its training) reads "not sure — maybe …" wherever the label is shown."""
    expect = sync_api.expect
    answer = _prediction(UNSURE_SEGMENTS, "happy", 0.41, uncertain=True)
    _stream_answer(page, [*UNSURE_SEGMENTS, answer])
    page.set_input_files("#file-input", str(clip))
    expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(page.locator("#status")).to_have_text("Done: not sure — maybe happy (41%).")
    expect(page.locator("#winner-unsure")).to_have_text("Not sure — maybe")
    expect(page.locator("#winner-label")).to_have_text("happy")
    expect(page.locator("#winner-caption")).to_have_text("The model is not sure what the clip shows")
    expect(page.locator("#winner-detail")).to_contain_text("41% likely")
    expect(page.locator("#winner-detail")).to_contain_text("Under 50% the answer is a guess.")

    blocks = page.locator("#segments .segment")
    expect(blocks).to_have_text(["Maybe happy", "Sad", "Maybe happy"])
    first_name = "0.0\u00a0s to 4.0\u00a0s: not sure — maybe happy (41%)"
    expect(blocks.nth(0)).to_have_attribute("aria-label", first_name)
    expect(blocks.nth(1)).to_have_attribute("aria-label", "4.0\u00a0s to 8.0\u00a0s: sad (72%)")
    detail = page.locator("#segment-detail .segment-top")
    blocks.nth(0).hover()
    expect(detail).to_have_text("Not sure — maybe happy (41%)")
    blocks.nth(1).hover()
    expect(detail).to_have_text("Most likely sad (72%)")
    expect(page.locator("#legend")).to_contain_text("Maybe …: the model is not sure")
    assert _axe_violations(page) == [], "not sure"
    page.emulate_media(color_scheme="dark")
    assert _axe_violations(page) == [], "not sure, dark scheme"


def test_an_older_servers_plain_json_answer(page: sync_api.Page, clip: Path) -> None:
    """A server without the NDJSON answer and without `confidence` / `uncertain`: read as before,
    never "not sure"."""
    answer = _prediction([_segment(0.0, 4.0, "happy", 0.41, False)], "happy", 0.41, uncertain=False)
    for item in (answer, *answer["segments"]):
        del item["confidence"], item["uncertain"]
    page.route("**/predict", lambda route: route.fulfill(status=200, json=answer))
    page.set_input_files("#file-input", str(clip))
    sync_api.expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    sync_api.expect(page.locator("#status")).to_have_text("Done: happy (41%).")
    sync_api.expect(page.locator("#winner-unsure")).to_be_hidden()
    sync_api.expect(page.locator("#segments .segment")).to_have_text(["Happy"])
    sync_api.expect(page.locator("#legend")).not_to_contain_text("not sure")


def test_an_error_inside_the_stream_keeps_the_windows_read(page: sync_api.Page, clip: Path) -> None:
    """The service gives up after the first window (its last line is a typed error): the error is
    shown, the window already drawn stays, the summary parts stay hidden."""
    error = {"error": "deadline_exceeded", "detail": "the request deadline passed while decoding"}
    _stream_answer(page, [UNSURE_SEGMENTS[0], error])
    page.set_input_files("#file-input", str(clip))
    sync_api.expect(page.locator("#error-title")).to_have_text("The analysis took too long")
    sync_api.expect(page.locator("#error-detail")).to_have_text(
        "the request deadline passed while decoding. The window read before it is shown below."
    )
    sync_api.expect(page.locator("#segments .segment")).to_have_text(["Maybe happy"])
    sync_api.expect(page.locator("#timeline-axis span").last).to_have_text("10 s")  # the clip's length
    sync_api.expect(page.locator(".timeline-card")).to_be_visible()
    sync_api.expect(page.locator("#winner")).to_be_hidden()
    sync_api.expect(page.locator("#progress-block")).to_be_hidden()
    assert _axe_violations(page) == [], "error after a window"


def test_a_line_that_is_not_json_reads_plainly(page: sync_api.Page, clip: Path) -> None:
    page.route(
        "**/predict",
        lambda route: route.fulfill(
            status=200, body="<html>proxy error</html>\n", headers={"Content-Type": NDJSON}
        ),
    )
    page.set_input_files("#file-input", str(clip))
    sync_api.expect(page.locator("#error-title")).to_have_text("The answer could not be read")
    sync_api.expect(page.locator("#result")).to_be_hidden()
