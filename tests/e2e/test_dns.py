"""Names through the daemon: a tunnel's DNS to the daemon's resolver address is forwarded to the
resolvers of the daemon's host, a loopback stub included (here a dnsmasq on 127.0.0.53 in the
test's namespace, the daemon's only resolver)."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.dataplane import audit_records, config, connect, counter
from tests.helpers import wait_for

DNSMASQ_ADDR = "127.0.0.53"
RECORDS = ["--host-record=app.test,198.18.0.1,fd18::1", "--address=/blocked.test/192.0.2.1",
           # 3 KB of answer: more than a plain UDP answer (512) or dig's default EDNS size
           *(f"--txt-record=big.test,{i:02d}{'x' * 250}" for i in range(12))]


@pytest.fixture
def resolver(netns):
    """dnsmasq on 127.0.0.53:53 inside the test's namespace: what systemd-resolved's stub is to
    a desktop host."""
    proc = subprocess.Popen(["nsenter", f"--net={netns.path}", "dnsmasq", "--keep-in-foreground",
                             "--no-resolv", "--no-hosts", f"--listen-address={DNSMASQ_ADDR}",
                             "--bind-interfaces", "--port=53", "--user=root", "--pid-file=",
                             "--log-facility=-", "--edns-packet-max=4096", *RECORDS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def answers() -> bool:
            res = subprocess.run(["nsenter", f"--net={netns.path}", "dig", "+short", "+time=1",
                                  "+tries=1", f"@{DNSMASQ_ADDR}", "app.test"],
                                 capture_output=True, timeout=10)
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited: {proc.stderr.read() if proc.stderr else ''}")
            return res.stdout.strip() == b"198.18.0.1"
        wait_for(answers, 10, "dnsmasq")
        yield DNSMASQ_ADDR
    finally:
        proc.kill()
        proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def dig(d, *args: str) -> str:
    res = connect(d, "dig", "+short", "+time=3", "+tries=1", *args, timeout=60)
    assert res.returncode == 0, (res.stdout, res.stderr)
    return res.stdout.decode().strip()


def test_queries_to_the_daemons_address_reach_the_hosts_stub(daemon_factory, resolver,
                                                              tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path, f"""
[dns]
upstreams = ["{resolver}"]
"""))
    assert dig(d, "@100.100.100.100", "app.test", "A") == "198.18.0.1"
    assert dig(d, "@100.100.100.100", "app.test", "AAAA") == "fd18::1"
    assert dig(d, "+tcp", "@100.100.100.100", "app.test", "A") == "198.18.0.1"
    assert dig(d, "@fd53::53", "app.test", "A") == "198.18.0.1"
    assert dig(d, "+tcp", "@fd53::53", "app.test", "AAAA") == "fd18::1"
    # The stub itself stays out of reach: the namespace's loopback is its own.
    res = connect(d, "dig", "+short", "+time=2", "+tries=1", f"@{resolver}", "app.test",
                  timeout=60)
    assert res.returncode != 0 and b"198.18.0.1" not in res.stdout
    starts = wait_for(lambda: [r for r in audit_records(tmp_path / "audit.jsonl")
                               if r["audit"] == "flow_start" and r["dport"] == 53
                               and r["dst"] in ("100.100.100.100", "fd53::53")] or None,
                      10, "flow_start records of the queries")
    assert len(starts) == 5, starts
    assert {r["upstream"] for r in starts} == {f"{resolver}:53"}, starts


def test_without_a_resolver_queries_are_refused_at_once(daemon_factory, tmp_path):
    missing = tmp_path / "resolv.conf"
    missing.write_text("# no nameserver\n")
    d = daemon_factory("--workers", "1", config=config(tmp_path, f"""
[dns]
resolv_conf = "{missing}"
"""))
    res = connect(d, "dig", "+time=3", "+tries=1", "@100.100.100.100", "app.test", timeout=60)
    assert b"connection refused" in res.stdout.lower() or res.returncode != 0, res.stdout
    assert counter(d, "ipferry_drops_total", "reason").get("no_dns_upstream", 0) >= 1


def test_names_work_inside_connect_whatever_the_hosts_resolver(daemon_factory, resolver,
                                                               upstream, tmp_path):
    """The desktop set-up of the issue: the daemon's host resolves through a loopback stub,
    unreachable from connect's namespace; connect's own resolv.conf names the daemon's address,
    which forwards to the stub."""
    (upstream / "hello.txt").write_text("hello by name\n")
    d = daemon_factory("--workers", "2", config=config(tmp_path, f"""
