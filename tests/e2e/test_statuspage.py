"""The admin API's status page (``GET /``) in headless Chromium: against a real daemon with traffic
flowing through ``ipferry connect``, and against a supervisor of fake workers whose every field is
hostile markup, which must show as text and never run.

Chromium runs inside the test's network namespace (``nsenter --net``), where only loopback
exists, with a throw-away profile; its whole process group is killed at the end. Set
``IPFERRY_STATUS_PAGE_PNG=docs/status-page.png`` to keep the live page's screenshot there.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ipferry.nsd.namespace import CLONE_NEWNET, setns
from ipferry.runtime import fdpass
from ipferry.supervisor.admin import AdminServer
from tests.e2e.dataplane import (
    SERVER_ADDR,
    STREAM_PORT,
    config,
    connect,
    drops,
    stream_client,
)
from tests.helpers import wait_for
from tests.supervisor.test_arbiter import supervisor

URL = "http://127.0.0.1:9180/"
CHROMIUM_TIMEOUT = 90
# Markup in every field a client controls: shown as text, it must never become an element.
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror="document.title=1">'

DENY_DISCARD = """
[[rules]]
action = "deny"
name = "no-discard"
protocol = "tcp"
ports = "9"
"""
# Inside ``ipferry connect``: a connection the rule above refuses (a drop, reason ``denied``).
REFUSED = f"""\
import socket
try:
    socket.create_connection(("{SERVER_ADDR}", 9), timeout=5)
except OSError as exc:
    print(type(exc).__name__)
"""
# Inside ``ipferry connect``: echo through the streams server, 16 KiB every 50 ms, until the stop
# file appears (or 150 s): one established flow whose bytes keep growing.
TRAFFIC = """\
import os, socket, sys, time
addr, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((addr, port), timeout=30)
s.sendall(b"ECHO\\n")
chunk, got, deadline = b"x" * 16384, 0, time.monotonic() + 150
while not os.path.exists(stop) and time.monotonic() < deadline:
    s.sendall(chunk)
    want = got + len(chunk)
    while got < want:
        got += len(s.recv(65536))
    time.sleep(0.05)
