"""The try-it page at `/`, driven in Debian's Chromium (headless, through Playwright) against the
real app served by uvicorn on a free local port with the untrained lite model.

Set FOALNET_WEB_SCREENSHOT=docs/screenshot.png to also copy the desktop screenshot there (a step run
by hand to refresh the README's picture, never on ordinary runs), and FOALNET_WEB_MODEL to serve
another lite-spec model file (e.g. the trained weights/foalnet-lite.onnx) instead of the untrained one.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.media import make_clip, write_bytes
from service.contract import LABELS_7
from service.schemas import Prediction, Timings
from service.streaming import NDJSON

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A fake camera and microphone, so recording can be tested without hardware or a permission prompt.
FAKE_MEDIA_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
RESULT_TIMEOUT_MS = 90_000  # decode + faces + inference on two shared CPU cores
SCREENSHOT_ENV = "FOALNET_WEB_SCREENSHOT"
MODEL_ENV = "FOALNET_WEB_MODEL"
READINGS = ("Voice and face agree", "Voice and face partly agree", "Voice and face disagree")

pytestmark = pytest.mark.slow

if not CHROMIUM.exists():
    pytest.skip(
        "no /usr/bin/chromium: install it (`apt-get install -y chromium`, or `make test`) to test the page",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the `test` extra)")


@contextmanager
def _serve(model: Path, **settings: object) -> Iterator[str]:
    """The real app on `model`, served by uvicorn in a thread on a free local port; yields its URL."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    config = Settings(model_path=model, device="cpu", intra_op_threads=1, decode_workers=1, **settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other test servers
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def model_file(request: pytest.FixtureRequest) -> Path:
    """The untrained lite export, or the lite-spec model file named by FOALNET_WEB_MODEL."""
    if chosen := os.environ.get(MODEL_ENV):
        return Path(chosen)
    return request.getfixturevalue("lite_model")


@pytest.fixture(scope="module")
def base_url(model_file: Path) -> Iterator[str]:
    with _serve(model_file) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + FAKE_MEDIA_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 s of a talking face: three windows for the lite model (4 s, 4 s and a 2 s tail)."""
    return make_clip(tmp_path_factory.mktemp("web") / "talking.mp4", seconds=10)


@pytest.fixture()
def page(browser: sync_api.Browser, base_url: str) -> Iterator[sync_api.Page]:
    """A fresh desktop-sized page on `/`; fails the test on any script error."""
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base_url)
    sync_api.expect(page.locator("#model-info")).to_contain_text("foalnet-lite")
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def _answer(response: sync_api.Response) -> dict:
    """The summary of an NDJSON answer (its last line), or a plain JSON body (errors)."""
    text = response.text()
    if response.headers.get("content-type", "").startswith(NDJSON):
        return json.loads(text.strip().splitlines()[-1])
    return json.loads(text)


def _upload(page: sync_api.Page, path: Path) -> dict:
    """Choose `path` in the file picker; return the answer /predict gave (the summary when streamed)."""
    with page.expect_response("**/predict", timeout=RESULT_TIMEOUT_MS) as answer:
        page.set_input_files("#file-input", str(path))
    return _answer(answer.value)


def _drop(page: sync_api.Page, path: Path) -> dict:
    """Drop `path` on the drop zone as a dragged file would; return the JSON body /predict answered."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: 'video/mp4' }));
            return transfer;
        }""",
        [data, path.name],
    )
    with page.expect_response("**/predict", timeout=RESULT_TIMEOUT_MS) as answer:
        page.dispatch_event("#drop-zone", "dragover", {"dataTransfer": transfer})
        sync_api.expect(page.locator("#drop-zone")).to_have_class(re.compile("dragover"))
        page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    return _answer(answer.value)


def _pct(p: float) -> str:
    return f"{round(p * 100)}%"


def _verdict(answer: dict) -> str:
    """What the page says for a Prediction or a Segment: 'happy (71%)' or 'not sure — maybe happy (41%)'."""
    said = f"{answer['emotion']} ({_pct(answer['confidence'])})"
    return f"not sure — maybe {said}" if answer["uncertain"] else said


def _read_window(segment: dict) -> str:
    """The detail panel's line for a window: 'Most likely sad (72%)' or 'Not sure — maybe …'."""
    said = f"{segment['emotion']} ({_pct(segment['confidence'])})"
    return f"Not sure — maybe {said}" if segment["uncertain"] else f"Most likely {said}"