[dns]
upstreams = ["{resolver}"]
"""))
    res = connect(d, "getent", "ahosts", "app.test", timeout=60)
    assert res.returncode == 0, res
    assert {"198.18.0.1", "fd18::1"} <= {line.split()[0] for line in res.stdout.decode().splitlines()}
    res = connect(d, "curl", "-sS", "-4", "--max-time", "10", "http://app.test:8080/hello.txt",
                  timeout=60)
    assert res.returncode == 0 and res.stdout == b"hello by name\n", res
    # --no-dns: the host's resolv.conf, whose servers the namespace cannot reach here.
    res = connect(d, "getent", "hosts", "app.test", options=("--no-dns",), timeout=60)
    assert res.returncode == 2, res


POLICY = """
[[rules]]
action = "deny"
domain = "blocked.test"

[[rules]]
action = "deny"
tenant = "acme"
domain = "*.corp.test"
"""


def test_denied_names_get_nxdomain_and_every_query_an_audit_record(daemon_factory, resolver,
                                                                   tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path, f"""
[dns]
upstreams = ["{resolver}"]
""" + POLICY))
    res = connect(d, "dig", "+time=3", "+tries=1", "@100.100.100.100", "blocked.test", timeout=60)
    assert res.returncode == 0 and b"status: NXDOMAIN" in res.stdout, res.stdout
    res = connect(d, "dig", "+time=3", "+tries=1", "@100.100.100.100", "x.corp.test", timeout=60)
    assert b"status: NXDOMAIN" in res.stdout, res.stdout
    # Another tenant's names are not acme's rules' business; the allowed name is forwarded.
    res = connect(d, "dig", "+short", "+time=3", "+tries=1", "@100.100.100.100", "app.test",
                  tenant="globex", timeout=60)
    assert res.stdout.strip() == b"198.18.0.1", res.stdout
    queries = wait_for(lambda: len([r for r in audit_records(tmp_path / "audit.jsonl")
                                    if r["audit"] == "dns_query"]) >= 3
                       and [r for r in audit_records(tmp_path / "audit.jsonl")
                            if r["audit"] == "dns_query"], 10, "dns_query records")
    by_name = {r["name"]: r for r in queries}
    assert by_name["blocked.test"]["decision"] == "nxdomain"
    assert by_name["blocked.test"]["rcode"] == "NXDOMAIN" and by_name["blocked.test"]["type"] == "A"
    assert by_name["x.corp.test"]["tenant"] == "acme"
    app = by_name["app.test"]
    assert (app["decision"], app["rcode"], app["answers"], app["tenant"]) == (
        "allow", "NOERROR", ["198.18.0.1"], "globex")
    assert app["latency"] > 0
    results = counter(d, "ipferry_dns_queries_total", "result")
    assert results.get("denied") == 2 and results.get("noerror") == 1, results
    # Over TCP the policy holds too: the denied name's connection is cut, the allowed answered
    # (and both audited).
    res = connect(d, "dig", "+tcp", "+time=3", "+tries=1", "@100.100.100.100", "blocked.test",
                  timeout=60)
    assert b"192.0.2.1" not in res.stdout, res.stdout  # what the upstream would have said
    assert dig(d, "+tcp", "@100.100.100.100", "app.test") == "198.18.0.1"
    tcp = wait_for(lambda: len([r for r in audit_records(tmp_path / "audit.jsonl")
                                if r["audit"] == "dns_query"]) >= 5
                   and [r for r in audit_records(tmp_path / "audit.jsonl")
                        if r["audit"] == "dns_query"][3:], 10, "the TCP queries' records")
    assert [(r["name"], r["decision"], r["result"]) for r in tcp] == [
        ("blocked.test", "nxdomain", "reset"), ("app.test", "allow", None)], tcp


def test_host_rules_apply_to_flows_by_the_names_the_resolver_gave(daemon_factory, netns,
                                                                   tmp_path):
    """A rule `host = "evil.test"` refuses flows to the address the daemon's resolver answered
    that name with, and lets flows to another name's address go; the flows' audit records carry
    the name. Two workers: the query and the flow need not have the same owner."""
    subprocess.run(["ip", "-n", netns.name, "addr", "add", "198.18.0.2/32", "dev", "lo"],
                   check=True)
    www = tmp_path / "www"
    www.mkdir()
    (www / "ok.txt").write_text("good\n")
    server = subprocess.Popen(["nsenter", f"--net={netns.path}", "python3", "-m", "http.server",
                               "--bind", "198.18.0.2", "8081"], cwd=www,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = ["--host-record=evil.test,198.18.0.1", "--host-record=good.test,198.18.0.2"]
    dnsmasq = subprocess.Popen(["nsenter", f"--net={netns.path}", "dnsmasq",
                                "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                f"--listen-address={DNSMASQ_ADDR}", "--bind-interfaces",
                                "--port=53", "--user=root", "--pid-file=", *records],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        d = daemon_factory("--workers", "2", config=config(tmp_path, f"""
[dns]
upstreams = ["{DNSMASQ_ADDR}"]

