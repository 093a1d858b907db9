"""The admin API's status page (``GET /``) and its summary (``GET /api/summary``), without a
daemon: the page's headers and policy, that it is one self-contained document whose script
builds no HTML from data, and the summary over fake workers. (The page running in Chromium, with
hostile values and against a real daemon: tests/e2e/test_statuspage.py.)"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re

from aiohttp.test_utils import TestClient, TestServer

from ipferry.runtime import fdpass
from ipferry.supervisor import statuspage
from ipferry.supervisor.admin import AdminServer
from ipferry.supervisor.children import State
from tests.supervisor.test_arbiter import supervisor

CONFIG = """\
    [logging]
    level = "info"
    """


def family(name: str, type_: str, *samples) -> dict:
    return {"name": name, "type": type_, "help": "", "samples": [list(s) for s in samples]}


def metrics_answer(families: list[dict], pieces: int = 1):
    """A worker's answers to ``metrics``: its families handed out in ``pieces`` parts."""
    def answer(type_, body):
        if type_ != "metrics":
            return fdpass.Message("error", {"error": "unexpected"})
        start = int(body.get("start") or 0)
        step = -(-len(families) // pieces)
        end = start + step
        return fdpass.Message("metrics", {"families": families[start:end], "snapshot": "s1",
                                          "next": end if end < len(families) else None})
    return answer


def worker_families(scale: int) -> list[dict]:
    return [
        family("ipferry_packets", "counter",
               ("ipferry_packets_total", {"direction": "from_tunnel"}, 10.0 * scale),
               ("ipferry_packets_total", {"direction": "to_tunnel"}, 8.0 * scale)),
        family("ipferry_bytes", "counter",
               ("ipferry_bytes_total", {"direction": "from_tunnel"}, 1500.0 * scale),
               ("ipferry_bytes_total", {"direction": "to_tunnel"}, 900.0 * scale)),
        # A family cut in two pieces of one name (as metric_pieces does for a large one).
        family("ipferry_drops", "counter",
               ("ipferry_drops_total", {"reason": "denied"}, 2.0 * scale),
               ("ipferry_drops_created", {"reason": "denied"}, 1795611489.5)),
        family("ipferry_drops", "counter",
               ("ipferry_drops_total", {"reason": "no_flow"}, float(scale)),
               ("ipferry_drops_total", {"reason": "weird"}, float("nan"))),
        family("ipferry_flows_started", "counter",
               ("ipferry_flows_started_total", {"protocol": "tcp"}, 4.0 * scale)),
        family("ipferry_flows_active", "gauge",
               ("ipferry_flows_active", {"protocol": "tcp"}, 2.0 * scale),
               ("ipferry_flows_active", {"protocol": "udp"}, 0.5)),
        family("ipferry_tunnels_active", "gauge", ("ipferry_tunnels_active", {}, float(scale))),
        family("ipferry_gue_tunnels_active", "gauge", ("ipferry_gue_tunnels_active", {}, 0.0)),
        family("ipferry_nat_slots_in_use", "gauge", ("ipferry_nat_slots_in_use", {}, 3.0)),
    ]


def admin(sup) -> TestClient:
    return TestClient(TestServer(AdminServer(sup, sup.config.admin, None).app))


# -- the page -------------------------------------------------------------------------------------

def test_the_page_is_one_document_under_a_strict_policy(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG)
        async with admin(sup) as client:
            resp = await client.get("/")
            body = await resp.read()
            assert resp.status == 200 and body == statuspage.PAGE
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert resp.headers["Cache-Control"] == "no-store"
            csp = dict(d.strip().split(" ", 1) for d in resp.headers["Content-Security-Policy"]
                       .split(";"))
            html = body.decode()
            # The policy lets exactly the page's own inline script and style run: each one's
            # hash, over the bytes served (so the page is never broken by its own policy).
            scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
            styles = re.findall(r"<style>(.*?)</style>", html, re.S)
            assert len(scripts) == 1 and len(styles) == 1

            def digest(text: str) -> str:
                return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"

            assert csp == {
                "default-src": "'none'", "script-src": digest(scripts[0]),
                "style-src": digest(styles[0]), "connect-src": "'self'", "img-src": "data:",
                "base-uri": "'none'", "form-action": "'none'", "frame-ancestors": "'none'",
                "require-trusted-types-for": "'script'", "trusted-types": "'none'"}
            # No other asset: no element loads anything but the empty favicon, no URL but the
            # SVG namespace (a name, never fetched), no inline event handler or style attribute.
            assert re.findall(r"""\b(?:src|href|action|srcset|data)\s*=\s*["']?([^"'\s>]*)""",
                              html) == ["data:,"]
            assert re.findall(r"[a-z]+://[^\s\"']*", html) == ["http://www.w3.org/2000/svg"]
            assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html
            assert not re.search(r"\son[a-z]+\s*=", html) and " style=" not in html
            assert body.isascii()

            head = await client.head("/")
            assert head.status == 200 and await head.read() == b""
            assert head.headers["Content-Security-Policy"] == resp.headers["Content-Security-Policy"]
            assert (await client.get("/index.html")).status == 404

    asyncio.run(go())


def test_the_script_builds_no_html_from_data():
    # Data reaches the DOM as Text nodes only (textContent, append of strings); nothing parses
    # a string as HTML or code. (The policy's Trusted Types enforce it in the browser too.)
    script = statuspage.SCRIPT
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "Function(", "srcdoc", "createContextualFragment", "DOMParser",
                 'setAttribute("style"', 'setAttribute("on', "setAttribute(k", ".style."):
        assert sink not in script, sink
    # Attributes set from the script: constants, and numbers the script computed.
    assert set(re.findall(r'setAttribute\("([a-z0-9]+)"', script)) == {
        "x1", "x2", "y1", "y2", "class", "points"}
    assert script.isascii() and statuspage.STYLE.isascii()
    # Only the admin API's own read endpoints are fetched.
    assert re.findall(r'getJSON\("([^"]+)"', script) == [
        "/api/status", "/api/summary", "/api/tunnels", "/api/flows?limit="]