s.close()
print(got)
"""


def chromium(netns, tmp_path: Path, *mode: str, budget_ms: int = 20000) -> tuple[str, str]:
    """Headless Chromium on the status page inside ``netns``: (stdout, stderr)."""
    binary = shutil.which("chromium")
    if binary is None:
        raise AssertionError("chromium is not installed: the status page is tested in headless "
                             "Chromium (apt-get install chromium; deploy/setup.sh installs it)")
    profile = tmp_path / f"chromium-{time.monotonic_ns()}"
    profile.mkdir()
    cmd = ["nsenter", f"--net={netns.path}", binary, "--headless=new", "--no-sandbox",
           "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions",
           "--disable-default-apps", "--disable-breakpad", "--window-size=1280,900",
           "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", "--enable-logging=stderr",
           "--v=0", *mode, URL]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(profile), "XDG_CONFIG_HOME": str(profile),
           "XDG_CACHE_HOME": str(profile), "LANG": "C.UTF-8"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"chromium did not finish within {CHROMIUM_TIMEOUT}s:\n"
                             f"{err.decode(errors='replace')[-3000:]}") from None
    finally:
        try:  # its helpers (zygote, renderer) too, whatever happened
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    stderr = err.decode(errors="replace")
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{stderr[-3000:]}"
    # The page runs under its own policy: no violation, no uncaught error in its console.
    console = [line for line in stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(
        r"Refused|violates|Content.Security.Policy|TrustedHTML|Uncaught|Error", line)], console
    return out.decode(errors="replace"), stderr


def dump_dom(netns, tmp_path: Path, budget_ms: int = 20000) -> str:
    dom, _ = chromium(netns, tmp_path, "--dump-dom", budget_ms=budget_ms)
    polls = re.search(r'<body data-polls="(\d+)"', dom)
    assert polls and int(polls.group(1)) >= 3, dom[:3000]
    return dom


def section(dom: str, tbody_id: str) -> str:
    found = re.search(rf'<tbody id="{tbody_id}">(.*?)</tbody>', dom, re.S)
    assert found, (tbody_id, dom[:3000])
    return found.group(1)


def cells(row: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", c))
            for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def rows(dom: str, tbody_id: str) -> list[list[str]]:
    return [cells(r) for r in re.findall(r"<tr>(.*?)</tr>", section(dom, tbody_id), re.S)]


def text_of(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>(.*?)</', dom, re.S)
    assert found, element_id
    return html.unescape(found.group(1))


def assert_png(path: Path, width: int = 1280, height: int = 900) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert (int.from_bytes(data[16:20]), int.from_bytes(data[20:24])) == (width, height)
    assert len(data) > 20_000, len(data)  # a rendered page, not a blank one


@pytest.mark.timeout(300)
def test_the_status_page_shows_a_live_daemon(daemon_factory, streams, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path, DENY_DISCARD))
    stream_client(d, "get", 4 << 20)  # bytes through a flow that ended
    res = connect(d, sys.executable, "-c", REFUSED, timeout=60)
    assert res.returncode == 0 and res.stdout.strip(), res
    wait_for(lambda: drops(d).get("denied", 0) >= 1, 10, "the denied flow's drop")
    stop = tmp_path / "stop-traffic"
    result: dict = {}

    def traffic():
        result["res"] = connect(d, sys.executable, "-c", TRAFFIC, SERVER_ADDR, str(STREAM_PORT),
                                str(stop), context=json.dumps({"device": HOSTILE}), timeout=200)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        wait_for(lambda: any(f["dport"] == STREAM_PORT and f["state"] == "established"
                             and f["payload_bytes"][0] > 0
                             for f in d.get_json("/api/flows")["flows"]), 30, "the echo flow")
        dom = dump_dom(d.netns, tmp_path)
        assert "<title>ipferry status</title>" in dom  # the hostile context changed nothing
        assert text_of(dom, "ready") == "ready"
        assert text_of(dom, "status-line").startswith("nsd ready, 2/2 workers ready")

        workers = rows(dom, "workers")
        pids = [w["pid"] for w in d.workers()]
        assert [w[:5] for w in workers] == [
            ["0", str(pids[0]), "ready", "0", "ipf0"], ["1", str(pids[1]), "ready", "0", "ipf1"]]

        # (The tunnels of the connects before may still be closing: find ours by its context.)
        tunnels = [t for t in rows(dom, "tunnels") if t[6].startswith('{"device"')]
        assert len(tunnels) == 1, rows(dom, "tunnels")
        _worker, _id, onramp, kind, tenant, _peer, context, packets_in, _out = tunnels[0]
        assert (onramp, kind, tenant) == ("tunnel", "tunnel (vnet)", "acme")
        assert json.loads(context) == {"device": HOSTILE}  # the markup, as text
        assert int(packets_in.replace(",", "")) > 0
        assert "<img" not in dom and dom.count("<script") == 1  # none of it became an element

        flows = rows(dom, "flows")
        echo = [f for f in flows if f[3] == f"{SERVER_ADDR}:{STREAM_PORT}"]
        assert echo and echo[0][:2] == ["acme", "tcp"] and echo[0][4] == "established", flows
        assert "live flows" in text_of(dom, "flows-note")

        # Rates came from several samples: the cards and the chart have them.
        assert text_of(dom, "c-in").endswith("bit/s") and int(text_of(dom, "c-tunnels")) >= 1
        assert re.search(r'<polyline class="in" points="[\d., ]+"', dom), dom[:3000]
        denied = [r for r in rows(dom, "drops") if r[0] == "denied"]
        assert denied and int(denied[0][1]) >= 1, rows(dom, "drops")

        shot = tmp_path / "status-page.png"
        chromium(d.netns, tmp_path, f"--screenshot={shot}")
        assert_png(shot)
        if keep := os.environ.get("IPFERRY_STATUS_PAGE_PNG"):
            shutil.copyfile(shot, keep)
    finally:
        stop.touch()
        sender.join(60)
    res = result["res"]
    assert res.returncode == 0 and int(res.stdout) > 0, res.stderr.decode()[-2000:]


# -- hostile values -------------------------------------------------------------------------------

def fake_worker(index: int, tunnels: list[dict], flows: list[dict]):
    """A worker's answers: these tunnels and flows, and counters that grow at every ask."""
    asked = [0]

    def answer(type_, body):
        if type_ == "metrics":
            asked[0] += 1
            n = float(asked[0])
            families = [
                {"name": "ipferry_bytes", "type": "counter", "help": "", "samples": [
                    ["ipferry_bytes_total", {"direction": "from_tunnel"}, 150_000 * n],
                    ["ipferry_bytes_total", {"direction": "to_tunnel"}, 90_000 * n]]},
                {"name": "ipferry_drops", "type": "counter", "help": "", "samples": [
                    ["ipferry_drops_total", {"reason": HOSTILE}, 3 * n]]},
                {"name": "ipferry_tunnels_active", "type": "gauge", "help": "", "samples": [
                    ["ipferry_tunnels_active", {}, float(len(tunnels))]]}]
            return fdpass.Message("metrics", {"families": families, "snapshot": "m", "next": None})
        if type_ == "tunnels":
            return fdpass.Message("tunnels", {"tunnels": tunnels, "snapshot": "t", "next": None})
        if type_ == "flows" and body.get("op") == "count":
            return fdpass.Message("flows", {"total": len(flows), "after": len(flows)})
        if type_ == "flows":
            start, limit = int(body.get("start", 0)), int(body.get("limit", 200))
            return fdpass.Message("flows", {"flows": flows[start:start + limit], "epoch": "ab",
                                            "cut": False})
        return fdpass.Message("error", {"error": f"unexpected {type_}"})
    return answer


