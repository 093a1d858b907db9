"""The flow engine's test kit: a fake tunnel, packets, matchers and a playbook.

A playbook reads as "these inputs in, exactly these actions out", in the spirit of mitmproxy's
``Playbook``::

    flow = Placeholder("flow")
    assert (Playbook(engine)
            >> packet(tunnel, syn) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << AuditFlowStart(flow, ANY))

``>>`` feeds an input (a method of :class:`~ipferry.engine.core.FlowEngine`, the time added),
``<<`` adds an action (or a list of them) the last input must return; an input with none must
return none. The steps
run when the playbook is asserted; a later ``assert pb >> ...`` plays on from there. An expected
action matches an actual one of the same type whose fields each equal the expected's; a field
may be a matcher: ``ANY``, a :class:`Placeholder` (binds on first use, then stands for what it
bound), :class:`Has` (a dict with at least these items), :class:`Pkt` (IP bytes that decode to
these fields, checksums right). A bare action type matches any action of that type.

Packets are built by dpkt (independently of the code under test) and judged by dpkt.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import ANY as ANY  # (re-exported: a field that matches anything)

import dpkt

from ipferry.engine.actions import (
    Action,
    AuditFlowStart,
    ConnectOfframp,
    DecideFlow,
    FlowStarted,
    OpenDatagram,
    SendDatagram,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.core import FlowEngine
from ipferry.engine.decisions import Decision, TunnelContext
from tests.wire.packets import l4_checksum_ok

SYN, ACK, FIN, RST, PSH = (dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST,
                           dpkt.tcp.TH_PUSH)


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


# The client (in a tunnel) and the server it reaches, per IP version.
C4, S4 = ip("10.0.0.2"), ip("198.18.0.1")
C6, S6 = ip("fd00:1::2"), ip("2001:db8::1")
# The worker's NAT blocks and upgrade listeners (see the engine fixture).
NAT4, NAT6 = "100.64.0.0/16", "fd00:64::/64"
LOCAL4, LOCAL6 = ip("100.64.0.1"), ip("fd00:64::1")
CLIENT_SEQ = 1000  # the client's ISN
SERVER_SEQ = 5000  # the kernel's


@dataclass(eq=False)  # compared by identity, as the engine compares tunnels
class FakeTunnel:
    """Satisfies :class:`ipferry.engine.legs.TunnelLeg`."""

    id: int = 1
    tenant: str = "acme"
    origin: int = 0
    mtu: int = 1500
    vnet: bool = False
    local: bool = True
    steered: bool = False
    anycast: bool = False
    lands: bool = False
    context: TunnelContext = field(default=None)  # type: ignore[assignment]
    # What it reaches: (origin, id), or a queue of another worker's TUN's (holder, its id).
    device: tuple[int, int] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.context is None:
            self.context = TunnelContext(self.tenant)
        if self.device is None:
            self.device = (self.origin, self.id)


# -- packets ------------------------------------------------------------------------------------

def _ip(src: bytes, dst: bytes, proto: int, l4: dpkt.Packet | bytes, df: bool = True,
        pad: bytes = b"") -> bytes:
    if len(src) == 16:
        data = bytes(dpkt.ip6.IP6(src=src, dst=dst, nxt=proto, hlim=64, plen=len(bytes(l4)),
                                  data=l4))  # (dpkt sums the L4 checksum as it packs)
        if pad:
            plen = int.from_bytes(data[4:6], "big") + len(pad)
            data = data[:4] + plen.to_bytes(2, "big") + data[6:] + pad
    else:
        packet = dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=64, df=int(df), data=l4)
        data = bytes(packet)
        if pad:
            packet = dpkt.ip.IP(data)
            packet.data = bytes(packet.data) + pad
            packet.len += len(pad)
            packet.sum = 0
            data = bytes(packet)
    assert decode(data)["checksums"], "the kit built a bad packet"
    return data


def tcp(src: bytes = C4, dst: bytes = S4, sport: int = 40000, dport: int = 80, flags: int = SYN,
        seq: int = CLIENT_SEQ, ack: int = 0, payload: bytes = b"", df: bool = True) -> bytes:
    segment = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=seq & 0xFFFFFFFF,
                           ack=ack & 0xFFFFFFFF, win=65535, data=payload)
    return _ip(src, dst, dpkt.ip.IP_PROTO_TCP, segment, df)


def udp(src: bytes = C4, dst: bytes = S4, sport: int = 40000, dport: int = 53,
        payload: bytes = b"query", pad: bytes = b"") -> bytes:
    """``pad``: bytes after the UDP datagram, inside the IP packet (its length covers them)."""
    datagram = dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)
    return _ip(src, dst, dpkt.ip.IP_PROTO_UDP, datagram, pad=pad)


def echo(src: bytes = C4, dst: bytes = S4, ident: int = 0x1234, seq: int = 7,
         data: bytes = b"ping", reply: bool = False) -> bytes:
    v6 = len(src) == 16
    type_ = (129 if reply else 128) if v6 else (0 if reply else 8)
    body = (dpkt.icmp6.ICMP6.Echo if v6 else dpkt.icmp.ICMP.Echo)(id=ident, seq=seq, data=data)
    return icmp(src, dst, type_, 0, body)


def icmp(src: bytes, dst: bytes, type_: int, code: int, body: dpkt.Packet | bytes) -> bytes:
    if len(src) == 16:
        return _ip(src, dst, dpkt.ip.IP_PROTO_ICMP6, dpkt.icmp6.ICMP6(type=type_, code=code,
                                                                      data=body))
    return _ip(src, dst, dpkt.ip.IP_PROTO_ICMP, dpkt.icmp.ICMP(type=type_, code=code, data=body))


def icmp_error(src: bytes, dst: bytes, type_: int, code: int, about: bytes,
               mtu: int = 0) -> bytes:
    """An ICMP error from ``src`` to ``dst`` embedding (the first 28 or 48 bytes of) ``about``."""
    keep = about[:48 if len(src) == 16 else 28]
    rest = mtu.to_bytes(4, "big") if len(src) == 16 else (mtu & 0xFFFF).to_bytes(4, "big")
    return icmp(src, dst, type_, code, rest + keep)


# -- judging packets ----------------------------------------------------------------------------

def decode(data: bytes | bytearray | memoryview) -> dict:
    """An IP packet's fields, by dpkt; ``checksums``: every checksum verifies."""
    data = bytes(data)
    out: dict[str, Any] = {}
    if data[0] >> 4 == 6:
        pkt6 = dpkt.ip6.IP6(data)
        ok = True
        src, dst, proto, ihl, end = pkt6.src, pkt6.dst, pkt6.nxt, 40, 40 + pkt6.plen
    else:
        pkt4 = dpkt.ip.IP(data)
        ihl = pkt4.hl * 4
        ok = dpkt.in_cksum(data[:ihl]) == 0
        src, dst, proto, end = pkt4.src, pkt4.dst, pkt4.p, pkt4.len
        out["df"] = bool(pkt4.df)
    data = data[:end]
    l4 = data[ihl:]
    out.update(version=data[0] >> 4, length=len(data), src=str(ipaddress.ip_address(src)),
               dst=str(ipaddress.ip_address(dst)), proto=proto)
    if proto == 17:  # the UDP length says where its checksum ends (IP padding may follow)
        ok = ok and l4_checksum_ok(data[:ihl + int.from_bytes(l4[4:6], "big")], ihl, proto)
    else:
        ok = ok and l4_checksum_ok(data, ihl, proto)
    if proto == 6:
        seg = dpkt.tcp.TCP(l4)
        out.update(sport=seg.sport, dport=seg.dport, seq=seg.seq, ack=seg.ack, flags=seg.flags,
                   payload=bytes(seg.data))
    elif proto == 17:
        u = dpkt.udp.UDP(l4)
        out.update(sport=u.sport, dport=u.dport, payload=bytes(l4[8:u.ulen]))
    else:
        out.update(type=l4[0], code=l4[1], rest=int.from_bytes(l4[4:8], "big"),
                   id=int.from_bytes(l4[4:6], "big"), seq=int.from_bytes(l4[6:8], "big"),
                   body=bytes(l4[8:]))
        if out["type"] in ((3, 11, 12) if proto == 1 else (1, 2, 3, 4)) and len(l4) > 28:
            out["inner"] = _decode_inner(l4[8:])
    out["checksums"] = ok
    return out


