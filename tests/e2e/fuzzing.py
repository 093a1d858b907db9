"""A seeded mutation fuzzer over every input the daemon takes, and the accounting that judges it.

Inputs (all to a daemon running in a namespace the caller made; nothing leaves it):

- **tunnel packets** on connected SEQPACKET tunnels, plain and vnet-framed (``\\0vnet\\0`` context,
  a virtio-net header before each packet): valid TCP/UDP/ICMP over IPv4 and IPv6 (options,
  extension headers, ICMP errors), then bit flips, truncation, lying length fields, header
  fields, fragments, splices, random bytes; honest and random virtio-net headers;
- **tunnel contexts** (the first datagram): JSON mutations, huge, nested, NUL, NaN, duplicates,
  non-UTF-8, encodings, with and without the vnet mark; each is followed by a probe packet whose
  answer tells an accepted context from a refused one;
- **GUE datagrams** to ``kind = "gue"`` on-ramps (IPv4 and IPv6): header bits, lengths,
  protocol, contexts, the offload option, and the same inner packets;
- **admin HTTP requests**, written raw on the admin unix socket and on loopback TCP: methods,
  paths, query strings (offset, limit, tenant, after, ...), headers, bodies, broken request
  lines, pipelining, aborted requests.

Every input is either served or counted, and :meth:`Fuzzer.run` checks it (see
:class:`Report`): each tunnel datagram is read (the tunnel's ``packets_in``); the parser's drops
equal what :func:`predict` says of each datagram (and are at least what the generator built on
purpose, :attr:`Report.known`); the drops of every reason plus the packets the fuzz flows took
(their ``flow_end`` audit records, or ``/api/flows`` while they live) add up to the datagrams
that reached the daemon; every context is accepted (its probe answered) or counted
``bad_context``; every admin request gets a well-formed HTTP answer, every ``/api/*`` 200 is
strict JSON; every packet the daemon sends back is a well-formed IP packet (checksums complete
where the framing promises it); no worker or nsd restarts; the daemon stays ready.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ipferry.nsd.namespace import CLONE_NEWNET, setns
from ipferry.wire import gue, vnet
from ipferry.wire.packet import Drop, parse

# -- where things are --------------------------------------------------------------------------

SERVER4 = socket.inet_aton("198.18.0.1")  # tests/e2e/dataplane.SERVER_ADDR (on the netns's lo)
SERVER6 = socket.inet_pton(socket.AF_INET6, "fd18::1")
OTHER4 = [socket.inet_aton(a) for a in ("198.18.0.2", "198.51.100.7", "10.1.2.3")]
OTHER6 = [socket.inet_pton(socket.AF_INET6, a) for a in ("fd18::2", "2001:db8::7")]
FORBIDDEN4 = [socket.inet_aton(a) for a in ("127.0.0.1", "127.3.4.5", "0.0.0.0", "0.1.2.3")]
FORBIDDEN6 = [socket.inet_pton(socket.AF_INET6, a) for a in
              ("::1", "::", "::ffff:198.18.0.1", "::198.18.0.1", "::ffff:127.0.0.1")]
MULTICAST4 = [socket.inet_aton(a) for a in ("224.0.0.1", "239.1.2.3", "255.255.255.255")]
MULTICAST6 = [socket.inet_pton(socket.AF_INET6, a) for a in ("ff02::1", "ff05::2")]
CLIENTS4 = [socket.inet_aton(f"10.98.77.{i}") for i in range(1, 9)]
CLIENTS6 = [socket.inet_pton(socket.AF_INET6, f"fd98::77:{i}") for i in range(1, 9)]
SINK_PORT = 9100  # a streams.py server the fuzz TCP flows may reach (idle connections)
REDIRECT_PORT = 9101  # a rule sends it to SINK_PORT
DENIED_PORT = 25  # a rule denies it
UDP_ECHO_PORT = 7007
GUE4 = ("127.0.0.1", 6080)
GUE6 = ("::1", 6081)
TENANT = "fuzz"  # connected fuzz tunnels (plain and vnet share it: tunnel_mismatch is reachable)
GUE_TENANT = "fuzz-gue"
GUE_CONTEXTS = {json.dumps({"tenant": GUE_TENANT, "s": i}, separators=(",", ":")).encode()
                for i in range(3)}
CTX_TENANT = "fuzz-ctx"

# Drop reasons that count something other than an input packet (packets towards clients, the
# kernel's packets, socket errors): left out of the accounting of inputs.
OUTBOUND_REASONS = {"tunnel_queue_full", "gue_send_full", "gue_send_failed", "upgrade_no_flow",
                    "reply_too_big", "upstream_unexpected", "upstream_error", "gue_receive_error",
                    "tun_write_failed", "mesh_bad_frame", "mesh_bad_message"}
PARSER_REASONS = {d.value for d in Drop}
GUE_REASONS = {"bad_gue", "gue_source_denied", "gue_bad_context", "gue_unknown_tenant",
               "gue_tunnel_limit", "gue_context_pending"}


def config(tmp: Path, extra: str = "") -> str:
    """The daemon config the fuzzer expects: audit to ``tmp/audit.jsonl``, short idle timeouts
    (fuzz flows end soon after the inputs stop), a deny and a redirect rule, the tunnel on-ramp
    and GUE on-ramps on IPv4 and IPv6 loopback."""
    return f"""\
[audit]
sink = "{tmp / 'audit.jsonl'}"

[flows]
tcp_syn_sent = 3
tcp_established = 4
tcp_fin_wait = 3
tcp_closing = 3
udp_unreplied = 3
udp_replied = 3
icmp = 3

[[rules]]
name = "no-smtp"
action = "deny"
ports = "{DENIED_PORT}"

[[rules]]
name = "redirect"
action = "allow"
protocol = "tcp"
ports = "{REDIRECT_PORT}"
upstream = "198.18.0.1:{SINK_PORT}"

[[onramps]]
kind = "tunnel"

[[onramps]]
kind = "gue"
name = "gue"
listen = "{GUE4[0]}:{GUE4[1]}"
tenants = ["{GUE_TENANT}"]

[[onramps]]
kind = "gue"
name = "gue6"
listen = "[{GUE6[0]}]:{GUE6[1]}"
tenants = ["{GUE_TENANT}"]
{extra}"""


# -- checksums and packet building ----------------------------------------------------------------

def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return _fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def checksum(data, initial: int = 0) -> int:
    return ~_fold(ones_sum(data) + initial) & 0xFFFF


def pseudo(version: int, src: bytes, dst: bytes, proto: int, length: int) -> int:
    if version == 4:
        return ones_sum(src + dst + bytes([0, proto]) + length.to_bytes(2, "big"))
    return ones_sum(src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto]))


_L4_CSUM_AT = {6: 16, 17: 6, 1: 2, 58: 2}


def set_l4_checksum(buf: bytearray, version: int, src: bytes, dst: bytes, proto: int, l4: int,
                    end: int) -> None:
    at = _L4_CSUM_AT.get(proto)
    if at is None or l4 + at + 2 > end:
        return
    buf[l4 + at:l4 + at + 2] = b"\0\0"
    initial = 0 if proto == 1 else pseudo(version, src, dst, proto, end - l4)
    c = checksum(memoryview(buf)[l4:end], initial)
    if proto == 17 and c == 0:
        c = 0xFFFF
    buf[l4 + at:l4 + at + 2] = c.to_bytes(2, "big")


def ipv4(src: bytes, dst: bytes, proto: int, l4: bytes, *, options: bytes = b"",
         frag: int = 0x4000, ttl: int = 64, ident: int = 0, tos: int = 0) -> bytearray:
    ihl = 20 + len(options)
    l4 = l4[:0xFFFF - ihl]  # (a payload near 64 KiB behind options: cut to what IPv4 carries)
    buf = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos, ihl + len(l4), ident,
                                frag, ttl, proto, 0, src, dst) + options + l4)
    buf[10:12] = checksum(buf[:ihl]).to_bytes(2, "big")
    set_l4_checksum(buf, 4, src, dst, proto, ihl, len(buf))
    return buf


def ipv6(src: bytes, dst: bytes, proto: int, l4: bytes, *, ext: bytes = b"",
         first: int | None = None, hlim: int = 64) -> bytearray:
    """``ext``: extension headers already chained to end in ``proto``; ``first`` their type."""
    nxt = proto if first is None else first
    l4 = l4[:0xFFFF - len(ext)]
    buf = bytearray(struct.pack("!IHBB16s16s", 0x60000000, len(ext) + len(l4), nxt, hlim, src,
                                dst) + ext + l4)
    set_l4_checksum(buf, 6, src, dst, proto, 40 + len(ext), len(buf))
    return buf


def fix_checksums(buf: bytearray) -> None:
    """Recompute the IPv4 header and L4 checksums of a (maybe mutated) packet that still parses,
    so the namespace's kernel takes the mutation instead of discarding it."""
    p = parse(bytes(buf))
    if isinstance(p, Drop):
        return
    if p.version == 4:
        ihl = (buf[0] & 0x0F) * 4
        buf[10:12] = b"\0\0"
        buf[10:12] = checksum(buf[:ihl]).to_bytes(2, "big")
    set_l4_checksum(buf, p.version, p.src, p.dst, p.protocol, p.ihl, p.total_length)


def tcp(sport: int, dport: int, seq: int, ack: int, flags: int, *, window: int = 65535,
        options: bytes = b"", payload: bytes = b"") -> bytes:
    options += bytes(-len(options) % 4)
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0,
                       0) + options + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(kind: int, code: int, rest: bytes, data: bytes) -> bytes:
    return struct.pack("!BBH", kind, code, 0) + rest + data


TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


# -- verifying what the daemon sends back ----------------------------------------------------------

def check_reply(data: bytes, *, partial_ok: bool) -> str | None:
    """Why ``data`` (one packet the daemon sent) is not a well-formed IP packet, or None."""
    if len(data) < 20:
        return f"a {len(data)}-byte packet"
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20 or len(data) < ihl or struct.unpack_from("!H", data, 2)[0] != len(data):
            return "IPv4 lengths do not match the packet"
        if checksum(data[:ihl]) != 0:
            return "bad IPv4 header checksum"
        proto, src, dst, l4 = data[9], data[12:16], data[16:20], ihl
        if struct.unpack_from("!H", data, 6)[0] & 0x3FFF:
            return "an IPv4 fragment"
    elif version == 6:
        if len(data) < 40 or 40 + struct.unpack_from("!H", data, 4)[0] != len(data):
            return "IPv6 lengths do not match the packet"
        proto, src, dst, l4 = data[6], data[8:24], data[24:40], 40
    else:
        return f"IP version {version}"
    if proto not in (6, 17, 1 if version == 4 else 58):
        return f"protocol {proto} over IPv{version}"
    if partial_ok and proto == 6:
        return None  # a partial checksum: the receiver's kernel completes it
    initial = 0 if proto == 1 else pseudo(version, src, dst, proto, len(data) - l4)
    if proto == 17 and data[l4 + 6:l4 + 8] == b"\0\0" and version == 4:
        return None  # IPv4 UDP without a checksum
    if checksum(data[l4:], initial) != 0:
        return f"bad {({6: 'TCP', 17: 'UDP'}).get(proto, 'ICMP')} checksum"
    return None


