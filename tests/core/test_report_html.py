"""The interactive HTML report, checked in a real headless Chromium through the DevTools protocol.

The page must load with no console error or exception, draw one timeline row per pipeline device with
the simulated actions at the simulated times, one memory bar per device labelled with the plan's bytes,
a limit line at the usable memory, and the table of the plan, baselines and alternatives; hovering an
action shows its tooltip, the zoom buttons and the wheel rescale the time axis, a header click sorts.
With ``PLANNER_WRITE_DOCS=1`` the test saves its screenshot as docs/report-screenshot.png.

Chromium comes from the system's packages (``make test`` installs Debian's ``chromium`` when it is
missing and apt is there); without it the browser tests are skipped, saying so.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from planner.cli import main
from planner.plan import Plan
from planner.report import simulate, usable_limit_bytes
from planner.report_html import format_bytes, report_data

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1300,1500", "about:blank"]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "p.json"
    # an interleaved schedule over 4 pipeline devices on one DGX node: enough actions to zoom into
    assert main(["plan", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80g", "--global-batch", "64", "--pp", "4",
                 "-o", str(path), "--no-progress"]) == 0
    return path


@pytest.fixture(scope="module")
def report(plan_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(plan_file), "--html", "-o", str(out), "--what-if", "nodes=2x",
                 "--what-if", "memory=0.001x"]) == 0
    return out


def test_the_page_is_self_contained(report):
    text = report.read_text()
    assert "<link" not in text and " src=" not in text and "@import" not in text
    # the only URL is the SVG namespace (a name, never fetched)
    assert text.count("http") == text.count("http://www.w3.org/2000/svg")


def test_report_data_are_the_plans_numbers(plan_file):
    plan = Plan.from_json(plan_file)
    data = report_data(plan, what_ifs=["nodes=2x"])
    sim = simulate(plan)
    assert len(data["timeline"]["devices"]) == plan.parallel.pp == len(sim.timeline)
    assert [a[:3] for a in data["timeline"]["devices"][0]] == [list(a) for a in sim.timeline[0]]
    for row, dev in zip(data["memory"]["devices"], plan.predicted.devices):
        assert row["total"] == dev.memory_bytes["total"] == sum(row["parts"].values())
    assert {r["name"] for r in data["rows"] if r["kind"] == "baseline"} == {"pure-dp", "zero3-fsdp", "megatron-lm"}
    assert sum(r["kind"] == "alternative" for r in data["rows"]) == len(plan.search.alternatives)
    assert data["what_if"][0]["devices"] == 2 * plan.parallel.world_size


def test_asynchronous_schedule_shows_warm_up_and_one_steady_step(tmp_path):
    path = tmp_path / "async.json"
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "4", "--global-batch",
                 "16", "--pp", "4", "--schedule", "pipedream-2bw", "-o", str(path), "--no-progress"]) == 0
    plan = Plan.from_json(path)
    tl = report_data(plan, what_ifs=[])["timeline"]
    sim = simulate(plan)
    assert not tl["synchronous"] and tl["window_s"] == list(sim.window_s)
    assert tl["window_s"][1] - tl["window_s"][0] == pytest.approx(sim.step_time_s)
    assert tl["window_s"][1] < tl["end_s"] < tl["window_s"][1] + 0.05 * sim.step_time_s  # stops just after it
    assert all(a[0] < tl["end_s"] for row in tl["devices"] for a in row)


def test_existing_output_and_what_if_without_html_are_refused(plan_file, report, tmp_path, capsys):
    assert main(["report", str(plan_file), "--html", "-o", str(report)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["report", str(plan_file), "-o", str(tmp_path / "r"), "--what-if", "nodes=2x"]) == 2
    assert "add --html" in capsys.readouterr().err


class Browser:
    """A headless Chromium and one page, driven over the DevTools protocol (websocket-client)."""

    def __init__(self) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen([CHROMIUM, f"--user-data-dir={self.profile}", *FLAGS],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(event)
            self.events.append(json.loads(self.ws.recv()))

    def open(self, path: Path) -> None:
        """Load the page afresh and wait until its script has drawn everything (events start anew)."""
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        deadline = time.monotonic() + 30
        while self.js("document.body.dataset.rendered") != "yes" and time.monotonic() < deadline:
            time.sleep(0.1)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def mouse(self, kind: str, x: float, y: float, **extra) -> None:
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(json.dumps(params.get("args"))[:300])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(params["entry"]["text"])
        return out

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(report):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium where apt is available)")
    pytest.importorskip("websocket", reason="websocket-client is a test dependency (pip install -e '.[test]')")
    browser = Browser()
    try:
        browser.open(report)
        yield browser
    finally:
        browser.close()


def test_page_loads_without_console_errors(page):
    assert page.js("document.body.dataset.rendered") == "yes"
    assert page.errors() == []


def test_timeline_has_a_row_per_device_with_the_simulated_actions(page, plan_file):
    plan = Plan.from_json(plan_file)
    sim = simulate(plan)
    rows = page.js("""Array.from(document.querySelectorAll('#timeline g.device-row')).map(g =>
        Array.from(g.querySelectorAll('rect.action')).map(r => [+r.dataset.start, +r.dataset.end, r.dataset.action]))""")
    assert len(rows) == plan.parallel.pp
    assert sim.synchronous
    for drawn, simulated in zip(rows, sim.timeline):
        assert drawn == [list(a) for a in simulated]
        # every chunk of the device runs every micro-batch forward once
        forwards = [a for _, _, a in drawn if "F" in a]
        assert len(forwards) == plan.parallel.num_micro_batches * plan.parallel.virtual_stages


def test_memory_bars_carry_the_plans_bytes(page, plan_file):
    plan = Plan.from_json(plan_file)
    bars = page.js("""Array.from(document.querySelectorAll('#memory g.memory-bar')).map(g => [
        +g.dataset.totalBytes, g.querySelector('text.memory-total').textContent,
        Array.from(g.querySelectorAll('rect.segment')).reduce((s, r) => s + (+r.dataset.bytes), 0)])""")
    assert len(bars) == len(plan.predicted.devices) == plan.parallel.pp
    for (total, label, stacked), dev in zip(bars, plan.predicted.devices):
        assert total == stacked == dev.memory_bytes["total"]
        assert label == format_bytes(dev.memory_bytes["total"])
    assert page.js("+document.querySelector('#memory line.limit').dataset.bytes") == \
        pytest.approx(usable_limit_bytes(plan))


def seconds(s: float) -> str:
    """formatSeconds of report_html.js."""
    return "0" if s == 0 else f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} µs"


def test_hover_shows_the_action_and_its_times(page):
    where = """(() => { const r = document.querySelector('#timeline rect.action[data-action="0F1"]');
        const b = r.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2, b.width,
        +r.dataset.start, +r.dataset.end]; })()"""
    x, y, width, start, end = page.js(where)
    for _ in range(30):  # zoom in around the action (the wheel keeps the point under the mouse in place)
        page.mouse("mouseWheel", x, y, deltaX=0, deltaY=-120)
    x, y, zoomed, _, _ = page.js(where)
    assert zoomed == pytest.approx(width * 1.25**30, rel=1e-4)  # layout boxes are single precision
    page.mouse("mouseMoved", x, y)
    shown, text = page.js("[getComputedStyle(tooltip).display, tooltip.textContent]")
    assert shown == "block"
    assert text.startswith("device 0: 0F1\nforward of stage 0, micro-batch 1\n")
    assert f"start {seconds(start)}, end {seconds(end)}" in text
    page.mouse("mouseMoved", 2, 2)
    assert page.js("getComputedStyle(tooltip).display") == "none"
    page.js("document.getElementById('zoom-reset').click()")


def test_zoom_buttons_and_wheel_rescale_the_time_axis(page):
    width = "+document.querySelector('#timeline rect.action').getAttribute('width')"
    before = page.js(width)
    page.js("document.getElementById('zoom-in').click()")
    assert page.js(width) == pytest.approx(2 * before)
    page.js("document.getElementById('zoom-reset').click()")
    assert page.js(width) == pytest.approx(before)
    x, y = page.js("(() => { const b = document.querySelector('#timeline svg').getBoundingClientRect();"
                   " return [b.x + b.width / 2, b.y + 20]; })()")
    page.mouse("mouseWheel", x, y, deltaX=0, deltaY=-120)
    assert page.js(width) == pytest.approx(1.25 * before)
    page.js("document.getElementById('zoom-reset').click()")


def test_table_sorts_by_clicking_a_header(page, plan_file):
    plan = Plan.from_json(plan_file)
    steps = "Array.from(document.querySelectorAll('#alternatives tbody tr')).map(r => +r.cells[3].dataset.value)"
    shown = page.js(steps)
    expected = [plan.predicted.step_time_s, *(b.step_time_s for b in plan.search.baselines),
                *(a.step_time_s for a in plan.search.alternatives)]
    assert shown == pytest.approx(expected)
    page.js("document.querySelectorAll('#alternatives th')[3].click()")
    assert page.js(steps) == pytest.approx(sorted(expected))
    page.js("document.querySelectorAll('#alternatives th')[3].click()")
    assert page.js(steps) == pytest.approx(sorted(expected, reverse=True))


def test_what_if_rows(page, plan_file):
    rows = page.js("Array.from(document.querySelectorAll('#what-if tbody tr')).map(r => "
                   "Array.from(r.cells).map(c => c.textContent))")
    assert [r[0] for r in rows] == ["nodes=2x", "memory=0.001x"]
    assert rows[0][2] == str(2 * Plan.from_json(plan_file).parallel.world_size)
    assert rows[1][1] == "—" and "fits" in rows[1][6]  # nothing fits in a thousandth of the memory


def test_screenshot(page, report):
    page.call("Emulation.setDeviceMetricsOverride", width=1300, height=1500, deviceScaleFactor=1, mobile=False)
    page.open(report)  # as first opened: unsorted, not zoomed
    assert page.js("document.body.dataset.rendered") == "yes" and page.errors() == []
    png = base64.b64decode(page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    if os.environ.get("PLANNER_WRITE_DOCS") == "1":
        (DOCS / "report-screenshot.png").write_bytes(png)
