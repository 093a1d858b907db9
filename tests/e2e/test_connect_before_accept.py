"""Connect before accept: the client's SYN waits until the off-ramp answered, so a client sees
what it would see end to end: a closed port refuses (not "reset after connect"), an unreachable
one answers ICMP, a silent one stays silent, and a port scan sees exactly the open ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap

import dpkt

from tests.e2e.dataplane import SERVER_ADDR, audit_records, config, connect, counter
from tests.helpers import wait_for

UNREACHABLE_NET = "198.51.100.0/24"  # the test namespace answers "unreachable" for it

SCAN = textwrap.dedent("""\
    import errno, json, socket, sys
    host, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    result = {}
    for port in range(lo, hi + 1):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((host, port))
            result[port] = "open"
        except ConnectionRefusedError:
            result[port] = "refused"
        except TimeoutError:
            result[port] = "timeout"
        except OSError as exc:
            result[port] = errno.errorcode.get(exc.errno, str(exc))
        finally:
            s.close()
    print(json.dumps(result))
    """)


def end_records(tmp_path) -> list[dict]:
    return [r for r in audit_records(tmp_path / "audit.jsonl") if r["audit"] == "flow_end"]


def test_a_closed_port_is_refused_not_reset_after_connect(daemon_factory, upstream, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    res = connect(d, "curl", "-sS", "--max-time", "5", f"http://{SERVER_ADDR}:8081/")
    # curl's 7 is "couldn't connect"; before connect-before-accept it was 56 (reset after
    # a connect that had looked fine).
    assert res.returncode == 7, res.stderr
    assert b"refused" in res.stderr.lower() or b"couldn't connect" in res.stderr.lower()
    assert counter(d, "ipferry_upstream_failures_total", "reason").get("refused") == 1
    [end] = wait_for(lambda: end_records(tmp_path), 5, "the flow_end record")
    assert end["close_reason"] == "upstream_refused" and end["dport"] == 8081
    # The kernel never saw the SYN: no upgraded connection was accepted for nothing.
    assert counter(d, "ipferry_drops_total", "reason").get("upgrade_no_flow", 0) == 0


def test_a_port_scan_sees_exactly_the_open_ports(daemon_factory, upstream, tmp_path):
    d = daemon_factory("--workers", "2", config=config(tmp_path))
    res = connect(d, "python3", "-c", SCAN, SERVER_ADDR, "8070", "8090")
    assert res.returncode == 0, res.stderr.decode()
    seen = json.loads(res.stdout)
    assert len(seen) == 21
    assert {p for p, state in seen.items() if state == "open"} == {"8080"}, seen
    assert all(state == "refused" for p, state in seen.items() if p != "8080"), seen
    assert counter(d, "ipferry_upstream_failures_total", "reason").get("refused") == 20


def test_an_unreachable_upstream_answers_icmp(daemon_factory, upstream, tmp_path, netns):
    subprocess.run(["ip", "-n", netns.name, "route", "add", "unreachable", UNREACHABLE_NET],
                   check=True)
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    res = connect(d, "python3", "-c", SCAN, "198.51.100.7", "80", "80")
    assert res.returncode == 0, res.stderr.decode()
    # The namespace kernel's EHOSTUNREACH came back to the client as ICMP host unreachable.
    assert json.loads(res.stdout) == {"80": "EHOSTUNREACH"}, res.stdout
    res = connect(d, "curl", "-sS", "--max-time", "5", "http://198.51.100.7/")
    assert res.returncode == 7, res.stderr
    assert counter(d, "ipferry_upstream_failures_total", "reason").get("unreachable", 0) >= 2
    assert counter(d, "ipferry_icmp_errors_sent_total", "kind").get("host", 0) >= 2


def test_a_silent_upstream_stays_silent(daemon_factory, tmp_path, netns):
    _silent_net(netns)
    d = daemon_factory("--workers", "1", config=config(tmp_path, textwrap.dedent("""\
        [flows]
        upstream_connect_timeout = 2
        """)))
    res = connect(d, "curl", "-sS", "--connect-timeout", "4", "http://203.0.113.9/")
    assert res.returncode == 28, res.stderr  # curl: timed out, as against a silent host
    assert counter(d, "ipferry_upstream_failures_total", "reason").get("timeout", 0) >= 1
    ends = wait_for(lambda: end_records(tmp_path), 5, "the flow_end record")
    assert ends[0]["close_reason"] == "upstream_timeout"
    # Nothing was sent back to the client for that flow: no reset, no ICMP.
    assert sum(counter(d, "ipferry_icmp_errors_sent_total", "kind").values()) == 0
    assert ends[0]["packets"][1] == 0


def _silent_net(netns) -> None:
    # A veth whose far end has no address, and a permanent neighbour entry: SYNs leave and
    # vanish (no ARP failure, no ICMP), as towards a host that drops everything.
    for cmd in (["link", "add", "silent0", "type", "veth", "peer", "name", "silent1"],
                ["addr", "add", "203.0.113.1/24", "dev", "silent0"],
                ["link", "set", "silent0", "up"], ["link", "set", "silent1", "up"],
                ["neigh", "add", "203.0.113.9", "lladdr", "02:00:00:00:00:09", "dev", "silent0",
                 "nud", "permanent"]):
        subprocess.run(["ip", "-n", netns.name, *cmd], check=True)


def test_a_client_giving_up_while_the_off_ramp_connects_ends_the_flow(daemon_factory, tmp_path,
                                                                     netns):
    _silent_net(netns)
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(d.runtime_dir / "tunnel.sock"))
    s.send(b'{"tenant": "acme"}')
    src, dst = socket.inet_aton("10.9.0.2"), socket.inet_aton("203.0.113.9")

    def segment(flags: int, seq: int) -> bytes:
        return bytes(dpkt.ip.IP(src=src, dst=dst, p=6, ttl=64, data=dpkt.tcp.TCP(
            sport=40000, dport=80, flags=flags, seq=seq)))

    try:
        s.send(segment(dpkt.tcp.TH_SYN, 1000))
        s.send(segment(dpkt.tcp.TH_SYN, 1000))  # a retransmission: held too
        wait_for(lambda: d.get_json("/api/flows")["total"] == 1, 5, "the held flow")
        s.send(segment(dpkt.tcp.TH_RST, 1001))
        [end] = wait_for(lambda: end_records(tmp_path), 5, "the flow to end at the client's RST")
        assert end["close_reason"] == "rst" and end["packets"] == [1, 0], end
        assert d.get_json("/api/flows")["total"] == 0
        assert counter(d, "ipferry_upstream_failures_total", "reason") == {}
    finally:
        s.close()


def test_packets_held_for_a_refused_off_ramp_are_counted(daemon_factory, upstream, tmp_path):
    d = daemon_factory("--workers", "1", config=config(tmp_path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(d.runtime_dir / "tunnel.sock"))
    s.send(b'{"tenant": "acme"}')
    src, dst = socket.inet_aton("10.98.1.1"), socket.inet_aton(SERVER_ADDR)

    def segment(flags: int, seq: int, data: bytes = b"") -> bytes:
        return bytes(dpkt.ip.IP(src=src, dst=dst, p=6, ttl=64, data=dpkt.tcp.TCP(
            sport=40000, dport=9, flags=flags, seq=seq, data=data)))

    try:
        # All five queued before the worker reads any (it is stopped meanwhile), so they are
        # read in one batch, before the refused connect can be known: all five are held. (Sent
        # to a running worker, a busy machine let the refusal overtake the fifth.)
        worker = d.workers()[0]["pid"]
        os.kill(worker, signal.SIGSTOP)
        try:
            for packet in [segment(dpkt.tcp.TH_SYN, 1000)] * 3 + \
                    [segment(dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, 1001, b"hello")] * 2:
                s.send(packet)
        finally:
            os.kill(worker, signal.SIGCONT)
        s.settimeout(5)
        answer = dpkt.ip.IP(s.recv(65535)).data
        assert answer.flags & dpkt.tcp.TH_RST  # the first SYN got the refusal
        [end] = wait_for(lambda: end_records(tmp_path), 5, "the flow_end record")
        assert end["close_reason"] == "upstream_refused"
        # The other four were never sent on: counted, not silently gone.
        assert counter(d, "ipferry_drops_total", "reason").get("held_at_end") == 4
    finally:
        s.close()