def strict_json(body: bytes):
    """json.loads that refuses what JSON does not have (NaN, Infinity) and bad UTF-8."""
    def constant(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(body.decode("utf-8"), parse_constant=constant)


# -- predictions -------------------------------------------------------------------------------------

def predict(datagram: bytes, framed: bool) -> tuple[str | None, object]:
    """What the data path makes of one tunnel datagram: (drop reason of the parser or of the
    virtio-net header check, or None; the parse result)."""
    packet = datagram[vnet.HEADER_SIZE:] if framed else datagram
    p = parse(packet)
    if isinstance(p, Drop):
        return p.value, p
    if framed and vnet.sanitize(datagram[:vnet.HEADER_SIZE], p.version, p.protocol, p.ihl,
                                p.payload_offset, p.payload_length) is None:
        return "bad_vnet_header", p
    return None, p


# -- the generator ----------------------------------------------------------------------------------

_IPV6_PADN6 = bytes([1, 4, 0, 0, 0, 0])


class Gen:
    """Inputs from one seeded ``random.Random``: the same seed, the same inputs."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    # -- valid packets -------------------------------------------------------------------------

    def _dst(self, v6: bool) -> bytes:
        r = self.rng.random()
        if r < 0.82:
            return SERVER6 if v6 else SERVER4
        if r < 0.92:
            return self.rng.choice(OTHER6 if v6 else OTHER4)
        return self.rng.choice(FORBIDDEN6 if v6 else FORBIDDEN4)

    def _tcp_options(self) -> bytes:
        rng, out = self.rng, b""
        for _ in range(rng.choice([0, 0, 1, 2, 3, 5])):
            kind = rng.random()
            if kind < 0.3:
                out += struct.pack("!BBH", 2, 4, rng.choice([0, 1, 536, 1460, 8960, 65495, 65535]))
            elif kind < 0.45:
                out += bytes([3, 3, rng.choice([0, 7, 14, 15, 255])])
            elif kind < 0.55:
                out += bytes([4, 2])
            elif kind < 0.7:
                out += bytes([8, 10]) + self.bytes(8)
            elif kind < 0.8:
                out += bytes([1])
            elif kind < 0.85:
                out += bytes([0])
            elif kind < 0.92:
                n = rng.choice([1, 2, 3])
                out += bytes([5, 2 + 8 * n]) + self.bytes(8 * n)
            else:  # a kind we do not know, or a length that lies
                out += bytes([rng.randrange(256), rng.choice([0, 1, 2, 40, 255])]) + self.bytes(
                    rng.randrange(0, 6))
        return out[:40]

    def _payload(self) -> bytes:
        r = self.rng.random()
        if r < 0.6:
            return b""
        if r < 0.85:
            return self.bytes(self.rng.randrange(1, 100))
        if r < 0.985:
            return self.bytes(self.rng.randrange(100, 1461))
        if r < 0.998:
            return self.bytes(self.rng.randrange(1461, 9001))
        return self.bytes(self.rng.randrange(65440, 65480))  # beyond the namespace's MTU

    def _ports(self) -> tuple[int, int]:
        rng = self.rng
        sport = rng.randrange(40000, 40064) if rng.random() < 0.9 else rng.randrange(65536)
        return sport, 0

    def _ext(self, proto: int, v6ext: list[int]) -> tuple[bytes, int | None]:
        """IPv6 extension headers of ``v6ext`` types, chained to end in ``proto``."""
        out = b""
        types = list(v6ext)
        for i, kind in enumerate(types):
            nxt = types[i + 1] if i + 1 < len(types) else proto
            if kind in (0, 60):
                out += bytes([nxt, 0]) + _IPV6_PADN6
            elif kind == 43:
                out += bytes([nxt, 0, self.rng.choice([0, 2, 4]),
                              0 if self.rng.random() < 0.8 else 1]) + bytes(4)
            elif kind == 44:
                out += bytes([nxt, 0]) + struct.pack("!HI", self.rng.choice([1, 8, 9]),
                                                     self.rng.randrange(1 << 32))
            elif kind == 51:
                out += bytes([nxt, 4, 0, 0]) + self.bytes(20)
            else:
                out += bytes([nxt, 0]) + self.bytes(6)
        return out, (types[0] if types else None)

    def packet(self, v6: bool | None = None, *, dst: bytes | None = None,
               v6ext: list[int] | None = None, v4opts: bytes | None = None) -> bytearray:
        """A well-formed client packet (checksums right): TCP, UDP, ICMP echo or an ICMP error."""
        rng = self.rng
        if v6 is None:
            v6 = rng.random() < 0.35
        src = rng.choice(CLIENTS6 if v6 else CLIENTS4)
        dst = dst or self._dst(v6)
        sport, _ = self._ports()
        r = rng.random()
        if r < 0.5:
            proto = 6
            flags = rng.choice([TCP_SYN] * 8 + [TCP_ACK, TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK,
                                               TCP_RST, TCP_RST | TCP_ACK, TCP_SYN | TCP_ACK,
                                               rng.randrange(256)])
            dport = rng.choice([SINK_PORT] * 4 + [9, DENIED_PORT, REDIRECT_PORT,
                                                  rng.randrange(65536)])
            payload = b"" if flags == TCP_SYN and rng.random() < 0.8 else self._payload()
            l4 = tcp(sport, dport, rng.randrange(1 << 32), rng.randrange(1 << 32), flags,
                     options=self._tcp_options() if flags & TCP_SYN or rng.random() < 0.2 else b"",
                     payload=payload)
        elif r < 0.75:
            proto = 17
            dport = rng.choice([UDP_ECHO_PORT] * 3 + [9, 53, GUE4[1], rng.randrange(65536)])
            l4 = udp(sport, dport, self._payload()[:1400] if rng.random() < 0.9 else self.bytes(
                rng.randrange(0, 9000)))
        elif r < 0.88:
            proto = 58 if v6 else 1
            kind = (128 if v6 else 8) if rng.random() < 0.85 else (129 if v6 else 0)
            l4 = icmp(kind, 0, struct.pack("!HH", sport & 0xFFFF, rng.randrange(65536)),
                      self.bytes(rng.randrange(0, 64)))
        else:
            proto = 58 if v6 else 1
            l4 = self._icmp_error(v6, src, dst, sport)
        if v6:
            ext, first = self._ext(proto, v6ext if v6ext is not None else (
                [rng.choice([0, 60, 43])] if rng.random() < 0.05 else []))
            return ipv6(src, dst, proto, l4, ext=ext, first=first)
        if v4opts is None:
            v4opts = b""
            if rng.random() < 0.05:
                v4opts = rng.choice([bytes([1, 1, 1, 0]), bytes([7, 7, 4, 0, 0, 0, 0, 1]),
                                     bytes([68, 8, 5, 0, 0, 0, 0, 0]), self.bytes(4 * rng.randrange(
                                         1, 11))])
        return ipv4(src, dst, proto, l4, options=v4opts, ident=rng.randrange(65536),
                    frag=0x4000 if rng.random() < 0.9 else 0)

    def _icmp_error(self, v6: bool, client: bytes, server: bytes, port: int) -> bytes:
        """An error from the client about a packet "from" the server (as if about a reply)."""
        rng = self.rng
        inner_proto = rng.choice([6, 17, 17, 58 if v6 else 1])
        if inner_proto == 6:
            l4 = tcp(rng.choice([SINK_PORT, 9]), port, rng.randrange(1 << 32), 0,
                     TCP_SYN | TCP_ACK)
        elif inner_proto == 17:
            l4 = udp(UDP_ECHO_PORT, port, self.bytes(rng.randrange(0, 40)))
        else:
            l4 = icmp(129 if v6 else 0, 0, struct.pack("!HH", port, 1), self.bytes(8))
        inner = bytes(ipv6(server, client, inner_proto, l4) if v6 else
                      ipv4(server, client, inner_proto, l4))
        cut = rng.choice([len(inner), (40 if v6 else 20) + 8, rng.randrange(1, len(inner) + 1)])
        if v6:
            kind, code = rng.choice([(1, rng.randrange(7)), (2, 0), (3, rng.randrange(2)),
                                     (4, rng.randrange(3))])
            rest = struct.pack("!I", rng.choice([1280, 1400, 65000]) if kind == 2 else 0)
        else:
            kind, code = rng.choice([(3, rng.randrange(16)), (11, rng.randrange(2)), (12, 0)])
            rest = struct.pack("!HH", 0, rng.choice([576, 1400]) if code == 4 else 0)
        return icmp(kind, code, rest, inner[:cut])

    # -- mutations -----------------------------------------------------------------------------

    def mutate(self, buf: bytearray) -> bytearray:
        rng = self.rng
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            if not buf:
                break
            m = rng.randrange(13)
            n = len(buf)
            if m == 0:  # bit flips
                for _ in range(rng.randint(1, 4)):
                    i = rng.randrange(n)
                    buf[i] ^= 1 << rng.randrange(8)
            elif m == 1:  # an interesting byte
                buf[rng.randrange(n)] = rng.choice([0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)])
            elif m == 2:  # truncation
                del buf[rng.randrange(1, n + 1) if n > 1 else 1:]
            elif m == 3:  # trailing bytes
                buf += self.bytes(rng.randrange(1, 64))
            elif m == 4:  # insert or delete a run
                i = rng.randrange(n)
                if rng.random() < 0.5:
                    buf[i:i] = self.bytes(rng.randrange(1, 16))
                else:
                    del buf[i:i + rng.randrange(1, 16)]
            elif m == 5:  # the IP length field lies
                value = rng.choice([0, 1, 19, 20, 39, 40, n - 1, n + 1, n + 100, 0xFFFF,
                                    rng.randrange(65536)]) & 0xFFFF
                if buf[0] >> 4 == 6 and n >= 6:
                    buf[4:6] = ((value - 40) & 0xFFFF).to_bytes(2, "big")
                elif n >= 4:
                    buf[2:4] = value.to_bytes(2, "big")
            elif m == 6:  # the IPv4 header length
                buf[0] = (buf[0] & 0xF0) | rng.randrange(16)
            elif m == 7:  # the transport protocol / next header
                at = 6 if buf[0] >> 4 == 6 else 9
                if n > at:
                    buf[at] = rng.choice([0, 1, 4, 6, 17, 41, 43, 44, 47, 50, 51, 58, 59, 60,
                                          132, 253, rng.randrange(256)])
            elif m == 8:  # fragment bits
                if buf[0] >> 4 == 4 and n >= 8:
                    buf[6:8] = rng.choice([0x2000, 0x0001, 0x3FFF, 0x6000, 0x8000,
                                           rng.randrange(65536)]).to_bytes(2, "big")
            elif m == 9:  # a field of the transport header
                l4 = (buf[0] & 0x0F) * 4 if buf[0] >> 4 == 4 else 40
                if n > l4 + 14:
                    at = l4 + rng.choice([0, 1, 2, 3, 4, 5, 12, 13, 14])
                    buf[at] = rng.randrange(256)
            elif m == 10:  # another destination
                v6 = buf[0] >> 4 == 6
                at, size = (24, 16) if v6 else (16, 4)
                if n >= at + size:
                    buf[at:at + size] = rng.choice(
                        (FORBIDDEN6 + MULTICAST6 + OTHER6) if v6 else
                        (FORBIDDEN4 + MULTICAST4 + OTHER4))
            elif m == 11:  # spliced with another packet
                other = self.packet()
                i, j = rng.randrange(n), rng.randrange(len(other))
                buf[i:] = other[j:]
            else:  # the TCP data offset / UDP length
                l4 = (buf[0] & 0x0F) * 4 if buf[0] >> 4 == 4 else 40
                if n > l4 + 13:
                    if rng.random() < 0.5:
                        buf[l4 + 12] = rng.randrange(16) << 4
                    else:
                        buf[l4 + 4:l4 + 6] = rng.choice([0, 7, 8, 9, n, 0xFFFF]).to_bytes(2, "big")
        if not buf:
            buf = bytearray(self.bytes(1))
        if rng.random() < 0.35:
            fix_checksums(buf)
        return buf

    def known_bad(self) -> tuple[bytearray, str]:
        """A packet malformed on purpose, with the drop reason the documentation promises for it
        (an oracle that does not read the parser)."""
        rng = self.rng
        r = rng.randrange(11)
        if r == 0:
            buf = self.packet()
            buf[0] = (rng.choice([0, 1, 2, 3, 5, 7, 8, 15]) << 4) | (buf[0] & 0x0F)
            return buf, "bad_version"
        if r == 1:
            v6 = rng.random() < 0.4
            buf = self.packet(v6)
            return buf[:rng.randrange(1, 40 if v6 else 20)], "truncated"
        if r == 2:
            buf = self.packet(False, dst=SERVER4, v4opts=b"")
            buf[0] = 0x40 | rng.randrange(5)
            return buf, "bad_header_length"
        if r == 3:
            buf = self.packet(False, dst=SERVER4)
            buf[6:8] = (rng.choice([0x2000, 0x0001, 0x00FF, 0x3FFF, 0x6001])).to_bytes(2, "big")
            fix_checksums(buf)
            return buf, "fragment"
        if r == 4:
            return self.packet(True, dst=SERVER6, v6ext=rng.choice([[44], [0, 44], [60, 44]])), \
                "fragment"
        if r == 5:
            v6 = rng.random() < 0.4
            return self.packet(v6, dst=rng.choice(MULTICAST6 if v6 else MULTICAST4)), "multicast"
        if r == 6:
            proto = rng.choice([2, 4, 41, 47, 50, 58, 89, 132, 255])
            return ipv4(rng.choice(CLIENTS4), SERVER4, proto, self.bytes(rng.randrange(8, 60))), \
                "unsupported_protocol"
        if r == 7:
            proto = rng.choice([1, 4, 41, 59, 132])  # (ICMPv4 in IPv6, IP in IP, no next header)
            return ipv6(rng.choice(CLIENTS6), SERVER6, proto, self.bytes(rng.randrange(8, 60))), \
                "unsupported_protocol"
        if r == 8:
            first = rng.choice([50, 51, 135, 139, 140, 253, 254])
            ext, _ = self._ext(17, [first])
            return ipv6(rng.choice(CLIENTS6), SERVER6, 17, udp(40000, 7007, b"x"), ext=ext,
                        first=first), "ipv6_ext_header"
        if r == 9:
            v6 = rng.random() < 0.4
            kind = rng.choice([133, 134, 135, 136, 137, 130, 143]) if v6 else rng.choice(
                [13, 14, 15, 16, 17, 18, 9, 10, 5])
            l4 = icmp(kind, 0, bytes(4), self.bytes(rng.randrange(0, 24)))
            if v6:
                return ipv6(rng.choice(CLIENTS6), SERVER6, 58, l4), "icmp_unsupported"
            return ipv4(rng.choice(CLIENTS4), SERVER4, 1, l4), "icmp_unsupported"
        v6 = rng.random() < 0.4
        if rng.random() < 0.5:
            l4 = bytearray(tcp(40000, SINK_PORT, 1, 0, TCP_SYN))
            l4[12] = rng.randrange(5) << 4
            reason = "bad_tcp_header"
            proto = 6
        else:
            l4 = bytearray(udp(40000, UDP_ECHO_PORT, b"hello"))
            l4[4:6] = rng.choice([0, 7, 14, 200]).to_bytes(2, "big")
            reason = "bad_udp_header"
            proto = 17
        if v6:
            return ipv6(rng.choice(CLIENTS6), SERVER6, proto, bytes(l4)), reason
        return ipv4(rng.choice(CLIENTS4), SERVER4, proto, bytes(l4)), reason

    def vnet_header(self, packet: bytearray) -> bytes:
        """A virtio-net header for ``packet``: honest (plain, a partial checksum, a superframe) or
        random; an honest partial checksum rewrites the packet's TCP checksum field."""
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            return vnet.PLAIN
        p = parse(bytes(packet))
        if r < 0.85 and not isinstance(p, Drop) and p.protocol == 6 and p.inner is None:
            # Linux's partial checksum: the field holds the pseudo-header's sum, not inverted.
            length = p.total_length - p.ihl
            packet[p.ihl + 16:p.ihl + 18] = pseudo(p.version, p.src, p.dst, 6, length).to_bytes(
                2, "big")
            payload = p.total_length - p.payload_offset
            if payload > 512 and rng.random() < 0.5:
                mss = rng.choice([256, 536, payload // 2 + 1, 1448])
                return struct.pack("<BBHHHH", vnet.NEEDS_CSUM,
                                   vnet.GSO_TCPV4 if p.version == 4 else vnet.GSO_TCPV6,
                                   p.payload_offset, mss, p.ihl, 16)
            return struct.pack("<BBHHHH", vnet.NEEDS_CSUM, 0, 0, 0, p.ihl, 16)
        return struct.pack("<BBHHHH", rng.choice([0, 1, 2, 3, 0x40, 0xFF]),
                           rng.choice([0, 1, 3, 4, 5, 0x81, 0x84, 0x7F]), rng.randrange(65536),
                           rng.choice([0, 1, 255, 256, 536, 1448, 65535]),
                           rng.choice([0, 20, 40, 60, 65535]), rng.choice([0, 6, 16, 65535]))

    def datagram(self, framed: bool) -> tuple[bytes, str | None]:
        """One tunnel datagram (never empty: an empty datagram is how SEQPACKET says EOF) and the
        reason the generator knows it must be dropped for, if it built it so."""
        rng = self.rng
        r = rng.random()
        known = None
        if r < 0.04:
            buf = bytearray(self.bytes(rng.randrange(1, 200)))
            if buf[0] >> 4 not in (4, 6):
                known = "bad_version"
        elif r < 0.3:
            buf, known = self.known_bad()
        elif r < 0.68:
            buf = self.mutate(self.packet())
        else:
            buf = self.packet()
        if not framed:
            return bytes(buf), known
        if rng.random() < 0.03 and known is None:
            return (self.vnet_header(buf) + bytes(buf))[:rng.randrange(1, vnet.HEADER_SIZE)], None
        header = self.vnet_header(buf)
        return header + bytes(buf), known

    # -- contexts ------------------------------------------------------------------------------

    def context(self, tenant: str = CTX_TENANT) -> tuple[bytes, str]:
        """A tunnel context and what the documented default application must do with it:
        ``accept``, ``refuse`` or ``either`` (what the docs leave open)."""
        rng = self.rng
        base = {"tenant": tenant, "device": f"laptop-{rng.randrange(100)}"}
        r = rng.randrange(20)
        if r < 4:
            return json.dumps(base).encode(), "accept"
        if r == 4:  # the tenant as something else
            value = rng.choice([None, 0, 1.5, True, [], {}, "", ["fuzz"], {"a": 1}])
            return json.dumps({**base, "tenant": value}).encode(), "refuse"
        if r == 5:  # not an object, not JSON at all
            return rng.choice([b"[1, 2]", b'"fuzz"', b"null", b"42", b"true", b"{", b"}",
                               b"not json", b"{'tenant': 'x'}", b'{"tenant": "x",}',
                               b'{"tenant" "x"}', b"\xff\xfe\xfd", b'{"no": "tenant"}',
                               b"{}", b'{"tenant": "x"} trailing']), "refuse"
        if r == 6:  # odd tenants the docs do not rule on yet
            value = rng.choice(["\u0000", "a\u0000b", "x\u0001y", "\n", "t\te", "ten ant", "💥",
                                "\ud800", "é" * 50, "x" * rng.choice([64, 256, 4096, 70000]),
                                "../../etc", "<script>", "a\\b", "'\"", "\u202e"])
            return json.dumps({**base, "tenant": value}).encode(), "either"
        if r == 7:  # values JSON does not have, and numbers Python makes infinite
            value = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1e-400",
                                "123456789012345678901234567890", "1" * 5000, "-0", "0.0e0"])
            where = rng.choice(["extra", "nested", "tenant"])
            if where == "extra":
                text = f'{{"tenant": "{tenant}", "x": {value}}}'
            elif where == "nested":
                text = f'{{"tenant": "{tenant}", "x": {{"y": [1, {value}]}}}}'
            else:
                text = f'{{"tenant": {value}}}'
            return text.encode(), "refuse" if where == "tenant" else "either"
        if r == 8:  # duplicate keys
            text = rng.choice([f'{{"tenant": "a", "tenant": "{tenant}"}}',
                               f'{{"tenant": "{tenant}", "tenant": ""}}',
                               f'{{"tenant": "{tenant}", "x": 1, "x": [2]}}',
                               f'{{"tenant": "{tenant}", "tenant": "{tenant}"}}'])
            return text.encode(), "either"
        if r == 9:  # deep nesting
            depth = rng.choice([10, 100, 1000, 5000, 30000])
            text = f'{{"tenant": "{tenant}", "x": ' + "[" * depth + "]" * depth + "}"
            return text.encode(), "either"
        if r == 10:  # many keys, long values
            n = rng.choice([100, 1000, 3000])
            return json.dumps({**base, **{f"k{i}": i for i in range(n)}}).encode(), "either"
        if r == 11:  # other encodings of a good context
            text = json.dumps(base)
            return rng.choice([text.encode("utf-16"), text.encode("utf-16-le"),
                               text.encode("utf-32"), b"\xef\xbb\xbf" + text.encode(),
                               text.encode("latin-1") + b"\xe9"]), "either"
        if r == 12:  # about 64 KiB, and beyond what one read takes
            size = rng.choice([65530, 65536, 65600, 65601, 70000, 150000])
            pad = max(0, size - len(json.dumps(base)) - 12)
            return json.dumps({**base, "pad": "x" * pad}).encode(), "either"
        if r == 13:  # NUL bytes and control characters in the raw bytes
            text = json.dumps(base).encode()
            i = rng.randrange(len(text))
            return text[:i] + rng.choice([b"\0", b"\x01", b"\x7f", b"\n", b"\0\0\0"]) + text[i:], \
                "either"
        # byte-level mutations of a good context
        buf = bytearray(json.dumps(base).encode())
        for _ in range(rng.randint(1, 3)):
            m = rng.randrange(4)
            if m == 0:
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            elif m == 1:
                if len(buf) > 1:
                    del buf[rng.randrange(1, len(buf)):]
            elif m == 2:
                i = rng.randrange(len(buf))
                buf[i:i] = self.bytes(rng.randrange(1, 8))
            else:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf) or b"{", "either"

    # -- GUE -----------------------------------------------------------------------------------

    def gue_datagram(self, version: int) -> tuple[bytes, bool]:
        """A GUE datagram for an on-ramp of IP ``version``, and whether its context is one of the
        few canonical good ones (so its inner packet's fate is predictable)."""
        rng = self.rng
        framed = rng.random() < 0.3
        canonical = rng.random() < 0.8
        if canonical:
            context = json.dumps({"tenant": GUE_TENANT, "s": rng.randrange(3)},
                                 separators=(",", ":")).encode()
        else:
            context = rng.choice([
                lambda: self.context(GUE_TENANT)[0][:100],
                lambda: json.dumps({"tenant": rng.choice(["acme", "evil", "", GUE_TENANT + "x"])}
                                   ).encode(),
                lambda: self.bytes(rng.randrange(0, 100)),
                lambda: b'{"tenant":"fuzz-gue","x":NaN}',
            ])()
        inner, _ = self.datagram(False) if rng.random() < 0.5 else (bytes(self.packet()), None)
        inner = bytearray(inner)
        inner_version = inner[0] >> 4 if inner else 4
        limit = gue.MAX_VNET_CONTEXT if framed else gue.MAX_CONTEXT
        context = context[:limit]
        if not framed and context.startswith(b"\0"):
            context = b"x" + context[1:]  # a leading NUL means the offload mark
        head = gue.header(context, inner_version if inner_version in (4, 6) else 4, framed)
        if framed:
            head += self.vnet_header(inner) + b"\0\0"
        datagram = bytearray(head + bytes(inner))
        r = rng.random()
        if r < 0.05:
            datagram[0] |= rng.choice([0x40, 0x80, 0xC0, 0x20])  # version, C bit
        elif r < 0.09:
            datagram[2:4] = rng.randrange(1, 65536).to_bytes(2, "big")  # flags
        elif r < 0.14:
            datagram[0] = (datagram[0] & 0xE0) | rng.randrange(32)  # Hlen
        elif r < 0.18:
            datagram[1] = rng.choice([4, 41, 0, 17, 255, 6])
        elif r < 0.22:
            del datagram[rng.randrange(0, len(datagram)):]
        elif r < 0.25:
            datagram = bytearray(self.bytes(rng.randrange(0, 80)))
        elif r < 0.3:
            i = rng.randrange(len(datagram))
            datagram[i] ^= 1 << rng.randrange(8)
            canonical = False
        return bytes(datagram)[:65507 if version == 4 else 65487], canonical

    # -- admin HTTP ----------------------------------------------------------------------------

    METHODS = ["GET"] * 11 + ["HEAD"] * 2 + ["POST"] * 2 + ["PUT", "DELETE", "PATCH", "OPTIONS",
                                                          "TRACE", "CONNECT"]
    PATHS = (["/healthz", "/readyz", "/api/status", "/api/workers", "/api/tunnels"] * 4
             + ["/api/flows"] * 12
             + ["/metrics", "/api/reload", "/api/workers/0/restart", "/api/workers/1/restart",
                "/api/workers/-1/restart", "/api/workers/99999999999999999999/restart",
                "/api/workers/x/restart", "/api/workers/00/restart", "/api/workers/0",
                "/api/", "/api", "/", "/nope", "/api/flows/", "/API/FLOWS", "//api//flows",
                "/api/./flows", "/api/../api/flows", "/api/flows%00", "/api/fl%6fws",
                "/%2e%2e/%2e%2e/etc/passwd", "/api/tunnels/", "*", "http://localhost/api/status",
                "/api/status#frag", "/api/workers/%30/restart", "/api/workers/0/restart/",
                "/static/../../etc/passwd"])
    QUERY_KEYS = ["offset", "limit", "tenant", "after", "cursor", "page", "x", "offset", "limit"]
    QUERY_VALUES = ["0", "1", "-1", "199", "200", "201", "850", "100000", "100001", "2147483648",
                    "9223372036854775808", "1" * 30, "1" * 5000, "1e3", "0x10", " 1", "1.5", "",
                    "NaN", "inf", "%00", "+1", "%D9%A3", "-0", "fuzz", "acme", "fuzz-gue", "%FF",
                    "a%20b", "%E2%80%AE", "null", "[]", "{}", "\u0663".encode().hex()]

    def http_request(self) -> tuple[bytes, dict]:
        """Raw request bytes and what they are: ``clean`` (must get an answer), ``path``,
        ``method``, ``api``; ``count`` requests (pipelined), ``abort`` (cut short on purpose)."""
        rng = self.rng
        clean = True
        method = rng.choice(self.METHODS)
        if rng.random() < 0.04:
            method = rng.choice(["get", "GeT", "FOO", "G\x00T", "", "A" * 1000, "GET GET",
                                 "\x16\x03\x01", "PRI"])
            clean = False
        path = rng.choice(self.PATHS)
        if rng.random() < 0.01:
            path = "/" + "a" * rng.choice([1000, 9000, 70000])
            clean = False
        query = ""
        if path.startswith("/api/flows") or rng.random() < 0.1:
            pairs = []
            for _ in range(rng.choice([0, 1, 2, 2, 3, 4])):
                pairs.append(f"{rng.choice(self.QUERY_KEYS)}={rng.choice(self.QUERY_VALUES)}")
            if rng.random() < 0.05:
                pairs.append(rng.choice(["&&", "=", "offset", "limit=", "=1", "%", "a=%zz"]))
            query = "&".join(pairs)
        target = path + ("?" + query if query or rng.random() < 0.05 else "")
        if not all(32 < ord(c) < 127 for c in target) or not target.startswith("/"):
            clean = False  # a space or a control character breaks the request line; "*" and
            # absolute URIs are for OPTIONS and proxies
        version = "HTTP/1.1"
        if rng.random() < 0.1:
            version = "HTTP/1.0"
        if rng.random() < 0.03:
            version = rng.choice(["HTTP/2.0", "HTTP/0.9", "", "http/1.1", "HTTP/1.10", "HTTP/9.9",
                                  "HTTP/1.1 extra", "HTTP/1"])
            clean = False
        eol = "\r\n"
        if rng.random() < 0.04:
            eol = rng.choice(["\n", "\r"])
            clean = False
        headers = []
        if rng.random() < 0.95:
            headers.append(("Host", rng.choice(["localhost", "127.0.0.1:9180", "x", ""])))
        elif version == "HTTP/1.1":
            clean = False  # HTTP/1.1 wants a Host header: 400, and the connection closes
        keep = version == "HTTP/1.1" and rng.random() < 0.2
        headers.append(("Connection", "keep-alive" if keep else "close"))
        body = b""
        if rng.random() < 0.15:
            body = rng.choice([b"{}", b'{"a": 1}', b"x" * rng.choice([1, 100, 5000]),
                               self.bytes(rng.randrange(1, 300))])
            style = rng.random()
            if style < 0.7:
                headers.append(("Content-Length", str(len(body))))
            elif style < 0.85:
                headers.append(("Transfer-Encoding", "chunked"))
                body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            else:
                headers.append(("Content-Length", rng.choice(["-1", "abc", "99999999999", "1, 2",
                                                              str(len(body) + 10)])))
                clean = False
        if rng.random() < 0.1:
            headers.append(("Authorization", rng.choice(["Bearer ", "Bearer x", "Basic Zm9vOmJhcg==",
                                                         "Bearer " + "a" * 5000, "bearer x"])))
        if rng.random() < 0.05:
            headers.append(("Expect", "100-continue"))
        if rng.random() < 0.08:
            clean = False
            weird = rng.choice([("X-Long", "v" * rng.choice([8000, 20000, 100000])),
                                ("X-Nul", "a\x00b"), ("X-Bytes", "\xe9\xff"),
                                ("", "no name"), ("Bad Name", "x"), ("X-Fold", "a\r\n b"),
                                ("Content-Length", "5"), ("Transfer-Encoding", "gzip, chunked"),
                                ("X-Many", None)])
            if weird[1] is None:
                headers += [(f"X-H{i}", "v") for i in range(rng.choice([50, 200, 1000]))]
            else:
                headers.append(weird)
        lines = [f"{method} {target} {version}".rstrip(" ")]
        lines += [f"{k}: {v}" if k or rng.random() < 0.5 else "no colon here" for k, v in headers]
        raw = (eol.join(lines) + eol + eol).encode("latin-1", "replace") + body
        meta = {"clean": clean, "path": path, "method": method, "count": 1, "abort": False,
                "head": method == "HEAD", "keep": keep}
        r = rng.random()
        if r < 0.04:  # byte-level damage
            buf = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            raw, meta["clean"] = bytes(buf), False
        elif r < 0.06:  # cut short, and the client goes away
            raw, meta["abort"], meta["clean"] = raw[:rng.randrange(len(raw))], True, False
        elif r < 0.1 and clean and not body:  # two pipelined requests
            second, m2 = self.http_request()
            if m2["clean"] and not m2["abort"] and m2["count"] == 1 and not m2["head"]:
                raw = raw.replace(b"Connection: close", b"Connection: keep-alive") + second
                meta["count"], meta["second"] = 2, m2
        return raw, meta


