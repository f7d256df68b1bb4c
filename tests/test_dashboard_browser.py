"""The dashboard in a real browser: start the server on localhost, open it in headless Chromium
(Debian's ``chromium``, driven by Playwright), click through set-up → placement → memory → trace →
export → parallel folding → (a smaller set-up) → cache sizing → elastic scaling, check that the
heatmaps render and that the downloaded plan loads, and save a screenshot of every page to a
temporary folder, or to the folder ``MOEPLAN_SCREENSHOTS`` names (``MOEPLAN_SCREENSHOTS=bench/screenshots``
refreshes the committed ones; a plain test run leaves the repository as it was)."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeplan.cli.dashboard_cmd import streamlit_command
from moeplan.plan import Plan

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(os.environ.get("MOEPLAN_SCREENSHOTS") or Path(tempfile.gettempdir()) / "moeplan-screenshots")
WIDTH = 1500
TIMEOUT_MS = 120_000


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; its own browser download is not needed)"
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The dashboard as ``moeplan dashboard`` starts it, on a free localhost port; stopped afterwards."""
    port = _free_port()
    proc = subprocess.Popen(streamlit_command(port, "127.0.0.1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"the dashboard server did not start:\n{out}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def settle(page: Page) -> None:
    """Wait until the script run is over: no "running" indicator, no spinner."""
    page.wait_for_timeout(500)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=stStatusWidget]') "
        "&& !document.querySelector('[data-testid=stSpinner]')", timeout=TIMEOUT_MS)
    page.wait_for_timeout(800)


def shoot(page: Page, name: str) -> Path:
    """Screenshot the whole page: the viewport grows to the main area's height, then shrinks back."""
    height = int(page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight"))
    page.set_viewport_size({"width": WIDTH, "height": min(max(height, 900), 8000)})
    page.wait_for_timeout(1200)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    return path


def goto(page: Page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    settle(page)
    assert page.get_by_test_id("stException").count() == 0, page.get_by_test_id("stException").first.inner_text()


def test_set_up_placement_and_export_in_chromium(server: str, tmp_path: Path) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000}, accept_downloads=True)
            page.goto(server)
            page.get_by_text("MoE deployment what-if").wait_for(timeout=TIMEOUT_MS)
            settle(page)

            # set-up: the measured H100 profile, 32 GPUs (4 nodes of 8), DeepSeek-V3, synthetic traffic
            page.get_by_test_id("stSelectbox").filter(has_text="Hardware profile").click()
            page.get_by_role("option", name="measured/h100-sxm (measured)").click()
            settle(page)
            assert page.get_by_text("measured: attention_decode").first.is_visible()
            shoot(page, "1-setup")

            goto(page, "Placement what-if")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.js-plotly-plot')].some("
                "p => (p.data || []).filter(t => t.type === 'heatmap').length === 3)", timeout=TIMEOUT_MS)
            page.get_by_text("Side by side").wait_for(timeout=TIMEOUT_MS)
            assert page.get_by_test_id("stDataFrame").count() == 1
            shoot(page, "2-placement")

            goto(page, "Memory")
            page.get_by_text("Fits: the busiest GPU needs").wait_for(timeout=TIMEOUT_MS)
            shoot(page, "3-memory")
            kv = page.get_by_test_id("stNumberInput").filter(has_text="KV cache per GPU").locator("input")
            kv.fill("2000000")
            kv.press("Enter")
            page.get_by_text("this plan does not fit").wait_for(timeout=TIMEOUT_MS)
            settle(page)
            shoot(page, "3-memory-rejected")

            goto(page, "Trace")
            page.get_by_text("Local routing consistency").wait_for(timeout=TIMEOUT_MS)
            shoot(page, "4-trace")

            goto(page, "Export")
            button = page.get_by_test_id("stDownloadButton").filter(has_text="Download plan JSON")
            button.wait_for(timeout=TIMEOUT_MS)
            with page.expect_download() as download:
                button.click()
            saved = tmp_path / "plan.json"
            download.value.save_as(saved)
            page.mouse.move(0, 0)
            plan = Plan.load(saved)
            assert plan.model.name == "DeepSeek-V3" and plan.num_devices == 32 and plan.nodes == 4
            assert plan.placement is not None and plan.placement.num_layers == plan.model.num_moe_layers
            assert plan.solver["name"] in ("contiguous", "eplb", "lpt")
            shoot(page, "5-export")

            goto(page, "Parallel folding")
            page.get_by_text("Mappings ranked").wait_for(timeout=TIMEOUT_MS)
            shoot(page, "6-folding")

            # offloading and autoscaling suit a smaller deployment: Mixtral-8x7B on 8 GPUs
            page.get_by_test_id("stSelectbox").filter(has_text="Model preset").click()
            page.get_by_role("option", name="Mixtral-8x7B-v0.1").click()
            settle(page)
            gpus = page.get_by_test_id("stNumberInput").filter(has_text="GPUs").locator("input")
            gpus.fill("8")
            gpus.press("Enter")
            settle(page)
            goto(page, "Cache sizing")
            page.get_by_text("Throughput against cache memory").wait_for(timeout=TIMEOUT_MS)
            settle(page)
            shoot(page, "7-cache")
            goto(page, "Elastic scaling")
            page.get_by_text("SLO attainment and cost").wait_for(timeout=TIMEOUT_MS)
            settle(page)
            shoot(page, "8-elastic")
        finally:
            browser.close()
