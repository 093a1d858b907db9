"""``ipferry connect --address/--route/--source/--gue-port``: a device's addresses, claims, fixed
source addresses and GUE port.

No daemon: the test plays the tunnel's other end (a SOCK_SEQPACKET listener reading the context, or
a UDP socket on loopback as the GUE on-ramp) and runs ``ip`` and a few sockets inside the
namespace to see what it holds. A real TUN, hence tests/e2e/ (root where /dev/net/tun is 0600).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import textwrap
import threading

import dpkt
import pytest

from ipferry.wire import gue, vnet
from tests.e2e.tunnelend import TunnelEnd
from tests.nsd.test_connect import connect

# Run inside the namespace: its addresses, its local routes, the source address the kernel picks
# towards each ``DST``, whether ``+ADDR`` can be bound and, if so, whether a server on the wildcard
# answers it.
INSPECT = textwrap.dedent("""\
    import json, socket, subprocess, sys

    def ip(*args):
        out = subprocess.run(["ip", "-j", *args], capture_output=True, check=True,
                             text=True, timeout=10).stdout
        return json.loads(out) if out.strip() else []

    def family(addr):
        return socket.AF_INET6 if ":" in addr else socket.AF_INET

    def source(dst):
        with socket.socket(family(dst), socket.SOCK_DGRAM) as s:
            s.connect((dst, 9))  # (sends nothing)
            return s.getsockname()[0]

    def binds(addr):
        with socket.socket(family(addr), socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, 0))
            except OSError:
                return False
            return True

    def answers(addr):
        fam = family(addr)
        with socket.socket(fam, socket.SOCK_STREAM) as srv:
            if fam == socket.AF_INET6:
                srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            srv.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
            srv.listen(1)
            srv.settimeout(5)
            with socket.create_connection((addr, srv.getsockname()[1]), timeout=5) as c:
                conn, _ = srv.accept()
                with conn:
                    return conn.getsockname()[0] == addr and c.getpeername()[0] == addr

    args = sys.argv[1:]
    print(json.dumps({
        "addr": {i["ifname"]: sorted(f"{a['local']}/{a['prefixlen']}"
                                     for a in i.get("addr_info", [])) for i in ip("addr")},
        "local": [r["dst"] for r in ip("-4", "route", "show", "table", "local")
                  + ip("-6", "route", "show", "table", "local")],
        "source": {d: source(d) for d in args if not d.startswith("+")},
        "binds": {d[1:]: binds(d[1:]) for d in args if d.startswith("+")},
        "answers": {d[1:]: answers(d[1:]) for d in args if d.startswith("+") and binds(d[1:])},
    }))
""")

TUN = "ipf-tun0"


def tunnel_end(path) -> tuple[socket.socket, threading.Thread, list[bytes]]:
    """Accept one tunnel; keep its first datagram (the context) and drain the rest until EOF."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(30)
    seen: list[bytes] = []

    def serve():
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        conn.settimeout(30)
        try:
            end = TunnelEnd(conn)
        except OSError:
            conn.close()
            return
        try:
            seen.append(end.first)
            while end.recv():
                pass
        except OSError:
            return
        finally:
            end.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t, seen


def context_of(first: bytes) -> dict:
    assert first.startswith(vnet.TUNNEL_MAGIC)  # (offload is the default)
    return json.loads(first[len(vnet.TUNNEL_MAGIC):])


