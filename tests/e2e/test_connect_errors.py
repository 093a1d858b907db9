"""``ipferry connect`` says why a tunnel will not carry CMD's traffic, instead of leaving CMD to
time out without a word: a GUE on-ramp that is not there (an error) or that drops this sender (a
warning), both found before CMD starts; a daemon gone mid-run; a daemon that cannot send pings."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.e2e.dataplane import SERVER_ADDR, add_server_address, audit_records, config, connect, drops
from tests.helpers import IPFERRY, NO_CAPS, wait_for

GUE = "127.0.0.1:6080"
SAID = "ipferry connect: "


def gue_config(tmp_path, extra: str = "") -> str:
    return config(tmp_path, f"""
[[onramps]]
kind = "tunnel"

[[onramps]]
kind = "gue"
listen = "{GUE}"
tenants = ["acme"]
{extra}""")


def said(res: subprocess.CompletedProcess) -> str:
    """The one line connect printed."""
    lines = res.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(SAID), lines
    return lines[0].removeprefix(SAID)


def test_gue_without_a_daemon_says_nothing_listens(netns, tmp_path):
    marker = tmp_path / "ran"
    start = time.monotonic()
    res = subprocess.run(["nsenter", f"--net={netns.path}", *NO_CAPS, IPFERRY, "connect",
                          "--gue", GUE, "--tenant", "acme", "--", "touch", str(marker)],
                         capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert time.monotonic() - start < 2.5, "said at once, not after the check's timeout"
    assert res.returncode == 1 and not marker.exists(), res
    assert said(res) == (
        f'nothing listens on udp {GUE} (ICMP port unreachable): is ipferry running there with a '
        f'kind = "gue" on-ramp? (--gue names its listen address)')


@pytest.mark.parametrize("how", ["tenant", "context", "source"])
def test_gue_sender_the_daemon_drops_is_told_the_likely_causes(daemon_factory, tmp_path, how):
    allow = 'allow = ["192.0.2.0/24"]' if how == "source" else ""
    d = daemon_factory("--workers", "2", config=gue_config(tmp_path, allow))
    tenant = {"tenant": "evil", "context": "no spaces allowed", "source": "acme"}[how]
    start = time.monotonic()
    res = connect(d, "true", tenant=tenant, gue=GUE, timeout=60)
    assert time.monotonic() - start < 15
    assert res.returncode == 0, res  # (CMD runs anyway: a GUE endpoint may be no ipferry)
    assert said(res) == (
        f"warning: the GUE on-ramp at {GUE} did not answer in 3 s, so it likely drops this "
        f"tunnel's datagrams: tenant {tenant!r} not in its tenants, this sender (127.0.0.1) "
        f"outside its allow list, a context its application refused, or no daemon there and no "
        f"ICMP error back (the daemon's log says gue_unknown_tenant or gue_context_refused; "
        f"ipferry_drops_total counts gue_source_denied); running CMD anyway")
    reason = {"tenant": "gue_unknown_tenant", "context": "gue_bad_context",
              "source": "gue_source_denied"}[how]
    assert drops(d).get(reason, 0) >= 1, drops(d)
    if how != "source":
        event = {"tenant": "gue_unknown_tenant", "context": "gue_context_refused"}[how]
        assert any(e.get("event") == event for e in d.log_events()), d.logs()[-2000:]
    assert not d.get_json("/api/tunnels")
    assert not audit_records(tmp_path / "audit.jsonl")


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_a_gue_tunnel_the_daemon_takes_runs_cmd(daemon_factory, tmp_path, offload):
    """The check costs one answered refusal (forbidden_destination), no flow and no record."""
    d = daemon_factory("--workers", "2", config=gue_config(tmp_path))
    res = connect(d, "true", gue=GUE, options=[] if offload else ["--no-offload"], timeout=60)
    assert res.returncode == 0 and not res.stderr, res
    assert drops(d).get("forbidden_destination", 0) >= 1
    [row] = d.get_json("/api/tunnels")
    assert (row["kind"], row["tenant"], row["offload"]) == ("gue", "acme", offload)
    assert not audit_records(tmp_path / "audit.jsonl")


def test_a_gue_daemon_gone_mid_run_is_told_once(daemon_factory, tmp_path):
    d = daemon_factory("--workers", "1", config=gue_config(tmp_path))
    sender = ("import socket, time\n"
              "time.sleep(3)\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "for _ in range(10):\n"
              f"    s.sendto(b'x', ('{SERVER_ADDR}', 9)); time.sleep(0.1)\n")
    result: dict = {}
    client = threading.Thread(target=lambda: result.update(
        res=connect(d, "python3", "-c", sender, gue=GUE, timeout=60)))
    client.start()
    wait_for(lambda: d.get_json("/api/tunnels"), 10, "the GUE tunnel checked")
    assert d.terminate() == 0
    client.join(60)
    res = result["res"]
    assert res.returncode == 0, res
    assert res.stderr.decode().strip().splitlines() == [
        f"{SAID}warning: the GUE on-ramp at {GUE} answered ICMP port unreachable: no daemon "
        f"listens there any more (stopped?); CMD's packets are lost until one does"]


def ping_range(netns, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns.name, "sysctl", "-qw",
                    f"net.ipv4.ping_group_range={value}"], check=True)


def ping_through(d, *flags: str) -> subprocess.CompletedProcess:
    """ping inside ``ipferry connect`` run in the daemon's own network namespace, where it can
    read the daemon's sysctl. (As root with capabilities: iputils ping calls setuid(), which
    fails in a namespace made without them; see test_datagrams.PING_CLIENT.)"""
    return subprocess.run(["nsenter", f"--net={d.netns.path}", IPFERRY, "connect", *flags,
                           "--tunnel", str(d.runtime_dir / "tunnel.sock"), "--tenant", "acme",
                           "--", "ping", "-c", "2", "-i", "0.2", "-W", "1", SERVER_ADDR],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


WHY = ("net.ipv4.ping_group_range is '1 0' here, which leaves out its groups (0), so it drops "
       "echo requests (icmp_not_permitted); fix, as root: sysctl -w "
       "net.ipv4.ping_group_range='0 2147483647'")


@pytest.mark.parametrize("flags, hint", [
    # attached (the daemon reads CMD's TUN): said up front, before any ping
    ((), f"{SAID}note: the daemon cannot send CMD's pings: {WHY}"),
    # packets through connect: said when CMD's first ping goes by
    (("--no-attach",), f"{SAID}CMD sends pings, but the daemon cannot: {WHY}"),
], ids=["attach", "no-attach"])
def test_ping_the_daemon_cannot_send_is_told_with_the_fix(daemon_factory, netns, tmp_path,
                                                           flags, hint):
    add_server_address(netns)
    ping_range(netns, "1 0")  # nobody: the kernel's default
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    res = ping_through(d, *flags)
    assert res.returncode != 0 and b"0 received" in res.stdout, res
    said = [line for line in res.stderr.decode().splitlines() if line.startswith(SAID)]
    assert said == [hint], res.stderr
    assert drops(d)["icmp_not_permitted"] == 2


def test_ping_the_daemon_can_send_gets_no_hint(daemon_factory, netns, tmp_path):
    add_server_address(netns)
    ping_range(netns, "0 0")  # the daemon's group (root's, without capabilities)
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    res = ping_through(d)
    assert res.returncode == 0 and b"2 received" in res.stdout, res
    assert SAID.encode() not in res.stderr, res.stderr
