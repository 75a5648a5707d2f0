"""End to end in a real browser: Playwright (PyPI) driving Debian's Chromium against `python app.py`.

Upload the demo data and see its preview; bad rows named by the pre-flight and skipped in one click; start,
stop and resume a run (a second tab finds the running jobs) while the tiny recipe trains to the end; the
Live tab polls only while a run can change and updates its plots in place; a run's online rounds plotted over
rounds; rename, delete and download a run's files; score answers in the playground; serve its reward model from
there and stop it; compare runs (numeric axes, lines drawn, tables that fit); chat with the policy over two turns
beside the base and export it; the Train form keeps edits; the Sharding choice follows Processes. Every request
the pages make must go to 127.0.0.1. One tiny run (`tiny-ui`, `trained` fixture) serves every test that needs a
trained model. Screenshots are taken with animations disabled; set MMRLHF_UI_SCREENSHOTS=docs to refresh
docs/ui-*.png (every tab).

    python -m pytest -q -m browser tests/test_ui_browser.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from test_ui_support import (LONG, LONG_STEPS, REPO, TINY, demo_zip, events, free_port, jobs_report, run_report,
                             start_server, stop_server, wait_for, write_recipe)

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost"]
DATA = "uploads/demo-data/demo.jsonl"

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)", allow_module_level=True)


# the Live tab's timer period in this app (app.py --poll-seconds; 1.5 s by default): a page that does not poll is
# shown by a quiet window of a few periods, shorter than with the default
POLL_S = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("ui-browser"), "--poll-seconds", str(POLL_S))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def browser():
    pw = sync_api.sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def requests_seen():
    return []


@pytest.fixture(scope="module")
def context(browser, requests_seen):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(60_000)
    ctx.on("request", lambda r: requests_seen.append(r.url))
    yield ctx
    ctx.close()


@pytest.fixture
def new_page(context, server):
    """`new_page(width, height)`: another tab on the app, loaded; closed at the end of the test whatever happens
    (an open page keeps its timers and its events going for the tests after it)."""
    opened = []

    def open_page(width: int = 1280, height: int = 900, seen: bool = False):
        p = context.new_page()
        opened.append(p)
        p.set_viewport_size({"width": width, "height": height})
        events = record_events(p) if seen else None
        p.goto(server.url)
        p.wait_for_selector("#data-file")
        return (p, events) if seen else p
    yield open_page
    for p in opened:
        if not p.is_closed():
            p.close()


@pytest.fixture
def page(new_page):
    """A tab on the app of this test's own (a page left open keeps its browser process busy for the tests after
    it: one kept over the file took a fifth of a core while later tests ran)."""
    return new_page()


@pytest.fixture
def runs_made(server):
    """Run folders a test makes (by name): removed at its end, so that every later page lists only the runs it
    needs (each page load, tab and tick reads every run folder)."""
    names: list[str] = []
    yield names
    for name in names:
        shutil.rmtree(server.runs / name, ignore_errors=True)


def quiet_dom(page, ms: int = 300, timeout: float = 15_000) -> None:
    """Wait until the page has not changed for `ms` (plots drawn, layout done) and no output is faded while an
    event that updates it is under way."""
    page.wait_for_function("""(ms) => new Promise(resolve => {
        let timer = null;
        const done = () => { obs.disconnect(); resolve(!document.querySelector('.pending')); };
        const obs = new MutationObserver(() => { clearTimeout(timer); timer = setTimeout(done, ms); });
        obs.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
        timer = setTimeout(done, ms);
    })""", arg=ms, timeout=timeout, polling=100)


def shot(page, tmp_path: Path, name: str, full_page: bool = False) -> Path:
    try:  # the plots drawn, and no output faded while an event that updates it is under way
        quiet_dom(page, 500, timeout=30_000)
    except sync_api.TimeoutError:
        pass
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page, animations="disabled")
    assert path.stat().st_size > 10_000
    target = os.environ.get("MMRLHF_UI_SCREENSHOTS")
    if target:
        shutil.copyfile(path, REPO / target / name)
    return path


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def pick(page, elem_id: str, option: str) -> None:
    """Choose an option of a gradio dropdown the way a user does; fail at once if the choice did not take."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()
    # (a single choice shows in the input; a multiselect's choices show as tokens beside it)
    until(page, f"#{elem_id}", f"el.querySelector('input')?.value == {option!r} || [...el.querySelectorAll("
                               f"'.token')].some(t => t.innerText.trim() == {option!r})", timeout=30_000)


def until(page, selector: str, condition: str, timeout: float = 60_000) -> None:
    """Wait until `condition` (JS, about element `el`) holds for the element (which may not exist yet); on a
    timeout, the failure says what the element showed."""
    try:
        page.wait_for_function(f"(() => {{ const el = document.querySelector({selector!r}); "
                               f"return !!el && ({condition}); }})()", timeout=timeout)
    except sync_api.TimeoutError:
        shown = page.evaluate("(s) => { const el = document.querySelector(s); return el ? el.innerText : null; }",
                              selector)
        raise AssertionError(f"timed out after {timeout / 1000:.0f} s waiting for {selector}: {condition}; "
                             f"it shows: {shown!r}") from None


def text(page, elem_id: str) -> str:
    """The element's text, without gradio's "processing | 0.6s" overlay while an event runs."""
    return _shown(page.locator(f"#{elem_id}").inner_text())


def texts(page, *elem_ids: str) -> list[str]:
    """Several elements' texts (as `text`) read at one moment: what the page shows together, never one element
    before an update and the next after it."""
    return [_shown(t) for t in page.evaluate("(ids) => ids.map(id => document.getElementById(id)?.innerText ?? '')",
                                             list(elem_ids))]


def _shown(inner_text: str) -> str:
    lines = inner_text.splitlines()
    return "\n".join(ln for ln in lines if not re.fullmatch(r"\s*(processing \| )?[\d./]+s\s*", ln)).strip()


def plot_state(page, elem_id: str) -> dict:
    """What the rendered vega plot shows: its axes' descriptions (vega writes "X-axis titled 'step' for a
    linear scale ..." or "... for a discrete scale with 3 values: ..."), its tick labels and, per line,
    how many points it joins (0 when it has no visible stroke)."""
    return page.evaluate("""(id) => {
        const el = document.querySelector('#' + id);
        if (!el) return {axes: [], labels: [], lines: []};
        const axes = [...el.querySelectorAll('g.role-axis')].map(a => a.getAttribute('aria-label')).filter(Boolean);
        const labels = [...el.querySelectorAll('g.role-axis-label text')].map(t => t.textContent);
        // a line is drawn when its path joins points and has a stroke colour (vega gives a series missing
        // from the plot's colour scale no stroke: there, but invisible)
        const lines = [...el.querySelectorAll('g.mark-line path')].map(p => {
            const stroke = getComputedStyle(p).stroke;
            const visible = !!stroke && stroke !== 'none' && !stroke.startsWith('rgba(0, 0, 0, 0)');
            return visible ? (p.getAttribute('d') || '').split(/[ML]/).filter(s => s.trim()).length : 0;
        });
        return {axes, labels, lines};
    }""", elem_id)


def assert_numeric_plot(page, elem_id: str, min_points: int = 2) -> dict:
    """Both axes are numeric (linear scales, every tick label a number) and a line joins `min_points`+ points."""
    deadline = 20
    state = {}
    for _ in range(deadline * 2):  # the plot redraws after its data arrive
        state = plot_state(page, elem_id)
        if len(state["axes"]) == 2 and max(state["lines"], default=0) >= min_points:
            break
        page.wait_for_timeout(500)
    axes = {a.split("-axis")[0]: a for a in state["axes"]}
    assert set(axes) == {"X", "Y"}, f"{elem_id}: axes {state['axes']}"
    for name, desc in axes.items():
        assert "linear scale" in desc, f"{elem_id}: the {name} axis is not numeric: {desc!r}"
    assert state["labels"] and all(re.fullmatch(r"[-−]?[\d.,]+(e[-+]?\d+)?[kmµ%]?", t.strip()) for t in state["labels"]), \
        f"{elem_id}: tick labels {state['labels'][:12]}"
    assert max(state["lines"], default=0) >= min_points, f"{elem_id}: no line drawn through {min_points} points: {state}"
    return state


