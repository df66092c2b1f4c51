"""
The dashboard in a real headless Chromium (Debian's, driven by Playwright for Python).

The real service tree runs on the reactor with three fake DMRs; the browser runs in a
worker thread (Playwright's sync API), and what the test does to the fleet -- stop a
fake, reload -- it does on the reactor with ``blockingCallFromThread``.  The checks are
what a person sees on the page.  ``OLLADMR_SCREENSHOTS=DIR`` also saves the light and
dark screenshots there (``docs/`` holds the ones the README shows).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
import yaml
from conftest import in_thread
from fakedmr import FakeDMR
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread

from olladmr import build as assembly
from olladmr.config import load_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("OLLADMR_REQUIRE_BROWSER"):
    pytest.skip("no chromium on this machine (scripts/test.sh installs Debian's)", allow_module_level=True)

pytestmark = pytest.mark.slow
ADMIN_KEY = "dashboard-admin-key-for-tests"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def write_config(path: Path, fakes: list[FakeDMR], **server: Any) -> None:
    endpoints = [
        {"name": f.name, "url": f.url, "priority": 100 - i, "check_interval": "1s", "check_timeout": "1s"}
        for i, f in enumerate(fakes)
    ]
    document = {"server": {"host": "127.0.0.1", "port": 0, **server}, "endpoints": endpoints}
    path.write_text(yaml.safe_dump(document))


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> Any:
    fakes = [FakeDMR(name=f"dmr-{i}") for i in range(3)]
    for fake in fakes:
        await fake.start()
    started: list[assembly.Daemon] = []

    async def start(**server: Any) -> tuple[assembly.Daemon, Path]:
        path = tmp_path / "olla.yaml"
        write_config(path, fakes, **server)
        parts = assembly.build(
            load_config(str(path)), reactor=reactor, listen="tcp:0:interface=127.0.0.1", config_path=str(path)
        )
        parts.service.startService()
        await parts.service.serving
        started.append(parts)
        return parts, path

    yield fakes, start
    for parts in started:
        await parts.service.stopService()
    for fake in fakes:
        await fake.stop()


def browse(base: str, scheme: str, steps: Callable[[Any], None]) -> None:
    """Open ``base/internal/ui/`` in headless Chromium (``scheme``: light or dark) and run ``steps(page)``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(color_scheme=scheme, viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base + "/internal/ui/")
            steps(page)
            assert errors == [], f"the page's script failed: {errors}"
        finally:
            browser.close()


def status_cell(page: Any, endpoint: str) -> Any:
    return page.locator(f'#fleet tr[data-endpoint="{endpoint}"] td.status')


