"""The dashboard in a real browser: Voila on 127.0.0.1, headless Debian Chromium driven by Playwright.

It starts the server the way ``nsa-viz dashboard`` does (the embedded SmolLM2 on a CPU, a short text),
waits for the first recording, changes the pattern tuner's window, and checks that the layout plot and
the recall figure change and that the page shows no error or traceback. A screenshot is saved under the
test's temporary folder (and to ``$NSA_VIZ_SCREENSHOT`` when set, e.g. ``docs/dashboard.png``).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import time

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-quic", "--no-first-run"]
FIRST_RECORDING_S = 600  # kernel start, imports, dequantising the GGUF and one forward pass on a slow CPU
UPDATE_S = 120


def _requirements():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; scripts/test.sh does it)")
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("voila")
    from nsa_viz.models import ModelNotFoundError, default_model_file

    try:
        default_model_file()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


def _server_args(**kw) -> argparse.Namespace:
    base = dict(port=0, no_browser=True, model=None, dataset="docs", file="", tokens=256, layers="0, 15, 29", block=32,
                results="", notebook="", timeout=180.0)
    base.update(kw)
    return argparse.Namespace(**base)


def _errors_on(page) -> list:
    """Error outputs, error messages and tracebacks visible on the page."""
    found = []
    for sel in (".nsa-message-error", "[data-mime-type='application/vnd.jupyter.stderr']",
                "[data-mime-type='application/vnd.jupyter.error']", ".jp-OutputArea-output.jp-mod-error"):
        n = page.locator(sel).count()
        if n:
            found.append(f"{n}× {sel}: {page.locator(sel).first.inner_text()[:300]}")
    text = page.locator("body").inner_text()
    for word in ("Traceback (most recent call last)", "There was an error when executing cell"):
        if word in text:
            found.append(word)
    return found


def _values(page) -> dict:
    el = page.locator(".nsa-recall-values")
    return {"recall": el.get_attribute("data-recall"), "density": el.get_attribute("data-density"),
            "layout_title": page.locator(".nsa-layout-plot .gtitle").first.text_content(),
            "recall_title": page.locator(".nsa-recall-plot .gtitle").first.text_content(),
            "recall_cells": page.locator(".nsa-recall-plot").first.inner_text()}


def test_dashboard_reacts_in_chromium(tmp_path):
    _requirements()
    from playwright.sync_api import sync_playwright

    from nsa_viz.dashboard import launch

    t0 = time.monotonic()
    log_path = tmp_path / "voila.log"
    args = _server_args()
    with open(log_path, "w") as log:
        proc, url = launch.start_server(args, log=log)
    try:
        assert launch.wait_until_up(url, proc, 180), f"Voila did not start:\n{log_path.read_text()[-3000:]}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1200})
            page.set_default_timeout(60_000)
            elsewhere = []  # the page must work offline: every request goes to our server
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:", "ws://127.0.0.1"))
                    else elsewhere.append(r.url))
            page.goto(url, timeout=180_000)
            page.wait_for_selector(".nsa-dashboard", timeout=FIRST_RECORDING_S * 1000)
            page.get_by_role("tab", name="Pattern tuner").click()
            page.wait_for_selector(".nsa-recall-values", timeout=FIRST_RECORDING_S * 1000)
            page.wait_for_selector(".nsa-layout-plot .gtitle", timeout=UPDATE_S * 1000)
            page.wait_for_selector(".nsa-recall-plot .gtitle", timeout=UPDATE_S * 1000)
            loaded_s = time.monotonic() - t0
            before = _values(page)
            before_png = page.locator(".nsa-layout-plot").screenshot()
            assert not _errors_on(page), _errors_on(page)
            assert re.search(r"window=64\b", before["layout_title"]), before

            # change a pattern parameter: type a new window into the slider's editable readout
            readout = page.locator(".nsa-window .widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("128")
            page.keyboard.press("Enter")
            page.wait_for_function(
                "(old) => { const e = document.querySelector('.nsa-recall-values');"
                " return e && e.getAttribute('data-recall') !== old; }", arg=before["recall"], timeout=UPDATE_S * 1000)
            page.wait_for_function(
                "() => { const t = document.querySelector('.nsa-layout-plot .gtitle');"
                " return t && t.textContent.includes('window=128'); }", timeout=UPDATE_S * 1000)
            after = _values(page)
            after_png = page.locator(".nsa-layout-plot").screenshot()

            assert float(after["recall"]) > float(before["recall"]), (before, after)  # a wider window keeps more
            assert float(after["density"]) > float(before["density"]), (before, after)
            assert after["layout_title"] != before["layout_title"]
            assert after["recall_title"] != before["recall_title"]
            assert after["recall_cells"] != before["recall_cells"]
            assert after_png != before_png  # the drawn tiles changed, not only the text
            errors = _errors_on(page)
            assert not errors, errors
            assert not elsewhere, f"requests that left 127.0.0.1: {elsewhere[:5]}"

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            target = os.environ.get("NSA_VIZ_SCREENSHOT")
            if target:
                shutil.copyfile(shot, target)
            browser.close()
        print(f"dashboard browser test: first recording shown after {loaded_s:.0f} s, "
              f"total {time.monotonic() - t0:.0f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except Exception:
            proc.kill()