def image_fit(page, elem_id: str) -> list[dict]:
    """For each image shown inside `elem_id`: its natural size, the box its pixels are drawn in (object-fit
    applied), and the part of that box left visible by the ancestors that clip it."""
    return page.evaluate("""(id) => {
        const root = document.querySelector('#' + id);
        return [...root.querySelectorAll('img')].filter(img => img.naturalWidth > 0).map(img => {
            const r = img.getBoundingClientRect(), fit = getComputedStyle(img).objectFit;
            const nw = img.naturalWidth, nh = img.naturalHeight;
            let w = r.width, h = r.height;
            if (fit === 'contain' || fit === 'scale-down') {
                const s = Math.min(r.width / nw, r.height / nh, fit === 'scale-down' ? 1 : Infinity);
                w = nw * s; h = nh * s;
            } else if (fit === 'cover') {
                const s = Math.max(r.width / nw, r.height / nh); w = nw * s; h = nh * s;
            } else if (fit === 'none') { w = nw; h = nh; }
            let box = {l: r.left + (r.width - w) / 2, t: r.top + (r.height - h) / 2};
            box.r = box.l + w; box.b = box.t + h;
            let vis = {l: Math.max(box.l, r.left), t: Math.max(box.t, r.top), r: Math.min(box.r, r.right), b: Math.min(box.b, r.bottom)};
            for (let a = img.parentElement; a && a !== document.body; a = a.parentElement) {
                const cs = getComputedStyle(a);
                if (cs.overflow === 'visible' && cs.overflowX === 'visible' && cs.overflowY === 'visible') continue;
                const ar = a.getBoundingClientRect();
                vis = {l: Math.max(vis.l, ar.left), t: Math.max(vis.t, ar.top), r: Math.min(vis.r, ar.right), b: Math.min(vis.b, ar.bottom)};
            }
            return {natural: [nw, nh], fit, drawn: [box.r - box.l, box.b - box.t],
                    visible: [Math.max(0, vis.r - vis.l), Math.max(0, vis.b - vis.t)]};
        });
    }""", elem_id)


def assert_all_local(requests_seen: list[str]) -> None:
    assert requests_seen
    outside = [u for u in requests_seen if urlparse(u).hostname not in ("127.0.0.1",) and not u.startswith(("data:", "blob:"))]
    assert not outside, f"the page requested outside 127.0.0.1: {outside[:5]}"


class Events(list):
    """(when, fn_index) of each event the page sent; `triggers`: the id of the component that set each off."""

    def __init__(self):
        super().__init__()
        self.triggers: list = []


def record_events(page) -> Events:
    """The events the page sends to the server (each is a POST to the queue's join): when, and which handler
    (its `fn_index`); what triggered each in `.triggers`."""
    seen = Events()

    def on_request(r):
        if r.method == "POST" and "/queue/join" in r.url:
            body = r.post_data_json or {}
            seen.append((time.time(), body.get("fn_index", -1)))
            seen.triggers.append(body.get("trigger_id"))
    page.on("request", on_request)
    return seen


def triggers_named(page, seen) -> list:
    """The last events' handlers with the elem_id (or label) of the component that triggered each."""
    names = page.evaluate("""(ids) => ids.map(id => { const c = (window.gradio_config.components || [])
        .find(c => c.id === id); return c ? (c.props.elem_id || c.props.label || c.type) : id; })""",
                          list(getattr(seen, "triggers", [])[-8:]))
    return [(fn, name) for (_, fn), name in zip(seen[-len(names):] if names else [], names)]


def tick_handlers(page) -> set[int]:
    """The `fn_index` of the handlers a timer's tick calls (from the page's own gradio config)."""
    return set(page.evaluate("window.gradio_config.dependencies.filter(d => d.targets.some(t => t[1] == 'tick'))"
                             ".map(d => d.id)"))


def settled(page, seen: list, quiet: float = 3.0, timeout: float = 120.0, outputs: str = "",
            runs: Path | None = None) -> None:
    """Wait until the page has sent no event for `quiet` seconds and no output waits for one (what the page
    load or the last action started has finished); with `outputs` (a selector list), only those outputs. With
    `runs`, a timeout says how each run's job stands (an active one keeps the Live tab's timer on)."""
    pending = ", ".join(f"{o}.pending, {o} .pending" for o in outputs.split(",")) if outputs else ".pending"
    end = time.time() + timeout
    while time.time() < end:
        page.wait_for_timeout(100)
        if (not seen or time.time() - seen[-1][0] >= quiet) and not page.locator(pending).count():
            return
    pending = page.evaluate("[...document.querySelectorAll('.pending')].map(e => e.id || e.className).slice(0, 5)")
    raise AssertionError(f"the page kept sending events for {timeout} s (the last: {seen[-5:]} at {time.time():.1f}; "
                         f"waiting for an event: {pending}; handler and trigger of the last: "
                         f"{triggers_named(page, seen)})" + (f"\n{jobs_report(runs)}" if runs else ""))


def ticks_come(page, seen: list, timeout: float = 20 * POLL_S + 10) -> None:
    """The Live tab's timer ticks: a tick event is sent from now on (within `timeout`, a loaded machine's)."""
    ticks, t0 = tick_handlers(page), time.time()
    end = t0 + timeout
    while time.time() < end:
        if any(t >= t0 and fn in ticks for t, fn in seen):
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"no timer tick in {timeout} s: {[(round(t - t0, 2), fn) for t, fn in seen[-8:]]}")


def no_events(page, seen: list, seconds: float = 3 * POLL_S) -> int:
    """How many events the page sends in `seconds` (three timer periods) once what the last action started has
    finished (a timer that still ticks never lets it settle, and would tick in the window)."""
    settled(page, seen, quiet=2 * POLL_S, timeout=30.0)
    t0 = time.time()
    page.wait_for_timeout(seconds * 1000)
    return sum(t >= t0 for t, _ in seen)


def text_lines(page, selector: str) -> list[dict]:
    """For each element matching `selector`: its text and the lines the browser laid it out in (characters
    grouped by the top of their boxes), its right edge, and whether its content is cut off."""
    return page.evaluate(r"""(sel) => [...document.querySelectorAll(sel)].map(el => {
        const chars = [];
        const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            const range = document.createRange();
            for (let i = 0; i < node.length; i++) {
                range.setStart(node, i); range.setEnd(node, i + 1);
                const box = [...range.getClientRects()].find(b => b.width > 0);
                if (box) chars.push([box.top, box.left, node.data[i]]);
            }
        }
        const lines = [];
        let top = null;
        for (const [t, l, c] of chars) {
            if (top === null || t > top + 6) { lines.push(''); top = t; }
            lines[lines.length - 1] += c;
        }
        const r = el.getBoundingClientRect();
        return {text: el.innerText.trim(), lines, right: r.right, window: window.innerWidth,
                clipped: el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1};
    })""", selector)


def assert_whole_words(cells: list[dict], what: str) -> None:
    """Every line holds whole words (a word, letters and digits, is never split over two lines; a line break
    after a hyphen, between the parts of a compound, is one), and at least one of them."""
    for c in cells:
        words = re.findall(r"[\w+]+", c["text"])
        per_line = [re.findall(r"[\w+]+", ln) for ln in c["lines"]]
        assert all(per_line) and sum(per_line, []) == words, f"{what}: {c['text']!r} laid out as {c['lines']}"


def sleeping_job(run: Path, started: float):
    """A live process whose command line names mmrlhf_lite.train, recorded as the run's job (what the app
    checks a job's pid against): an active run without the cost of training one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "mmrlhf_lite.train"])
    wait_for(lambda: b"mmrlhf_lite.train" in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 10, interval=0.01)
    (run / "ui_job.json").write_text(json.dumps({"pid": proc.pid, "started": started}))
    return proc


def fake_run(runs: Path, name: str, events: list[dict], report: bool = False) -> Path:
    """A run folder as the app reads it: the demo recipe, events, a console log (and an evaluation report)."""
    import yaml

    run = runs / name
    (run / "eval").mkdir(parents=True, exist_ok=True)
    tree = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    tree["run"]["dir"] = str(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "console.log").write_text(f"=== launched: {name}\n[reward] step=1 loss=0.69\n")
    if report:
        (run / "eval" / "report.md").write_text(f"# {name}\n\nAcc 75.0%\n")
    return run


def _made_run(server, name: str, tree: dict) -> Path:
    """Run `name` of recipe `tree`, made from the browser by test_train_watch_stop_resume; when that test did not
    run (a test picked alone, or the file split over workers), made here by the CLI; once done."""
    run = server.runs / name
    if not run.exists():
        if not (server.data / DATA).exists():
            from mmrlhf_lite.data.demo import write_demo
            write_demo(server.data / Path(DATA).parent, groups=20, seed=0)
        recipe = write_recipe(server.root / f"{name}.yaml", tree)
        subprocess.run([sys.executable, "-m", "mmrlhf_lite.train", str(recipe), f"data.path={server.data / DATA}",
                        f"run.dir={run}", "--quiet"], check=True, timeout=900, cwd=str(REPO))
    from mmrlhf_lite.ui import jobs
    wait_for(lambda: jobs.job_state(run).status == "done", 600, interval=1, what=f"{name} done")
    return run


@pytest.fixture(scope="module")
def trained(server):
    """The tiny recipe's run `tiny-ui`, trained through every stage."""
    return _made_run(server, "tiny-ui", TINY)