# -- reading HTTP answers ----------------------------------------------------------------------------

class HttpError(Exception):
    pass


# aiohttp answers in the request's version, even HTTP/0.9 and HTTP/2.0: taken as they come.
_STATUS = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})(?: [^\r\n]*)?\r\n")


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.buf += chunk
        return bool(chunk)

    def response(self, head: bool) -> tuple[int, dict, bytes]:
        while True:
            while b"\r\n\r\n" not in self.buf:
                if len(self.buf) > 1 << 20 or not self.fill():
                    if not self.buf:
                        raise EOFError
                    raise HttpError(f"no end of headers in {self.buf[:200]!r}")
            head_end = self.buf.index(b"\r\n\r\n")
            top, self.buf = self.buf[:head_end + 2], self.buf[head_end + 4:]
            m = _STATUS.match(top)
            if not m:
                raise HttpError(f"bad status line {top[:100]!r}")
            status = int(m.group(1))
            headers: dict[str, str] = {}
            for line in top[m.end():].split(b"\r\n"):
                if not line:
                    continue
                name, sep, value = line.partition(b":")
                if not sep or not name or name != name.strip():
                    raise HttpError(f"bad header line {line[:100]!r}")
                headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
            if status != 100:
                break
        if head or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    if not self.fill():
                        raise HttpError("chunked body cut short")
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    if not self.fill():
                        raise HttpError("chunk cut short")
                body, self.buf = body + self.buf[:size], self.buf[size + 2:]
                if size == 0:
                    return status, headers, body
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                if not self.fill():
                    raise HttpError(f"body cut short: {len(self.buf)} of {n}")
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, headers, body
        while self.fill():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body


