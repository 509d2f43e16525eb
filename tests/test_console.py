"""`vigil console` in a real browser: a real `vigil serve`, a real simulated robot (`vigil sim` in a child
process), the console as a child process (`vigil console`), headless Chromium driven by selenium, and the
runtime's SQLite store.

The bundle scores its plans: `vfd` = |state|^2 beside the optimal LQR action of aircraft pitch, with a VFD
monitor in its manifest, so the runtime's `trace` topic carries a score and its thresholds without training
an ensemble.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import VIGIL, child_env, free_port, gain_of, graph_bundle, run_vigil, tcp_endpoint, wait_until

from vigil.console.auth import new_token, write_token_file
from vigil.runtime.launch import LOCAL_TCP
from vigil.runtime.preferences import PreferenceStore
from vigil.runtime.requests import RequestStore
from vigil.runtime.store import AlertStore

pytest.importorskip("starlette")
pytest.importorskip("selenium")
if not Path("/usr/bin/chromium").exists() and not shutil.which("chromium"):
    pytest.skip("needs chromium and chromedriver (make test installs them)", allow_module_level=True)

WARN, ALERT = 1e-4, 1e9  # every plan of a moving robot is at warn; none alerts (no data requests filed)


# -- the console as a child process ------------------------------------------------------------------------


@dataclass
class Console:
    proc: subprocess.Popen
    out: Path
    url: str  # with ?token=
    base: str
    token: str

    def post(self, path: str, body: Any, token: str | None = None, headers: dict[str, str] | None = None
             ) -> tuple[int, dict]:
        """POST JSON to the console; (HTTP status, JSON answer)."""
        h = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            h["X-Vigil-Token"] = token
        req = urllib.request.Request(self.base + path, json.dumps(body).encode(), h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def consoles(tmp_path) -> Iterator[Callable[..., Console]]:
    """Factory: `consoles(connect, store, **flags)` starts `vigil console` on a free loopback port with a token
    file and waits for its ready line; all are stopped at teardown."""
    started: list[Console] = []

    def start(connect: str, store: Path, **flags: Any) -> Console:
        n = len(started)
        token = new_token()
        write_token_file(tmp_path / f"token{n}", token)
        flags = {"bind": "127.0.0.1:0", "token_file": str(tmp_path / f"token{n}"), "poll_s": 0.3, **flags}
        args = [*VIGIL, "console", "--connect", connect, "--store", str(store)]
        for k, v in flags.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        out = tmp_path / f"console{n}.out"
        with open(out, "w") as f, open(tmp_path / f"console{n}.err", "w") as err:
            proc = subprocess.Popen(args, stdout=f, stderr=err, stdin=subprocess.DEVNULL, env=child_env())

        def ready() -> dict | None:
            assert proc.poll() is None, (tmp_path / f"console{n}.err").read_text()
            for line in out.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("vigil") == "console":
                    return json.loads(line)
            return None

        try:
            line = wait_until(ready, 30)
        except BaseException:
            proc.kill()
            raise
        c = Console(proc, out, line["url"], f"http://{line['bind']}", token)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


@pytest.fixture(scope="module")
def driver():
    from vigil.console.screenshot import browser

    d = browser(1300, 1400)
    d.set_script_timeout(10)
    yield d
    d.quit()


def dom(driver, script: str, *args: Any) -> Any:
    """Run a snippet in the page (`return ...`)."""
    return driver.execute_script(script, *args)


def text_of(driver, selector: str) -> str:
    return dom(driver, "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", selector)


def click(driver, selector: str) -> None:
    assert dom(driver, "const e = document.querySelector(arguments[0]); if (!e) return false; e.click(); return true;",
               selector), f"nothing to click at {selector}"


def fill(driver, selector: str, value: str) -> None:
    """Type into an input the way a user does (an `input` event), so the page keeps the value."""
    assert dom(driver, "const e = document.querySelector(arguments[0]); if (!e) return false; e.value = arguments[1]; "
                       "e.dispatchEvent(new Event('input', {bubbles: true})); return true;", selector, value), selector


# -- bundles -----------------------------------------------------------------------------------------------


def scored_bundle(folder: Path, lqr: Path, name: str, provenance: dict | None = None) -> Path:
    """The LQR action of aircraft pitch and a `vfd` score |state|^2 judged by a VFD monitor (window 1)."""
    from onnx.helper import make_node

    K = gain_of(lqr)
    graph_bundle(folder, [make_node("MatMul", ["state", "W"], ["action"]),
                          make_node("ReduceSumSquare", ["state"], ["vfd"], axes=[1], keepdims=0)],
                 obs_dim=3, act_dim=1, outputs={"action": ["batch", 1], "vfd": ["batch"]},
                 initializers={"W": -K.T}, name=name,
                 onnx={"inputs": {"state": "state"}, "action": "action", "scores": ["vfd"]},
                 monitor={"vfd": {"score": "vfd", "window": 1, "thresholds": {"warn": WARN, "alert": ALERT}}},
                 provenance=provenance or {"method": "test"})
    return folder


@pytest.fixture(scope="module")
def scored(tmp_path_factory, lqr_bundle) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("console-bundles")
    return (scored_bundle(root / "pitch-scored", lqr_bundle, "pitch-scored"),
            scored_bundle(root / "pitch-scored-v2", lqr_bundle, "pitch-scored-v2", {"method": "console test v2"}))


def sim(endpoint: str, robot: str, tmp_path: Path) -> subprocess.Popen:
    """A simulated aircraft-pitch robot at its own 20 Hz, long enough for any test here (killed after)."""
    log = open(tmp_path / f"sim-{robot}.out", "w")
    return subprocess.Popen([*VIGIL, "sim", "--connect", endpoint, "--robot", robot, "--mode", "realtime",
                             "--steps", "4000"], stdout=log, stderr=subprocess.STDOUT, env=child_env())


# -- tests -------------------------------------------------------------------------------------------------


def test_live_page_trace_alert_within_a_second_and_swap(scored, serve, consoles, driver, links, tmp_path):
    bundle, bundle_v2 = scored
    served = serve(bundle, control_endpoint=LOCAL_TCP, link_timeout_s=0.3, telemetry_s=0.25)
    console = consoles(served.operator_endpoint, served.store, control=served.control_endpoint)
    robot = sim(served.robot_endpoint, "sim-0", tmp_path)
    try:
        driver.get(console.url)
        assert driver.title == "vigil console"
        assert "token" not in driver.current_url  # taken out of the address bar, kept by the page
        wait_until(lambda: dom(driver, "const r = document.querySelector('tr[data-robot=\"sim-0\"]');"
                                       "return r && r.dataset.state === 'connected';"), 30)
        # the tick rate: from two telemetry messages
        wait_until(lambda: "Hz" in text_of(driver, 'tr[data-robot="sim-0"] td:nth-child(4)'), 10)

        # the VFD trace: points keep coming, drawn against the manifest's thresholds
        card = '[data-trace="sim-0"]'
        points = f"return Number(document.querySelector('{card}')?.dataset.points || 0)"
        first = wait_until(lambda: dom(driver, points), 20)
        wait_until(lambda: dom(driver, points) >= first + 10, 20)
        assert float(dom(driver, f"return document.querySelector('{card}').dataset.lastScore")) >= 0
        assert dom(driver, f"return document.querySelector('{card}').dataset.level") in ("ok", "warn")
        assert dom(driver, f"return document.querySelectorAll('{card} polyline.score').length") >= 1
        assert dom(driver, f"return document.querySelectorAll('{card} line.th-warn').length") == 1
        assert dom(driver, f"return document.querySelectorAll('{card} rect').length") >= 1  # the verdict strip

        # an alert reaches the page: a robot that goes silent (link loss, 0.3 s); how soon is `make bench-console`
        probe = links(served.robot_endpoint, "probe-1")
        assert probe.act({"state": np.zeros(3, np.float32)}, timeout_s=10).kind == "act"
        find = ("for (const r of document.querySelectorAll('#alerts tr[data-alert-id]')) {"
                " const c = r.children; if (c[3].textContent === 'probe-1' && c[4].textContent === 'link')"
                " return Number(r.dataset.alertId); } return 0;")
        alert_id = wait_until(lambda: dom(driver, find), 20, interval_s=0.005)
        store = AlertStore(served.store, readonly=True)
        [published] = [a for a in store.since(0) if a.id == alert_id]
        store.close()
        assert published.robot == "probe-1" and published.monitor == "link"

        # a swap from the page, and the provenance of the bundle now serving, read from its manifest
        fill(driver, "#swap-bundle", str(bundle_v2))
        click(driver, "#swap-button")
        wait_until(lambda: "swapped" in text_of(driver, "#notice"), 60)
        wait_until(lambda: "console test v2" in text_of(driver, '#swaps li[data-ok="true"]'), 20)
        wait_until(lambda: text_of(driver, "#policy").startswith("pitch-scored-v2@"), 10)
    finally:
        robot.kill()
        robot.wait()


def demo_dataset(folder: Path) -> str:
    """A dataset holding one recorded demonstration (as a teleoperation tool writes it); its episode id."""
    from vigil.training.demos import DemoWriter, Episode

    T = 3
    ep = Episode(task="push-v3", instruction="push the puck", seed=None,
                 observations={"state": np.zeros((T + 1, 3), np.float32)}, actions=np.zeros((T, 1), np.float32),
                 rewards=np.zeros(T, np.float32), success=np.ones(T, bool), source="request")
    return DemoWriter(folder).add(ep)


def file_requests(store: Path, n: int) -> None:
    """`n` open data requests, written as the runtime files them."""
    requests = RequestStore(store)
    for i in range(n):
        requests.append("arm-1", "push-v3", "push the puck", "pitch-scored@0", 1, i, 2.0 + i, 1.0,
                        {"state": np.full(3, i, np.float32)})
    requests.close()


def stored(store: Path, request_id: int):
    s = RequestStore(store, readonly=True)
    try:
        return s.get(request_id)
    finally:
        s.close()


def test_requests_answer_reject_refusals_and_two_pages(consoles, driver, tmp_path):
    store = tmp_path / "alerts.db"
    file_requests(store, 4)
    demo = demo_dataset(tmp_path / "acquired")
    console = consoles(tcp_endpoint(), store)  # no runtime: the page is useful without one

    # no token, a wrong token, another site: refused, and the store is unchanged
    assert console.post("/api/requests/1/reject", {"by": "eve", "reason": "x"})[0] == 401
    assert console.post("/api/requests/1/reject", {"by": "eve", "reason": "x"}, token="wrong-token-1234")[0] == 403
    status, answer = console.post("/api/requests/1/claim", {"by": "eve"}, token=console.token,
                                  headers={"Origin": "http://evil.example"})
    assert status == 403 and "another site" in answer["error"]
    assert stored(store, 1).status == "open" and stored(store, 1).attempts == 0

    driver.get(console.url)
    wait_until(lambda: dom(driver, "return document.querySelectorAll('#requests tr[data-request-id]').length") == 4, 20)
    assert "not heard from" in text_of(driver, "#runtime-status")

    # from a page without the token: refused with a clear message on the page, store unchanged
    dom(driver, "localStorage.removeItem('vigil-console-token')")
    driver.refresh()
    wait_until(lambda: dom(driver, "return document.querySelectorAll('#requests tr[data-request-id]').length") == 4, 20)
    click(driver, 'button[data-action="claim"][data-request="1"]')
    wait_until(lambda: text_of(driver, "#notice").startswith("401"), 10)
    assert "token" in text_of(driver, "#notice")
    assert stored(store, 1).status == "open"

    # with the token: answer #1 with the recorded demonstration, reject #2
    driver.get(console.url)
    wait_until(lambda: dom(driver, "return document.querySelectorAll('#requests tr[data-request-id]').length") == 4, 20)
    fill(driver, "#operator", "alice")

    def open_form(action: str, request_id: int) -> None:
        click(driver, f'button[data-action="{action}"][data-request="{request_id}"]')
        wait_until(lambda: dom(driver, f"return !!document.querySelector('tr[data-form-for=\"{request_id}\"]')"), 10)

    def answer(request_id: int, dataset: str, episode: str) -> None:
        open_form("answer", request_id)
        fill(driver, f'tr[data-form-for="{request_id}"] input[name="dataset"]', dataset)
        fill(driver, f'tr[data-form-for="{request_id}"] input[name="demo"]', episode)
        click(driver, f'tr[data-form-for="{request_id}"] button[data-send]')

    answer(1, str(tmp_path / "acquired"), "no-such-episode")  # refused: the episode must exist
    wait_until(lambda: text_of(driver, "#notice").startswith("400"), 10)
    assert stored(store, 1).status == "open"
    answer(1, str(tmp_path / "acquired"), demo)
    wait_until(lambda: "fulfilled by alice" in text_of(driver, "#notice"), 10)
    r1 = stored(store, 1)
    assert (r1.status, r1.resolved_by, r1.demo, r1.dataset) == ("fulfilled", "alice", demo,
                                                                 str((tmp_path / "acquired").resolve()))
    open_form("reject", 2)
    fill(driver, 'tr[data-form-for="2"] input[name="reason"]', "cannot reach that pose")
    click(driver, 'tr[data-form-for="2"] button[data-send]')
    wait_until(lambda: "rejected by alice" in text_of(driver, "#notice"), 10)
    assert (stored(store, 2).status, stored(store, 2).reason) == ("rejected", "cannot reach that pose")
    wait_until(lambda: dom(driver, "return document.querySelector('tr[data-request-id=\"2\"]').dataset.state")
               == "rejected", 10)

    # claim then release #4: open again
    click(driver, 'button[data-action="claim"][data-request="4"]')
    wait_until(lambda: stored(store, 4).status == "claimed", 10)
    assert stored(store, 4).claimed_by == "alice"
    click(driver, 'button[data-action="release"][data-request="4"]')
    wait_until(lambda: stored(store, 4).status == "open", 10)

    # #3 answered from two pages at once: exactly one wins, the other is told who did
    first = driver.current_window_handle
    driver.switch_to.new_window("tab")
    second = driver.current_window_handle
    driver.get(console.base + "/")  # the token is kept by the browser for this origin
    wait_until(lambda: dom(driver, "return document.querySelectorAll('#requests tr[data-request-id]').length") == 4, 20)
    fill(driver, "#operator", "bob")
    open_form("answer", 3)  # bob's form is open, and so is alice's: both about to send
    driver.switch_to.window(first)
    open_form("answer", 3)
    for handle in (second, first):
        driver.switch_to.window(handle)
        fill(driver, 'tr[data-form-for="3"] input[name="dataset"]', str(tmp_path / "acquired"))
        fill(driver, 'tr[data-form-for="3"] input[name="demo"]', demo)
        click(driver, 'tr[data-form-for="3"] button[data-send]')
    notices = {}
    for name, handle in (("alice", first), ("bob", second)):
        driver.switch_to.window(handle)
        notices[name] = wait_until(lambda: text_of(driver, "#notice") if "#3" in text_of(driver, "#notice") else "", 10)
    r3 = stored(store, 3)
    assert r3.status == "fulfilled" and r3.resolved_by in ("alice", "bob")
    loser = "bob" if r3.resolved_by == "alice" else "alice"
    assert f"fulfilled by {r3.resolved_by}" in notices[r3.resolved_by]
    assert notices[loser].startswith("409") and f"already fulfilled by {r3.resolved_by}" in notices[loser]
    driver.close()
    driver.switch_to.window(first)


def test_console_before_the_runtime_then_through_a_restart(lqr_bundle, serve, consoles, driver, links, tmp_path):
    operator = tcp_endpoint()
    store = tmp_path / "runtime" / "alerts.db"
    console = consoles(operator, store, silence_s=1.0)
    driver.get(console.url)
    wait_until(lambda: dom(driver, "return document.querySelector('#store-status').dataset.status") == "missing", 10)
    assert "not heard from" in text_of(driver, "#runtime-status")

    served = serve(lqr_bundle, operator_endpoint=operator, store=str(store), telemetry_s=0.2, link_timeout_s=60)
    link = links(served.robot_endpoint, "arm-7")
    assert link.act({"state": np.zeros(3, np.float32)}, timeout_s=10).kind == "act"
    wait_until(lambda: dom(driver, "return !!document.querySelector('tr[data-robot=\"arm-7\"]')"), 20)
    wait_until(lambda: dom(driver, "return document.querySelector('#runtime-status').dataset.silent") == "false", 10)
    assert dom(driver, "return document.querySelector('#store-status').dataset.status") == "ok"

    served.stop()  # the runtime goes away: the page says for how long it has not been heard from
    wait_until(lambda: "not heard from for" in text_of(driver, "#runtime-status"), 10)
    again = serve(lqr_bundle, operator_endpoint=operator, store=str(store), telemetry_s=0.2, link_timeout_s=60)
    link = links(again.robot_endpoint, "arm-8")
    assert link.act({"state": np.zeros(3, np.float32)}, timeout_s=10).kind == "act"
    wait_until(lambda: dom(driver, "return !!document.querySelector('tr[data-robot=\"arm-8\"]')"), 20)
    wait_until(lambda: dom(driver, "return document.querySelector('#runtime-status').dataset.silent") == "false", 10)


def test_a_gap_in_alert_ids_is_read_back_from_the_store_and_gains_are_shown(consoles, driver, tmp_path):
    """The runtime's publisher (OperatorStream) in the test process, so that the test chooses what the stream
    drops: alerts 5 and 6 are stored but never published; the console reads them from the store because of the
    gap (its periodic poll is an hour away)."""
    import zmq

    from vigil.runtime.stream import OperatorStream
    from vigil.wire.protocol import Message

    store = AlertStore(tmp_path / "alerts.db")
    for i in range(3):
        store.append("arm-1", "warn", "saturation", f"history {i + 1}")
    stream = OperatorStream(zmq.Context.instance(), "tcp://127.0.0.1:0")
    try:
        console = consoles(stream.endpoint, tmp_path / "alerts.db", poll_s=60)
        driver.get(console.url)
        rows = ("return [...document.querySelectorAll('#alerts tr[data-alert-id]')]"
                ".map(r => r.dataset.alertId + ' ' + r.children[7].textContent).sort()")
        wait_until(lambda: dom(driver, rows) == ["1 store", "2 store", "3 store"], 20)  # the history, on page load

        def published() -> bool:  # PUB/SUB joins late: telemetry until the page has heard the runtime
            stream.publish("telemetry", Message("telemetry", "", 0, 0, {}, {"policy": "p@1", "robots": {}}))
            return dom(driver, "return document.querySelector('#runtime-status').dataset.silent") == "false"

        wait_until(published, 20, interval_s=0.1)
        records = [store.append("arm-1", "alert", "observation", f"live {i}") for i in (4, 5, 6, 7)]
        for r in (records[0], records[3]):  # 5 and 6 dropped on the way
            stream.publish(f"alert.{r.severity}", Message("alert", r.robot, r.id, r.t_ns, {}, r.to_meta()))
        wait_until(lambda: dom(driver, rows) == ["1 store", "2 store", "3 store", "4 stream", "5 store", "6 store",
                                                 "7 stream"], 20)
        status = console.get("/api/state")[1]["status"]["counters"]
        assert status["alert_gaps"] == 1 and status["alerts_from_store"] == 2

        stream.event("arm-2", "gain", {"epoch": 3, "steps": 400, "gain": [[1.5, -0.25, 2.0]], "fallback": False,
                                       "guarded": True, "failed": False, "update_ms": 1.2, "t": time.time()})
        wait_until(lambda: "guarded" in text_of(driver, '#gains tr[data-gain-robot="arm-2"]'), 20)
        assert "1.5" in text_of(driver, '#gains tr[data-gain-robot="arm-2"]')

        # the dynamics monitor's diagnosis tells the operator who should act: a maintenance alert stands out
        r = store.append("arm-1", "alert", "dynamics", "maintenance: the robot's commands take effect differently",
                         {"diagnosis": "robot", "z_robot": 9.5})
        stream.publish("alert.alert", Message("alert", r.robot, r.id, r.t_ns, {}, r.to_meta()))
        wait_until(lambda: "maintenance" in text_of(driver, f'#alerts tr[data-alert-id="{r.id}"]'), 20)
        assert dom(driver, f"return document.querySelector('#alerts tr[data-alert-id=\"{r.id}\"]')"
                           ".dataset.diagnosis") == "robot"
        assert "1 maintenance" in text_of(driver, "#alerts-info")
    finally:
        stream.close()
        store.close()


def test_a_locked_store_is_shown_and_refuses_actions_until_it_is_free(consoles, driver, tmp_path):
    import sqlite3

    store = tmp_path / "alerts.db"
    file_requests(store, 1)
    AlertStore(store).close()
    console = consoles(tcp_endpoint(), store)
    driver.get(console.url)
    wait_until(lambda: dom(driver, "return document.querySelector('#store-status').dataset.status") == "ok", 20)
    holder = sqlite3.connect(str(store), isolation_level=None)  # another program holds the file
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        wait_until(lambda: dom(driver, "return document.querySelector('#store-status').dataset.status") == "locked", 20)
        assert "locked" in text_of(driver, "#store-status")
        status, answer = console.post("/api/requests/1/claim", {"by": "alice"}, token=console.token)
        assert status == 503 and "nothing was changed" in answer["error"]
    finally:
        holder.close()
    wait_until(lambda: dom(driver, "return document.querySelector('#store-status').dataset.status") == "ok", 20)
    assert console.post("/api/requests/1/claim", {"by": "alice"}, token=console.token)[0] == 200
    assert stored(store, 1).claimed_by == "alice"


def test_malformed_websocket_messages_get_an_error_and_a_count(consoles, tmp_path):
    from websockets.sync.client import connect

    console = consoles(tcp_endpoint(), tmp_path / "none.db")
    with connect(console.base.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        assert json.loads(ws.recv(10))["type"] == "snapshot"

        def reply_to(text: str) -> dict:
            ws.send(text)
            while True:
                msg = json.loads(ws.recv(10))
                if msg["type"] in ("error", "pong"):
                    return msg

        for n, bad in enumerate(["not json", "[1, 2]", '{"op": "claim", "id": 1}', "x" * 10_000, b"\x00\x01"],
                                start=1):
            msg = reply_to(bad)
            assert msg["type"] == "error" and msg["error"].startswith("malformed message") and msg["ws_malformed"] == n
        assert reply_to('{"op": "ping", "id": 7}') == {"type": "pong", "id": 7}  # still serving this page
    status, state = console.get("/api/state")
    assert status == 200 and state["status"]["counters"]["ws_malformed"] == 5
    assert state["status"]["store"]["status"] == "missing"
    # DNS rebinding: a loopback console answers only to loopback host names
    assert console.get("/api/state", headers={"Host": f"evil.example:{free_port()}"})[0] == 403


def test_beyond_loopback_every_read_needs_the_token(consoles, tmp_path):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    console = consoles(tcp_endpoint(), tmp_path / "none.db", bind="0.0.0.0:0")
    base = console.base.replace("0.0.0.0", "127.0.0.1")
    console.base = base
    assert "WARNING" in (console.out.with_suffix(".err")).read_text()
    assert console.get("/api/state")[0] == 401
    assert console.get("/api/state", {"X-Vigil-Token": "wrong-token-1234"})[0] == 403
    assert console.get("/api/state", {"X-Vigil-Token": console.token})[0] == 200
    with connect(base.replace("http", "ws") + "/ws?token=" + console.token, open_timeout=10) as ws:
        assert json.loads(ws.recv(10))["type"] == "snapshot"
    with pytest.raises((InvalidStatus, ConnectionError, OSError)), \
            connect(base.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        ws.recv(5)  # closed at once: no token


def test_bad_flags_and_a_token_file_others_can_read_are_refused(tmp_path):
    from dataclasses import fields

    from vigil.console.cli import ConsoleConfig

    r = subprocess.run([*VIGIL, "console", "--help"], capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 0
    for option in [f"--{f.name.replace('_', '-')}" for f in fields(ConsoleConfig)] + ["--key", "--server-key"]:
        assert option in r.stdout, option
    loose = tmp_path / "token"
    loose.write_text("a-token-long-enough-1234\n")
    loose.chmod(0o644)
    for args, expected in ((["--token-file", str(loose)], "readable by others"),
                           (["--bind", "nonsense"], "'bind' must be HOST:PORT")):
        r = subprocess.run([*VIGIL, "console", *args], capture_output=True, text=True, timeout=60, env=child_env())
        assert r.returncode == 2 and expected in r.stderr, r.stderr


def preference_pool(folder: Path, camera: bool = False) -> list[str]:
    """A pool of three attempts at reach-v3 of 6, 9 and 12 steps, written as the policy's attempts are
    (state (T+1, 39) whose first three columns are the hand; rewards 1, 2 and 3 per step; success in the last
    two steps); with `camera`, an 8x8 frame per step too. Their episode ids."""
    from vigil.training.demos import DemoWriter, Episode

    writer = DemoWriter(folder)
    ids = []
    for k, T in enumerate((6, 9, 12)):
        state = np.zeros((T + 1, 39), np.float32)
        state[:, :3] = np.linspace(0.0, 0.1 * (k + 1), T + 1)[:, None] * np.array([1.0, -1.0, 0.5])
        obs = {"state": state}
        if camera:
            obs["image"] = np.full((T + 1, 8, 8, 3), 40 * k, np.uint8)
        ids.append(writer.add(Episode(task="reach-v3", instruction="reach the goal", seed=k, observations=obs,
                                      actions=np.zeros((T, 4), np.float32), rewards=np.full(T, k + 1.0, np.float32),
                                      success=np.arange(T) >= T - 2, source="policy")))
    return ids


def test_preferences_compare_answer_once_and_a_late_click_is_refused(consoles, driver, tmp_path):
    store = tmp_path / "alerts.db"
    pool = preference_pool(tmp_path / "pool")
    prefs = PreferenceStore(store)
    prefs.add("reach-v3", tmp_path / "pool", pool[0], pool[1], "uncertainty", predicted=0.7)
    prefs.add("reach-v3", tmp_path / "pool", pool[1], pool[2], "random")
    prefs.close()
    console = consoles(tcp_endpoint(), store)
    driver.get(console.url)
    fill(driver, "#operator", "carol")
    rows = "return document.querySelectorAll('#prefs tr[data-pref-id]').length"
    wait_until(lambda: dom(driver, rows) == 2, 20)

    def lines(side: str) -> int:  # the hand's x, y and z over the steps
        return dom(driver, f"return document.querySelectorAll('#pref-compare [data-side=\"{side}\"] polyline').length")

    # query 1: both attempts drawn on one scale, with their steps, success and return; the operator prefers A
    click(driver, '#prefs tr[data-pref-id="1"]')
    wait_until(lambda: lines("a") == 3 and lines("b") == 3, 10)
    assert "6 steps" in text_of(driver, '#pref-compare [data-side="a"]')
    assert "return 6.000" in text_of(driver, '#pref-compare [data-side="a"]')
    assert "9 steps" in text_of(driver, '#pref-compare [data-side="b"]')
    assert "return 18.00" in text_of(driver, '#pref-compare [data-side="b"]')
    click(driver, '#pref-compare button[data-answer="a"]')
    wait_until(lambda: "answered by 'carol'" in text_of(driver, "#notice"), 10)
    q1 = stored_preference(store, 1)
    assert (q1.status, q1.answer, q1.by) == ("answered", "a", "carol")
    wait_until(lambda: dom(driver, "return document.querySelector('#prefs tr[data-pref-id=\"1\"]').dataset.state")
               == "answered", 10)

    # queries added while the page is open appear without a reload: camera frames (PNG, decoded by the browser),
    # and a pool that is not there (a message in the panel)
    cams = preference_pool(tmp_path / "cams", camera=True)
    prefs = PreferenceStore(store)
    prefs.add("reach-v3", tmp_path / "cams", cams[0], cams[2], "drts")
    prefs.add("reach-v3", tmp_path / "moved-away", "gone-1", "gone-2", "random")
    prefs.close()
    wait_until(lambda: dom(driver, rows) == 4, 20)
    click(driver, '#prefs tr[data-pref-id="3"]')
    frames = ("return [...document.querySelectorAll('#pref-compare [data-side=\"b\"] .frames img')]"
              ".map(i => i.complete ? i.naturalWidth : -1)")
    wait_until(lambda: dom(driver, frames) == [8] * 6, 10)
    click(driver, '#prefs tr[data-pref-id="4"]')
    wait_until(lambda: "no such dataset folder" in text_of(driver, '#pref-compare [data-side="b"]'), 10)

    # query 2 answered from the command line while the page shows it: shown as answered, and a late click is
    # refused with who answered and what; the store keeps the first answer
    click(driver, '#prefs tr[data-pref-id="2"]')
    wait_until(lambda: lines("a") == 3 and lines("b") == 3, 10)
    r = run_vigil("prefs", "answer", "2", "b", "--by", "dave", "--store", str(store))
    assert r.returncode == 0, r.stderr
    wait_until(lambda: dom(driver, "return document.querySelector('#prefs tr[data-pref-id=\"2\"]').dataset.state")
               == "answered", 20)
    assert "answered by dave" in text_of(driver, "#pref-state")
    click(driver, '#pref-compare button[data-answer="a"]')
    wait_until(lambda: text_of(driver, "#notice").startswith("409"), 10)
    assert "already answered by 'dave': b" in text_of(driver, "#notice")
    wait_until(lambda: "already answered by 'dave': b" in text_of(driver, "#pref-msg"), 10)
    q2 = stored_preference(store, 2)
    assert (q2.answer, q2.by) == ("b", "dave")


def stored_preference(store: Path, query_id: int):
    s = PreferenceStore(store, readonly=True)
    try:
        return s.get(query_id)
    finally:
        s.close()