@pytest.fixture(scope="module")
def long_trained(server):
    """The long recipe's run `long-ui` (reward only), the second run the Compare tab compares."""
    return _made_run(server, "long-ui", LONG)


def test_upload_shows_validation_stats_and_groups(page, server, tmp_path, requests_seen):
    until(page, "#data-summary", "el.innerText.includes('create the demo set')")
    assert "secondary" in page.locator("#use-data").get_attribute("class")  # no data yet: not the primary action
    page.locator("#upload input[type=file]").set_input_files(str(demo_zip(tmp_path)))
    until(page, "#data-summary", "el.innerText.includes('20 groups')")
    summary = text(page, "data-summary")
    assert "demo-data/demo.jsonl — 20 groups from 20 rows (ranked); no problems found." in summary
    assert page.locator("#data-file input").input_value() == DATA
    until(page, "#use-data", "el.classList.contains('primary')")
    assert page.locator("#group-images img").count() >= 1
    assert "demo-00000" in text(page, "group-question")
    page.wait_for_function("document.querySelector('#group-images img')?.naturalWidth > 0")
    quiet_dom(page)  # laid out at its size
    for img in image_fit(page, "group-images"):  # the whole image is visible, undistorted, and not tiny
        (nw, nh), (w, h), (vw, vh) = img["natural"], img["drawn"], img["visible"]
        assert abs(w / h - nw / nh) < 0.02, f"image drawn distorted: {img}"
        assert vw >= w - 1 and vh >= h - 1, f"image cropped: only {vw:.0f}x{vh:.0f} of {w:.0f}x{h:.0f} visible: {img}"
        assert min(w, h) >= 200, f"image shown too small: {img}"
    assert "Pairs training forms (6; better > worse)" in text(page, "group-pairs")
    responses = text(page, "group-responses")
    assert "rank" in responses and "critique (data)" in responses
    # Prev / Next, and within one category
    page.locator("#group-next").click()
    until(page, "#group-question", "el.innerText.includes('demo-00001')")
    page.locator("#group-prev").click()
    until(page, "#group-question", "el.innerText.includes('demo-00000')")
    page.locator("#group-category input").click()
    options = [o.strip().splitlines()[-1].strip() for o in page.get_by_role("option").all_inner_texts()]  # no "✓"
    assert options[0] == "(all)" and len(options) >= 3, options
    cat = options[2]
    page.get_by_role("option", name=cat, exact=True).click()
    until(page, "#group-question", f"el.innerText.includes(' · {cat} · ')")
    first = re.search(r"demo-\d+", text(page, "group-question")).group(0)
    page.locator("#group-next").click()
    until(page, "#group-question", f"!el.innerText.includes('{first}') && el.innerText.includes(' · {cat} · ')")
    # the validation report as a CSV
    page.locator("#report-csv-make").click()
    until(page, "#report-csv", "!!el.querySelector('a[download=\"demo-validation-report.csv\"]')")
    csv_text = page.request.get(page.locator("#report-csv a[download]").get_attribute("href")).text()
    assert csv_text.splitlines()[0] == "where,problem,how to fix", csv_text[:200]
    page.locator("#group-prev").click()
    until(page, "#group-question", f"el.innerText.includes('{first}')")
    shot(page, tmp_path, "ui-data.png", full_page=True)
    assert_all_local(requests_seen)



def bad_rows_zip(tmp: Path) -> Path:
    """The demo set as `my_pairs.jsonl` in a .zip with its images, line 5 malformed and line 10's image missing."""
    import zipfile

    from mmrlhf_lite.data.demo import write_demo

    data = write_demo(tmp / "bad-src", groups=20, seed=0)
    lines = data.read_text().splitlines()
    lines[4] = '{"id": "broken", "prompt": '
    lines[9] = lines[9].replace("images/", "images/missing-")
    out = tmp / "my_pairs.zip"
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("my_pairs.jsonl", "\n".join(lines) + "\n")
        for f in sorted((data.parent / "images").iterdir()):
            zf.write(f, f"images/{f.name}")
    return out


def test_bad_rows_are_named_by_the_preflight_and_skipped_in_one_click(page, runs_made, server, tmp_path):
    """A .zip whose data has a malformed line and a missing image: the Data tab lists both (its report in its
    box), "Train on this data" carries its choice about them; without the skip the pre-flight names both rows,
    Start stays disabled, and one click sets `data.on_error: skip`. A taken run name is the pre-flight's too,
    and a Start refused anyway says why in its status line (no "Error" badge over an old line)."""
    tab(page, "1 · Data")
    page.locator("#upload input[type=file]").set_input_files(str(bad_rows_zip(tmp_path)))
    until(page, "#data-summary", "el.innerText.includes('my_pairs.jsonl') && el.innerText.includes('2 row(s) skipped')")
    until(page, "#data-problems", "el.innerText.includes('my_pairs.jsonl:10')")
    # the report fits its box: every cell, "how to fix" included, in view and not cut off
    cells = text_lines(page, "#data-problems [role=gridcell]")
    box = page.evaluate("document.querySelector('#data-problems').getBoundingClientRect().right")
    assert len(cells) >= 6 and all(c["right"] <= box + 1 and not c["clipped"] for c in cells), cells
    assert any("fix the JSON" in c["text"] for c in cells)
    shot(page, tmp_path, "ui-data-bad-rows.png", full_page=True)
    # the Data tab offers to train without them; without that choice the pre-flight refuses and says why
    page.wait_for_selector("#data-skip-bad", state="visible")
    page.locator("#data-skip-bad input").uncheck()
    page.locator("#use-data").click()
    until(page, "#f-data-path textarea", "el.value == 'uploads/my_pairs/my_pairs.jsonl'")
    until(page, "#train-estimate", "el.innerText.includes('cannot start')")
    estimate = text(page, "train-estimate")
    assert "2 bad data row(s) (data.path: 1 malformed json, 1 missing image), first at " \
           "uploads/my_pairs/my_pairs.jsonl:5, uploads/my_pairs/my_pairs.jsonl:10" in estimate, estimate
    assert not page.locator("#start").is_enabled()
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, tmp_path, "ui-train-preflight.png")
    page.locator("#skip-bad-rows").click()
    until(page, "#train-estimate", "el.innerText.includes('plan OK')")
    assert page.locator("#start").is_enabled() and "on_error: skip" in page.locator("#train-yaml textarea").input_value()
    assert "data: 16 train / 2 held-out groups" in text(page, "train-estimate")  # the 18 good ones
    # "Train on this data" with the Data tab's choice to skip: the pre-flight accepts at once
    tab(page, "1 · Data")
    page.locator("#data-skip-bad input").check()
    page.locator("#use-data").click()
    until(page, "#train-estimate", "el.innerText.includes('plan OK')")
    assert "on_error: skip" in page.locator("#train-yaml textarea").input_value()
    # a run name that is taken: said by the pre-flight, Start disabled
    runs_made.extend(["taken-run", "race-run"])
    fake_run(server.runs, "taken-run", [{"time": 1.0, "type": "run_start", "stages": ["eval"], "skip": []},
                                        {"time": 2.0, "type": "run_end", "status": "done"}])
    page.locator("#run-name textarea").fill("taken-run")
    until(page, "#train-estimate", "el.innerText.includes(\"run name 'taken-run' is taken\")")
    assert not page.locator("#start").is_enabled()
    # the folder appears after the pre-flight accepted the name: Start says why in its status line
    page.locator("#run-name textarea").fill("race-run")
    until(page, "#train-estimate", "el.innerText.includes('plan OK')")
    until(page, "#start", "!el.disabled")
    (server.runs / "race-run").mkdir()
    (server.runs / "race-run" / "recipe.yaml").write_text("model: {}\n")
    page.locator("#start").click()
    until(page, "#train-status", "el.innerText.includes('Not started')")
    status = text(page, "train-status")
    assert "run 'race-run' already exists" in status and not status.startswith("Error"), status
    assert page.locator("#train-status .error").count() == 0
    assert page.get_by_role("tab", name="2 · Train").get_attribute("aria-selected") == "true"