[[rules]]
action = "deny"
host = "evil.test"
"""))
        wait_for(lambda: dig(d, "@100.100.100.100", "good.test") == "198.18.0.2", 10,
                 "dnsmasq through the daemon")
        res = connect(d, "curl", "-sS", "--max-time", "10", "http://good.test:8081/ok.txt",
                      timeout=60)
        assert res.returncode == 0 and res.stdout == b"good\n", res
        res = connect(d, "curl", "-sS", "--max-time", "10", "http://evil.test:8081/ok.txt",
                      timeout=60)
        assert res.returncode == 7, res  # refused: "administratively prohibited"
        # The same address without the name (asked by number) is not the rule's.
        res = connect(d, "curl", "-sS", "--max-time", "10", "http://198.18.0.2:8081/ok.txt",
                      tenant="globex", timeout=60)
        assert res.returncode == 0, res
        starts = wait_for(lambda: [r for r in audit_records(tmp_path / "audit.jsonl")
                                   if r["audit"] == "flow_start" and r["dport"] == 8081]
                          or None, 10, "flow_start records")
        assert {(r["host"], r["decision"]) for r in starts} == {
            ("good.test", "upgrade"), ("evil.test", "drop"), (None, "upgrade")}, starts
    finally:
        for proc in (server, dnsmasq):
            proc.kill()
            proc.wait(5)


SINK = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.54", 53))
print("listening", flush=True)
while True:
    s.recv(65535)  # a resolver that never answers
"""


def test_big_answers_and_bad_queries(daemon_factory, netns, resolver, tmp_path):
    """A 3 KB EDNS answer comes back whole over UDP; a datagram that is no query is dropped
    and counted."""
    d = daemon_factory("--workers", "1", config=config(tmp_path, f"""
[dns]
upstreams = ["{resolver}"]
"""))
    res = connect(d, "dig", "+bufsize=4096", "+ignore", "+time=3", "+tries=1",
                  "@100.100.100.100", "big.test", "TXT", timeout=60)
    assert res.returncode == 0 and b"status: NOERROR" in res.stdout, res.stdout
    assert b" tc" not in res.stdout.split(b"flags:")[1][:30], res.stdout  # not truncated
    assert res.stdout.count(b"big.test.") >= 12, res.stdout  # 3 KB of TXT records
    garbage = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
               "s.sendto(b'\\x00' * 5, ('100.100.100.100', 53))")
    assert connect(d, "python3", "-c", garbage, timeout=60).returncode == 0
    wait_for(lambda: counter(d, "ipferry_drops_total", "reason").get("dns_malformed"),
             10, "the malformed query counted")


def test_an_upstream_that_never_answers_gets_the_client_a_servfail(daemon_factory, netns,
                                                                   tmp_path):
    sink = subprocess.Popen(["nsenter", f"--net={netns.path}", "python3", "-c", SINK],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == b"listening"
        d = daemon_factory("--workers", "1", config=config(tmp_path, """
[dns]
upstreams = ["127.0.0.54"]
"""))
        res = connect(d, "dig", "+time=8", "+tries=1", "@100.100.100.100", "app.test",
                      timeout=60)
        assert b"status: SERVFAIL" in res.stdout, res.stdout
        assert counter(d, "ipferry_dns_queries_total", "result").get("timeout") == 1
    finally:
        sink.kill()
        sink.wait(5)


DNS_APP = """
from ipferry.worker.app import DnsDecision, RulesApplication


class App(RulesApplication):
    def on_dns_query(self, query):
        if query.name == "magic.test":
            return DnsDecision.answer("198.18.0.9" if query.type == "A" else "fd18::9", "magic")
        if query.name == "nope.test":
            return DnsDecision.refused("not here")
        return super().on_dns_query(query)
"""


def test_an_application_answers_or_refuses_queries_itself(daemon_factory, resolver, tmp_path):
    (tmp_path / "dnsapp.py").write_text(DNS_APP)
    d = daemon_factory("--workers", "1", config=config(tmp_path, f"""
[app]
class = "dnsapp:App"

[dns]
upstreams = ["{resolver}"]
"""), env={"PYTHONPATH": str(tmp_path)})
    assert dig(d, "@100.100.100.100", "magic.test", "A") == "198.18.0.9"
    assert dig(d, "@100.100.100.100", "magic.test", "AAAA") == "fd18::9"
    res = connect(d, "dig", "+time=3", "+tries=1", "@100.100.100.100", "nope.test", timeout=60)
    assert b"status: REFUSED" in res.stdout, res.stdout
    assert dig(d, "@100.100.100.100", "app.test") == "198.18.0.1"  # the rest: forwarded
    results = counter(d, "ipferry_dns_queries_total", "result")
    assert (results.get("answered"), results.get("refused"), results.get("noerror")) == (2, 1, 1)