# -- running it all ------------------------------------------------------------------------------------

def in_netns(path: str, fn: Callable, *args):
    """Run ``fn`` in a thread that entered the network namespace at ``path``; its result."""
    out: dict = {}

    def inside():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc

    t = threading.Thread(target=inside, name="fuzz-netns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def expected_sha256(size: int) -> str:
    from tests.e2e.streams import pattern
    block = pattern(1 << 22)
    h = hashlib.sha256()
    for _ in range(size // len(block)):
        h.update(block)
    h.update(block[:size % len(block)])
    return h.hexdigest()


class Transfers:
    """Transfers through ``ipferry connect`` (streams.py GET and PUT, checked by SHA-256), one
    after the other, until stopped: the traffic that must go on intact while the fuzzer runs."""

    def __init__(self, daemon, size: int = 16 << 20) -> None:
        self.daemon, self.size = daemon, size
        self.results: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-transfers", daemon=True)
        self.expected = expected_sha256(size)

    def start(self) -> Transfers:
        self._thread.start()
        return self

    def _run(self) -> None:
        from tests.e2e.dataplane import stream_client
        mode = "get"
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = stream_client(self.daemon, mode, self.size, timeout=180)
            except Exception as exc:  # noqa: BLE001 - recorded, judged by the caller
                self.errors.append(f"{mode}: {str(exc)[-500:]}")
                r = {}
            got = r.get("sha256") or r.get("server_sha256")
            ok = got == self.expected and r.get("bytes") == self.size
            self.results.append({"mode": mode, "ok": ok, "start": t0, "end": time.monotonic()})
            if not ok and r:
                self.errors.append(f"{mode} corrupted: {r}")
            mode = "put" if mode == "get" else "get"

    def wait_started(self, timeout: float = 30) -> None:
        """Until the first transfer's tunnel is open (so what follows runs alongside it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.results and not self.errors:
            status, body = self.daemon.request("GET", "/api/tunnels")
            if status == 200 and any(t.get("tenant") == "acme" for t in json.loads(body)):
                return
            time.sleep(0.05)

    def overlapping(self, start: float, end: float) -> int:
        """How many intact transfers ran (at least partly) between ``start`` and ``end``."""
        return sum(1 for r in self.results if r["ok"] and r["start"] < end and r["end"] > start)

    def stop(self, timeout: float = 200) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.errors.append("a transfer did not finish in time")


def udp_socket_stats(ports: set[int]) -> tuple[int, int]:
    """(queued bytes, drops) of the UDP sockets bound to ``ports`` in this thread's namespace."""
    queued = drops = 0
    for name in ("udp", "udp6"):
        with open(f"/proc/thread-self/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in ports:
                    queued += int(fields[4].split(":")[1], 16)
                    drops += int(fields[-1])
    return queued, drops


@dataclass
class Report:
    seed: int
    inputs: Counter = field(default_factory=Counter)  # by kind
    seconds: float = 0.0
    predicted: Counter = field(default_factory=Counter)  # drops the predictor expects
    known: Counter = field(default_factory=Counter)  # drops the generator built on purpose
    drops: dict = field(default_factory=dict)  # Δ ipferry_drops_total by reason
    closed: dict = field(default_factory=dict)  # Δ ipferry_tunnels_closed_total by reason
    upstream: dict = field(default_factory=dict)  # Δ ipferry_upstream_failures_total by reason
    accounting: dict = field(default_factory=dict)
    answers: Counter = field(default_factory=Counter)  # what came back, by kind
    contexts: Counter = field(default_factory=Counter)  # (expectation, outcome)
    admin: Counter = field(default_factory=Counter)  # status codes and outcomes
    transfers: list = field(default_factory=list)
    restarts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)

    @property
    def total(self) -> int:
        return sum(self.inputs.values())

    def as_dict(self) -> dict:
        return {"seed": self.seed, "inputs": dict(self.inputs), "total": self.total,
                "seconds": round(self.seconds, 2),
                "inputs_per_second": round(self.total / self.seconds) if self.seconds else None,
                "predicted": dict(self.predicted), "known": dict(self.known),
                "drops": self.drops, "tunnels_closed": self.closed,
                "upstream_failures": self.upstream,
                "accounting": self.accounting, "answers": dict(self.answers),
                "contexts": {f"{k[0]}/{k[1]}": v for k, v in self.contexts.items()},
                "admin": {str(k): v for k, v in self.admin.items()},
                "transfers": self.transfers, "restarts": self.restarts,
                "problems": self.problems, "notes": self.notes}


def _sum_by(metrics: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, labels), v in metrics.items():
        if metric == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0) + v
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if after.get(k, 0) != before.get(k, 0)}