def _decode_inner(data: bytes) -> dict:
    """An ICMP error's embedded packet (its addresses and ports only: it is cut short)."""
    if data[0] >> 4 == 6:
        src, dst, ihl = data[8:24], data[24:40], 40
    else:
        src, dst, ihl = data[12:16], data[16:20], (data[0] & 0xF) * 4
    return {"src": str(ipaddress.ip_address(src)), "dst": str(ipaddress.ip_address(dst)),
            "sport": int.from_bytes(data[ihl:ihl + 2], "big"),
            "dport": int.from_bytes(data[ihl + 2:ihl + 4], "big"), "bytes": data}


class Matcher:
    why = ""

    def __ne__(self, other: object) -> bool:
        return not self == other


class Has(Matcher):
    """A dict (or a decoded packet's part) with at least these items."""

    def __init__(self, **items: Any) -> None:
        self.items = items

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict):
            self.why = f"not a dict: {other!r}"
            return False
        for k, v in self.items.items():
            if k not in other or not (v == other[k]):
                self.why = f"{k}: want {v!r}, got {other.get(k, '<missing>')!r}"
                return False
        return True

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.items.items())
        return f"Has({inner})" + (f" <{self.why}>" if self.why else "")


class Pkt(Matcher):
    """IP bytes whose decoded fields (see :func:`decode`) equal these; checksums must verify."""

    def __init__(self, **fields: Any) -> None:
        fields.setdefault("checksums", True)
        self.fields = fields
        self.has = Has(**fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (bytes, bytearray, memoryview)):
            self.why = f"not bytes: {other!r}"
            return False
        try:
            decoded = decode(other)
        except Exception as exc:  # noqa: BLE001 (a matcher answers, never raises)
            self.why = f"undecodable: {exc!r}"
            return False
        ok = self.has == decoded
        self.why = self.has.why
        return ok

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"Pkt({inner})" + (f" <{self.why}>" if self.why else "")


