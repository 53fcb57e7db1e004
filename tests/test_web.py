"""The try-it page at `/`, driven in Debian's Chromium (headless, through Playwright) against the
real app served by uvicorn on a free local port with the untrained lite model.

Set FOALNET_WEB_SCREENSHOT=docs/screenshot.png to also copy the desktop screenshot there (a step run
by hand to refresh the README's picture, never on ordinary runs), and FOALNET_WEB_MODEL to serve
another lite-spec model file (e.g. the trained weights/foalnet-lite.onnx) instead of the untrained one.
"""

from __future__ import annotations

import base64
import json
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