def _axe_violations(page: sync_api.Page) -> list[str]:
    """axe-core's WCAG 2.1 A/AA rules (contrast, labels, ARIA, names) on the page as it is now."""
    axe = pytest.importorskip(
        "axe_playwright_python.sync_playwright", reason="axe-playwright-python not installed"
    )
    found = axe.Axe().run(page, options={"runOnly": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]})
    return [f"{v['id']}: {[n['target'] for n in v['nodes']]}" for v in found.response["violations"]]


def test_upload_shows_label_chart_gauges_and_timeline(
    page: sync_api.Page, clip: Path, tmp_path: Path
) -> None:
    expect = sync_api.expect
    body = _upload(page, clip)
    expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    assert body["emotion"] in LABELS_7

    # The winner and the fused chart: one bar per label, each showing the API's number.
    expect(page.locator("#winner-label")).to_have_text(body["emotion"])
    bars = page.locator("#fused-chart .bar")
    expect(bars).to_have_count(len(LABELS_7))
    assert [bars.nth(i).get_attribute("data-label") for i in range(len(LABELS_7))] == list(LABELS_7)
    for label, p in body["probabilities"].items():
        expect(page.locator(f'#fused-chart .bar[data-label="{label}"] .bar-value')).to_have_text(_pct(p))
    expect(page.locator(f'#fused-chart .bar.top[data-label="{body["emotion"]}"]')).to_have_count(1)

    # Both senses are present in this clip, each with its own chart.
    assert body["modalities"]["audio"]["present"] and body["modalities"]["video"]["present"]
    expect(page.locator("#audio-view .bar")).to_have_count(len(LABELS_7))
    expect(page.locator("#video-view .bar")).to_have_count(len(LABELS_7))
    video = body["modalities"]["video"]
    expect(page.locator("#video-view")).to_contain_text(
        f"Face found in {video['frames_with_face']} of {video['frames']}"
    )

    # Agreement: three gauges carrying the API's values, and a one-line reading.
    alignment = body["alignment"]
    gauges = page.locator("#gauges [role=meter]")
    expect(gauges).to_have_count(3)
    expect(page.locator('[data-gauge="similarity"]')).to_have_attribute(
        "aria-valuetext", f"{alignment['similarity']:.2f}"
    )
    expect(page.locator('[data-gauge="audio"]')).to_have_attribute("aria-valuetext", _pct(alignment["audio"]))
    expect(page.locator('[data-gauge="video"]')).to_have_attribute("aria-valuetext", _pct(alignment["video"]))
    reading = page.inner_text("#alignment-reading")
    assert reading.startswith(READINGS), reading

    # Timeline: one block per window; hovering one shows that window's details.
    segments = body["segments"]
    assert len(segments) >= 3
    blocks = page.locator("#segments .segment")
    expect(blocks).to_have_count(len(segments))
    blocks.nth(1).hover()
    detail = page.locator("#segment-detail")
    expect(detail).to_contain_text(f"Window 2 of {len(segments)}")
    expect(detail.locator(".segment-top")).to_have_text(_read_window(segments[1]))
    expect(detail.locator(".bar")).to_have_count(len(LABELS_7))

    # Keyboard: focus the first block, arrow to the next, Enter seeks the player there.
    page.mouse.move(0, 0)
    blocks.nth(0).focus()
    expect(detail).to_contain_text(f"Window 1 of {len(segments)}")
    page.keyboard.press("ArrowRight")
    expect(blocks.nth(1)).to_be_focused()
    expect(detail).to_contain_text(f"Window 2 of {len(segments)}")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "start => Math.abs(document.getElementById('player').currentTime - start) < 0.5",
        arg=segments[1]["start"],
    )
    expect(blocks.nth(1)).to_have_attribute("aria-current", "true")

    # Playing across a window boundary moves the highlight to the next block.
    page.eval_on_selector(
        "#player",
        "(p, t) => { p.muted = true; p.currentTime = t; return p.play(); }",
        segments[2]["start"] - 0.3,
    )
    expect(blocks.nth(2)).to_have_attribute("aria-current", "true", timeout=10_000)
    expect(blocks.nth(1)).not_to_have_attribute("aria-current", "true")
    page.eval_on_selector("#player", "p => p.pause()")

    # Status announced (with "not sure" when the model is: the untrained model usually is); no
    # leftover progress bar.
    expect(page.locator("#status")).to_have_text(f"Done: {_verdict(body)}.")
    if body["uncertain"]:
        expect(page.locator("#winner-unsure")).to_be_visible()
    else:
        expect(page.locator("#winner-unsure")).to_be_hidden()
    expect(page.locator("#progress-block")).to_be_hidden()

    blocks.nth(1).hover()
    shot = tmp_path / "web-desktop.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, target)