class FakeAdmin:
    """The admin API of a supervisor with fake workers (tests/supervisor/test_arbiter.py), on
    127.0.0.1:9180 inside ``netns``: served by a thread that entered the namespace."""

    def __init__(self, netns, path: Path, **answers) -> None:
        self.netns, self.path, self.answers = netns, path, answers
        self.started = threading.Event()
        self.failed: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeAdmin:
        self.thread.start()
        assert self.started.wait(30), "the fake admin API did not start"
        if self.failed:
            raise self.failed
        return self

    def __exit__(self, *exc) -> None:
        if self.loop is not None and self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the fake admin API did not stop"

    def _run(self) -> None:
        try:
            fd = os.open(self.netns.path, os.O_RDONLY)
            try:
                setns(fd, CLONE_NEWNET)  # this thread only
            finally:
                os.close(fd)
            asyncio.run(self._serve())
        except BaseException as exc:
            self.failed = exc
            self.started.set()

    async def _serve(self) -> None:
        sup = supervisor(self.path, '[admin]\nunix_socket = ""\n', **self.answers)
        server = AdminServer(sup, sup.config.admin, "127.0.0.1:9180")
        await server.start()
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        self.started.set()
        try:
            await self.stopping.wait()
        finally:
            await server.stop()


@pytest.mark.timeout(180)
def test_hostile_values_show_as_text(netns, tmp_path):
    tunnel = {"id": 1, "onramp": HOSTILE, "kind": HOSTILE, "offload": False, "tenant": HOSTILE,
              "peer": HOSTILE, "context": {HOSTILE: HOSTILE}, "packets_in": 5, "packets_out": 4,
              "worker": 0}
    flow = {"tenant": HOSTILE, "protocol": HOSTILE, "src": HOSTILE, "sport": HOSTILE,
            "dst": "198.18.0.1", "dport": 80, "tunnel": 1, "tunnel_worker": 0, "state": HOSTILE,
            "decision": HOSTILE, "slot": None, "packets": [HOSTILE, 1], "payload_bytes": [10, 0],
            "age": HOSTILE, "worker": 0, "seq": 1}
    with FakeAdmin(netns, tmp_path / "c.toml", w0=fake_worker(0, [tunnel], [flow]),
                   w1=fake_worker(1, [], [])):
        dom = dump_dom(netns, tmp_path)
    shown = html.escape(HOSTILE, quote=False)
    assert "<title>ipferry status</title>" in dom
    assert "<img" not in dom and dom.count("<script") == 1, dom  # only the page's own script
    assert "&lt;script&gt;" in dom

    (tunnel_row,) = rows(dom, "tunnels")
    assert tunnel_row[2:6] == [HOSTILE] * 4
    context = json.dumps({HOSTILE: HOSTILE}, separators=(",", ":"))
    assert tunnel_row[6] == context[:159] + "\u2026"  # long values are cut, at 160 characters
    (flow_row,) = rows(dom, "flows")
    assert flow_row[0] == flow_row[1] == flow_row[4] == flow_row[5] == HOSTILE
    assert flow_row[2] == f"{HOSTILE}:{HOSTILE}" and flow_row[6] == "\u2013 / 1"  # not a number
    (drop_row,) = rows(dom, "drops")
    assert drop_row[0] == HOSTILE
    assert shown in section(dom, "tunnels") and shown in section(dom, "drops")
    assert text_of(dom, "c-tunnels") == "1"
