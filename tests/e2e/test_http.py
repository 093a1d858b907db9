"""The HTTP layer end to end: streams carried as HTTP through ``ipferry connect``, the HTTP
on-ramp as a forward proxy, TLS server names; real clients (curl, aiohttp's WebSocket client)
and real servers (nginx, an aiohttp upstream, a device's file server) inside the test's
namespace."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.e2e.dataplane import SERVER_ADDR, audit_records, config, connect, counter
from tests.e2e.devices import NETWORKS, serve_files
from tests.e2e.webservers import TLS_PORT, aiohttp_upstream, need, nginx
from tests.helpers import wait_for

PORT = 8080
PROXY = "127.0.0.1:3128"
TOKEN = "globex-token-0123456789"


@pytest.fixture
def origin(netns):
    """The aiohttp upstream on SERVER_ADDR:8080 (answering as "a")."""
    need("curl")
    with aiohttp_upstream(netns, SERVER_ADDR, PORT, "a") as where:
        yield where


@pytest.fixture
def web(netns, tmp_path):
    with nginx(netns, tmp_path / "nginx") as where:
        yield where


HTTP_RULES = """
[[rules]]
action = "deny"
name = "no-admin"
path = "/admin"

[[rules]]
action = "deny"
name = "no-delete"
method = "DELETE"

[[rules]]
action = "allow"
name = "web-as-http"
protocol = "tcp"
ports = "80-8080"
layer = "http"
"""

# An application that rewrites and denies by request, and marks responses.
HOOKS = textwrap.dedent("""\
    from ipferry.worker.app import HttpDecision, RulesApplication

    class App(RulesApplication):
        def on_request(self, request):
            if request.path == "/to-b":
                return HttpDecision.allow("to site b", target="/",
                                          set_headers={"host": "b.test"})
            if request.header("x-block") is not None:
                return HttpDecision.deny("blocked by header", status=451)
            return super().on_request(request)

        async def on_response(self, response):
            return HttpDecision.allow(set_headers={"x-seen-by": "ipferry"})
    """)


def nonzero(counts: dict[str, float]) -> dict[str, float]:
    """A counter's labels that counted (the known ones are exported from 0)."""
    return {k: v for k, v in counts.items() if v}


def http_records(tmp_path, n: int) -> list[dict]:
    def got() -> list[dict] | None:
        found = [r for r in audit_records(tmp_path / "audit.jsonl")
                 if r["audit"] == "http_request"]
        return found if len(found) >= n else None
    return wait_for(got, 10, f"{n} http_request records")


def curl(d, *args: str) -> subprocess.CompletedProcess:
    """curl inside ``ipferry connect`` (a tunnel of tenant acme)."""
    return connect(d, "curl", "-sS", "--max-time", "60", *args, timeout=120)


