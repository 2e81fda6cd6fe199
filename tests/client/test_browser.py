"""The demo page in headless Chromium: an answer survives a network drop and a page reload, and
the model is asked once. Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from selenium import webdriver

from proxy.app import API
from tests.helpers import free_port, make_config, run_proxy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = (
    "needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
)


@pytest.fixture(autouse=True)
def _browser() -> None:
    """Skip without a browser, except under CI, where a missing browser is a failure."""
    if CHROMIUM and CHROMEDRIVER:
        return
    if os.environ.get("CI"):
        pytest.fail(MISSING)
    pytest.skip(MISSING)


PROMPT = "tell me how the log survives a crash"
TOKENS = 60
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=900,760",
]
# The last answer's text and state ("streaming", "done" or "error").
ANSWER_JS = (
    "const a = [...document.querySelectorAll('.answer')].at(-1);"
    "return a && [a.textContent, a.dataset.state];"
)


@dataclass
class PageRun:
    words_at_drop: int
    words_before_reload: int
    text: str
    badge: str


def drive_demo(url: str, workdir: Path, drop_connections: Callable[[], None]) -> PageRun:
    """Ask; while the answer streams, drop the connection, then reload the page; wait for the
    end (blocking: runs in a thread)."""
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={workdir / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(15)
        driver.get(url + "/demo")
        driver.find_element(By.ID, "prompt").send_keys(PROMPT)
        driver.find_element(By.ID, "send").click()

        def words(_: object) -> int:
            answer = driver.execute_script(ANSWER_JS)
            return len(answer[0].split()) if answer else 0

        WebDriverWait(driver, 10, poll_frequency=0.05).until(lambda d: words(d) >= 8)
        at_drop = words(driver)
        drop_connections()
        WebDriverWait(driver, 10, poll_frequency=0.05).until(lambda d: words(d) >= at_drop + 12)
        before = words(driver)
        driver.refresh()
        WebDriverWait(driver, 15, poll_frequency=0.05).until(
            lambda d: (d.execute_script(ANSWER_JS) or ["", ""])[1] in ("done", "error")
        )
        text, state = driver.execute_script(ANSWER_JS)
        assert state == "done", text
        badge = driver.find_element(By.CSS_SELECTOR, ".badge").text
        driver.save_screenshot(str(workdir / "demo-after-reload.png"))
        return PageRun(at_drop, before, text, badge)
    finally:
        driver.quit()


async def test_demo_answer_survives_a_drop_and_a_reload_and_the_model_is_called_once(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path / "data", "mock", **{"mock.tokens": TOKENS, "mock.interval_ms": 50}
    )
    async with run_proxy(config) as proxy:
        loop = asyncio.get_running_loop()
        server = proxy.runner.server
        assert server is not None

        def reset_all() -> None:
            for handler in server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

        def drop_connections() -> None:
            """The network drop: every browser connection to the proxy is reset."""
            loop.call_soon_threadsafe(reset_all)

        run = await asyncio.to_thread(drive_demo, proxy.url, tmp_path, drop_connections)
        mock_url = proxy.app[API].upstream_url
        async with httpx.AsyncClient() as client:
            calls = (await client.get(mock_url + "/mock/calls")).json()
            metrics = (await client.get(proxy.url + "/metrics")).text
            direct = await client.post(
                mock_url + "/v1/chat/completions",
                json={"model": "mock-gpt", "messages": [{"role": "user", "content": PROMPT}]},
            )
    assert calls == {"/v1/chat/completions": 1}
    # Two resumes: resume.js after the drop, the page after the reload.
    assert "resumable_proxy_replays_total 2.0" in metrics
    assert run.words_at_drop < run.words_before_reload < TOKENS, "the reload was not mid-answer"
    assert run.badge.startswith("resumed after reload at event")
    assert run.text == direct.json()["choices"][0]["message"]["content"]
    assert (tmp_path / "demo-after-reload.png").stat().st_size > 0


BROWSER_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "browser"
EXAMPLE_KEY = "sk-browser-page"
# How long the finished page is watched for further requests: over two of Chromium's
# EventSource reconnection delays (3 s), so a page that polled would be seen polling.
WATCH_AFTER_END_S = 7.0


@contextlib.asynccontextmanager
async def static_site(directory: Path) -> AsyncIterator[str]:
    """`directory`'s page served on its own origin (another port than the proxy's)."""

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(directory / "index.html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class ExampleRun:
    words_before_reload: int
    text: str
    via: str
    session_id: str
    token: str


def drive_example(page_url: str, workdir: Path, watch: Callable[[], None]) -> ExampleRun:
    """Ask with a key, reload mid-answer (the key is gone), wait for the resumed answer's end,
    then keep the page open while `watch` looks for further requests (blocking: a thread)."""
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={workdir / 'chromium-example'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    answer = "const a = document.getElementById('answer'); return [a.textContent, a.dataset.state];"
    try:
        driver.set_page_load_timeout(15)
        driver.get(page_url)
        driver.find_element(By.ID, "key").send_keys(EXAMPLE_KEY)
        driver.find_element(By.ID, "prompt").send_keys(PROMPT)
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 20, poll_frequency=0.05)
        wait.until(lambda d: len(d.execute_script(answer)[0].split()) >= 10)
        before = len(driver.execute_script(answer)[0].split())
        driver.refresh()
        wait.until(lambda d: d.execute_script(answer)[1] in ("done", "error"))
        text, state = driver.execute_script(answer)
        assert state == "done", text
        watch()
        saved = driver.execute_script("return JSON.parse(sessionStorage['resumable-proxy']);")
        driver.save_screenshot(str(workdir / "example-after-reload.png"))
        via = driver.find_element(By.ID, "via").text
        return ExampleRun(before, text, via, saved["sessionId"], saved["token"])
    finally:
        driver.quit()


async def test_example_page_resumes_a_bound_session_with_event_source_and_token_and_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The page on its own origin (CORS `*`) streams with an API key, loses it on reload, and
    resumes by EventSource with the capability token; the browser stops at the proxy's 204."""
    caplog.set_level(logging.INFO, logger="proxy.access")
    config = make_config(
        tmp_path / "data",
        "mock",
        **{"mock.tokens": TOKENS, "mock.interval_ms": 60, "server.cors_origins": ["*"]},
    )

    def events_requests() -> list[int]:
        return [
            int(message.split()[2])
            for record in caplog.records
            if record.name == "proxy.access"
            and (message := record.getMessage()).startswith("GET /sessions/")
            and message.split()[1].endswith("/events")
        ]

    seen_after_end: list[list[int]] = []

    def watch() -> None:
        at_end = events_requests()
        time.sleep(WATCH_AFTER_END_S)
        seen_after_end.extend([at_end, events_requests()])

    async with run_proxy(config) as proxy, static_site(BROWSER_EXAMPLE) as site:
        run = await asyncio.to_thread(drive_example, f"{site}/?proxy={proxy.url}", tmp_path, watch)
        mock_url = proxy.app[API].upstream_url
        async with httpx.AsyncClient() as client:
            calls = (await client.get(mock_url + "/mock/calls")).json()
            direct = await client.post(
                mock_url + "/v1/chat/completions",
                json={"model": "mock-gpt", "messages": [{"role": "user", "content": PROMPT}]},
            )
            events = f"{proxy.url}/sessions/{run.session_id}/events"
            without_token = await client.get(events)
            with_key = await client.get(events, headers={"Authorization": f"Bearer {EXAMPLE_KEY}"})
    assert calls == {"/v1/chat/completions": 1}
    assert run.via == "EventSource"
    assert run.words_before_reload < TOKENS, "the reload was not mid-answer"
    assert run.text == direct.json()["choices"][0]["message"]["content"]
    # The EventSource stream, its reconnect at the end (204), resume.js's check of why the
    # source closed (204); then nothing more, however long the page stays open.
    at_end, later = seen_after_end
    assert at_end == [200, 204, 204]
    assert later == at_end
    assert without_token.status_code == 404 and with_key.status_code == 200
    assert run.token and (tmp_path / "example-after-reload.png").stat().st_size > 0
