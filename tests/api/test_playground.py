"""The built-in pages in a real Chromium (Debian's, driven by Playwright) against real servers
of the bundled model: the playground chats with streamed tokens, answers that Paris is the
capital of France, gives JSON in JSON mode, asks for the API key and shows a wrong one's 401;
the dashboard shows tokens/s while a load runs and idle values after. Screenshots are kept
under test-artifacts/."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server
from tests.api.test_server import MODEL
from tests.conftest import CHROMIUM

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
KEY = "playground-secret"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="no Chromium: `make setup` installs Debian's chromium"
)


@pytest.fixture(scope="module")
def server(smollm2_dir) -> Iterator[Server]:
    server = start_server("--max-model-len", "2048", "--kv-cache-memory-gb", "0.25")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def keyed_server(smollm2_dir) -> Iterator[Server]:
    server = start_server("--max-model-len", "2048", "--kv-cache-memory-gb", "0.1",
                          "--api-key", KEY)  # fmt: skip
    yield server
    stop_server(server)


def ask(page, question: str) -> str:
    """Send a question and wait for its answer's stats line (written once the stream ends);
    the answer's text, and how many times it changed while streaming."""
    page.fill("#prompt", question)
    count = page.locator(".assistant").count()
    page.evaluate(  # the lengths the answer's text went through as it streamed in
        """() => {
            window.__lengths = new Set();
            new MutationObserver(() => {
                const all = document.querySelectorAll(".assistant .content");
                if (all.length) window.__lengths.add(all[all.length - 1].textContent.length);
            }).observe(document.getElementById("log"), {subtree: true, characterData: true,
                                                       childList: true});
        }"""
    )
    page.click("#send-button")
    answer = page.locator(".assistant").nth(count)
    answer.locator(".stats").filter(has_text="tokens/s").wait_for(timeout=120_000)
    return answer.locator(".content").inner_text()


def test_chat_streams_and_answers(browser, server: Server) -> None:
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.input_value("#model") == MODEL
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "48")
    text = ask(page, "What is the capital of France?")
    assert "Paris" in text
    # the text grew through several lengths: tokens arrived as they came, not all at the end
    assert page.evaluate("window.__lengths.size") >= 4
    stats = page.locator(".assistant .stats").first.inner_text()
    assert "time to first token" in stats and "tokens/s" in stats
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    page.click("#clear")
    page.check("#json-mode")
    text = ask(page, "Give the capital of France as JSON with the key capital.")
    assert isinstance(json.loads(text), dict)
    page.close()


def test_tools_give_calls_shown_with_their_arguments(browser, server: Server) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]},
        },
    }  # fmt: skip
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "64")
    page.fill("#tools", json.dumps([weather]))
    page.select_option("#tool-choice", "required")
    ask(page, "What is the weather in Paris?")
    shown = page.locator(".assistant .tools").first.inner_text()
    name, arguments = shown.split("(", 1)
    assert name == "get_weather"
    assert isinstance(json.loads(arguments.rsplit(")", 1)[0])["city"], str)
    page.close()


def test_the_page_asks_for_the_key_and_shows_a_wrong_ones_401(browser, keyed_server) -> None:
    page = browser.new_page()
    page.goto(keyed_server.url + "/")  # the page itself needs no key
    error = page.locator(".error").first
    error.wait_for()
    assert "401" in error.inner_text() and "API key" in error.inner_text()
    page.fill("#api-key", "wrong")
    page.dispatch_event("#api-key", "change")
    page.locator(".error").nth(1).wait_for()
    assert "Invalid or missing API key" in page.locator(".error").nth(1).inner_text()
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "32")
    assert "Paris" in ask(page, "What is the capital of France?")
    page.screenshot(path=str(ARTIFACTS / "playground-with-key.png"), full_page=True)
    page.close()


def test_dashboard_shows_the_load_and_then_idle(browser, server: Server) -> None:
    page = browser.new_page()
    page.goto(server.url + "/dashboard")
    card = page.locator(".card[data-metric=gen]").first
    card.wait_for()

    def load() -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        for _ in range(4):
            client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=96,
                                      extra_body={"ignore_eos": True})  # fmt: skip

    worker = threading.Thread(target=load)
    worker.start()
    page.wait_for_function(
        "Number(document.querySelector('.card[data-metric=gen]').dataset.value) > 0",
        timeout=60_000,
    )
    busy = float(card.get_attribute("data-value"))
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    worker.join()
    page.wait_for_function(
        "Number(document.querySelector('.card[data-metric=gen]').dataset.value) === 0 && "
        "Number(document.querySelector('.card[data-metric=running]').dataset.value) === 0",
        timeout=30_000,
    )
    assert busy > 5  # tokens per second while the load ran
    page.close()


def test_disable_playground_leaves_the_pages_out(tiny_model_dirs) -> None:
    server = start_server(str(tiny_model_dirs["llama"]), "--kv-cache-memory-gb", "0.02",
                          "--disable-playground")  # fmt: skip
    try:
        assert httpx.get(server.url + "/").status_code == 404
        assert httpx.get(server.url + "/dashboard").status_code == 404
    finally:
        stop_server(server)


def test_an_attached_image_reaches_a_vision_model(browser, tiny_llava_dir, tmp_path) -> None:
    """The page sends a chosen image as an image_url part: the engine encodes one image (its
    mm_cache_queries counter rises by one) and the answer streams in."""
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (28, 28), (200, 30, 30)).save(image)
    server = start_server(str(tiny_llava_dir), "--served-model-name", "llava")

    def images_seen() -> float:
        text = httpx.get(server.url + "/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("lmserve:mm_cache_queries_total"))
        return float(line.rsplit(" ", 1)[1])

    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        page.fill("#max-tokens", "8")
        page.set_input_files("#file", str(image))
        before = images_seen()
        ask(page, "What color is this?")
        assert not page.locator(".error").count()
        assert images_seen() == before + 1
        page.close()
    finally:
        stop_server(server)


def test_an_attached_audio_file_is_transcribed(browser, whisper_dir, speech_dir) -> None:
    """With a speech-to-text model, the page sends a chosen audio file to
    /v1/audio/transcriptions (streamed) and shows the transcript as it arrives."""
    server = start_server(str(whisper_dir), "--served-model-name", "whisper")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        page.set_input_files("#file", str(speech_dir / "beckett.wav"))
        page.click("#send-button")  # no text needed beside a file
        answer = page.locator(".assistant").last
        answer.locator(".stats").filter(has_text="transcribed in").wait_for(timeout=120_000)
        assert not page.locator(".error").count()
        text = answer.locator(".content").inner_text().lower()
        assert "ever tried" in text and "fail better" in text
        assert "first words after" in answer.locator(".stats").inner_text()
        page.screenshot(path=str(ARTIFACTS / "playground-transcription.png"), full_page=True)
        page.close()
    finally:
        stop_server(server)


def test_reasoning_is_shown_apart_from_the_answer(browser, tiny_chat_dir) -> None:
    """With --reasoning-parser deepseek_r1, output before `</think>` (here all of a random
    model's output: R1's template opens the thinking) streams into the reasoning box, not the
    answer."""
    server = start_server(str(tiny_chat_dir), "--reasoning-parser", "deepseek_r1")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        page.fill("#max-tokens", "12")
        assert ask(page, "Think first.") == ""
        reasoning = page.locator(".assistant .reasoning").last.inner_text()
        assert len(reasoning) > 0
        page.close()
    finally:
        stop_server(server)