def test_the_page_changes_nothing_of_the_authorisation(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG)
        async with admin(sup) as client:  # TCP, no token configured: every mutation 403
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                for path in ("/", "/api/summary"):
                    resp = await client.request(method, path)
                    assert resp.status == 403 and "admin.token" in await resp.text()
            resp = await client.get("/", headers={"Expect": "something-else"})
            assert resp.status == 417

    asyncio.run(go())


# -- the summary ----------------------------------------------------------------------------------

def test_summary_sums_the_ready_workers_that_answered(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG, workers=4,
                         w0=metrics_answer(worker_families(1)),
                         w1=metrics_answer(worker_families(10), pieces=3),
                         w2=lambda t, b: TimeoutError(),  # ready, but no answer
                         w3=metrics_answer(worker_families(100)))
        sup.workers[3].state = State.BACKOFF  # not ready: not asked, not missing
        async with admin(sup) as client:
            resp = await client.get("/api/summary")
            assert resp.status == 200 and resp.content_type == "application/json"
            body = json.loads(await resp.text())
        assert [t for t, _ in sup.workers[3].child.channel.sent] == []
        assert body["workers_missing"] == [2]
        assert set(body["workers"]) == {"0", "1"}
        assert body["workers"]["1"] == {
            "pid": 201,
            "packets": {"from_tunnel": 100, "to_tunnel": 80},
            "bytes": {"from_tunnel": 15000, "to_tunnel": 9000},
            "drops": {"denied": 20, "no_flow": 10},  # _created and NaN left out
            "flows_started": {"tcp": 40},
            "flows_active": {"tcp": 20, "udp": 0.5},
            "tunnels_active": 10, "gue_tunnels_active": 0}
        assert body["total"] == {
            "packets": {"from_tunnel": 110, "to_tunnel": 88},
            "bytes": {"from_tunnel": 16500, "to_tunnel": 9900},
            "drops": {"denied": 22, "no_flow": 11}, "flows_started": {"tcp": 44},
            "flows_active": {"tcp": 22, "udp": 1}, "tunnels_active": 11, "gue_tunnels_active": 0}
        assert isinstance(body["clock"], float) and body["time"] > 1.7e9

    asyncio.run(go())


def test_summary_of_no_worker_is_zeros():
    out = statuspage.summarize([], {}, 5.0, 1795611489.0)
    assert out == {"clock": 5.0, "time": 1795611489.0, "workers": {}, "workers_missing": [],
                   "total": {"packets": {}, "bytes": {}, "drops": {}, "flows_started": {},
                             "flows_active": {}, "tunnels_active": 0, "gue_tunnels_active": 0}}
    json.dumps(out, allow_nan=False)