def rst_for(segment: bytes) -> Pkt:
    """The reset a TCP stack answers ``segment`` with (RFC 793 "Reset Generation")."""
    d = decode(segment)
    if d["flags"] & ACK:
        return Pkt(src=d["dst"], sport=d["dport"], dst=d["src"], dport=d["sport"], flags=RST,
                   seq=d["ack"])
    length = len(d["payload"]) + (1 if d["flags"] & SYN else 0) + (1 if d["flags"] & FIN else 0)
    return Pkt(src=d["dst"], sport=d["dport"], dst=d["src"], dport=d["sport"], flags=RST | ACK,
               seq=0, ack=(d["seq"] + length) & 0xFFFFFFFF)


UNREACH = {4: {"net": (3, 0), "host": (3, 1), "port": (3, 3), "admin": (3, 13),
               "too_big": (3, 4)},
           6: {"net": (1, 0), "admin": (1, 1), "host": (1, 3), "port": (1, 4), "too_big": (2, 0)}}


def icmp_about(packet: bytes, kind: str, mtu: int | None = None) -> Pkt:
    """The ICMP error a router on the path answers ``packet`` with: from its destination, to its
    source, of ``kind`` (see wire.icmp.unreachable), embedding its start."""
    d = decode(packet)
    type_, code = UNREACH[d["version"]][kind]
    want: dict[str, Any] = {"src": d["dst"], "dst": d["src"], "type": type_, "code": code,
                            "inner": Has(src=d["src"], dst=d["dst"],
                                         bytes=Prefix(packet[:min(len(packet), 500)]))}
    if mtu is not None:
        want["rest"] = mtu
    return Pkt(**want)