def host_curl(d, *args: str) -> subprocess.CompletedProcess:
    """curl in the daemon's namespace, where the HTTP on-ramp listens."""
    return subprocess.run(["nsenter", f"--net={d.netns.path}", "curl", "-sS", "--max-time",
                           "60", *args], capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def worker_pid(d) -> int:
    workers = d.workers()
    assert len(workers) == 1, workers
    return workers[0]["pid"]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss:
    """The highest RSS of ``pid`` while the block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.before = pid, 0, rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# -- streams carried as HTTP (layer = "http") ---------------------------------------------------

def test_keep_alive_requests_are_each_decided_and_audited(daemon_factory, origin, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, HTTP_RULES))
    res = curl(d, "-w", "%{http_code} %{num_connects}\\n", f"http://{origin}/hello",
               f"http://{origin}/admin/x", "-X", "GET", f"http://{origin}/hello")
    assert res.returncode == 0, res
    out = res.stdout.decode()
    assert out.count("hello from a") == 2, out
    assert "denied by rule no-admin\n403 0" in out, out  # on the same connection
    res = curl(d, "-X", "DELETE", "-w", "%{http_code}", f"http://{origin}/hello")
    assert res.stdout.decode().endswith("denied by rule no-delete\n403"), res
    records = http_records(tmp_path, 4)
    assert [(r["method"], r["path"], r["status"], r["decision"]) for r in records] == [
        ("GET", "/hello", 200, "allow"), ("GET", "/admin/x", 403, "deny"),
        ("GET", "/hello", 200, "allow"), ("DELETE", "/hello", 403, "deny")], records
    assert records[1]["reason"] == "denied by rule no-admin"
    assert records[0]["response_bytes"] == len("hello from a\n")
    assert all(r["tenant"] == "acme" and r["flow"]["dport"] == PORT
               and r["upstream"] == origin for r in records), records
    # The flow the requests rode on: one connection, one flow, carried as HTTP.
    starts = [r for r in audit_records(tmp_path / "audit.jsonl")
              if r["audit"] == "flow_start" and r["dport"] == PORT]
    assert len(starts) == 2 and {r["sport"] for r in starts} == \
        {r["flow"]["sport"] for r in records}, (starts, records)
    classes = counter(d, "ipferry_http_requests_total", "status_class")
    assert classes.get("2xx") == 2 and classes.get("4xx") == 2, classes
    metrics = d.metrics()
    assert metrics[("ipferry_http_request_duration_seconds_count", (("worker", "0"),))] == 4


def test_uploads_and_downloads_stream_through_a_worker_of_bounded_rss(daemon_factory, origin,
                                                                      tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, HTTP_RULES))
    payload = tmp_path / "payload"
    block = hashlib.sha256(b"ipferry").digest() * 2048  # 64 KiB, not all one byte
    size = 200 * 1024 * 1024
    digest = hashlib.sha256()
    with open(payload, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
            digest.update(block)
    # Chunked (curl's Transfer-Encoding: chunked upload), then 200 MB with a Content-Length.
    res = curl(d, "-H", "Transfer-Encoding: chunked", "--data-binary", "@" + str(payload),
               f"http://{origin}/sha256")
    assert res.returncode == 0, res
    assert f'"sha256": "{digest.hexdigest()}", "size": {size}' in res.stdout.decode(), res
    pid = worker_pid(d)
    with PeakRss(pid) as mem:
        res = curl(d, "-T", str(payload), f"http://{origin}/sha256")
        down = curl(d, "-o", "/dev/null", "-w", "%{size_download}",
                    f"http://{origin}/bytes/{size}")
    assert res.returncode == 0 and digest.hexdigest() in res.stdout.decode(), res
    assert down.returncode == 0 and down.stdout == str(size).encode(), down
    grew = mem.peak - mem.before
    print(f"worker RSS {mem.before / 2**20:.1f} MiB, peak {mem.peak / 2**20:.1f} MiB while "
          f"{size / 2**20:.0f} MiB went up and down")
    assert mem.peak > 0 and grew < 24 * 1024 * 1024, (mem.before, mem.peak)
    records = http_records(tmp_path, 3)
    assert [(r["method"], r["request_bytes"], r["response_bytes"] == 0) for r in records[:2]] \
        == [("POST", size, False), ("PUT", size, False)], records
    assert records[2]["response_bytes"] == size


def test_hooks_rewrite_deny_and_mark(daemon_factory, web, tmp_path):
    """A Host rewrite reaches the other virtual host of nginx; a hook's denial has its status;
    ``on_response`` adds a header to every answer."""
    (tmp_path / "httpapp.py").write_text(HOOKS)
    d = daemon_factory("--workers", "1", config=config(tmp_path, HTTP_RULES + """
[app]
class = "httpapp:App"
"""), env={"PYTHONPATH": str(tmp_path)})
    res = curl(d, "-i", f"http://{SERVER_ADDR}/", "-H", "Host: a.test", f"http://{SERVER_ADDR}/to-b")
    assert res.returncode == 0, res
    out = res.stdout.decode().replace("\r\n", "\n")
    assert out.count("x-seen-by: ipferry") == 2, out
    assert "site a\n" in out and out.rstrip().endswith("site b"), out
    res = curl(d, "-w", "%{http_code}", "-H", "X-Block: 1", f"http://{SERVER_ADDR}/")
    assert res.stdout.decode().endswith("blocked by header\n451"), res
    records = http_records(tmp_path, 3)
    assert [(r["path"], r["status"], r["reason"]) for r in records] == [
        ("/", 200, "allowed by default"), ("/to-b", 200, "to site b"),
        ("/", 451, "blocked by header")], records


def test_a_websocket_upgrades_to_a_stream(daemon_factory, origin, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, HTTP_RULES))
    script = textwrap.dedent(f"""\
        import asyncio, aiohttp
        async def main():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect("ws://{origin}/ws") as ws:
                    await ws.send_str("hello")
                    print((await ws.receive()).data)
                    blob = bytes(range(256)) * 4096
                    await ws.send_bytes(blob)
                    print((await ws.receive()).data == blob)
        asyncio.run(main())
        """)
    res = connect(d, sys.executable, "-c", script, timeout=120)
    assert res.returncode == 0, res
    assert res.stdout.decode().split() == ["a:", "hello", "True"], res
    records = http_records(tmp_path, 1)
    assert [(r["path"], r["status"]) for r in records] == [("/ws", 101)], records


def test_tls_server_names_are_allowed_or_denied_and_audited(daemon_factory, web, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, """
[[rules]]
action = "deny"
name = "no-bad"
sni = "bad.test"
"""))
    good = curl(d, "-k", "--resolve", f"good.test:{TLS_PORT}:{SERVER_ADDR}",
                f"https://good.test:{TLS_PORT}/")
    assert good.returncode == 0 and good.stdout == b"tls site\n", good
    bad = curl(d, "-k", "--resolve", f"bad.test:{TLS_PORT}:{SERVER_ADDR}",
               f"https://bad.test:{TLS_PORT}/")
    assert bad.returncode in (35, 56) and bad.stdout == b"", bad  # reset during the handshake
    records = wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(
        [r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "tls_stream"]),
        10, "tls_stream records")
    assert [(r["sni"], r["decision"], r["reason"]) for r in records] == [
        ("good.test", "allow", ""), ("bad.test", "deny", "denied by rule no-bad")], records
    assert nonzero(counter(d, "ipferry_tls_streams_total", "result")) == {"allowed": 1,
                                                                          "denied": 1}


# -- the HTTP on-ramp (a forward proxy) ---------------------------------------------------------

PROXY_CONFIG = f"""
[[onramps]]
kind = "tunnel"

[[onramps]]
kind = "http"
name = "proxy"
listen = "{PROXY}"
tenant = "acme"

[[onramps.tokens]]
tenant = "globex"
token = "{TOKEN}"

[[rules]]
action = "deny"
name = "no-admin"
path = "/admin"

[[rules]]
action = "deny"
name = "globex-not-8443"
tenant = "globex"
ports = "{TLS_PORT}"

[[rules]]
action = "deny"
name = "globex-not-the-origin"
tenant = "globex"
cidr = "{SERVER_ADDR}/32"
ports = "{PORT}"
"""


def test_a_forward_proxy_for_plain_requests_and_connect(daemon_factory, origin, web, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, PROXY_CONFIG))
    res = host_curl(d, "-x", f"http://{PROXY}", "-w", " %{http_code} %{num_connects}\\n",
                    f"http://{origin}/hello", f"http://{origin}/admin", f"http://{origin}/hello")
    assert res.returncode == 0, res
    out = res.stdout.decode()
    assert out.count("hello from a\n 200") == 2 and "denied by rule no-admin\n 403" in out, out
    # HTTPS through CONNECT: nginx's TLS, end to end.
    res = host_curl(d, "-x", f"http://{PROXY}", "-k", f"https://{SERVER_ADDR}:{TLS_PORT}/")
    assert res.returncode == 0 and res.stdout == b"tls site\n", res
    # A token names another tenant, whose flow rule refuses the CONNECT: 403, named.
    res = host_curl(d, "-x", f"http://{PROXY}", "-U", f"someone:{TOKEN}", "-k", "-w",
                    "%{http_connect}", f"https://{SERVER_ADDR}:{TLS_PORT}/")
    assert res.returncode != 0 and res.stdout.endswith(b"403"), res
    # A wrong token: 407, whatever the listener's own tenant.
    res = host_curl(d, "-x", f"http://{PROXY}", "-U", "someone:wrong-token-000000", "-w",
                    "%{http_code}", f"http://{origin}/hello")
    assert res.stdout.endswith(b"407"), res
    # A flow rule refuses the upstream flow a plain request needs: 403, named.
    res = host_curl(d, "-x", f"http://{PROXY}", "-U", f"someone:{TOKEN}", "-w", " %{http_code}",
                    f"http://{origin}/hello")
    assert res.stdout == b"denied by rule globex-not-the-origin\n 403", res
    records = http_records(tmp_path, 7)
    got = [(r["tenant"], r["method"], r["status"], r["onramp"]) for r in records]
    assert got[:5] == [("acme", "GET", 200, "proxy"), ("acme", "GET", 403, "proxy"),
                       ("acme", "GET", 200, "proxy"), ("acme", "CONNECT", 200, "proxy"),
                       ("globex", "CONNECT", 403, "proxy")], got
    assert TOKEN not in d.logs() and TOKEN not in (tmp_path / "audit.jsonl").read_text()
    # The CONNECT's flow is a TCP flow like any other, audited with its on-ramp.
    starts = [r for r in audit_records(tmp_path / "audit.jsonl")
              if r["audit"] == "flow_start" and r["dport"] == TLS_PORT]
    assert len(starts) == 2 and {r["tenant"] for r in starts} == {"acme", "globex"}, starts


def test_connect_reaches_a_devices_http_service(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path, PROXY_CONFIG + NETWORKS))
    with serve_files(d, "10.77.0.2"):
        # --proxytunnel: CONNECT 10.77.0.2:8000, then plain HTTP inside it, downgraded into
        # the device's tunnel.
        res = host_curl(d, "-x", f"http://{PROXY}", "--proxytunnel", "-o", "/dev/null", "-w",
                        "%{http_code} %{size_download}", "http://10.77.0.2:8000/100000")
        assert res.returncode == 0 and res.stdout == b"200 100000", res
        # An absolute-form request to the device goes by downgrade too.
        res = host_curl(d, "-x", f"http://{PROXY}", "-o", "/dev/null", "-w",
                        "%{http_code} %{size_download}", "http://10.77.0.2:8000/5000")
        assert res.returncode == 0 and res.stdout == b"200 5000", res
    starts = [r for r in audit_records(tmp_path / "audit.jsonl")
              if r["audit"] == "flow_start" and r["dst"] == "10.77.0.2"]
    assert len(starts) == 2 and {r["server_leg"] for r in starts} == {"tcp:downgraded"}, starts


def raw_exchange(data: bytes, *, slow: float = 0.0, wait: float = 20) -> bytes:
    """Send ``data`` to the proxy (a byte every ``slow`` seconds, if set) and read until it
    closes."""
    host, port = PROXY.split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        if slow:
            for i in range(len(data)):
                try:
                    s.send(data[i:i + 1])
                except OSError:
                    break
                time.sleep(slow)
        else:
            s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_malformed_oversized_and_slow_requests(daemon_factory, origin, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, PROXY_CONFIG + """
[http]
header_timeout = 1.0
max_header_bytes = 4096
"""))
    ns = d.netns
    bad = ns.run(raw_exchange, b"GET http://x/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400 "), bad
    big = ns.run(raw_exchange, b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX-Big: "
                 + b"a" * 8192 + b"\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 431 "), big
    started = time.monotonic()
    slow = ns.run(lambda: raw_exchange(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n", slow=0.2))
    assert slow.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 10, slow
    garbage = ns.run(raw_exchange, bytes(range(256)) * 4)
    assert garbage.startswith(b"HTTP/1.1 400 "), garbage
    target = ns.run(raw_exchange, b"GET /no-absolute-url HTTP/1.1\r\nHost: x\r\n\r\n")
    assert target.startswith(b"HTTP/1.1 400 ") and b"absolute URL" in target, target
    # The worker lives on and serves.
    res = host_curl(d, "-x", f"http://{PROXY}", f"http://{origin}/hello")
    assert res.returncode == 0 and res.stdout == b"hello from a\n", res
    rejected = counter(d, "ipferry_http_rejected_total", "reason")
    assert rejected.get("malformed") == 2 and rejected.get("header_too_large") == 1 \
        and rejected.get("header_timeout") == 1 and rejected.get("bad_target") == 1, rejected
    assert len(d.workers()) == 1 and "Traceback" not in d.logs()


def test_a_tcp_onramps_stream_carried_as_http(daemon_factory, origin, tmp_path):
    """A published service (a TCP on-ramp) whose flows a rule carries as HTTP: its requests are
    decided one by one like a tunnel's."""
    d = daemon_factory("--workers", "1", config=config(tmp_path, f"""
[[onramps]]
kind = "tunnel"

[[onramps]]
kind = "tcp"
name = "web"
listen = "127.0.0.1:8088"
tenant = "acme"
upstream = "{origin}"
""" + HTTP_RULES))
    res = host_curl(d, "-w", " %{http_code}\\n", "http://127.0.0.1:8088/hello",
                    "http://127.0.0.1:8088/admin")
    assert res.returncode == 0, res
    assert res.stdout == b"hello from a\n 200\ndenied by rule no-admin\n 403\n", res
    records = http_records(tmp_path, 2)
    assert [(r["path"], r["status"], r["flow"]["dport"]) for r in records] == [
        ("/hello", 200, PORT), ("/admin", 403, PORT)], records


def test_the_proxy_is_no_way_into_the_daemons_host(daemon_factory, tmp_path):
    """Loopback (the admin API listens there), the proxy itself, by address or by name: refused
    as any flow to them is, with a 403 naming why."""
    d = daemon_factory("--workers", "1", config=config(tmp_path, PROXY_CONFIG))
    for url in ("http://127.0.0.1:9180/api/status", "http://localhost:9180/metrics",
                f"http://{PROXY}/", "http://[::1]:9180/api/status"):
        res = host_curl(d, "-x", f"http://{PROXY}", "-w", " %{http_code}", url)
        assert res.stdout.endswith(b" 403"), (url, res)
    res = host_curl(d, "-x", f"http://{PROXY}", "--proxytunnel", "-w", "%{http_connect}",
                    "http://127.0.0.1:9180/api/status")
    assert res.returncode != 0 and res.stdout.endswith(b"403"), res
    records = http_records(tmp_path, 5)
    assert [r["status"] for r in records] == [403] * 5, records
    assert nonzero(counter(d, "ipferry_http_requests_total", "status_class")) == {"4xx": 5}


def test_a_proxied_download_cut_by_a_stopping_daemon_is_cut_not_whole(daemon_factory, origin,
                                                                       tmp_path):
    """The upstream connection a proxy request borrows is a flow: when the daemon stops, the
    client's download ends in an error (never a short "complete" body) and the daemon stops
    cleanly."""
    d = daemon_factory("--workers", "1", config=config(tmp_path, PROXY_CONFIG))
    size = 500 * 1024 * 1024
    proc = subprocess.Popen(["nsenter", f"--net={d.netns.path}", "curl", "-sS", "--max-time",
                             "60", "--limit-rate", "2M", "-x", f"http://{PROXY}", "-o",
                             "/dev/null", "-w", "%{size_download}",
                             f"http://{origin}/bytes/{size}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: [r for r in audit_records(tmp_path / "audit.jsonl")
                          if r["audit"] == "flow_start" and r["dport"] == PORT] or None,
                 10, "the proxy's upstream flow")
        time.sleep(1)
        assert d.terminate() == 0, d.logs()[-2000:]
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(5)
    assert proc.returncode != 0 and int(out or b"0") < size, (proc.returncode, out, err)
    assert "Traceback" not in d.logs(), d.logs()[-3000:]
    ends = [r for r in audit_records(tmp_path / "audit.jsonl")
            if r["audit"] == "flow_end" and r["dport"] == PORT]
    # (the on-ramp stops first: its client is reset and the borrowed flow handed back)
    assert len(ends) == 1 and ends[0]["close_reason"] in ("fin", "shutdown"), ends
    assert b"reset" in err.lower() or b"transfer closed" in err.lower(), err


def test_plain_http_on_a_tls_port_is_carried_whole(daemon_factory, netns, tmp_path):
    """A stream to a TLS port is read for a ClientHello first; when it is carried as HTTP, what
    was read is the start of its first request, not lost nor sent around the HTTP layer."""
    with aiohttp_upstream(netns, SERVER_ADDR, 853, "on-853") as where:
        d = daemon_factory("--workers", "1", config=config(tmp_path, """
[[rules]]
action = "allow"
protocol = "tcp"
ports = "853"
layer = "http"
"""))
        res = curl(d, f"http://{where}/hello", f"http://{where}/hello")
        assert res.returncode == 0 and res.stdout == b"hello from on-853\n" * 2, res
    records = http_records(tmp_path, 2)
    assert [r["status"] for r in records] == [200, 200], records
    assert nonzero(counter(d, "ipferry_tls_streams_total", "result")) == {"not_tls": 1}