def inspect(tmp_path, *options: str, probes: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(context the tunnel got, what INSPECT saw inside) for ``ipferry connect OPTIONS``."""
    path = tmp_path / "tunnel.sock"
    srv, t, seen = tunnel_end(path)
    try:
        res = connect("--tunnel", str(path), "--tenant", "acme", *options, "--",
                      "python3", "-c", INSPECT, *probes)
    finally:
        srv.close()
        t.join(10)
    assert res.returncode == 0, res.stderr
    assert seen, "the tunnel got no context"
    return context_of(seen[0]), json.loads(res.stdout)


def test_an_address_of_each_family_is_the_namespaces_and_claimed(tmp_path):
    context, inside = inspect(tmp_path, "--address", "10.77.0.2", "--address", "fd77::2",
                              probes=("198.18.0.1", "2001:db8::1"))
    assert context == {"tenant": "acme", "routes": ["10.77.0.2/32", "fd77::2/128"]}
    assert "10.77.0.2/32" in inside["addr"][TUN] and "fd77::2/128" in inside["addr"][TUN]
    assert inside["source"] == {"198.18.0.1": "10.77.0.2", "2001:db8::1": "fd77::2"}


def test_one_family_given_the_other_stays_random(tmp_path):
    context, inside = inspect(tmp_path, "--address", "10.77.0.2")
    assert context == {"tenant": "acme", "routes": ["10.77.0.2/32"]}
    six = [a for a in inside["addr"][TUN] if ":" in a and not a.startswith("fe80:")]
    assert len(six) == 1 and ipaddress.ip_interface(six[0]) in ipaddress.ip_network("fd98::/16")

    (tmp_path / "6").mkdir()
    context, inside = inspect(tmp_path / "6", "--address", "fd77::2")
    assert context == {"tenant": "acme", "routes": ["fd77::2/128"]}
    four = [a for a in inside["addr"][TUN] if ":" not in a]
    assert len(four) == 1 and ipaddress.ip_interface(four[0]) in ipaddress.ip_network("10.98.0.0/16")


def test_more_addresses_and_routes_are_claimed_and_answered(tmp_path):
    context, inside = inspect(
        tmp_path, "--address", "10.77.0.2", "--address", "fd77::2", "--address", "10.77.0.3",
        "--address", "fd77:9::3", "--route", "10.77.1.9/24", "--route", "fd77:1::/64",
        "--route", "10.77.0.3",  # (one of the addresses again: claimed once)
        probes=("198.18.0.1", "fd77:9::1",  # (fd77:9::3 matches longer: still not the source)
                "+10.77.0.3", "+fd77:9::3", "+10.77.1.77", "+fd77:1::77", "+10.77.2.1"))
    assert context["routes"] == ["10.77.0.2/32", "fd77::2/128", "10.77.0.3/32", "fd77:9::3/128",
                                 "10.77.1.0/24", "fd77:1::/64"]
    # The first of each family on the TUN, the source of what CMD sends; the others on lo.
    assert {"10.77.0.2/32", "fd77::2/128"} <= set(inside["addr"][TUN])
    assert {"10.77.0.3/32", "fd77:9::3/128"} <= set(inside["addr"]["lo"])
    assert inside["source"] == {"198.18.0.1": "10.77.0.2", "fd77:9::1": "fd77::2"}
    # The routes are local (AnyIP): bound to, and answered by a server on the wildcard.
    assert {"10.77.1.0/24", "fd77:1::/64"} <= set(inside["local"])
    assert inside["binds"] == {"10.77.0.3": True, "fd77:9::3": True, "10.77.1.77": True,
                               "fd77:1::77": True, "10.77.2.1": False}
    assert inside["answers"] == {"10.77.0.3": True, "fd77:9::3": True, "10.77.1.77": True,
                                 "fd77:1::77": True}


def test_routes_alone_keep_a_random_address(tmp_path):
    context, inside = inspect(tmp_path, "--route", "fd77:1::/64", probes=("198.18.0.1",))
    assert context == {"tenant": "acme", "routes": ["fd77:1::/64"]}
    assert ipaddress.ip_address(inside["source"]["198.18.0.1"]) in \
        ipaddress.ip_network("10.98.0.0/16")
    assert "fd77:1::/64" in inside["local"]


def test_a_source_is_the_namespaces_address_and_claims_nothing(tmp_path):
    context, inside = inspect(tmp_path, "--source", "10.98.1.2", "--source", "fd98::1:2",
                              probes=("198.18.0.1", "2001:db8::1"))
    assert context == {"tenant": "acme"}  # no "routes"
    assert "10.98.1.2/32" in inside["addr"][TUN] and "fd98::1:2/128" in inside["addr"][TUN]
    assert inside["source"] == {"198.18.0.1": "10.98.1.2", "2001:db8::1": "fd98::1:2"}


def test_a_source_of_one_family_and_an_address_of_the_other(tmp_path):
    context, inside = inspect(tmp_path, "--source", "10.98.1.2", "--address", "fd77::2",
                              probes=("198.18.0.1", "2001:db8::1"))
    assert context == {"tenant": "acme", "routes": ["fd77::2/128"]}  # only the --address
    assert inside["source"] == {"198.18.0.1": "10.98.1.2", "2001:db8::1": "fd77::2"}


@pytest.mark.parametrize("options, message", [
    (["--address", "10.77.0.0/24"], "--address 10.77.0.0/24: a network, not an address (claim a "
                                    "prefix with --route)"),
    (["--address", "10.77.0.2/32"], "--address 10.77.0.2/32: a network, not an address"),
    (["--address", "acme"], "--address acme: not an IPv4 or IPv6 address"),
    (["--address", "10.77.0.256"], "--address 10.77.0.256: not an IPv4 or IPv6 address"),
    (["--address", "0.0.0.0"], "--address 0.0.0.0: unspecified"),
    (["--address", "::"], "--address ::: unspecified"),
    (["--address", "127.0.0.2"], "--address 127.0.0.2: loopback"),
    (["--address", "::1"], "--address ::1: loopback"),
    (["--address", "224.0.0.1"], "--address 224.0.0.1: multicast"),
    (["--address", "ff02::1"], "--address ff02::1: multicast"),
    (["--address", "fe80::1"], "--address fe80::1: link-local"),
    (["--address", "::ffff:10.77.0.2"], "--address ::ffff:10.77.0.2: IPv4-mapped"),
    (["--address6", "10.77.0.2"], "--address6 10.77.0.2: not an IPv6 address"),
    (["--route", "10.77.0.0/33"], "--route 10.77.0.0/33: not an IPv4 or IPv6 prefix"),
    (["--route", "0.0.0.0/0"], "--route 0.0.0.0/0: overlaps unspecified"),
    (["--route", "::/0"], "--route ::/0: overlaps unspecified"),
    (["--route", "127.0.0.0/8"], "--route 127.0.0.0/8: overlaps loopback"),
    (["--route", "239.1.0.0/16"], "--route 239.1.0.0/16: overlaps multicast"),
    (["--address", "10.77.0.2", "--context", '{"routes": ["10.77.0.0/24"]}'],
     "--context has routes and so do --address/--route"),
    (["--gue-port", "7001"], "--gue-port 7001: only with --gue HOST:PORT"),
    (["--source", "10.98.1.2", "--address", "10.77.0.2"],
     "--source 10.98.1.2 and --address 10.77.0.2: both IPv4; a family's address is claimed "
     "(--address) or not (--source): give one of them"),
    (["--address6", "fd77::2", "--source", "fd98::2"],
     "--source fd98::2 and --address fd77::2: both IPv6"),
    (["--source", "10.98.1.2", "--source", "10.98.1.3"],
     "--source 10.98.1.3: one --source per family, and IPv4 has --source 10.98.1.2 already"),
    (["--source", "10.98.1.0/24"], "--source 10.98.1.0/24: a network, not an address\n"),
    (["--source", "127.0.0.1"], "--source 127.0.0.1: loopback"),
    (["--source", "acme"], "--source acme: not an IPv4 or IPv6 address"),
])
def test_a_bad_value_is_one_line_and_nothing_starts(tmp_path, options, message):
    # The tunnel does not exist: had anything started, connect would say so (exit 1) instead.
    res = connect("--tunnel", str(tmp_path / "nothing.sock"), *options, "--", "true")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"ipferry connect: {message}"), res.stderr
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize("options, message", [
    (["--gue-port", "0"], "--gue-port 0: not a port (1..65535)"),
    (["--gue-port", "65536"], "--gue-port 65536: not a port (1..65535)"),
    (["--context", '{"routes": ["10.77.0.0/24"]}'], "--context: with --gue the context carries "
                                                    "no routes"),
])
def test_bad_gue_values(options, message):
    # 127.0.0.1:9 (discard): nothing may be sent there, and nothing is.
    res = connect("--gue", "127.0.0.1:9", *options, "--", "true")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"ipferry connect: {message}"), res.stderr
    assert res.stderr.count("\n") == 1


UDP_SEND = textwrap.dedent("""\
    import socket, subprocess, sys
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello site", ("198.18.0.1", 7))
    sys.stdout.write(subprocess.run(["ip", "-j", "-4", "route", "show", "table", "local"],
                                    capture_output=True, text=True, timeout=10).stdout)
""")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offload", [True, False])
def test_gue_port_sends_from_that_port_and_no_routes(offload):
    onramp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        onramp.bind(("127.0.0.1", 0))
        onramp.settimeout(30)
        port = free_udp_port()
        res = connect("--gue", f"127.0.0.1:{onramp.getsockname()[1]}", "--gue-port", str(port),
                      "--tenant", "acme", "--address", "10.77.5.1", "--route", "10.77.5.0/24",
                      *([] if offload else ["--no-offload"]), "--", "python3", "-c", UDP_SEND)
        assert res.returncode == 0, res.stderr
        assert "10.77.5.0/24" in [r["dst"] for r in json.loads(res.stdout)]
        onramp.settimeout(0.5)  # (what the command sent is queued by now)
        datagrams = []
        while True:
            try:
                datagrams.append(onramp.recvfrom(70000))
            except TimeoutError:
                break
    finally:
        onramp.close()
    assert datagrams, "nothing reached the GUE on-ramp"
    sent = []
    for data, peer in datagrams:
        assert peer == ("127.0.0.1", port)
        context, inner = gue.decapsulate(data)
        if offload:
            assert context.startswith(gue.VNET_MAGIC)
            context, inner = context[len(gue.VNET_MAGIC):], inner[vnet.HEADER_SIZE:]
        assert json.loads(context) == {"tenant": "acme"}  # no routes in a GUE header
        if inner[0] >> 4 == 4:
            ip = dpkt.ip.IP(inner)
            if ip.p == dpkt.ip.IP_PROTO_UDP:
                sent.append((socket.inet_ntoa(ip.src), ip.data.data))
    assert sent == [("10.77.5.1", b"hello site")]


def test_gue_port_in_use_is_one_clear_line():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as onramp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        onramp.bind(("127.0.0.1", 0))
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        res = connect("--gue", f"127.0.0.1:{onramp.getsockname()[1]}", "--gue-port", str(port),
                      "--", "true")
    assert res.returncode == 1, res.stderr
    assert res.stderr == (f"ipferry connect: --gue-port {port}: 127.0.0.1:{port} is in use "
                          "(another sender there?); pick another port\n")