def test_train_watch_stop_resume(page, new_page, server, tmp_path, requests_seen):
    # run 1: reward only, long enough to stop; the data path typed into the form
    page.evaluate("window.scrollTo(0, 0)")
    tab(page, "2 · Train")
    pick(page, "recipe", "long.yaml")
    until(page, "#run-name textarea", "el.value.startsWith('long-')")
    page.locator("#f-data-path textarea").fill(DATA)
    page.locator("#run-name textarea").fill("long-ui")
    until(page, "#start", "!el.disabled")  # the pre-flight accepted the form
    page.locator("#start").click()
    until(page, "#run-status", "el.innerText.includes('long-ui')")
    assert page.get_by_role("tab", name="3 · Live").get_attribute("aria-selected") == "true"

    # a second tab finds the job running (its state lives in the run folder)
    other = new_page()
    tab(other, "3 · Live")
    until(other, "#jobs", "el.innerText.includes('long-ui')")
    assert re.search(r"long-ui\s+(starting|running)", text(other, "jobs")), text(other, "jobs")
    other.close()

    # stop it once it trains (its first curve point written; waiting for the page to draw it first took up to
    # 15 s under load, most of the run), from the live view
    wait_for(lambda: any(e.get("type") == "metrics" and e.get("stage") == "reward"
                         for e in events(server.runs / "long-ui")), 240, interval=0.1,
             what="long-ui's first reward point", detail=lambda: run_report(server.runs, "long-ui"))
    page.locator("#stop").click()
    until(page, "#run-status", "el.innerText.includes('status: stopped')", timeout=180_000)
    assert "stopped after" in text(page, "run-progress")
    stopped_points = text(page, "curve-points")
    # this page opened before any run existed: its curves must still be numeric, with lines
    assert_numeric_plot(page, "plot-reward_loss", min_points=1)

    # a reloaded page finds the stopped run and resumes it
    page.reload()
    page.wait_for_selector("#data-file")
    tab(page, "3 · Live")
    pick(page, "live-run", "long-ui")
    until(page, "#run-status", "el.innerText.includes('long-ui') && el.innerText.includes('status: stopped')")
    assert page.locator("#resume").is_enabled() and not page.locator("#stop").is_enabled()
    page.locator("#resume").click()
    until(page, "#run-action", "el.innerText.includes('Resumed long-ui')")

    # run 2: the tiny recipe on the uploaded data, every stage (recipe first, then "Train on this data"),
    # started while run 1 trains on; every status the Live tab shows for it is recorded
    page.evaluate("""() => { window.mmStatuses = []; const el = document.querySelector('#run-status');
        new MutationObserver(() => { const t = el.innerText;
            if (t.includes('tiny-ui') && window.mmStatuses[window.mmStatuses.length - 1] !== t) window.mmStatuses.push(t);
        }).observe(el, {subtree: true, childList: true, characterData: true}); }""")
    tab(page, "2 · Train")
    pick(page, "recipe", "tiny.yaml")
    until(page, "#run-name textarea", "el.value.startsWith('tiny-')")
    tab(page, "1 · Data")
    pick(page, "data-file", DATA)
    page.locator("#use-data").click()
    until(page, "#f-data-path textarea", f"el.value == '{DATA}'")
    page.locator("#run-name textarea").fill("tiny-ui")
    until(page, "#train-estimate", "el.innerText.includes('plan OK')")
    until(page, "#start", "!el.disabled")
    page.locator("#start").click()
    until(page, "#run-status", "el.innerText.includes('tiny-ui')")
    # the new run is shown without run 1's "Resumed ..." line under it
    assert text(page, "run-action") == "", text(page, "run-action")

    # run 1's curves gain points in view until it is done
    pick(page, "live-run", "long-ui")
    seen = [stopped_points]

    shown = {}

    def done():
        points, status = texts(page, "curve-points", "run-status")  # (one moment: both of the same run)
        shown.update(points=points, status=status)
        if "long-ui" in status and points != seen[-1] and re.search(r"reward \d+", points):
            seen.append(points)  # (while the pick is under way the view may still be run 2's)
        return "long-ui" in status and "status: done" in status
    wait_for(done, 300, interval=0.3, what="long-ui done",
             detail=lambda: f"the page shows {shown}\n{run_report(server.runs, 'long-ui', 'tiny-ui')}")
    until(page, "#curve-points", f"el.innerText.includes('reward {LONG_STEPS}')")
    if text(page, "curve-points") != seen[-1]:
        seen.append(text(page, "curve-points"))
    counts = [int(re.search(r"reward (\d+)", s).group(1)) for s in seen]
    assert counts == sorted(counts) and counts[-1] == LONG_STEPS and len(counts) >= 2, f"curves did not grow in view: {seen}"
    # (the log box shows the newest 60 lines: a 60-step run's resume line has scrolled out; the run's log has it)
    assert "resuming from" in (server.runs / "long-ui" / "console.log").read_text(errors="replace")
    # the stopped stage's time is the sum of its two pieces (the stop's and the resumed one's)
    until(page, "#run-progress", "el.innerText.includes('in 2 pieces (Stop + Resume)')")

    # run 2 ran all the while: every stage done, curves of both trainers
    pick(page, "live-run", "tiny-ui")
    until(page, "#run-status", "el.innerText.includes('tiny-ui') && el.innerText.includes('status: done')",
          timeout=300_000)
    until(page, "#curve-points", "el.innerText.includes('dpo')")
    assert "Curve points: reward 3, dpo 3" in text(page, "curve-points")
    assert text(page, "run-progress").count("done in") == 5
    assert page.locator("#plot-beta canvas, #plot-beta svg").count() >= 1
    for name in ("reward_loss", "reward_acc", "dpo_loss", "dpo_acc", "margins", "beta"):
        assert_numeric_plot(page, f"plot-{name}")
    # its statuses came in order: starting, running, done (never back to starting while it finished)
    order = ["starting", "running", "done"]
    shown = [re.search(r"status: (\w+)", t).group(1) for t in page.evaluate("window.mmStatuses")]
    assert shown and shown[-1] == "done" and all(s in order for s in shown), shown
    assert [order.index(s) for s in shown] == sorted(order.index(s) for s in shown), shown
    # the DPO tokens/s plot names its unit on the y axis
    axes = plot_state(page, "plot-tokens")["axes"]
    assert any(a.startswith("Y-axis titled 'tokens/s'") for a in axes), axes
    # the final-evaluation card, and the log box showing its newest line
    until(page, "#run-eval", "!!el.querySelector('.mm-eval')")
    card = text(page, "run-eval")
    assert "Final evaluation" in card and "without any critique" in card and "implicit reward accuracy" in card, card
    scroll = page.evaluate("(() => { const t = document.querySelector('#run-log textarea'); "
                           "return [t.scrollTop, t.clientHeight, t.scrollHeight]; })()")
    assert scroll[2] > scroll[1] and scroll[0] + scroll[1] >= scroll[2] - 2, f"log not at its newest line: {scroll}"
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, tmp_path, "ui-run.png", full_page=True)
    assert_all_local(requests_seen)


def set_visibility(page, state: str) -> None:
    """The browser tab hidden or shown, as the page's script sees it (`visibilitychange`)."""
    page.evaluate("""(state) => { Object.defineProperty(document, 'visibilityState', {configurable: true,
        get: () => state}); document.dispatchEvent(new Event('visibilitychange')); }""", state)