def test_text_file_shows_the_servers_message(page: sync_api.Page, tmp_path: Path) -> None:
    notes = write_bytes(tmp_path / "notes.txt", b"Not a video, just some words.\n" * 20)
    body = _upload(page, notes)
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(page.locator("#error-title")).to_have_text("That does not look like a video")
    sync_api.expect(page.locator("#error-detail")).to_have_text(body["detail"])
    sync_api.expect(page.locator("#result")).to_be_hidden()
    sync_api.expect(page.locator("#progress-block")).to_be_hidden()


@pytest.mark.parametrize(
    ("status", "body", "headers", "title", "detail"),
    [
        (
            413,
            {"error": "too_large", "detail": "the upload is over 200 MB"},
            {},
            "That file is too large",
            "over 200 MB",
        ),
        (
            429,
            {"error": "overloaded", "detail": "the queue is full"},
            {"Retry-After": "3"},
            "The service is busy right now",
            "Try again in 3 s.",
        ),
        (
            504,
            {"error": "deadline_exceeded", "detail": "no result within 60 s"},
            {},
            "The analysis took too long",
            "no result within 60 s",
        ),
        (502, None, {}, "The service had a problem (HTTP 502)", "HTTP 502 without details"),
    ],
)
def test_api_errors_read_plainly(
    page: sync_api.Page, clip: Path, status: int, body: dict | None, headers: dict, title: str, detail: str
) -> None:
    """Answers the real server gives only under load or misconfiguration, replayed in the browser."""
    text = json.dumps(body) if body else "<html>Bad Gateway</html>"
    page.route("**/predict", lambda route: route.fulfill(status=status, body=text, headers=headers))
    page.set_input_files("#file-input", str(clip))
    sync_api.expect(page.locator("#error-title")).to_have_text(title)
    sync_api.expect(page.locator("#error-detail")).to_contain_text(detail)
    sync_api.expect(page.locator("#result")).to_be_hidden()


def test_size_limit_checked_before_upload(browser: sync_api.Browser, base_url: str, clip: Path) -> None:
    """A file over /info's upload limit is refused in the page, without sending it."""

    def small_limit(route: sync_api.Route) -> None:
        info = route.fetch().json()
        info["limits"]["max_upload_bytes"] = 1000
        route.fulfill(json=info)

    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.route("**/info", small_limit)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url) if request.url.endswith("/predict") else None)
    page.goto(base_url)
    sync_api.expect(page.locator("#limits")).to_contain_text("up to 1\u00a0kB")
    page.set_input_files("#file-input", str(clip))
    sync_api.expect(page.locator("#error-title")).to_have_text("That file is too large")
    size_kb = round(clip.stat().st_size / 1000)
    sync_api.expect(page.locator("#error-detail")).to_have_text(
        f"“{clip.name}” is {size_kb}\u00a0kB; the limit is 1\u00a0kB."
    )
    assert sent == []
    context.close()


def test_network_failure_reads_plainly(page: sync_api.Page, clip: Path) -> None:
    page.route("**/predict", lambda route: route.abort("connectionrefused"))
    page.set_input_files("#file-input", str(clip))
    sync_api.expect(page.locator("#error-title")).to_have_text("Could not reach the service")


def test_phone_sized_screen(browser: sync_api.Browser, base_url: str, clip: Path, tmp_path: Path) -> None:
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(base_url)
    body = _upload(page, clip)
    sync_api.expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    sync_api.expect(page.locator("#winner-label")).to_have_text(body["emotion"])
    # Nothing wider than the screen; the two senses stack; every window block is on screen width.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    audio, video = page.locator("#audio-view").bounding_box(), page.locator("#video-view").bounding_box()
    assert audio["y"] + audio["height"] <= video["y"] and abs(audio["x"] - video["x"]) < 1
    for box in [b.bounding_box() for b in page.locator("#segments .segment").all()]:
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    page.locator("#segments .segment").nth(1).tap()
    sync_api.expect(page.locator("#segment-detail")).to_contain_text("Window 2 of")
    page.screenshot(path=str(tmp_path / "web-phone.png"), full_page=True)
    context.close()