class Prefix(Matcher):
    """Bytes that start with these."""

    def __init__(self, start: bytes) -> None:
        self.start = bytes(start)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (bytes, bytearray, memoryview)) and \
            bytes(other).startswith(self.start)

    def __repr__(self) -> str:
        return f"Prefix({self.start[:16].hex()}…)"


_UNSET = object()


class Placeholder(Matcher):
    """Binds to what it is first compared with; then matches only that (and stands for it as an
    input's argument). Call it for the value."""

    def __init__(self, name: str = "?") -> None:
        self.name = name
        self.value: Any = _UNSET

    def __eq__(self, other: object) -> bool:
        if self.value is _UNSET:
            self.value = other
            return True
        return self.value is other or self.value == other

    def __hash__(self) -> int:
        return id(self)

    def __call__(self) -> Any:
        assert self.value is not _UNSET, f"placeholder {self.name} never bound"
        return self.value

    def __repr__(self) -> str:
        return f"<{self.name}>" if self.value is _UNSET else f"<{self.name}={_short(self.value)}>"


def _short(value: Any, n: int = 100) -> str:
    text = repr(value)
    return text if len(text) < n else text[:n - 3] + "..."


# -- the playbook -------------------------------------------------------------------------------

@dataclass
class In:
    """One input: an engine method, its arguments (placeholders resolved when it runs), when."""

    method: str
    args: tuple
    at: float | None = None
    takes_now: bool = True

    def __repr__(self) -> str:
        when = f" @{self.at}" if self.at is not None else ""
        return f"{self.method}({', '.join(_short(a) for a in self.args)}){when}"


def _input(method: str, takes_now: bool = True):
    def make(*args: Any, at: float | None = None) -> In:
        return In(method, args, at, takes_now)
    make.__name__ = method
    return make


packet = _input("tunnel_packet")  # (tunnel, data)
kernel = _input("tun_packet")  # (data): the namespace's kernel sent it
decided = _input("decided")  # (flow, decision)
hook_failed = _input("hook_failed")  # (flow, error)
audit_written = _input("audit_written")  # (flow, ok)
offramp_connected = _input("offramp_connected")  # (flow,)
offramp_failed = _input("offramp_failed")  # (flow, reason, errno)
datagram_opened = _input("datagram_opened")  # (flow,)
datagram_failed = _input("datagram_failed")  # (flow, reason, kind)
upstream_reply = _input("upstream_reply")  # (flow, data)
upstream_error = _input("upstream_error")  # (flow, kind)
close_tunnel = _input("close_tunnel")  # (tunnel,)
end_all = _input("end_all")  # (close_reason,)
end = _input("end")  # (flow, close_reason)
reset = _input("reset", takes_now=False)  # (tunnel, data)


def timer(at: float) -> In:
    return In("timer", (), at)


def mismatch(expected: Any, actual: Action) -> str | None:
    """Why ``actual`` is not ``expected`` (None: it is)."""
    if isinstance(expected, type):
        return None if type(actual) is expected else f"want a {expected.__name__}"
    if type(actual) is not type(expected):
        return f"want {type(expected).__name__}"
    for name, want, got in zip(expected._fields, expected, actual, strict=True):
        if not (want == got):
            return f"{name}: want {want!r}, got {_short(got)}"
    return None