class Fuzzer:
    """Feeds a running daemon ``inputs`` fuzzed inputs (seeded) and judges the outcome.

    ``daemon``: a :class:`tests.helpers.Daemon` started with :func:`config`, whose namespace has
    the servers of tests/e2e (streams on 9000 for the transfers and on :data:`SINK_PORT`, the UDP
    echo server). Run :meth:`run` from any thread: the fuzzing itself happens in a thread inside
    the daemon's network namespace.
    """

    MIX = {"packet": 0.31, "vnet": 0.31, "gue": 0.2, "context": 0.06, "admin": 0.12}

    def __init__(self, daemon, seed: int, *, audit: Path, transfers: Transfers | None = None,
                 round_size: int = 1000,
                 rotate_every: int = 50_000, progress: Callable[[str], None] | None = None,
                 progress_every: int = 0, mix: dict | None = None) -> None:
        self.d = daemon
        self.transfers = transfers
        self.seed = seed
        self.rng = random.Random(seed)
        self.gen = Gen(self.rng)
        self.audit = audit
        self.round_size = round_size
        self.rotate_every = rotate_every
        self.progress = progress or (lambda line: None)
        self.progress_every = progress_every
        self.mix = mix or self.MIX
        self.report = Report(seed)
        self.tunnels: dict[str, dict] = {}  # kind -> {"sock", "sent", "role"}
        self.generation = 0
        self.flow_packets_closed = 0  # packets of fuzz flows of tunnels already rotated out
        self.rst_valid = 0  # valid TCP RSTs sent: the kernel may take them uncounted (RFC 5961)
        self.gue_sent = 0
        self.gue_unpredicted = 0
        self.probes = 0
        self.accepted_probes = 0
        self._gue_socks: list[tuple[socket.socket, int]] = []
        self.unpredicted = 0  # inputs whose parser fate is not predicted (GUE, odd contexts)

    # -- plumbing ----------------------------------------------------------------------------------

    def _tunnel(self, role: str, framed: bool, tenant: str = TENANT) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.connect(str(self.d.runtime_dir / "tunnel.sock"))
        ctx = json.dumps({"tenant": tenant, "role": role}).encode()
        s.send((vnet.TUNNEL_MAGIC if framed else b"") + ctx)
        return s

    def _open_fuzz_tunnels(self) -> None:
        self.generation += 1
        for kind, framed in (("packet", False), ("vnet", True)):
            role = f"{kind}-{self.seed}-{self.generation}"
            self.tunnels[kind] = {"sock": self._tunnel(role, framed), "sent": 0, "role": role,
                                  "framed": framed}

    def _listed(self) -> list[dict]:
        status, body = self.d.request("GET", "/api/tunnels")
        if status != 200:
            raise AssertionError(f"/api/tunnels answered {status}")
        return json.loads(body)  # (lenient: the strict check is the admin fuzzer's)

    def _wait_read(self, t: dict, timeout: float = 30) -> None:
        """Until the daemon has read every datagram sent on fuzz tunnel ``t`` (its packets_in)."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            self._drain(t)
            rows = [r for r in self._listed() if (r.get("context") or {}).get("role") == t["role"]]
            if rows:
                seen = rows[0]["packets_in"]
                if seen == t["sent"]:
                    return
                if seen > t["sent"]:
                    break
            time.sleep(0.05)
        self.report.problem(f"tunnel {t['role']}: the daemon read {seen} datagrams of "
                            f"{t['sent']} sent")

    def _close_fuzz_tunnels(self) -> None:
        for t in self.tunnels.values():
            self._wait_read(t)
            self._drain(t)
            t["sock"].close()
        self.tunnels.clear()

    def _drain(self, t: dict) -> None:
        sock = t["sock"]
        while True:
            try:
                data = sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.report.problem(f"fuzz tunnel {t['role']}: {exc}")
                return
            if not data:
                self.report.problem(f"the daemon closed fuzz tunnel {t['role']}")
                return
            self._check_answer(data, t["framed"], f"tunnel {t['role']}")

    def _check_answer(self, data: bytes, framed: bool, where: str) -> None:
        partial = False
        if framed:
            if len(data) < vnet.HEADER_SIZE:
                self.report.problem(f"{where}: a {len(data)}-byte datagram")
                return
            header, data = data[:vnet.HEADER_SIZE], data[vnet.HEADER_SIZE:]
            partial = vnet.is_partial(header)
            if vnet.is_gso(header) and not partial:
                self.report.problem(f"{where}: a superframe without a partial checksum")
        why = check_reply(data, partial_ok=partial)
        if why:
            self.report.problem(f"{where}: the daemon sent {why}: {data[:64].hex()}")
            return
        version = data[0] >> 4
        proto = data[9] if version == 4 else data[6]
        l4 = (data[0] & 0x0F) * 4 if version == 4 else 40
        if proto == 6:
            flags = data[l4 + 13]
            kind = "tcp_rst" if flags & TCP_RST else "tcp_synack" if flags & TCP_SYN else "tcp"
        elif proto == 17:
            kind = "udp"
        else:
            kind = f"icmp{'6' if version == 6 else ''}_{data[l4]}"
        self.report.answers[kind] += 1

    # -- the four kinds of input -------------------------------------------------------------------

    def _packets(self, kind: str, n: int) -> None:
        t = self.tunnels[kind]
        framed = t["framed"]
        sock = t["sock"]
        for i in range(n):
            datagram, known = self.gen.datagram(framed)
            reason, p = predict(datagram, framed)
            if reason:
                self.report.predicted[reason] += 1
            elif p.protocol == 6 and p.tcp_flags & TCP_RST:
                self.rst_valid += 1
            if known:
                self.report.known[known] += 1
                if known != reason:
                    self.report.problem(f"the parser says {reason} of a packet built to be "
                                        f"{known}: {datagram[:80].hex()}")
            try:
                sock.send(datagram)
            except OSError as exc:
                self.report.problem(f"fuzz tunnel {t['role']}: send failed: {exc}")
                return
            t["sent"] += 1
            if i % 64 == 63:
                self._drain(t)
        self._drain(t)
        self.report.inputs[kind] += n

    def _gue(self, n: int) -> None:
        if not self._gue_socks:
            for family, addr in ((socket.AF_INET, GUE4),) * 4 + ((socket.AF_INET6, GUE6),) * 2:
                s = socket.socket(family, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.connect(addr)
                self._gue_socks.append((s, 4 if family == socket.AF_INET else 6))
        for i in range(n):
            s, version = self.rng.choice(self._gue_socks)
            datagram, canonical = self.gen.gue_datagram(version)
            try:
                s.send(datagram)
            except OSError as exc:
                self.report.notes.append(f"GUE send of {len(datagram)} bytes: {exc}")
                continue
            self.gue_sent += 1
            self._predict_gue(datagram, canonical)
            if i % 32 == 31:
                self._gue_pace()
        self._gue_pace()
        self.report.inputs["gue"] += n

    def _predict_gue(self, datagram: bytes, canonical: bool) -> None:
        try:
            raw, inner = gue.decapsulate(datagram)
        except gue.BadGue:
            self.report.predicted["bad_gue"] += 1
            return
        reason, p = predict(inner, raw.startswith(gue.VNET_MAGIC))
        if reason is None and p.protocol == 6 and p.tcp_flags & TCP_RST:
            self.rst_valid += 1
        if canonical and raw.removeprefix(gue.VNET_MAGIC) in GUE_CONTEXTS:
            if reason:  # a context the on-ramp takes: the inner packet's fate is the parser's
                self.report.predicted[reason] += 1
        else:
            self.unpredicted += 1

    def _gue_pace(self) -> None:
        """Drain the answers, and wait until the on-ramp sockets are read (bounded)."""
        for s, version in self._gue_socks:
            while True:
                try:
                    data = s.recv(1 << 17, socket.MSG_DONTWAIT)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                self._check_gue_answer(data, version)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and udp_socket_stats({GUE4[1], GUE6[1]})[0]:
            time.sleep(0.001)

    def _check_gue_answer(self, data: bytes, version: int) -> None:
        if len(data) < 4 or data[0] & 0xE0 or data[2:4] != b"\0\0":
            self.report.problem(f"GUE answer with a bad header: {data[:24].hex()}")
            return
        start = 4 + (data[0] & 0x1F) * 4
        if data[4:10] == gue.VNET_MAGIC:
            header = data[start - gue.VNET_OPTION:start - 2]
            packet = data[start:]
            partial = vnet.is_partial(header)
        elif start == 4:
            packet, partial = data[4:], False
        else:
            self.report.problem(f"GUE answer carries a context: {data[:24].hex()}")
            return
        if packet and {4: 4, 6: 41}.get(packet[0] >> 4) != data[1]:
            self.report.problem(f"GUE answer's protocol {data[1]} does not match its packet")
        why = check_reply(packet, partial_ok=partial)
        if why:
            self.report.problem(f"GUE answer: {why}: {packet[:64].hex()}")
        else:
            self.report.answers["gue"] += 1

    def _contexts(self, n: int) -> None:
        done = 0
        while done < n:
            batch = min(16, n - done)
            self._context_batch(batch)
            done += batch
        self.report.inputs["context"] += n

    def _probe(self, framed: bool) -> bytes:
        """An echo request to the daemon's own host: forbidden, answered "prohibited"."""
        self.probes += 1
        packet = ipv4(CLIENTS4[0], FORBIDDEN4[0], 1, icmp(8, 0, struct.pack("!HH", 7, 7), b"p"))
        return (vnet.PLAIN if framed else b"") + bytes(packet)

    def _context_batch(self, n: int) -> None:
        pending = []
        for _ in range(n):
            ctx, expect = self.gen.context()
            framed = self.rng.random() < 0.2
            raw = (vnet.TUNNEL_MAGIC + ctx) if framed else ctx
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            try:
                s.connect(str(self.d.runtime_dir / "tunnel.sock"))
                s.send(raw)
            except OSError as exc:
                self.report.problem(f"context of {len(raw)} bytes: {exc}")
                s.close()
                continue
            try:
                s.send(self._probe(framed))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused (closed) already: the recv below reads the EOF
            pending.append((s, framed, expect, ctx))
        outcomes = {}
        deadline = time.monotonic() + 10
        while len(outcomes) < len(pending) and time.monotonic() < deadline:
            waiting = [p[0] for p in pending if p[0] not in outcomes]
            ready, _, _ = select.select(waiting, [], [], 0.2)
            for s in ready:
                try:
                    data = s.recv(1 << 16)
                except OSError:
                    data = b""
                outcomes[s] = data
        accepted = 0
        for s, framed, expect, ctx in pending:
            data = outcomes.get(s)
            if data is None:
                self.report.problem(f"a context got no answer in 10 s: {ctx[:100]!r}")
                outcome = "silent"
            elif data == b"":
                outcome = "refused"
            else:
                outcome = "accepted"
                accepted += 1
                self._check_answer(data, framed, "context probe")
            self.report.contexts[(expect, outcome)] += 1
            if expect == "accept" and outcome != "accepted" or \
                    expect == "refuse" and outcome != "refused":
                self.report.problem(f"context {ctx[:100]!r}: {outcome}, expected to {expect}")
        self.accepted_probes += accepted
        if accepted:
            self._admin_check("GET", "/api/tunnels", via_unix=True)  # strict JSON, odd contexts
        for s, *_ in pending:
            s.close()

    def _admin(self, n: int) -> None:
        for _ in range(n):
            raw, meta = self.gen.http_request()
            via_unix = self.rng.random() < 0.6
            if via_unix and b"restart" in urllib.parse.unquote_to_bytes(raw).lower():
                via_unix = False  # over TCP a mutating call needs a token nobody has
            self._exchange(raw, meta, via_unix)
            if self.rng.random() < 0.002:
                self._admin_check("POST", "/api/reload", via_unix=True)  # harmless: same config
        self.report.inputs["admin"] += n

    def _admin_socket(self, via_unix: bool) -> socket.socket:
        if via_unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(15)
            s.connect(self.d.admin_socket)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(15)
            s.connect(("127.0.0.1", 9180))
        return s

    def _admin_check(self, method: str, path: str, via_unix: bool) -> None:
        raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        self._exchange(raw, {"clean": True, "path": path.partition("?")[0], "method": method,
                             "count": 1, "abort": False, "head": False, "keep": False},
                       via_unix, count=False)

    def _exchange(self, raw: bytes, meta: dict, via_unix: bool, count: bool = True) -> None:
        where = "unix" if via_unix else "tcp"
        try:
            s = self._admin_socket(via_unix)
        except OSError as exc:
            self.report.problem(f"admin {where}: cannot connect: {exc}")
            return
        with s:
            try:
                s.sendall(raw)
                if not meta["clean"]:
                    # A damaged request may lack its end: the server waits for the rest as long
                    # as the client stays (it has no timeout for that); we do not.
                    s.settimeout(3)
            except OSError:
                if meta["clean"]:
                    self.report.problem(f"admin {where}: the server hung up on a clean request "
                                        f"{raw[:120]!r}")
                return
            if meta["abort"]:
                self.report.admin["aborted"] += count
                return
            reader = Reader(s)
            metas = [meta] + ([meta["second"]] if meta["count"] == 2 else [])
            for n, m in enumerate(metas):
                try:
                    status, headers, body = reader.response(m["head"])
                except EOFError:
                    # A server may close after any answer (aiohttp does after some errors, not
                    # always saying so): only the first request must be answered.
                    if m["clean"] and n == 0:
                        self.report.problem(f"admin {where}: no answer to clean request #{n} "
                                            f"of {raw[:600]!r}")
                    self.report.admin["closed"] += count
                    return
                except (HttpError, ValueError) as exc:
                    self.report.problem(f"admin {where}: malformed answer to {raw[:120]!r}: "
                                        f"{exc}")
                    return
                except TimeoutError:
                    if m["clean"]:
                        self.report.problem(f"admin {where}: no answer in 15 s to {raw[:160]!r}")
                    elif b"\r\n\r\n" in raw or b"\n\n" in raw:
                        self.report.notes.append(f"admin {where}: no answer in 3 s to a complete "
                                                 f"request {raw[:160]!r}")
                    self.report.admin["timeout"] += count
                    return
                except OSError as exc:  # reset: fine for a request that was not clean
                    if m["clean"]:
                        self.report.problem(f"admin {where}: {exc} on a clean request "
                                            f"{raw[:120]!r}")
                    self.report.admin["reset"] += count
                    return
                self.report.admin[status] += count
                self._judge(status, headers, body, m, raw)
                if headers.get("connection", "").lower() == "close":
                    return  # the server may leave a pipelined request unanswered: it said so

    def _judge(self, status: int, headers: dict, body: bytes, meta: dict, raw: bytes) -> None:
        path = meta["path"]
        if status >= 500 and not (status == 503 and path == "/readyz"):
            self.report.problem(f"admin answered {status} to {raw[:160]!r}: {body[:300]!r}")
        if status == 200 and path.startswith("/api/") and meta["method"] == "GET" \
                and not meta["head"]:
            if not headers.get("content-type", "").startswith("application/json"):
                self.report.problem(f"{path}: 200 with content type "
                                    f"{headers.get('content-type')!r}")
            try:
                value = strict_json(body)
            except ValueError as exc:
                self.report.problem(f"{path}: 200 but not strict JSON ({exc}): {body[:300]!r}")
                return
            if path == "/api/flows" and isinstance(value, dict):
                if len(value.get("flows", [])) > min(value.get("limit", 200), 200):
                    self.report.problem(f"/api/flows: a page longer than its limit: {raw[:160]!r}")
                if value.get("workers_missing"):
                    self.report.notes.append(f"/api/flows: workers missing "
                                             f"{value['workers_missing']}")
        if meta["method"] in ("POST", "PUT", "DELETE", "PATCH") and status in (200, 202) \
                and "restart" in path:
            self.report.problem(f"a mutating call was served: {raw[:160]!r}")

    # -- the run -------------------------------------------------------------------------------------

    def _snapshot(self) -> dict:
        m = self.d.metrics()
        return {"drops": _sum_by(m, "ipferry_drops_total", "reason"),
                "upstream": _sum_by(m, "ipferry_upstream_failures_total", "reason"),
                "closed": _sum_by(m, "ipferry_tunnels_closed_total", "reason"),
                "packets": _sum_by(m, "ipferry_packets_total", "direction")}

    def _status(self) -> dict:
        s = self.d.status()
        return {"nsd": (s["nsd"]["pid"], s["nsd"]["restarts"]),
                "workers": {w["index"]: (w["pid"], w["restarts"], w["state"])
                            for w in s["workers"]},
                "ready": s["ready"]}

    def run(self, inputs: int) -> Report:
        if self.transfers is not None:
            self.transfers.wait_started()
        t0 = time.monotonic()
        report = in_netns(self.d.netns.path, self._run, inputs)
        t1 = time.monotonic()
        if self.transfers is not None:
            self.transfers.stop()
            report.transfers = [{"mode": r["mode"], "ok": r["ok"],
                                 "seconds": round(r["end"] - r["start"], 2)}
                                for r in self.transfers.results]
            for error in self.transfers.errors:
                report.problem(f"transfer: {error}")
            if not self.transfers.overlapping(t0, t1):
                report.problem("no intact transfer ran alongside the fuzzer")
        self._scan_logs(report)
        return report

    def _scan_logs(self, report: Report) -> None:
        """Exceptions in the daemon's log are problems; aiohttp's tracebacks for requests it
        could not parse (logged raw, bypassing the JSON log) are counted in the notes."""
        bad_requests = 0
        lines = self.d.logs().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") in ("loop_exception", "request_failed") or \
                        event.get("exc_info") or event.get("exception"):
                    report.problem(f"daemon log: {line[:400]}")
            elif line.startswith("Traceback") and (not i or not lines[i - 1].strip() == ""):
                # One logged error: up to the next JSON line or "Error handling request"; its
                # exception is the last line there that is not indented (after any chain).
                end = next((j for j in range(i + 1, len(lines))
                            if lines[j].startswith(("{", "Error handling request"))), len(lines))
                block = lines[i:end]
                exc = next((x for x in reversed(block) if x.strip() and not x.startswith(" ")
                            and not x.startswith(("Traceback", "During handling"))), "")
                if exc.startswith(("aiohttp.http_exceptions.",
                                   "aiohttp.client_exceptions.ClientConnectionResetError")):
                    bad_requests += 1  # (the second: a client gone before its 100 Continue)
                else:
                    report.problem("daemon log: " + "\n".join(block)[-1500:])
        if bad_requests:
            report.notes.append(f"{bad_requests} unparsable (or abandoned) admin requests each "
                                f"wrote a raw (non-JSON) traceback to the daemon's log")

    def _run(self, inputs: int) -> Report:
        rep = self.report
        audit_start = self.audit.stat().st_size if self.audit.exists() else 0
        status0 = self._status()
        before = self._snapshot()
        _, gue_drops0 = udp_socket_stats({GUE4[1], GUE6[1]})
        silent = [self._silent_tunnel() for _ in range(3)]  # must be closed: context_timeout
        t0 = time.monotonic()
        self._open_fuzz_tunnels()
        since_rotation = 0
        next_progress = self.progress_every
        done = 0
        kinds = list(self.mix)
        weights = [self.mix[k] for k in kinds]
        while done < inputs:
            n = min(self.round_size, inputs - done)
            share = Counter(self.rng.choices(kinds, weights, k=n))
            for kind in kinds:
                k = share.get(kind, 0)
                if not k:
                    continue
                if kind in ("packet", "vnet"):
                    self._packets(kind, k)
                elif kind == "gue":
                    self._gue(k)
                elif kind == "context":
                    self._contexts(k)
                else:
                    self._admin(k)
            done += n
            since_rotation += n
            if since_rotation >= self.rotate_every and done < inputs:
                self._close_fuzz_tunnels()
                self._open_fuzz_tunnels()
                since_rotation = 0
            if self.progress_every and done >= next_progress:
                next_progress += self.progress_every
                elapsed = time.monotonic() - t0
                self.progress(f"{done:>9} inputs  {done / elapsed:7.0f}/s  "
                              f"problems {len(rep.problems)}  answers {sum(rep.answers.values())}"
                              f"  admin {sum(v for k, v in rep.admin.items() if isinstance(k, int))}")
                if not self.d.ready():
                    rep.problem(f"not ready after {done} inputs: {self.d.request('GET', '/readyz')}")
        self._close_fuzz_tunnels()
        rep.seconds = time.monotonic() - t0
        self._gue_pace()
        self._settle()
        self._account(before, gue_drops0, audit_start, silent_count=len(silent))
        for s in silent:
            s.close()
        self._empty_datagram()
        status1 = self._status()
        rep.restarts = {"nsd": status1["nsd"][1],
                        "workers": {i: w[1] for i, w in status1["workers"].items()}}
        if status1 != status0:
            rep.problem(f"processes changed: {status0} -> {status1}")
        if not self.d.ready():
            rep.problem("the daemon is not ready at the end")
        for s, _ in self._gue_socks:
            s.close()
        return rep

    def _silent_tunnel(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(str(self.d.runtime_dir / "tunnel.sock"))
        return s

    def _settle(self) -> None:
        """Until no fuzz flow lives any more (idle timeouts of a few seconds) and the counters
        stand still."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = sum(self.d.get_json(f"/api/flows?tenant={t}&limit=1")["total"]
                       for t in (TENANT, GUE_TENANT))
            if not live:
                break
            time.sleep(0.5)
        else:
            self.report.problem("fuzz flows still live 60 s after the inputs stopped")
        last = None
        for _ in range(20):
            snap = self._snapshot()["drops"]
            if snap == last:
                return
            last = snap
            time.sleep(0.3)

    def _account(self, before: dict, gue_drops0: int, audit_start: int,
                 silent_count: int) -> None:
        rep = self.report
        after = self._snapshot()
        drops = _delta(after["drops"], before["drops"])
        closed = _delta(after["closed"], before["closed"])
        rep.drops = dict(sorted(drops.items(), key=lambda kv: -kv[1]))
        rep.closed = closed
        # A new flow whose off-ramp cannot be had is answered (a reset, an ICMP unreachable)
        # and counted there, once per flow: its first packet is served so.
        upstream = _delta(after["upstream"], before["upstream"])
        rep.upstream = upstream
        failed = sum(upstream.values())
        _, gue_drops1 = udp_socket_stats({GUE4[1], GUE6[1]})
        gue_lost = gue_drops1 - gue_drops0  # datagrams the kernel dropped: the daemon never saw
        # Packets the fuzz flows took (ended flows: their flow_end records).
        flow_packets = 0
        ends = 0
        with open(self.audit, "rb") as f:
            f.seek(audit_start)
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    rep.problem(f"an audit line that is not JSON: {line[:200]!r}")
                    continue
                if rec.get("audit") == "flow_end" and rec.get("tenant") in (TENANT, GUE_TENANT):
                    flow_packets += rec["packets"][0]
                    ends += 1
        datagrams = rep.inputs["packet"] + rep.inputs["vnet"]
        probes = self.accepted_probes
        reached = datagrams + (self.gue_sent - gue_lost) + probes
        input_drops = sum(v for k, v in drops.items()
                          if k not in OUTBOUND_REASONS and not k.startswith("kernel_"))
        # The parser's drops are exactly what predict() said, but for packets of other tunnels
        # (the transfers' client kernel sends MLD reports: multicast) and unpredicted GUE ones.
        extra_parser = {k: drops.get(k, 0) - rep.predicted.get(k, 0) for k in PARSER_REASONS
                        | {"bad_vnet_header", "bad_gue"}
                        if drops.get(k, 0) != rep.predicted.get(k, 0)}
        for reason, extra in extra_parser.items():
            if extra < 0:
                rep.problem(f"{reason}: {drops.get(reason, 0)} counted, {rep.predicted[reason]} "
                            f"predicted")
        for reason, n in rep.known.items():
            if drops.get(reason, 0) < n:
                rep.problem(f"{reason}: {drops.get(reason, 0)} counted, {n} built on purpose")
        noise = max(0, extra_parser.get("multicast", 0))  # the transfers' MLD reports
        accounted = input_drops - noise + flow_packets + failed
        rep.accounting = {
            "tunnel_datagrams": datagrams, "gue_sent": self.gue_sent,
            "gue_lost_in_kernel": gue_lost, "accepted_context_probes": probes,
            "reached_daemon": reached, "input_drops": input_drops, "multicast_noise": noise,
            "fuzz_flow_packets": flow_packets, "fuzz_flows_ended": ends,
            "upstream_failures": failed,
            "accounted": accounted, "unaccounted": reached - accounted,
            "valid_rst_allowance": self.rst_valid, "unpredicted_inputs": self.unpredicted,
            "extra_parser_drops": extra_parser}
        if not reached - self.rst_valid <= accounted <= reached + max(10, reached // 1000):
            rep.problem(f"accounting: {reached} inputs reached the daemon, {accounted} accounted "
                        f"for ({input_drops} drops - {noise} noise + {flow_packets} packets of "
                        f"fuzz flows); allowance for blind RSTs {self.rst_valid}")
        refused = sum(v for (e, o), v in rep.contexts.items() if o == "refused")
        if closed.get("bad_context", 0) != refused:
            rep.problem(f"{refused} contexts refused, bad_context counted "
                        f"{closed.get('bad_context', 0)}")
        if rep.seconds > 11 and closed.get("context_timeout", 0) < silent_count:
            rep.problem(f"{silent_count} silent tunnels, context_timeout counted "
                        f"{closed.get('context_timeout', 0)}")

    def _empty_datagram(self) -> None:
        """A zero-length datagram on an open tunnel: either the close signal (the tunnel closes,
        closed_by_peer) or a counted drop (the tunnel lives on). Noted, not judged."""
        before = self._snapshot()
        s = self._tunnel("empty", False)
        try:
            s.send(b"")
            s.send(self._probe(False))
            s.settimeout(5)
            try:
                data = s.recv(1 << 16)
            except TimeoutError:
                data = None
        finally:
            s.close()
        time.sleep(0.3)
        after = self._snapshot()
        if data:
            self.report.notes.append(f"an empty datagram left the tunnel open; drops "
                                     f"{_delta(after['drops'], before['drops'])}")
        else:
            self.report.notes.append(f"an empty datagram closed the tunnel ({data!r}); closed "
                                     f"{_delta(after['closed'], before['closed'])}")


