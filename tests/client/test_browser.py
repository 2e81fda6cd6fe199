"""The demo page in headless Chromium: an answer survives a network drop and a page reload, and
the model is asked once. Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
them)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from proxy.app import API
from tests.helpers import make_config, run_proxy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if os.environ.get("CI"):
    from selenium import webdriver  # .ci/run installs it: under CI a missing one fails
else:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI"):
    # .ci/run installs both: under CI a missing browser is a broken setup, never a skip.
    raise RuntimeError("CI must install chromium and chromium-driver (.ci/run does)")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs chromium and chromedriver on PATH (Debian: apt-get install chromium "
    "chromium-driver)",
)

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