class Playbook:
    def __init__(self, engine: FlowEngine, now: float = 0.0) -> None:
        self.engine = engine
        self.now = now
        self.steps: list[tuple[In, list]] = []
        self.played = 0
        self.log: list[tuple[In, list]] = []  # what was played, and what came out

    def __rshift__(self, step: In) -> Playbook:
        self.steps.append((step, []))
        return self

    def __lshift__(self, expected: Any) -> Playbook:
        assert self.steps, "an expected action before any input"
        if isinstance(expected, list):  # several at once
            self.steps[-1][1].extend(expected)
        else:
            self.steps[-1][1].append(expected)
        return self

    def play(self, step: In) -> list[Action]:
        """Run one input now (no expectation): its actions."""
        if step.at is not None:
            assert step.at >= self.now, "time goes forward"
            self.now = step.at
        args = tuple(a() if isinstance(a, Placeholder) else a for a in step.args)
        method = getattr(self.engine, step.method)
        actions = method(*args, self.now) if step.takes_now else method(*args)
        assert isinstance(actions, list)
        self.log.append((step, actions))
        return actions

    def __bool__(self) -> bool:
        while self.played < len(self.steps):
            step, expected = self.steps[self.played]
            self.played += 1
            actual = self.play(step)
            problem = None
            if len(actual) != len(expected):
                problem = f"{len(actual)} actions, want {len(expected)}"
            else:
                for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
                    why = mismatch(want, got)
                    if why:
                        problem = f"action {i}: {why}"
                        break
            if problem:
                raise AssertionError(self._report(step, expected, actual, problem))
        return True

    def _report(self, step: In, expected: list, actual: list, problem: str) -> str:
        lines = ["playbook failed at " + repr(step) + ": " + problem, "played:"]
        for s, out in self.log[:-1]:
            lines.append(f"  >> {s!r}")
            lines.extend(f"     << {_short(a)}" for a in out)
        lines.append(f"  >> {step!r}")
        lines.append("  expected:")
        lines.extend(f"     << {e!r}" for e in expected)
        lines.append("  actual:")
        lines.extend(f"     << {_short(a, 400)}" for a in actual)
        return "\n".join(lines)


# -- common openings ----------------------------------------------------------------------------

def addrs(version: int) -> tuple[bytes, bytes]:
    """(client, server) of an IP version."""
    return (C4, S4) if version == 4 else (C6, S6)


def local_of(flow: Any) -> bytes:
    return LOCAL4 if len(flow.key.src) == 4 else LOCAL6


def from_kernel(flow: Any, flags: int, seq: int = SERVER_SEQ, ack: int = 0,
                payload: bytes = b"") -> bytes:
    """A segment of the kernel's upgraded socket (upgrade listener, port 1) to the flow's slot."""
    slot = flow.slot
    return tcp(local_of(flow), slot.address, 1, slot.port, flags, seq, ack, payload)


def open_tcp(pb: Playbook, tunnel: FakeTunnel, syn: bytes | None = None) -> Any:
    """A client's SYN through decision, audit and the off-ramp's connect: the flow, its SYN in
    the kernel."""
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, syn or tcp()) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << AuditFlowStart(flow, Has(decision="upgrade"))
            >> audit_written(flow, True) << ConnectOfframp(flow)
            >> offramp_connected(flow) << WriteTun(Pkt(flags=SYN), None))
    return flow()


def establish(pb: Playbook, tunnel: FakeTunnel, version: int = 4) -> Any:
    """An upgraded TCP flow past its handshake (client ISN CLIENT_SEQ, kernel's SERVER_SEQ)."""
    c, s = addrs(version)
    flow = open_tcp(pb, tunnel, tcp(c, s))
    assert (pb >> kernel(from_kernel(flow, SYN | ACK, SERVER_SEQ, CLIENT_SEQ + 1))
            << SendToTunnel(tunnel, Pkt(flags=SYN | ACK), None)
            >> packet(tunnel, tcp(c, s, flags=ACK, seq=CLIENT_SEQ + 1, ack=SERVER_SEQ + 1))
            << WriteTun(Pkt(flags=ACK), None))
    return flow


def open_datagram(pb: Playbook, tunnel: FakeTunnel, first: bytes) -> Any:
    """A datagram flow decided, audited, its leg open and its first packet sent: the flow."""
    flow = Placeholder("flow")
    assert (pb >> packet(tunnel, first) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << OpenDatagram(flow)
            >> datagram_opened(flow) << SendDatagram)
    return flow()