def test_live_tab_polls_only_while_a_run_can_change_and_updates_plots_in_place(new_page, runs_made, server, trained):
    """A finished run on the Live tab: no request at all. An active run (a live job process whose events the
    test writes as a trainer would): the timer ticks while the Live tab is shown, and not while another tab
    is, nor while the browser tab is hidden; new points reach the same plot element, one held-out point is
    drawn as a mark, the ETA follows the recent pace; when the job is gone the timer stops by itself."""
    p, seen = new_page(1400, 1000, seen=True)
    # the page load's own events are done: the Train tab's pre-flight has answered (on a server that just
    # started, the first one takes seconds, and the form's next one is sent only then)
    tab(p, "2 · Train")
    until(p, "#train-estimate", "!el.innerText.includes('Pre-flight: ...')", timeout=120_000)
    tab(p, "3 · Live")
    pick(p, "live-run", "tiny-ui")
    until(p, "#run-status", "el.innerText.includes('tiny-ui') && el.innerText.includes('status: done')")
    settled(p, seen, runs=server.runs)
    assert no_events(p, seen) == 0, "a finished run's Live tab polled"

    t0 = time.time()
    runs_made.append("live-fake")
    run = fake_run(server.runs, "live-fake", [{"time": t0 + 1, "type": "run_start", "stages": ["reward"], "skip": []},
                                              {"time": t0 + 1, "type": "stage_start", "stage": "reward"}])

    def append(*events):
        with open(run / "events.jsonl", "a") as fh:
            fh.write("".join(json.dumps(e) + "\n" for e in events))

    job = sleeping_job(run, t0)
    try:
        pick(p, "live-run", "live-fake")
        until(p, "#run-status", "el.innerText.includes('live-fake') && el.innerText.includes('status: running')")
        ticks_come(p, seen)  # the Live tab of a running job polls
        tab(p, "1 · Data")
        assert no_events(p, seen) == 0, "polled while another tab was shown"
        tab(p, "3 · Live")
        ticks_come(p, seen)
        set_visibility(p, "hidden")
        assert no_events(p, seen) == 0, "polled while the browser tab was hidden"
        set_visibility(p, "visible")
        ticks_come(p, seen)

        # two train-accuracy points and one held-out point: the held-out one is drawn as a mark
        append({"time": t0 + 2, "type": "metrics", "stage": "reward", "step": 30, "pair_accuracy": 0.6},
               {"time": t0 + 3, "type": "metrics", "stage": "reward", "step": 60, "pair_accuracy": 0.7},
               {"time": t0 + 3, "type": "metrics", "stage": "reward", "step": 60, "eval_pair_accuracy_given": 0.972})
        # (the plot's own marks, one per point: `role-mark`; the legend's symbols are `role-legend-symbol`)
        marks = ("[...document.querySelectorAll('#plot-reward_acc g.mark-symbol.role-mark path')].filter(m => {"
                 "const b = m.getBoundingClientRect(); return b.width >= 3 && getComputedStyle(m).opacity !== '0'; })")
        p.wait_for_function(f"{marks}.length == 3", timeout=30_000)
        assert max(plot_state(p, "plot-reward_acc")["lines"]) == 2
        p.evaluate("document.querySelector('#plot-reward_acc svg').mmSame = true")
        append({"time": t0 + 4, "type": "metrics", "stage": "reward", "step": 90, "pair_accuracy": 0.75},
               {"time": t0 + 5, "type": "metrics", "stage": "reward", "step": 120, "pair_accuracy": 0.8})
        wait_for(lambda: max(plot_state(p, "plot-reward_acc")["lines"], default=0) == 4, 30, what="new points drawn")
        assert p.evaluate("document.querySelector('#plot-reward_acc svg').mmSame === true"), "the plot was re-created"

        # 5 steps of 1 s, then 6 of 10 s: 9 steps left at the recent pace are 90 s away
        tp = t0 + 10
        progress = []
        for n in range(1, 12):
            tp += 1.0 if n <= 5 else 10.0
            progress.append({"time": tp, "type": "progress", "stage": "reward", "n": n, "total": 20, "unit": "step"})
        append(*progress)
        until(p, "#run-progress", "el.innerText.includes('11/20 steps · 10.0 s/step · ETA 1m30s')", timeout=30_000)
        # the job ends while the browser tab is hidden (no polling then) ...
        set_visibility(p, "hidden")
    finally:
        job.kill()
        job.wait()
    assert no_events(p, seen) == 0, "polled while the browser tab was hidden"
    assert "status: running" in text(p, "run-status")
    # ... shown again, the page catches up at once: the job is gone (no run_end: interrupted), and the timer,
    # with no run left to follow, stays off (before, the page stayed on "running" for good)
    set_visibility(p, "visible")
    until(p, "#run-status", "el.innerText.includes('live-fake') && el.innerText.includes('interrupted')",
          timeout=30_000)
    assert no_events(p, seen) == 0, "still polling after the last job ended"


def test_runs_are_renamed_deleted_and_their_files_downloaded(new_page, runs_made, server):
    """Rename and delete (after a confirmation) a finished run, never a running one; download its log and report."""
    p = new_page(1400, 1000)
    runs_made.extend(["to-rename", "renamed-run", "busy-run"])
    t0 = time.time()
    finished = [{"time": t0, "type": "run_start", "stages": ["eval"], "skip": []},
                {"time": t0 + 1, "type": "run_end", "status": "done"}]
    fake_run(server.runs, "to-rename", finished, report=True)
    busy = fake_run(server.runs, "busy-run", finished[:1])
    job = sleeping_job(busy, t0 - 1)
    try:
        tab(p, "3 · Live")
        pick(p, "live-run", "busy-run")
        until(p, "#run-status", "el.innerText.includes('busy-run') && el.innerText.includes('status: running')")
        assert not p.locator("#rename").is_enabled() and not p.locator("#delete").is_enabled()
    finally:
        job.kill()
        job.wait()
    pick(p, "live-run", "to-rename")
    until(p, "#run-status", "el.innerText.includes('to-rename') && el.innerText.includes('status: done')")
    until(p, "#rename", "!el.disabled")
    p.locator("#rename-to textarea").fill("renamed-run")
    p.locator("#rename").click()
    until(p, "#run-action", "el.innerText.includes(\"Renamed run 'to-rename' to 'renamed-run'\")")
    until(p, "#live-run input", "el.value == 'renamed-run'")
    assert not (server.runs / "to-rename").exists() and (server.runs / "renamed-run" / "events.jsonl").exists()
    until(p, "#run-status", "el.innerText.includes('renamed-run') && el.innerText.includes('status: done')")
    # its log and report, to download
    p.locator("#run-files-make").click()
    until(p, "#run-files", "el.querySelectorAll('a[download]').length == 2")
    links = {a.get_attribute("download"): a.get_attribute("href") for a in p.locator("#run-files a[download]").all()}
    assert set(links) == {"renamed-run-console.log", "renamed-run-report.md"}, links
    assert p.request.get(links["renamed-run-report.md"]).text() == "# to-rename\n\nAcc 75.0%\n"
    # delete: asked first; Cancel keeps it
    p.locator("#delete").click()
    until(p, "#delete-notice", "el.innerText.includes('Delete run renamed-run?')")
    assert "cannot be undone" in text(p, "delete-notice")
    p.locator("#delete-cancel").click()
    p.wait_for_selector("#delete-confirm", state="hidden")
    assert (server.runs / "renamed-run").exists()
    p.locator("#delete").click()
    p.locator("#delete-confirm").click()
    until(p, "#run-action", "el.innerText.includes(\"Deleted run 'renamed-run'\")")
    assert not (server.runs / "renamed-run").exists()
    p.locator("#live-run input").click()
    assert "renamed-run" not in " ".join(p.get_by_role("option").all_inner_texts())
    p.keyboard.press("Escape")


def test_live_tab_plots_online_rounds_over_rounds(new_page, runs_made, server):
    """A run with online rounds (its events written as the rounds stage writes them, rounds 0 to 10): the Live
    tab's rounds section plots each metric over rounds, the x axis titled "round" with one tick per round in
    numeric order ("10" last), each legend naming its metrics, every point marked (round 0 has no samples: the
    sampled series start at round 1)."""
    t0 = time.time()
    events = [{"time": t0, "type": "run_start", "stages": ["rounds"], "skip": []},
              {"time": t0, "type": "stage_start", "stage": "rounds"}]
    for r in range(11):
        numbers = {"rounds_right_answers": 0.3 + r / 50, "rounds_well_formed": 0.5 + r / 40,
                   "rounds_implicit_accuracy": 0.66, "rounds_reward_rank": 2.2 - r / 10, "rounds_reward_score": -49 + r}
        if r:
            numbers.update(rounds_sampled_reward_score=-50 + r, rounds_sampled_right_answers=0.3,
                           rounds_sampled_well_formed=0.9, rounds_sampled_empty=0.0,
                           rounds_sampled_ranker_right=0.6 + r / 100, rounds_sampled_best_right=0.7,
                           rounds_groups=40 + r, rounds_pairs=120 + r, rounds_dropped_degenerate=30,
                           rounds_dropped_tied=20 - r, rounds_dropped_unknown=5)
            events.append({"time": t0 + r, "type": "metrics", "stage": "rounds", "round": r, "part": "dpo",
                           "step": 10, "loss": 1.5})
        events.append({"time": t0 + r + 0.5, "type": "metrics", "stage": "rounds", "step": r, "round": r, **numbers})
    events += [{"time": t0 + 12, "type": "stage_end", "stage": "rounds", "status": "done", "seconds": 12.0},
               {"time": t0 + 12, "type": "run_end", "status": "done"}]
    runs_made.append("rounds-fake")
    fake_run(server.runs, "rounds-fake", events)
    p = new_page(1400, 1000)
    tab(p, "3 · Live")
    pick(p, "live-run", "rounds-fake")
    until(p, "#rounds-curves", "el.offsetParent !== null")
    rounds = [str(r) for r in range(11)]
    legend = ("(id) => [...document.querySelectorAll('#' + id + ' g.role-legend-label text')]"
              ".map(t => t.textContent)")
    for elem_id, series, points in (("plot-rounds_held_out", ["right answers", "well-formed", "implicit accuracy"], 33),
                                    ("plot-rounds_reward", ["held-out answers", "sampled answers"], 21),
                                    # the ranker check: the reward model on the policy's own answers
                                    ("plot-rounds_sampled", ["right answers", "well-formed", "empty",
                                                             "reward model: right > wrong",
                                                             "reward model's top answer right"], 50),
                                    # what the round trained on, and what it dropped (unknown: rounds.ranker answer)
                                    ("plot-rounds_groups", ["groups", "pairs", "dropped: degenerate", "dropped: tied",
                                                            "dropped: answer unknown"], 50)):
        marks = (f"[...document.querySelectorAll('#{elem_id} g.mark-symbol.role-mark path')].filter(m => {{"
                 "const b = m.getBoundingClientRect(); return b.width >= 3 && getComputedStyle(m).opacity !== '0'; })")
        p.wait_for_function(f"{marks}.length == {points}", timeout=30_000)
        state = plot_state(p, elem_id)
        x_axis = next(a for a in state["axes"] if a.startswith("X-axis"))
        shown = rounds if elem_id in ("plot-rounds_held_out", "plot-rounds_reward") else rounds[1:]   # samples: round 1 on
        assert x_axis.startswith(f"X-axis titled 'round' for a discrete scale with {len(shown)} values: "
                                 f"{', '.join(shown[:3])}"), x_axis
        assert state["labels"][:len(shown)] == shown, state["labels"]
        assert p.evaluate(legend, elem_id) == series


