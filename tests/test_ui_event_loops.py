"""Gradio's page and `always_last` handlers, in a real browser (docs/ui.md, "Event loops").

When an `always_last` handler's trigger fires while it runs, gradio's page dispatches the whole trigger again once
it finishes: every handler of that trigger runs, and one still busy is queued in turn. Two such handlers of one
trigger whose runs overlap re-fire each other without end; CI saw it on the Train tab (its YAML preview and its
pre-flight, 120 s of events). The app chains the second handler instead (`.then`), and refuses the pair when it is
built (`blocks.check_one_always_last`). Here, on a one-box page, the timing that kept the pair going on a quiet
machine (two 0.4 s handlers, two edits 0.2 s apart: 74 events in 15 s, still sending; under load it may stop,
so the pair itself is not run here): the chained pattern the app uses settles.

    python -m pytest -q tests/test_ui_event_loops.py
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from test_ui_support import free_port

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost"]
HANDLER_S = 0.4  # each handler's run
QUIET_S = 2.0    # settled: no event for this long (a loop sends one every HANDLER_S or so)

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)", allow_module_level=True)


def _page_app(chained: bool):
    import gradio as gr

    def slow(x):
        time.sleep(HANDLER_S)
        return x

    with gr.Blocks(analytics_enabled=False) as app:
        box = gr.Textbox(elem_id="box")
        first, second = gr.Textbox(), gr.Textbox()
        if chained:   # what the app does
            box.change(slow, box, first).then(slow, box, second, trigger_mode="always_last")
        else:         # what it did (both `always_last`, gradio's default for .change)
            box.change(slow, box, first)
            box.change(slow, box, second)
    return app


def _events_after_two_edits(browser, chained: bool, timeout: float = 30.0) -> tuple[int, bool]:
    """(events the page sent, whether it went quiet for QUIET_S within `timeout`) after two edits HANDLER_S / 2
    apart."""
    app = _page_app(chained)
    port = free_port()
    app.queue(default_concurrency_limit=None).launch(server_name="127.0.0.1", server_port=port,
                                                     prevent_thread_lock=True, quiet=True)
    page = browser.new_page()
    sent: list[float] = []
    page.on("request", lambda r: sent.append(time.time()) if r.method == "POST" and "/queue/join" in r.url
            else None)
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#box textarea")
        page.locator("#box textarea").fill("a")
        page.wait_for_timeout(HANDLER_S / 2 * 1000)
        page.locator("#box textarea").fill("ab")
        end = time.time() + timeout
        while time.time() < end:
            page.wait_for_timeout(100)
            if sent and time.time() - sent[-1] >= QUIET_S:
                return len(sent), True
        return len(sent), False
    finally:
        page.close()
        app.close()


def test_a_chained_always_last_pair_settles_and_two_handlers_of_one_trigger_are_refused():
    pw = sync_api.sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
    try:
        chained, settled = _events_after_two_edits(browser, chained=True)
    finally:
        browser.close()
        pw.stop()
    # the chain runs for the first edit and once more for the second (4 events seen), then the page is quiet
    assert settled and chained <= 6, f"{chained} events, {'settled' if settled else 'still sending after 30 s'}"

    from mmrlhf_lite.ui.blocks import check_one_always_last
    check_one_always_last(_page_app(chained=True))
    with pytest.raises(RuntimeError, match=r"box\.change"):
        check_one_always_last(_page_app(chained=False))