def model_requests(page: Any, model: str) -> int:
    return int(page.locator(f'#models tr[data-model="{model}"] td.requests').inner_text())


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read(200)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def chat(base: str, model: str) -> None:
    """One non-streaming chat completion through olladmr (must succeed)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(
        base + "/olla/dmr/engines/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        response.read()


def screenshot(page: Any, scheme: str) -> None:
    folder = os.environ.get("OLLADMR_SCREENSHOTS")
    if folder:
        page.screenshot(path=os.path.join(folder, f"dashboard-{scheme}.png"), full_page=True)


@pytest_twisted.ensureDeferred
async def test_the_page_shows_the_fleet_and_follows_it_live(rig: Any) -> None:
    """Every endpoint and its status; a killed fake turns offline in place; 20 requests count; a reload is logged."""
    fakes, start = rig
    daemon, path = await start()
    base = f"http://127.0.0.1:{daemon.service.port.getHost().port}"
    timings: dict[str, float] = {}

    def steps(page: Any) -> None:
        from playwright.sync_api import expect

        for fake in fakes:
            expect(status_cell(page, fake.name)).to_contain_text("healthy", timeout=5000)
        expect(page.locator("#connection")).to_have_text("live")
        page.evaluate("window.__sameDocument = true")

        # a fake dies: its row turns offline without a page reload
        blockingCallFromThread(reactor, fakes[1].stop)
        stopped = time.monotonic()
        expect(status_cell(page, "dmr-1")).to_contain_text("offline", timeout=5000)
        timings["offline_visible_s"] = time.monotonic() - stopped
        expect(status_cell(page, "dmr-0")).to_contain_text("healthy")
        expect(page.locator("#events")).to_contain_text("dmr-1: healthy → offline")

        # 20 chat requests move the model's request count by 20
        model, key = "ai/smollm2", "ai/smollm2:latest"
        expect(page.locator(f'#models tr[data-model="{key}"]')).to_be_visible()
        before = model_requests(page, key)
        for _ in range(20):
            chat(base, model)
        sent = time.monotonic()
        expect(page.locator(f'#models tr[data-model="{key}"] td.requests')).to_have_text(str(before + 20), timeout=5000)
        timings["requests_visible_s"] = time.monotonic() - sent

        # a reload shows its one-line summary in the events list
        document = yaml.safe_load(path.read_text())
        document["endpoints"][2]["priority"] = 50
        path.write_text(yaml.safe_dump(document))
        result = blockingCallFromThread(reactor, daemon.reloader.reload)
        assert result.ok, result.summary
        reloaded = time.monotonic()
        expect(page.locator("#events li").first).to_contain_text(f"reloaded: {result.summary}", timeout=5000)
        timings["reload_visible_s"] = time.monotonic() - reloaded
        assert page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
        screenshot(page, "light")

        # the stream drops: the page says so, polls the status API meanwhile, then reconnects
        blockingCallFromThread(reactor, daemon.dashboard.close_streams)
        expect(page.locator("#connection")).to_contain_text("disconnected", timeout=5000)
        blockingCallFromThread(reactor, fakes[1].start, fakes[1].port)
        expect(status_cell(page, "dmr-1")).to_contain_text("healthy", timeout=5000)  # seen while polling or live
        expect(page.locator("#connection")).to_have_text("live", timeout=10000)
        assert page.evaluate("window.__sameDocument") is True

    await in_thread(browse, base, "light", steps)
    print(f"dashboard latency: {timings}")
    assert all(seconds < 5 for seconds in timings.values()), timings


@pytest_twisted.ensureDeferred
async def test_dark_scheme_renders(rig: Any) -> None:
    """Under prefers-color-scheme: dark the page uses its dark palette (and renders the fleet)."""
    fakes, start = rig
    daemon, _ = await start()
    base = f"http://127.0.0.1:{daemon.service.port.getHost().port}"
    colours: list[str] = []

    def steps(page: Any) -> None:
        from playwright.sync_api import expect

        for fake in fakes:
            expect(status_cell(page, fake.name)).to_contain_text("healthy", timeout=5000)
        for _ in range(12):
            chat(base, "ai/llama3.2")
        expect(page.locator('#models tr[data-model="ai/llama3.2:latest"] td.requests')).to_have_text("12", timeout=5000)
        colours.append(page.evaluate("getComputedStyle(document.body).backgroundColor"))
        screenshot(page, "dark")

    await in_thread(browse, base, "dark", steps)
    assert colours == ["rgb(13, 17, 23)"]


@pytest_twisted.ensureDeferred
async def test_with_admin_keys_the_page_asks_for_one(rig: Any) -> None:
    """Admin keys configured: the event stream refuses a request without one; the page asks, then shows the fleet."""
    fakes, start = rig
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    daemon, _ = await start(auth={"admin_keys": [digest]})
    base = f"http://127.0.0.1:{daemon.service.port.getHost().port}"

    status, _, body = await in_thread(http_get, base + "/internal/ui/events")
    assert status == 401 and b"admin" in body
    status, _, _ = await in_thread(http_get, base + "/internal/ui/snapshot")
    assert status == 401
    status, headers, _ = await in_thread(http_get, base + "/internal/ui/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")

    def steps(page: Any) -> None:
        from playwright.sync_api import expect

        expect(page.locator("#key-form")).to_be_visible(timeout=5000)
        expect(page.locator("#connection")).to_have_text("admin key required")
        assert page.locator("#fleet tbody tr").count() == 0
        page.get_by_label("Admin key").fill("not-the-key")
        page.get_by_role("button", name="Open dashboard").click()
        expect(page.locator("#key-error")).to_have_text("That key was refused.", timeout=5000)
        page.get_by_label("Admin key").fill(ADMIN_KEY)
        page.get_by_role("button", name="Open dashboard").click()
        for fake in fakes:
            expect(status_cell(page, fake.name)).to_contain_text("healthy", timeout=5000)
        expect(page.locator("#connection")).to_have_text("live")
        assert page.evaluate("sessionStorage.getItem('olladmr.adminKey')") == ADMIN_KEY

    await in_thread(browse, base, "light", steps)
