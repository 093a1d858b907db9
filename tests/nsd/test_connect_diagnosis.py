"""How ``ipferry connect`` tells what a tunnel will not carry, without root: the GUE on-ramp's
check (against a stand-in on loopback) and the ping hint's pieces.

With the real daemon: tests/e2e/test_connect_errors.py.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest

from ipferry.nsd import connect
from ipferry.wire import gue, vnet
from ipferry.wire.icmp import echo_message, icmp_packet, udp_packet, unreachable
from ipferry.wire.packet import Parsed, parse

SOURCE = ipaddress.IPv4Address("10.98.1.2")


class FakeOnramp:
    """A UDP socket on loopback that answers what a GUE on-ramp would (``answer``), or nothing."""

    def __init__(self, answer: str | None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.received: list[bytes] = []
        self.done = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.done:
            try:
                datagram, peer = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            self.received.append(datagram)
            context, inner = gue.decapsulate(datagram)
            offload = context.startswith(gue.VNET_MAGIC)
            packet = inner[vnet.HEADER_SIZE:] if offload else inner
            p = parse(packet)
            assert isinstance(p, Parsed)
            if self.answer == "admin":  # what the daemon answers: "administratively prohibited"
                reply = unreachable(packet, p, "admin")
            elif self.answer == "unrelated":  # an ICMP error about another echo request
                other = icmp_packet(p.src, p.dst, echo_message(8, p.sport ^ 1, 1, b"x"))
                reply = unreachable(other, parse(other), "admin")
            else:
                continue
            assert reply is not None
            if offload:
                self.sock.sendmsg([gue.vnet_reply_header(4), vnet.PLAIN, b"\0\0", reply], [], 0,
                                  peer)
            else:
                self.sock.sendto(gue.reply_header(4) + reply, peer)

    def close(self) -> None:
        self.done = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def onramp(request):
    fake = FakeOnramp(request.param)
    yield fake
    fake.close()


def tunnel(port: int, offload: bool) -> connect.GueTunnel:
    return connect.GueTunnel("127.0.0.1", port, b'{"tenant":"acme"}', offload)


@pytest.mark.parametrize("onramp", ["admin"], indirect=True)
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_check_passes_when_the_onramp_answers_the_probe(onramp, offload):
    t = tunnel(onramp.port, offload)
    try:
        start = time.monotonic()
        assert t.check(SOURCE, "acme", timeout=5) is None
        assert time.monotonic() - start < 2
        assert t.sock.gettimeout() is None, "the pumps read a blocking socket"
    finally:
        t.close()
    context, inner = gue.decapsulate(onramp.received[0])
    assert context.startswith(gue.VNET_MAGIC) == offload
    p = parse(inner[vnet.HEADER_SIZE:] if offload else inner)
    assert isinstance(p, Parsed)
    assert (p.protocol, p.icmp_type, p.src, p.dst) == (1, 8, SOURCE.packed, bytes([127, 0, 0, 1]))


@pytest.mark.parametrize("onramp", [None, "unrelated"], indirect=True, ids=["silent", "other"])
def test_check_that_gets_no_answer_names_the_likely_causes(onramp):
    """A warning, not an error: a GUE endpoint other than ipferry answers no probe."""
    t = tunnel(onramp.port, True)
    try:
        start = time.monotonic()
        text = t.check(SOURCE, "evil", timeout=0.6)
        assert 0.6 <= time.monotonic() - start < 2
        assert t.sock.gettimeout() is None
    finally:
        t.close()
    assert text is not None
    assert text.startswith(f"the GUE on-ramp at 127.0.0.1:{onramp.port} did not answer in 0.6 s")
    for cause in ("tenant 'evil' not in its tenants", "sender (127.0.0.1) outside its allow list",
                  "a context its application refused", "no daemon there", "gue_unknown_tenant",
                  "running CMD anyway"):
        assert cause in text
    assert len(onramp.received) >= 3, "the probe is sent again"


def test_check_with_nothing_on_the_port_says_so_at_once():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = tunnel(port, False)  # (nothing listens there any more)
    try:
        start = time.monotonic()
        with pytest.raises(connect.ConnectError) as exc:
            t.check(SOURCE, "acme", timeout=5)
        assert time.monotonic() - start < 1
    finally:
        t.close()
    assert str(exc.value).startswith(f"nothing listens on udp 127.0.0.1:{port} (ICMP port "
                                     f"unreachable): is ipferry running there")


@pytest.mark.parametrize("groups, low, high, hint", [
    ({0}, 1, 0, True),  # the kernel's default: nobody
    ({0}, 0, 2147483647, False),
    ({1000, 27}, 100, 999, True),
    ({1000, 27}, 0, 30, False),  # a supplementary group is enough
    ({1000}, 1000, 1000, False),
])
def test_ping_hint_for(groups, low, high, hint):
    text = connect.ping_hint_for(groups, low, high)
    if not hint:
        assert text is None
        return
    assert text is not None
    assert f"net.ipv4.ping_group_range is '{low} {high}'" in text
    assert f"its groups ({', '.join(map(str, sorted(groups)))})" in text
    assert "sysctl -w net.ipv4.ping_group_range='0 2147483647'" in text


def test_groups_of_a_proc_status():
    status = "Name:\tipf-supervisor\nUid:\t0\t0\t0\t0\nGid:\t5\t7\t7\t7\nGroups:\t27 100 \n"
    assert connect._groups(status) == {7, 27, 100}
    assert connect._groups("Gid:\t0\t0\t0\t0\nGroups:\n") == {0}
    with pytest.raises(ValueError):
        connect._groups("Name:\tx\n")


def test_ping_hint_says_nothing_for_a_peer_that_is_not_the_daemon():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert connect.ping_hint(a) is None  # (the peer is this test, not ipf-supervisor)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert connect.ping_hint(udp) is None  # (no peer credentials)


def test_is_echo_request():
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    src6, dst6 = socket.inet_pton(socket.AF_INET6, "fd98::1"), socket.inet_pton(
        socket.AF_INET6, "fd98::2")
    echo = icmp_packet(src, dst, echo_message(8, 1, 1, b"ping"))
    echo6 = icmp_packet(src6, dst6, echo_message(128, 1, 1, b"ping"))
    assert connect.is_echo_request(echo) and connect.is_echo_request(echo6)
    assert connect.is_echo_request(vnet.PLAIN + echo, vnet.HEADER_SIZE)
    assert not connect.is_echo_request(echo, vnet.HEADER_SIZE)
    assert not connect.is_echo_request(icmp_packet(dst, src, echo_message(0, 1, 1, b"pong")))
    assert not connect.is_echo_request(icmp_packet(dst6, src6, echo_message(129, 1, 1, b"")))
    assert not connect.is_echo_request(udp_packet(src, 8, dst, 8, b"\x08"))
    assert not connect.is_echo_request(b"") and not connect.is_echo_request(echo[:20])