def test_accessibility_audit(page: sync_api.Page, clip: Path, tmp_path: Path) -> None:
    """axe-core's WCAG 2.1 A/AA rules (contrast, labels, ARIA, names) on each state of the page;
    the clip arrives by drag and drop this time."""
    assert _axe_violations(page) == [], "start page"
    body = _drop(page, clip)
    sync_api.expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    sync_api.expect(page.locator("#winner-label")).to_have_text(body["emotion"])
    page.locator("#segments .segment").nth(1).hover()
    assert _axe_violations(page) == [], "result"
    page.emulate_media(color_scheme="dark")
    assert _axe_violations(page) == [], "result, dark scheme"
    _upload(page, write_bytes(tmp_path / "notes.txt", b"not a video\n"))
    sync_api.expect(page.locator("#error")).to_be_visible()
    assert _axe_violations(page) == [], "error message"


def test_keyboard_cancel_and_reduced_motion(page: sync_api.Page, clip: Path) -> None:
    """Tab reaches the file picker with a visible ring; Cancel stops a pending analysis; no spinning
    under prefers-reduced-motion."""
    page.emulate_media(reduced_motion="reduce")
    page.keyboard.press("Tab")
    expect = sync_api.expect
    expect(page.locator(".skip-link")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("#file-input")).to_be_focused()
    ring = page.eval_on_selector(
        "#drop-zone", "el => getComputedStyle(el).outlineStyle + ' ' + getComputedStyle(el).outlineWidth"
    )
    assert ring == "solid 3px", ring

    page.route("**/predict", lambda route: None)  # the answer never comes
    page.set_input_files("#file-input", str(clip))
    expect(page.locator("#status")).to_have_class(re.compile("busy"))
    spin = page.eval_on_selector("#status", "el => getComputedStyle(el, '::before').animationName")
    assert spin == "none", spin
    page.click("#cancel-button")
    expect(page.locator("#status")).to_have_text("Cancelled.")
    expect(page.locator("#progress-block")).to_be_hidden()


def test_api_key_field(browser: sync_api.Browser, model_file: Path, clip: Path) -> None:
    """A service with an API key: the page asks for it, explains a refusal, then sends the key."""
    with _serve(model_file, api_key="page-test-key") as url:
        context = browser.new_context(viewport=DESKTOP)
        page = context.new_page()
        page.goto(url)
        key = page.get_by_label("API key")
        sync_api.expect(key).to_be_visible()
        body = _upload(page, clip)
        assert body["error"] == "unauthorized"
        sync_api.expect(page.locator("#error-title")).to_have_text("Not authorised to use this service")
        sync_api.expect(key).to_be_focused()
        key.fill("page-test-key")
        body = _upload(page, clip)
        sync_api.expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
        sync_api.expect(page.locator("#winner-label")).to_have_text(body["emotion"])
        sync_api.expect(page.locator("#error")).to_be_hidden()
        context.close()


def test_record_from_camera(page: sync_api.Page, tmp_path: Path) -> None:
    """Chromium's fake camera (a test pattern, no face) and microphone (a beep), recorded for 5 s."""
    page.select_option("#record-seconds", "5")
    with page.expect_response("**/predict", timeout=RESULT_TIMEOUT_MS) as answer:
        page.click("#record-button")
        sync_api.expect(page.locator("#record-button")).to_have_text("Stop recording")
        sync_api.expect(page.locator("#status")).to_have_text(
            "Recording for 5 seconds. Press Stop recording to finish early."
        )
        sync_api.expect(page.locator("#countdown")).to_contain_text("s left")
        sync_api.expect(page.locator("#camera-preview")).to_be_visible()
    body = _answer(answer.value)
    sync_api.expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    sync_api.expect(page.locator("#record-button")).to_have_text("Record")
    assert 3.0 < body["duration_s"] < 7.0
    assert not body["modalities"]["video"]["present"]
    sync_api.expect(page.locator("#video-view .missing")).to_contain_text("No face found in any of the")
    sync_api.expect(page.locator("#alignment-reading")).to_contain_text("Cannot compare voice and face")
    sync_api.expect(page.locator("#gauges [role=meter]")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "web-recorded.png"), full_page=True)


# Records, on every change of the progress text or of the timeline, what the page shows: the count
# beside the bar, the blocks drawn, and whether the summary is still missing (the `partial` result).
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