def test_playground_scores_answers_and_compare(page, server, trained, long_trained, tmp_path, requests_seen):
    tab(page, "4 · Reward playground")
    pick(page, "pg-run", "tiny-ui")
    page.locator("#pg-image input[type=file]").set_input_files(
        str(server.data / "uploads/demo-data/images/demo-00003.png"))
    page.locator("#pg-question textarea").fill("What shape is the object?")
    page.locator("#pg-answer-1 textarea").fill("It is a circle.")
    page.locator("#pg-answer-2 textarea").fill("It is a square.")
    page.locator("#pg-score").click()
    until(page, "#pg-cards", "el.querySelectorAll('.mm-card').length == 2", timeout=180_000)
    ranks = sorted(int(page.locator("#pg-cards .mm-card").nth(i).get_attribute("data-rank")) for i in range(2))
    assert ranks == [1, 2]
    assert "Critique:" in text(page, "pg-cards") and "score" in text(page, "pg-cards")
    assert "tiny random-init demo model" in text(page, "pg-notice")
    # the scores table fits: headers in whole words, no cell cut off or beyond its box
    assert_whole_words(text_lines(page, "#pg-table th span.header"), "playground table header")
    cells = text_lines(page, "#pg-table [role=gridcell]")
    box = page.evaluate("document.querySelector('#pg-table').getBoundingClientRect().right")
    assert cells and all(c["right"] <= box + 1 and not c["clipped"] for c in cells), cells
    shot(page, tmp_path, "ui-playground.png", full_page=True)

    pick(page, "cache-run", "tiny-ui")
    page.locator("#cache-show").click()
    until(page, "#cache-summary", "el.innerText.includes('pairs in 20 groups')")

    tab(page, "5 · Compare runs")
    pick(page, "cmp-runs", "tiny-ui")
    pick(page, "cmp-runs", "long-ui")
    page.locator("#cmp-go").click()
    until(page, "#cmp-table", "el.innerText.includes('none yet')")
    table = text(page, "cmp-table")  # a row per metric, a column per run
    assert re.search(r"status\s+done\s+done", table) and re.search(r"Acc \(none\)\s+\d+\.\d%\s+-", table), table
    assert_numeric_plot(page, "cmp-plot")  # the overlaid curves: numeric axes, tiny-ui's 3 DPO points joined
    until(page, "#cmp-diff", "el.innerText.includes('reward.train.max_steps')")
    diff = text(page, "cmp-diff")
    assert "run.stages" in diff and "model.path" not in diff, diff  # tiny vs long differ in these, share the model
    shot(page, tmp_path, "ui-compare.png", full_page=True)
    assert_all_local(requests_seen)


def test_playground_serves_the_reward_model_and_stops_it(new_page, server, trained):
    """Serve this reward model: the exact command with the port typed in, "starting" then "serving" (and then
    no more polling), the URL and the examples; a second tab finds it serving on that port and stops it: the
    state says stopped and the port is free."""
    from mmrlhf_lite.ui import serving

    port = free_port()
    p, seen = new_page(seen=True)
    tab(p, "4 · Reward playground")
    pick(p, "pg-run", "tiny-ui")
    until(p, "#pg-serve-state", "el.innerText.includes('State: not serving run tiny-ui')")
    box = p.locator("#pg-serve-port input")
    box.fill(str(port))
    box.blur()
    command = f"{sys.executable} -m mmrlhf_lite.serve {trained} --host 127.0.0.1 --port {port}"
    until(p, "#pg-serve-usage", f"el.innerText.includes({command!r})")
    p.locator("#pg-serve").click()
    until(p, "#pg-serve-state", f"el.innerText.includes('State: serving at http://127.0.0.1:{port}')",
          timeout=180_000)
    usage = text(p, "pg-serve-usage")
    assert command in usage and f"URL: http://127.0.0.1:{port}" in usage, usage
    assert f"curl -s http://127.0.0.1:{port}/score" in usage and f'httpx.post("http://127.0.0.1:{port}/score"' in usage
    assert serving.health(port)["model"] == str(trained)
    assert no_events(p, seen, 2.0) == 0, "the page still polls a service that serves"

    other = new_page()  # a second tab (or a reloaded page) finds the service, and stops it
    tab(other, "4 · Reward playground")
    pick(other, "pg-run", "tiny-ui")
    until(other, "#pg-serve-state", f"el.innerText.includes('State: serving at http://127.0.0.1:{port}')")
    assert other.locator("#pg-serve-port input").input_value() == str(port)
    other.locator("#pg-serve-stop").click()
    until(other, "#pg-serve-state", f"el.innerText.includes('State: stopped (it served on port {port})')")
    assert not serving.port_in_use(port) and serving.service_state(trained).status == "stopped"


FRESH_LOAD = """
import sys
sys.modules["mmrlhf_lite"] = None  # the project cannot be imported here
from transformers import AutoModelForImageTextToText
m = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
print("LOADED", type(m).__name__, m.dtype)
"""


