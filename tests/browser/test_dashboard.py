"""The dashboard in a real browser (Debian's headless Chromium) against a stack of real stage
processes: while jobs run its numbers move, thumbnails of finished jobs load, the form makes an
image, and with DF_API_KEYS set it works once a key is entered. Saves the screenshot docs show."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nats
import openai
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from disagfusion.launcher import Launcher
from disagfusion.protocol import STAGES, SchedulerStatus, StageState
from disagfusion.scheduler_state import scheduler_bucket, withdraw_status, write_status

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard.png"
TIMEOUT_S = 120.0


def wait_for(what: str, check: Callable[[], object], timeout: float = TIMEOUT_S) -> object:
    """``check()``'s first truthy value, polled; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"the dashboard never showed {what} within {timeout:.0f} s"
        time.sleep(0.25)


def text(browser: WebDriver, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def number(browser: WebDriver, element_id: str) -> float | None:
    try:
        return float(text(browser, element_id))
    except ValueError:  # "–": nothing yet
        return None


def column(browser: WebDriver, name: str) -> dict[str, str]:
    """Stage → the stages table's cell in column ``name``, read in one go (the page redraws its
    rows each second, so elements found one by one can go stale between two reads)."""
    return browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#stages tbody tr')]"
        ".map(row => [row.dataset.stage, row.querySelector('.' + arguments[0]).textContent]))", name)


def running(browser: WebDriver) -> dict[str, int]:
    return {stage: int(count) for stage, count in column(browser, "running").items()}


def job_rows(browser: WebDriver) -> list[str]:
    """The recent jobs' rows as text."""
    return browser.execute_script("return [...document.querySelectorAll('#jobs tbody tr')].map(row => row.textContent)")


def loaded_thumbnails(browser: WebDriver) -> int:
    """Thumbnails the browser has decoded (a broken or pending image has naturalWidth 0)."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#jobs img.thumbnail')].filter(i => i.complete && i.naturalWidth > 0).length")


def generate_in_page(browser: WebDriver, prompt: str) -> None:
    """Submit the page's form and wait for its image to be shown."""
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "submit").click()
    wait_for("the generated image", lambda: browser.execute_script(
        "const i = document.getElementById('generated'); return !i.hidden && i.complete && i.naturalWidth > 0"))
    assert text(browser, "generate-state").startswith("done"), text(browser, "generate-state")


def test_dashboard_moves_while_jobs_run(browser: WebDriver, gateway_url: str) -> None:
    browser.get(f"{gateway_url}/")
    wait_for("every stage running", lambda: len(running(browser)) == 3 and all(running(browser).values()))
    before = number(browser, "completed")
    assert before is not None and number(browser, "throughput") is not None

    sdk = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            for seed in (10, 12, 14):
                sdk.images.generate(model="tiny", prompt="a lantern at dusk", size="64x64", n=2,
                                    extra_body={"seed": seed, "num_inference_steps": 3})
        except BaseException as exc:  # seen by the test thread below
            errors.append(exc)

    jobs = threading.Thread(target=submit)
    jobs.start()
    try:
        wait_for("a finished job counted", lambda: (number(browser, "completed") or 0) > before)
        wait_for("a throughput above 0", lambda: (number(browser, "throughput") or 0) > 0)
        wait_for("a p95 latency", lambda: number(browser, "p95"))
        wait_for("a loaded thumbnail", lambda: loaded_thumbnails(browser))
    finally:
        jobs.join(timeout=TIMEOUT_S)
    assert not errors, errors
    wait_for("all six jobs counted", lambda: (number(browser, "completed") or 0) >= before + 6)
    assert any("a lantern at dusk" in row and "completed" in row for row in job_rows(browser))
    assert browser.find_elements(By.CSS_SELECTOR, "#chart canvas"), "the chart library drew nothing"

    generate_in_page(browser, "a harbour in fog")
    wait_for("the form's job among the recent jobs",
             lambda: any("a harbour in fog" in row for row in job_rows(browser)))
    wait_for("every thumbnail loaded", lambda: loaded_thumbnails(browser) >= 7)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))


def test_with_api_keys_the_page_works_once_a_key_is_entered(browser: WebDriver, gateway_stack: Launcher,
                                                           start_gateway) -> None:
    url = start_gateway(gateway_stack.client_settings().nats_url, DF_API_KEYS="browser-key")
    browser.get(f"{url}/")
    wait_for("that a key is needed", lambda: "enter an API key" in text(browser, "state"))
    browser.find_element(By.ID, "key").send_keys("browser-key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_for("the live view", lambda: text(browser, "state").startswith("live"))
    wait_for("every stage running", lambda: len(running(browser)) == 3 and all(running(browser).values()))
    generate_in_page(browser, "a key to the city")
    wait_for("its thumbnail, fetched with the key", lambda: loaded_thumbnails(browser))


async def scheduler_says(nats_url: str, targets: dict[str, int] | None) -> None:
    """Write what a running scheduler writes each tick (``targets``: its desired instances), or
    withdraw it as a stopping scheduler does (None)."""
    nc = await nats.connect(nats_url)
    try:
        kv = await scheduler_bucket(nc.jetstream(), create=True)
        if targets is None:
            await withdraw_status(kv)
            return
        stages = [StageState(stage=stage, service=stage.service, desired=targets[stage], running=1, backlog=0,
                             in_flight=0, waiting=1, arrival_rate=0.0, throughput=0.0) for stage in STAGES]
        await write_status(kv, SchedulerStatus(policy="hybrid", actuator="local", pool="slot:6", tick_s=5.0,
                                               stages=stages))
    finally:
        await nc.close()


def test_desired_instances_come_from_a_running_scheduler(browser: WebDriver, gateway_url: str,
                                                         gateway_stack: Launcher) -> None:
    nats_url = gateway_stack.client_settings().nats_url
    browser.get(f"{gateway_url}/")
    wait_for("no desired counts without a scheduler", lambda: column(browser, "desired") == dict.fromkeys(STAGES, "–"))
    asyncio.run(scheduler_says(nats_url, {"encode": 1, "denoise": 3, "decode": 2}))
    try:
        wait_for("the scheduler's desired counts",
                 lambda: column(browser, "desired") == {"encode": "1", "denoise": "3", "decode": "2"})
        assert "scheduler's target" in text(browser, "scheduler")
    finally:
        asyncio.run(scheduler_says(nats_url, None))
    wait_for("the desired counts gone with the scheduler", lambda: column(browser, "desired") == dict.fromkeys(STAGES, "–"))
