"""The gateway's page in headless Chromium (Debian's, driven by playwright): upload a
reference clip, synthesize, and the audio element gets a playable source; also save the
clip as a voice, pick it, and delete it. The screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .client_fixtures import GATEWAY_API_KEY, gateway, speech_clip
from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run make setup-test (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_upload_a_clip_synthesize_and_play(browser, gateway, speech_clip, triton_server):
    started = time.monotonic()
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    page.goto(gateway.url + "/")
    page.select_option("#voice", "__upload__")
    page.set_input_files("#clip", str(speech_clip.path))
    page.fill("#transcript", speech_clip.transcript)
    page.fill("#text", "Hello from a browser, in a cloned voice.")
    page.fill("#seed", "4")
    page.fill("#max-seconds", "1")
    page.fill("#api-key", GATEWAY_API_KEY)  # speech and voice writes need a gateway API key once keys are set
    page.click("#speak")
    page.wait_for_function("document.querySelector('#player').src.startsWith('blob:')", timeout=30_000)
    # Playable: the browser decoded the WAV's header and knows its length.
    page.wait_for_function("document.querySelector('#player').readyState >= 1", timeout=10_000)
    duration = page.evaluate("document.querySelector('#player').duration")
    assert duration == pytest.approx(1.04, abs=0.01)
    assert page.get_attribute("#download", "href").startswith("blob:")
    assert "s of audio" in page.inner_text("#status")

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "gateway_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")

    # Save the uploaded clip as a voice; the menu then offers and selects it.
    page.fill("#new-name", "browser-voice")
    page.click("#save")
    page.wait_for_function("document.querySelector('#voice').value === 'browser-voice'", timeout=30_000)
    page.click("#speak")
    page.wait_for_function("document.querySelector('#status').textContent.includes('s of audio')", timeout=30_000)
    assert not page.locator("#status.error").count()

    # A conversation: the stored voice's clip as the earlier turn (speaker 0), the text
    # answered by speaker 1; a speaker out of range is the server's clear refusal.
    page.select_option("#voice", "")
    page.select_option("#context-voice", "browser-voice")
    page.fill("#speaker", "1")
    page.evaluate("document.querySelector('#status').textContent = ''")
    page.click("#speak")
    page.wait_for_function("document.querySelector('#status').textContent.includes('s of audio')", timeout=30_000)
    assert not page.locator("#status.error").count()
    page.fill("#speaker", "300")
    page.click("#speak")
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "speaker" in page.inner_text("#status") and "255" in page.inner_text("#status")
    page.fill("#speaker", "0")
    page.select_option("#context-voice", "")
    page.select_option("#voice", "browser-voice")

    # Delete it again (confirming the dialog): gone from the menu and from the store.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete")
    page.wait_for_function("document.querySelector('#status').textContent.includes('Deleted voice')", timeout=30_000)
    assert "browser-voice" not in page.eval_on_selector_all("#voice option", "options => options.map(o => o.value)")
    assert page.locator("#delete").is_hidden()  # the default voice is selected, which cannot be deleted
    page.close()
    from csm_clients import VoiceCloner

    with VoiceCloner(triton_server.grpc_url, admin_token=ADMIN_TOKEN) as cloner:
        assert "browser-voice" not in {voice["voice_id"] for voice in cloner.list_voices()}
    assert time.monotonic() - started < 30


def test_the_servers_error_is_shown_on_the_page(browser, gateway, speech_clip):
    page = browser.new_page()
    page.goto(gateway.url + "/")
    page.select_option("#voice", "__upload__")
    page.set_input_files("#clip", str(speech_clip.path))  # and no transcript
    page.fill("#api-key", GATEWAY_API_KEY)
    page.click("#speak")
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "'REFERENCE_AUDIO' needs 'REFERENCE_TEXT'" in page.inner_text("#status")
    assert page.get_attribute("#player", "src") is None
    page.close()