def test_policy_tab_chats_over_two_turns_beside_the_base_and_exports(page, server, trained, tmp_path,
                                                                   requests_seen):
    """Ask both models about an image (shown in both chats, not as a file name), the aligned policy's answer
    streaming in the browser in many steps; a second question continues each model's conversation. Export the
    adapter (its real path as code, a .zip to download) and the merged policy (loaded by transformers in a
    process that cannot import the project; where it is, no download)."""
    tab(page, "6 · Policy")
    pick(page, "pol-run", "tiny-ui")
    until(page, "#pol-notice", "el.innerText.includes('tiny random-init demo model')")
    page.locator("#pol-message input[type=file]").set_input_files(
        str(server.data / "uploads/demo-data/images/demo-00003.png"))
    page.wait_for_function("document.querySelector('#pol-message img')?.naturalWidth > 0")
    page.locator("#pol-message textarea").fill("What shape is the object?")
    page.locator("#pol-max-new input").fill("24")
    # every text the aligned policy's answer shows in the page as it streams
    page.evaluate("""() => { window.mmSeen = []; const root = document.querySelector('#pol-policy');
        new MutationObserver(() => { const bots = root.querySelectorAll('[data-testid=bot]');
            const t = bots.length ? bots[bots.length - 1].innerText.trim() : '';
            if (t && window.mmSeen[window.mmSeen.length - 1] !== t) window.mmSeen.push(t);
        }).observe(root, {subtree: true, childList: true, characterData: true}); }""")
    page.locator("#pol-ask").click()
    until(page, "#pol-scores", "el.querySelectorAll('.mm-card').length == 2", timeout=180_000)

    def answers(elem_id):
        return [b.inner_text().strip() for b in page.locator(f"#{elem_id} [data-testid=bot]").all()]
    base, aligned = answers("pol-base")[-1], answers("pol-policy")[-1]
    assert base and aligned, (base, aligned)
    steps = {s for s in page.evaluate("window.mmSeen") if 0 < len(s) < len(aligned) and aligned.startswith(s)}
    assert len(steps) >= 5, f"the answer reached the page in {len(steps)} partial steps: {page.evaluate('window.mmSeen')}"
    # the image asked about is in both chats, as a picture
    for elem_id in ("pol-base", "pol-policy"):
        page.wait_for_function(f"[...document.querySelectorAll('#{elem_id} [data-testid=user] img')]"
                               ".some(i => i.naturalWidth > 0)")
    assert "Base model · score" in text(page, "pol-scores") and "Aligned policy · score" in text(page, "pol-scores")
    # a second turn: both models answer it, the first turn kept above it
    page.locator("#pol-message textarea").fill("And what colour is it?")
    page.locator("#pol-ask").click()
    until(page, "#pol-scores", "el.innerText.includes('of turn 2')", timeout=180_000)
    for elem_id, first in (("pol-base", base), ("pol-policy", aligned)):
        said = answers(elem_id)
        assert len(said) == 2 and said[0] == first and said[1], (elem_id, said)
        assert "And what colour is it?" in text(page, elem_id)
    page.evaluate("document.querySelectorAll('#pol-base [role=log], #pol-policy [role=log]')"
                  ".forEach(l => l.scrollTop = 0)")  # the screenshot shows the image asked about
    shot(page, tmp_path, "ui-policy.png", full_page=True)

    # the adapter: its real path to copy, and a .zip to download
    page.locator("#pol-export-merge input").uncheck()
    page.locator("#pol-export").click()
    until(page, "#pol-export-status", "el.innerText.includes('Exported')", timeout=180_000)
    adapter = server.runs / "tiny-ui" / "export" / "policy-adapter"
    codes = [c.inner_text().strip() for c in page.locator("#pol-export-status pre code").all()]
    assert codes[:2] == [str(adapter), f'PeftModel.from_pretrained(base, "{adapter}")'], codes
    assert "&quot;" not in text(page, "pol-export-status") and "<runs root>" not in text(page, "pol-export-status")
    until(page, "#pol-export-file", "!!el.querySelector('a[download]')")
    import io
    import zipfile
    body = page.request.get(page.locator("#pol-export-file a[download]").get_attribute("href")).body()
    assert "adapter_config.json" in zipfile.ZipFile(io.BytesIO(body)).namelist()

    # the merged model: where it is, no download
    page.locator("#pol-export-merge input").check()
    page.locator("#pol-export").click()
    until(page, "#pol-export-status", "el.innerText.includes('merged, bf16')", timeout=180_000)
    folder = server.runs / "tiny-ui" / "export" / "policy-merged"
    assert page.locator("#pol-export-status pre code").first.inner_text().strip() == str(folder)
    assert "not offered as a download" in text(page, "pol-export-status")
    page.wait_for_selector("#pol-export-file", state="hidden")
    assert (folder / "model.safetensors").exists() and (folder / "README.md").exists()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(folder)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED Qwen2VLForConditionalGeneration torch.bfloat16" in proc.stdout
    assert_all_local(requests_seen)


def test_train_form_keeps_edits(new_page, server, tmp_path):
    """Opening the recipe list and clicking elsewhere changes nothing; choosing another recipe over edited
    settings asks first, and loads it only when told to."""
    p, seen = new_page(seen=True)
    tab(p, "2 · Train")
    pick(p, "recipe", "tiny.yaml")
    until(p, "#run-name textarea", "el.value.startsWith('tiny-')")
    p.locator("#f-data-path textarea").fill(DATA)
    p.locator("#run-name textarea").fill("my-run")
    p.locator("#section-data").get_by_text("more settings").click()  # the data section is folded
    frac = p.locator("#f-data-eval_fraction input")
    frac.fill("0.3")
    frac.blur()

    def form_values():
        return (p.locator("#f-data-path textarea").input_value(), p.locator("#run-name textarea").input_value(),
                frac.input_value(), p.locator("#recipe input").input_value())

    kept = form_values()
    assert kept == (DATA, "my-run", "0.3", "tiny.yaml")
    p.wait_for_selector("#f-data-demo-groups", state="hidden")  # the demo set's settings: only for data.path demo
    # open the recipe list, then click elsewhere (twice, and on another input)
    for target in (None, "#run-name textarea"):
        p.locator("#recipe input").click()
        p.wait_for_selector("[role=option]")
        if target is None:
            p.mouse.click(5, 5)  # an empty corner of the page
        else:
            p.locator(target).click()
        # what the click started (if anything) has come back to the fields compared
        settled(p, seen, quiet=1.0, timeout=60, outputs="#f-data-path, #run-name, #f-data-eval_fraction, #recipe")
        assert form_values() == kept, f"the form changed after opening the recipe list: {form_values()} != {kept}"

    # choosing another recipe over edits: nothing is lost, the page says what would be, and offers to load
    pick(p, "recipe", "long.yaml")
    until(p, "#train-status", "el.innerText.includes('long.yaml')")
    notice = text(p, "train-status")
    named = notice.split(":", 1)[1].split(". ")[0]  # "... your edits of tiny.yaml: run name, data.path, ... ."
    assert [k.strip() for k in named.split(",")] == ["run name", "data.path", "data.eval_fraction"], notice
    assert form_values()[:3] == kept[:3]
    p.locator("#recipe-load").click()
    until(p, "#run-name textarea", "el.value.startsWith('long-')")
    assert p.locator("#f-data-path textarea").input_value() == "demo"
    p.wait_for_selector("#f-data-demo-groups", state="visible")
    assert frac.input_value() == "0.15"
    p.wait_for_selector("#recipe-load", state="hidden")
    # unedited again: picking a recipe loads it at once
    pick(p, "recipe", "tiny.yaml")
    until(p, "#run-name textarea", "el.value.startsWith('tiny-')")
    assert "Loaded recipe tiny.yaml" in text(p, "train-status")


def test_train_essentials_presets_and_yaml_beside_start(new_page, server, trained, tmp_path):
    """The essentials and the pre-flight estimate are beside Start with every section folded; a preset
    changes the shown values and the YAML preview, and says what it set; over an edit of one of its keys it
    asks first; the demo set's settings hide for a data path that is not `demo`."""
    p = new_page(1400, 1000)
    tab(p, "2 · Train")
    # the presets' labels say how long they take here, scaled from a finished run of the same model and device
    # (tiny-ui ran the tiny recipe's settings), or that nothing was timed yet (the demo recipe's 4-bit setting)
    pick(p, "recipe", "tiny.yaml")
    until(p, "#preset-0", r"/^Preset: smoke test · about (\d+m)?\d+s here$/.test(el.innerText.trim())",
          timeout=120_000)
    pick(p, "recipe", "demo.yaml")
    until(p, "#preset-0", "el.innerText.trim() == 'Preset: smoke test · not timed here yet'", timeout=120_000)
    until(p, "#run-name textarea", "el.value.startsWith('demo-')")
    until(p, "#train-estimate", "el.innerText.includes('optimizer steps') && el.innerText.includes('memory')",
          timeout=120_000)
    # every section folded (one setting of each is hidden); the essentials and the estimate beside Start,
    # in the first screen
    for folded in ("model-load_in_4bit", "data-format", "reward-w_rank", "cache-dir", "dpo-beta", "eval-max_groups",
                   "run-seed"):
        assert not p.locator(f"#f-{folded}").is_visible(), f"{folded} should be folded"
    start = p.locator("#start").bounding_box()
    est = p.locator("#train-estimate").bounding_box()
    assert est["x"] >= start["x"] - 1 and abs(est["x"] - start["x"]) < 40 and est["y"] > start["y"], (start, est)
    for key in ("model-path", "data-path", "data-demo-groups", "run-stages", "model-lora_r",
                "reward-train-max_steps", "reward-train-epochs", "reward-train-learning_rate",
                "dpo-train-max_steps", "dpo-train-epochs", "dpo-train-learning_rate"):
        box = p.locator(f"#f-{key}").bounding_box()
        assert p.locator(f"#f-{key}").is_visible() and box and box["y"] + box["height"] <= 1000, (key, box)
        assert box["x"] + box["width"] <= start["x"], f"{key} is not beside Start: {box} vs {start}"
    assert est["y"] + 40 <= 1000
    assert "reward: 600 optimizer steps" in text(p, "train-estimate"), text(p, "train-estimate")
    yaml_box = p.locator("#train-yaml textarea")
    until(p, "#train-yaml textarea", "el.value.includes('max_steps: 600')")
    assert "groups: 600" in yaml_box.input_value()

    # the smoke-test preset: the values shown, the YAML, the estimate, and what it set
    p.locator("#preset-0").click()
    until(p, "#f-reward-train-max_steps input", "el.value == '60'")
    assert p.locator("#f-dpo-train-max_steps input").input_value() == "60"
    assert p.locator("#f-data-demo-groups input").input_value() == "120"
    status = text(p, "train-status")
    assert "smoke test" in status and "reward.train.max_steps = 60" in status, status
    until(p, "#train-yaml textarea", "el.value.includes('max_steps: 60\\n') && el.value.includes('groups: 120')")
    until(p, "#train-estimate", "el.innerText.includes('reward: 60 optimizer steps')", timeout=60_000)
    p.evaluate("window.scrollTo(0, 0)")
    shot(p, tmp_path, "ui-train.png")
    # the full demo preset replaces the smoke test's values without asking (they were the preset's, not edits)
    p.locator("#preset-1").click()
    until(p, "#f-reward-train-max_steps input", "el.value == '600'")
    until(p, "#train-yaml textarea", "el.value.includes('max_steps: 600')")

    # an edit of a preset's key: the preset asks first, and applies only when told to
    steps = p.locator("#f-dpo-train-max_steps input")
    steps.fill("7")
    steps.blur()
    until(p, "#train-yaml textarea", "el.value.includes('max_steps: 7\\n')")
    p.locator("#preset-0").click()
    until(p, "#train-status", "el.innerText.includes('Nothing was changed')")
    assert "dpo.train.max_steps" in text(p, "train-status") and steps.input_value() == "7"
    p.locator("#preset-apply").click()
    until(p, "#f-dpo-train-max_steps input", "el.value == '60'")
    p.wait_for_selector("#preset-apply", state="hidden")

    # a data path that is not the demo set hides data.demo.* (the essential and the folded ones)
    if not (server.data / DATA).exists():  # this test alone: the upload test did not put it there
        from mmrlhf_lite.data.demo import write_demo
        write_demo(server.data / Path(DATA).parent, groups=20, seed=0)
    p.locator("#f-data-path textarea").fill(DATA)
    p.locator("#f-data-path textarea").blur()
    p.wait_for_selector("#f-data-demo-groups", state="hidden")
    p.locator("#section-data").get_by_text("more settings").click()
    p.wait_for_selector("#f-data-format", state="visible")
    for key in ("seed", "image_size", "safety_fraction"):
        assert not p.locator(f"#f-data-demo-{key}").is_visible()
    until(p, "#train-yaml textarea", "el.value.includes('demo-data/demo.jsonl') && !el.value.includes('refuse')")
    until(p, "#train-estimate", "el.innerText.includes('data: 18 train / 2 held-out groups')")


