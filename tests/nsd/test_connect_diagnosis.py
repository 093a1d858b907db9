"""How ``ipferry connect`` tells what a tunnel will not carry, without root: the GUE on-ramp's
check (against a stand-in on loopback).

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
from ipferry.wire.icmp import echo_message, icmp_packet, unreachable
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
