"""Kernel steering for the GUE on-ramp: every inner flow reaches its owner without a mesh hop.

Each worker binds its own UDP socket to the GUE port with SO_REUSEPORT. Left alone, the kernel
would pick a socket by the *outer* addresses, so most datagrams would land on a worker that does
not own their flow and cross the mesh. Instead the group runs the classic-BPF program built here:
it reads the *inner* packet's headers and returns ``flow_hash(...) % workers``, the owner that
``sharding.owner`` names, as the index of the socket that gets the datagram.

What the kernel does (checked over loopback by tests/wire/test_steering.py; the supervisor
attaches the program, :func:`ipferry.supervisor.listeners.attach`):

- The program sees the UDP payload: offset 0 is the GUE header, ``len`` is the payload length.
- Socket index = the order in which the sockets joined the group, i.e. bind order. Closing a
  member moves the *last* member into its slot, so the sockets must outlive the workers (bind
  them once, in worker order, and hand each worker its own) or the indices stop naming owners.
- A returned index >= the number of sockets makes the kernel pick by its own hash: that is how
  the program says "not mine to steer" (``FALLBACK``); the worker drops such datagrams.
- A load past the end of the datagram aborts the program with 0, which would pile every short
  datagram on worker 0; so every read is preceded by a length check that falls back instead.

Layout of the program (cBPF jumps only forward and has no loops, so the IPv6 extension header
walk is unrolled and the L3/L4 block is emitted twice)::

    prologue   len -> M[LEN]; GUE version and C bit must be 0; 4 + 4*hlen -> M[IP]
    outer      the inner IP packet: addresses -> M[ADDR], protocol -> M[PROTO],
               sport ^ dport -> M[PORTS]; an ICMP error points M[IP] at the packet it
               embeds and falls through to ...
    embedded   the same block without the ICMP error case: an error in an error hashes with
               ports 0, it never recurses further
    mix        flow_hash's arithmetic on M[ADDR], M[PROTO], M[PORTS]; % workers; ret

``steering_hash_fields`` is the same rules in Python, the reference the tests hold the kernel to.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .sharding import _MIX, M32  # the program must do flow_hash's arithmetic, constant for constant

# -- classic BPF, from linux/filter.h ---------------------------------------------------------

BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR = 0x60, 0x70, 0x80, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
BPF_MAXINSNS = 4096
BPF_MEMWORDS = 16
MAX_JUMP = 255  # jt and jf are 8-bit offsets; only BPF_JA (32-bit k) goes further

FALLBACK = M32  # any index >= the number of sockets: the kernel picks by its own hash

Insn = tuple[int, int, int, int]  # (code, jt, jf, k), as struct sock_filter
Target = int | str  # a relative offset, or a label defined further on
Line = str | tuple[int, Target, Target, int | str]  # a str defines a label


def stmt(code: int, k: int = 0) -> tuple[int, int, int, int]:
    return (code, 0, 0, k)


def jump(code: int, k: int, jt: Target, jf: Target = 0) -> tuple[int, Target, Target, int]:
    """A conditional jump; ``jt``/``jf`` are offsets from the next instruction, or labels."""
    return (BPF_JMP | code, jt, jf, k)


def goto(label: str) -> tuple[int, int, int, str]:
    """An unconditional jump (BPF_JA): any distance, still only forward."""
    return (BPF_JMP | BPF_JA, 0, 0, label)


def assemble(lines: Iterable[Line]) -> list[Insn]:
    """Resolve labels into the relative offsets cBPF wants, checking what the kernel would refuse.

    >>> assemble([jump(BPF_JEQ | BPF_K, 1, "one"), stmt(BPF_RET | BPF_K, 0),
    ...           "one", stmt(BPF_RET | BPF_K, 1)])
    [(21, 1, 0, 1), (6, 0, 0, 0), (6, 0, 0, 1)]
    """
    lines = list(lines)
    labels: dict[str, int] = {}
    count = 0
    for line in lines:
        if isinstance(line, str):
            if line in labels:
                raise ValueError(f"label {line!r} defined twice")
            labels[line] = count
        else:
            count += 1
    if not 0 < count <= BPF_MAXINSNS:
        raise ValueError(f"{count} instructions: cBPF takes 1 to {BPF_MAXINSNS}")

    def offset(target: Target, pc: int, limit: int) -> int:
        if isinstance(target, str):
            if target not in labels:
                raise ValueError(f"jump to undefined label {target!r} at instruction {pc}")
            target = labels[target] - pc - 1
        if target < 0:
            raise ValueError(f"backward jump at instruction {pc}: cBPF jumps only forward")
        if target > limit:
            raise ValueError(f"jump of {target} at instruction {pc} exceeds {limit}: "
                             "put a BPF_JA trampoline in between")
        if pc + 1 + target >= count:
            raise ValueError(f"jump at instruction {pc} leaves the program")
        return target

    out: list[Insn] = []
    for line in lines:
        if isinstance(line, str):
            continue
        code, jt, jf, k = line
        pc = len(out)
        if code == BPF_JMP | BPF_JA:
            k = offset(k, pc, BPF_MAXINSNS)
        elif code & 0x07 == BPF_JMP:
            jt, jf = offset(jt, pc, MAX_JUMP), offset(jf, pc, MAX_JUMP)
        elif (jt, jf) != (0, 0):
            raise ValueError(f"instruction {pc} (code {code:#x}) is not a jump but has jt/jf")
        if isinstance(k, str) or not 0 <= k <= M32:
            raise ValueError(f"instruction {pc}: k={k!r} is not a 32-bit constant")
        if isinstance(jt, str) or isinstance(jf, str):  # a label where BPF_JA ignores jt/jf
            raise ValueError(f"instruction {pc}: jt={jt!r}, jf={jf!r}: only conditional jumps take labels")
        out.append((code, jt, jf, k))
    return out


# -- the steering program ---------------------------------------------------------------------

# Scratch memory M[0..15]: the registers are A and X only, and X is busy as the base of loads.
LEN, IP, L4, ADDR, PROTO, PORTS, TMP = range(7)

_TCP, _UDP, _ICMP, _ICMPV6 = 6, 17, 1, 58
_EXTENSION_HEADERS = (0, 43, 60)  # hop-by-hop, routing, destination options
_MAX_EXTENSION_HEADERS = 4
_ICMP_ECHO: tuple[int, ...] = (8, 0)
_ICMP_ERRORS: tuple[int, ...] = (3, 11, 12)  # unreachable, time exceeded, parameter problem
_ICMPV6_ECHO: tuple[int, ...] = (128, 129)
# unreachable, packet too big, time exceeded, parameter problem
_ICMPV6_ERRORS: tuple[int, ...] = (1, 2, 3, 4)


class _Emitter:
    def __init__(self) -> None:
        self.lines: list[Line] = []

    def __call__(self, *lines: Line) -> None:
        self.lines.extend(lines)

    def need(self, base: int, size: int) -> None:
        """Fall back unless the ``size`` bytes at offset M[base] lie within the datagram."""
        self(stmt(BPF_LD | BPF_MEM, base), stmt(BPF_ALU | BPF_ADD | BPF_K, size),
             stmt(BPF_LDX | BPF_MEM, LEN), jump(BPF_JGT | BPF_X, 0, 0, 1),
             stmt(BPF_RET | BPF_K, FALLBACK))

    def xor_word(self, offset: int) -> None:
        """M[ADDR] ^= the 32-bit word at M[IP] + offset (X must hold M[IP]; it does after)."""
        self(stmt(BPF_LD | BPF_W | BPF_IND, offset), stmt(BPF_LDX | BPF_MEM, ADDR),
             stmt(BPF_ALU | BPF_XOR | BPF_X), stmt(BPF_ST, ADDR), stmt(BPF_LDX | BPF_MEM, IP))

    def l3l4(self, p: str, errors: bool) -> None:
        """The IP packet at M[IP] -> M[ADDR], M[PROTO], M[PORTS]; then on to "mix"."""
        ldx_ip, ldx_l4 = stmt(BPF_LDX | BPF_MEM, IP), stmt(BPF_LDX | BPF_MEM, L4)
        ld_proto = stmt(BPF_LD | BPF_MEM, PROTO)
        self.need(IP, 1)
        self(ldx_ip, stmt(BPF_LD | BPF_B | BPF_IND, 0), stmt(BPF_ALU | BPF_RSH | BPF_K, 4),
             jump(BPF_JEQ | BPF_K, 4, f"{p}.v4"), jump(BPF_JEQ | BPF_K, 6, f"{p}.v6"),
             stmt(BPF_RET | BPF_K, FALLBACK))

        self(f"{p}.v4")
        self.need(IP, 20)
        self(ldx_ip, stmt(BPF_LD | BPF_B | BPF_IND, 0), stmt(BPF_ALU | BPF_AND | BPF_K, 0x0F),
             jump(BPF_JGE | BPF_K, 5, 1, 0), stmt(BPF_RET | BPF_K, FALLBACK),  # IHL < 5
             stmt(BPF_ALU | BPF_LSH | BPF_K, 2), stmt(BPF_ALU | BPF_ADD | BPF_X), stmt(BPF_ST, L4),
             stmt(BPF_LD | BPF_W | BPF_IND, 12), stmt(BPF_ST, ADDR))
        self.xor_word(16)
        self(stmt(BPF_LD | BPF_B | BPF_IND, 9), stmt(BPF_ST, PROTO),
             stmt(BPF_LD | BPF_H | BPF_IND, 6), jump(BPF_JSET | BPF_K, 0x3FFF, f"{p}.other"),
             ld_proto, jump(BPF_JEQ | BPF_K, _TCP, f"{p}.ports"), jump(BPF_JEQ | BPF_K, _UDP, f"{p}.ports"),
             jump(BPF_JEQ | BPF_K, _ICMP, 0, f"{p}.other"))
        self.icmp(p, _ICMP_ECHO, _ICMP_ERRORS if errors else ())

        self(f"{p}.v6")
        self.need(IP, 40)
        self(ldx_ip, stmt(BPF_LD | BPF_W | BPF_IND, 8), stmt(BPF_ST, ADDR))
        for offset in range(12, 40, 4):
            self.xor_word(offset)
        self(stmt(BPF_LD | BPF_B | BPF_IND, 6), stmt(BPF_ST, PROTO),
             stmt(BPF_MISC | BPF_TXA), stmt(BPF_ALU | BPF_ADD | BPF_K, 40), stmt(BPF_ST, L4))
        for i in range(_MAX_EXTENSION_HEADERS):
            ext = f"{p}.ext{i}"
            self(ld_proto, *(jump(BPF_JEQ | BPF_K, kind, ext) for kind in _EXTENSION_HEADERS),
                 goto(f"{p}.l4v6"), ext)
            self.need(L4, 2)
            self(ldx_l4, stmt(BPF_LD | BPF_B | BPF_IND, 0), stmt(BPF_ST, PROTO),
                 stmt(BPF_LD | BPF_B | BPF_IND, 1), stmt(BPF_ALU | BPF_ADD | BPF_K, 1),
                 stmt(BPF_ALU | BPF_LSH | BPF_K, 3), stmt(BPF_ALU | BPF_ADD | BPF_X), stmt(BPF_ST, L4))
        # A 5th extension header stays the protocol: none of the cases below, so ports 0.
        self(f"{p}.l4v6", ld_proto, jump(BPF_JEQ | BPF_K, _TCP, f"{p}.ports"),
             jump(BPF_JEQ | BPF_K, _UDP, f"{p}.ports"), jump(BPF_JEQ | BPF_K, _ICMPV6, 0, f"{p}.other"))
        self.icmp(p, _ICMPV6_ECHO, _ICMPV6_ERRORS if errors else ())

        self(f"{p}.ports")
        self.need(L4, 4)
        self(ldx_l4, stmt(BPF_LD | BPF_H | BPF_IND, 0), stmt(BPF_ST, TMP),
             stmt(BPF_LD | BPF_H | BPF_IND, 2), stmt(BPF_LDX | BPF_MEM, TMP),
             stmt(BPF_ALU | BPF_XOR | BPF_X), stmt(BPF_ST, PORTS), goto("mix"))
        self(f"{p}.echo")  # sport = the identifier, dport = 0
        self.need(L4, 6)
        self(ldx_l4, stmt(BPF_LD | BPF_H | BPF_IND, 4), stmt(BPF_ST, PORTS), goto("mix"))
        self(f"{p}.other", stmt(BPF_LD | BPF_IMM, 0), stmt(BPF_ST, PORTS), goto("mix"))
        if errors:
            # The embedded packet starts after the 8-byte ICMP header; the next block reads it.
            self(f"{p}.error", stmt(BPF_LD | BPF_MEM, L4), stmt(BPF_ALU | BPF_ADD | BPF_K, 8),
                 stmt(BPF_ST, IP))

    def icmp(self, p: str, echo: Sequence[int], errors: Sequence[int]) -> None:
        self.need(L4, 1)
        self(stmt(BPF_LDX | BPF_MEM, L4), stmt(BPF_LD | BPF_B | BPF_IND, 0))
        for kind in echo:
            self(jump(BPF_JEQ | BPF_K, kind, f"{p}.echo"))
        for kind in errors:
            self(jump(BPF_JEQ | BPF_K, kind, f"{p}.error"))
        self(goto(f"{p}.other"))

    def mix(self, workers: int) -> None:
        """sharding.flow_hash on the fields, in 32-bit ALU arithmetic (MUL wraps like & M32)."""
        self("mix", stmt(BPF_LD | BPF_MEM, PORTS), stmt(BPF_ALU | BPF_MUL | BPF_K, 0x10001),
             stmt(BPF_LDX | BPF_MEM, ADDR), stmt(BPF_ALU | BPF_XOR | BPF_X),
             stmt(BPF_LDX | BPF_MEM, PROTO), stmt(BPF_ALU | BPF_XOR | BPF_X))
        fold = (stmt(BPF_MISC | BPF_TAX), stmt(BPF_ALU | BPF_RSH | BPF_K, 16),  # h ^= h >> 16
                stmt(BPF_ALU | BPF_XOR | BPF_X))
        for _ in range(2):
            self(*fold, stmt(BPF_ALU | BPF_MUL | BPF_K, _MIX))
        self(*fold, stmt(BPF_ALU | BPF_MOD | BPF_K, workers), stmt(BPF_RET | BPF_A))


def program(workers: int) -> list[Insn]:
    """The cBPF program that picks socket ``flow_hash(inner flow) % workers`` for a GUE datagram."""
    if not 1 <= workers <= M32:
        raise ValueError(f"workers={workers}: a reuseport group has at least one socket")
    emit = _Emitter()
    emit(stmt(BPF_LD | BPF_W | BPF_LEN), stmt(BPF_ST, LEN),
         stmt(BPF_LD | BPF_IMM, 0), stmt(BPF_ST, IP))
    emit.need(IP, 4)
    emit(stmt(BPF_LD | BPF_B | BPF_ABS, 0), jump(BPF_JSET | BPF_K, 0xE0, 0, 1),  # version, C bit
         stmt(BPF_RET | BPF_K, FALLBACK),
         stmt(BPF_ALU | BPF_AND | BPF_K, 0x1F), stmt(BPF_ALU | BPF_LSH | BPF_K, 2),  # hlen words
         stmt(BPF_ALU | BPF_ADD | BPF_K, 4), stmt(BPF_ST, IP))
    emit.l3l4("outer", errors=True)
    emit.l3l4("embedded", errors=False)
    emit.mix(workers)
    return assemble(emit.lines)


# -- the same rules in Python: the reference --------------------------------------------------

class HashFields(NamedTuple):
    """What ``sharding.flow_hash`` is called with: ``flow_hash(*fields)``."""

    protocol: int
    src: bytes
    sport: int
    dst: bytes
    dport: int


class _Short(Exception):
    """A field the rules read lies past the end of the datagram."""


_GUE = struct.Struct("!B3x")
_VERSION = struct.Struct("!B")
_IPV4 = struct.Struct("!B5xH1xB2x4s4s")  # version/IHL, fragment word, protocol, src, dst
_IPV6 = struct.Struct("!6xB1x16s16s")  # next header, src, dst
_EXTENSION = struct.Struct("!BB")  # next header, length in 8 bytes not counting the first 8
_PORTS = struct.Struct("!HH")
_TYPE = struct.Struct("!B")
_IDENTIFIER = struct.Struct("!4xH")


def _read(layout: struct.Struct, data: bytes | bytearray | memoryview, offset: int) -> tuple[Any, ...]:
    if offset + layout.size > len(data):
        raise _Short
    return layout.unpack_from(data, offset)


def steering_hash_fields(datagram: bytes | bytearray | memoryview) -> HashFields | None:
    """The fields the steering program hashes for a GUE datagram; None where it falls back.

    None: a GUE version or C bit other than 0, an inner IP version other than 4 or 6 (or an IPv4
    IHL below 5), or a field the rules read lying past the end of the datagram.

    >>> udp = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
    ...              0x9c, 0x40, 0, 53, 0, 8, 0, 0])
    >>> steering_hash_fields(bytes([0, 4, 0, 0]) + udp)
    HashFields(protocol=17, src=b'\\n\\x00\\x00\\x02', sport=40000, dst=b'\\n\\x00\\x00\\x01', dport=53)
    """
    try:
        (first,) = _read(_GUE, datagram, 0)
        if first & 0xE0:  # version 0, no control message
            return None
        return _ip_fields(datagram, 4 + 4 * (first & 0x1F), embedded=False)
    except _Short:
        return None


def _ip_fields(data: bytes | bytearray | memoryview, ip: int, embedded: bool) -> HashFields | None:
    version = _read(_VERSION, data, ip)[0] >> 4
    if version == 4:
        vihl, fragment, protocol, src, dst = _read(_IPV4, data, ip)
        if vihl & 0x0F < 5:
            return None
        if fragment & 0x3FFF:  # MF or an offset: no ports to read
            return HashFields(protocol, src, 0, dst, 0)
        l4, icmp, echo, errors = ip + 4 * (vihl & 0x0F), _ICMP, _ICMP_ECHO, _ICMP_ERRORS
    elif version == 6:
        protocol, src, dst = _read(_IPV6, data, ip)
        l4 = ip + 40
        for _ in range(_MAX_EXTENSION_HEADERS):
            if protocol not in _EXTENSION_HEADERS:
                break
            protocol, length = _read(_EXTENSION, data, l4)
            l4 += (length + 1) * 8
        icmp, echo, errors = _ICMPV6, _ICMPV6_ECHO, _ICMPV6_ERRORS
    else:
        return None
    if protocol in (_TCP, _UDP):
        sport, dport = _read(_PORTS, data, l4)
        return HashFields(protocol, src, sport, dst, dport)
    if protocol == icmp:
        (kind,) = _read(_TYPE, data, l4)
        if kind in echo:
            return HashFields(protocol, src, _read(_IDENTIFIER, data, l4)[0], dst, 0)
        if kind in errors and not embedded:
            return _ip_fields(data, l4 + 8, embedded=True)
    return HashFields(protocol, src, 0, dst, 0)