def test_sharding_follows_processes_and_fsdp2_shows_its_per_gpu_memory(new_page, server):
    """Sharding is off (and "none") with one process, on with two; FSDP2 adds the per-GPU lines of
    `--dry-run --processes 2 --fsdp` to the pre-flight beside Start, and they go with one process again."""
    p = new_page()
    tab(p, "2 · Train")
    pick(p, "recipe", "demo.yaml")
    until(p, "#train-estimate", "el.innerText.includes('optimizer steps') && el.innerText.includes('memory')",
          timeout=120_000)
    radios = "document.querySelectorAll('#sharding input[type=radio]')"
    until(p, "#sharding", f"{radios}.length == 2 && [...{radios}].every(r => r.disabled)")
    procs = p.locator("#processes input")
    procs.fill("2")
    procs.blur()
    until(p, "#sharding", f"[...{radios}].every(r => !r.disabled)")
    until(p, "#train-estimate", "el.innerText.includes('2 processes (data-parallel')")
    p.locator("#sharding").get_by_text("FSDP2 (the base sharded over the GPUs)").click()
    until(p, "#train-estimate", "el.innerText.includes('memory per GPU with FSDP2 over 2 GPUs')")
    assert re.search(r"reward\s+[\d.]+ GiB allocated", text(p, "train-estimate")), text(p, "train-estimate")
    procs.fill("1")
    procs.blur()
    until(p, "#sharding", f"[...{radios}].every(r => r.disabled) && {radios}[0].checked")
    until(p, "#train-estimate", "!el.innerText.includes('FSDP2') && el.innerText.includes('plan OK')")


def _compared_run(runs: Path, name: str, i: int) -> None:
    """A finished run folder as the Compare tab reads it: a recipe with long values and an evaluation
    report with five categories and three critique modes (many columns)."""
    import json

    import yaml

    from mmrlhf_lite.recipe import Recipe

    run = runs / name
    (run / "eval").mkdir(parents=True, exist_ok=True)
    tree = Recipe().to_dict()
    tree["data"]["path"] = "/data/" + "/".join(f"a-rather-long-folder-name-{k}" for k in range(6)) + f"/set-{i}.jsonl"
    tree["model"]["lora_target_modules"] = [f"model.language_model.layers.{k}.self_attn.q_proj_{i}" for k in range(8)]
    tree["dpo"]["beta"] = 0.1 * (i + 1)
    tree["run"]["dir"] = str(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    cat = {"acc": 0.75, "acc_plus": 0.5, "pairs": 12, "groups": 3, "score_ties": 0, "rank_ties": 0}
    mode = {"overall": dict(cat), "by_category": {c: dict(cat) for c in
                                                  ("colour", "count", "safety", "shape", "size-and-position")}}
    report = {"groups": 12, "pairs": 48, "dpo": {"beta": 0.1 * (i + 1), "w": 0.1, "k": 0.5},
              "reward_model": {"modes": {m: mode for m in ("given", "none", "generate")}},
              "policy": {"implicit_accuracy": 0.7, "win_rate": {"win_rate": 0.6}}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    (run / "events.jsonl").write_text(json.dumps({"time": 1.0, "type": "run_end", "status": "done"}) + "\n")


def test_compare_tables_stay_within_the_screen_width(new_page, runs_made, server, tmp_path):
    """Four runs with long recipe values and many evaluation columns, in a 1400 px window: the tables wrap
    or scroll inside their boxes; the page itself has no horizontal scroll."""
    names = [f"wide-comparison-run-number-{i}-with-a-long-name" for i in range(4)]
    runs_made.extend(names)
    for i, name in enumerate(names):
        _compared_run(server.runs, name, i)
    p = new_page(1400, 1000)
    tab(p, "5 · Compare runs")
    box = p.locator("#cmp-runs input")
    for name in names:  # typed and taken with Enter (the growing list of chosen names moves the options)
        box.fill(name)
        p.get_by_role("option", name=name, exact=True).wait_for()
        box.press("Enter")
        until(p, "#cmp-runs", f"el.innerText.includes({name!r})")
    p.keyboard.press("Escape")
    p.locator("#cmp-go").click()
    until(p, "#cmp-diff", "el.innerText.includes('dpo.beta') && el.innerText.includes('lora_target_modules')")
    until(p, "#cmp-table", "el.innerText.includes('size-and-position')")
    quiet_dom(p)  # the tables laid out
    # the evaluation: a row per metric, a column per run; every header in whole words, every cell in the window
    assert_whole_words(text_lines(p, "#cmp-table th span.header"), "evaluation header")
    cells = text_lines(p, "#cmp-table [role=gridcell]")
    assert len(cells) >= 5 * 20, len(cells)
    outside = [c for c in cells if c["right"] > c["window"] or c["clipped"]]
    assert not outside, f"evaluation cells beyond the window or cut off: {outside[:4]}"
    shot(p, tmp_path, "ui-compare-wide.png", full_page=True)
    width = p.evaluate("""() => ({doc: document.documentElement.scrollWidth, body: document.body.scrollWidth,
                                  inner: window.innerWidth})""")
    assert width["doc"] <= width["inner"] and width["body"] <= width["inner"], width
    for box_id in ("cmp-table", "cmp-diff", "cmp-bench"):
        right = p.evaluate(f"document.querySelector('#{box_id}').getBoundingClientRect().right")
        assert right <= width["inner"], f"{box_id} ends at {right} px, beyond the window's {width['inner']} px"
    # the recipe differences wrap: every run's column is in view side by side, no value is cut off
    cells = p.evaluate("""() => {
        const box = document.querySelector('#cmp-diff').getBoundingClientRect();
        return [...document.querySelectorAll('#cmp-diff th, #cmp-diff td')].map(c => {
            const r = c.getBoundingClientRect();
            return {text: c.innerText.trim().slice(0, 80), right: r.right, box: box.right,
                    clipped: c.scrollWidth > c.clientWidth + 1 ||
                             [...c.querySelectorAll('*')].some(e => e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0)};
        });
    }""")
    assert any(names[3] in c["text"] for c in cells), cells[:8]
    outside = [c for c in cells if c["right"] > c["box"] + 1]
    assert not outside, f"recipe-difference cells beyond the box (a horizontal scroll to see them): {outside[:4]}"
    clipped = [c for c in cells if c["clipped"]]
    assert not clipped, f"recipe-difference values cut off in their cells: {clipped[:4]}"
