"""The try-it page beyond one upload, in Debian's Chromium: a phone-sized screen, an accessibility
audit, keyboard use and reduced motion, the API-key field, and recording from a (fake) camera. Same
server, browser and fixtures as test_web.py."""

# ruff: noqa: F811 (the fixtures imported below are parameters by name)
from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.media import write_bytes
from tests.test_web import (  # noqa: F401 (module fixtures, used by name)
    DESKTOP,
    PHONE,
    RESULT_TIMEOUT_MS,
    _answer,
    _axe_violations,
    _drop,
    _serve,
    _upload,
    base_url,
    browser,
    clip,
    model_file,
    page,
    sync_api,
)

pytestmark = pytest.mark.slow


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
