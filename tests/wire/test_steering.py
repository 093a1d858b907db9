"""The kernel hands each GUE datagram to the worker that owns its inner flow.

Real SO_REUSEPORT groups on loopback run the steering program; ``steering_hash_fields`` (checked
against the rules by the pure tests) and ``sharding.flow_hash`` say where each datagram must land.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipferry.supervisor.listeners import attach, attach_program
from ipferry.wire.sharding import flow_hash
from ipferry.wire.steering import (
    BPF_A,
    BPF_ABS,
    BPF_ALU,
    BPF_B,
    BPF_JEQ,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_LEN,
    BPF_MAXINSNS,
    BPF_MOD,
    BPF_RET,
    BPF_W,
    HashFields,
    assemble,
    goto,
    jump,
    program,
    steering_hash_fields,
    stmt,
)

BOUNDED = settings(deadline=None, max_examples=200)
TCP, UDP = 6, 17
ICMP = {4: 1, 6: 58}
ECHO = {4: (8, 0), 6: (128, 129)}  # request, reply
ERRORS = {4: (3, 11, 12), 6: (1, 2, 3, 4)}
INFORMATIONAL = {4: (5, 9, 10, 13, 14, 42), 6: (130, 133, 134, 135, 136, 137)}  # neither
OTHER_PROTOCOLS = {4: (2, 47, 50, 58, 132), 6: (1, 2, 44, 47, 50, 59, 132)}
EXTENSION_HEADERS = (0, 43, 60)


# -- packets ----------------------------------------------------------------------------------

def ipv4(src: bytes, dst: bytes, protocol: int, l4: bytes, fragment: int = 0,
         options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(l4), 0x1234, fragment, 64,
                       protocol, 0, src, dst) + options + l4


def ipv6(src: bytes, dst: bytes, protocol: int, l4: bytes,
         extensions: tuple[tuple[int, int], ...] = ()) -> bytes:
    """``extensions``: (type, length) in order; each header is (length + 1) * 8 bytes."""
    kinds = [kind for kind, _ in extensions] + [protocol]
    chain = b"".join(struct.pack("!BB", following, length) + bytes((length + 1) * 8 - 2)
                     for (_, length), following in zip(extensions, kinds[1:], strict=True))
    return struct.pack("!IHBB16s16s", 0x6000_0000, len(chain) + len(l4), kinds[0], 64,
                       src, dst) + chain + l4


@dataclass(frozen=True)
class Gue:
    hlen: int = 0
    flags: int = 0
    version: int = 0
    control: int = 0

    def wrap(self, inner: bytes) -> bytes:
        protocol = 41 if inner[:1] and inner[0] >> 4 == 6 else 4
        return struct.pack("!BBH", self.version << 6 | self.control << 5 | self.hlen, protocol,
                           self.flags) + bytes(range(4 * self.hlen)) + inner


@dataclass(frozen=True)
class Flow:
    version: int
    src: bytes
    dst: bytes
    protocol: int
    sport: int  # the identifier for ICMP echo
    dport: int
    icmp_type: int | None = None  # ICMP: None for echo, else an informational type
    fragment: int = 0
    options: bytes = b""
    extensions: tuple[tuple[int, int], ...] = ()
    payload: bytes = b""

    def packet(self, reverse: bool = False) -> bytes:
        src, dst, sport, dport = self.src, self.dst, self.sport, self.dport
        if reverse:
            src, dst, sport, dport = dst, src, dport, sport
        if self.protocol == TCP:
            l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
        elif self.protocol == UDP:
            l4 = struct.pack("!HHHH", sport, dport, 8 + len(self.payload), 0)
        elif self.protocol == ICMP[self.version] and self.icmp_type is None:
            l4 = struct.pack("!BBHHH", ECHO[self.version][reverse], 0, 0, self.sport, 7)
        elif self.protocol == ICMP[self.version]:
            l4 = struct.pack("!BBHI", self.icmp_type, 0, 0, 0)
        else:
            l4 = b""
        if self.version == 4:
            return ipv4(src, dst, self.protocol, l4 + self.payload, self.fragment, self.options)
        return ipv6(src, dst, self.protocol, l4 + self.payload, self.extensions)

    def fields(self) -> HashFields:
        """The rules, read off how the flow was built."""
        if len(self.extensions) > 4:  # the 5th extension header is taken for the protocol
            return HashFields(self.extensions[4][0], self.src, 0, self.dst, 0)
        if self.fragment & 0x3FFF or self.protocol not in (TCP, UDP, ICMP[self.version]):
            return HashFields(self.protocol, self.src, 0, self.dst, 0)
        if self.protocol in (TCP, UDP):
            return HashFields(self.protocol, self.src, self.sport, self.dst, self.dport)
        ident = self.sport if self.icmp_type is None else 0
        return HashFields(self.protocol, self.src, ident, self.dst, 0)


@dataclass(frozen=True)
class IcmpError:
    version: int
    kind: int
    router: bytes
    host: bytes

    def wrap(self, embedded: bytes) -> bytes:
        message = struct.pack("!BBHI", self.kind, 0, 0, 1280) + embedded
        if self.version == 4:
            return ipv4(self.router, self.host, ICMP[4], message)
        return ipv6(self.router, self.host, ICMP[6], message)


def address(version: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=4 if version == 4 else 16, max_size=4 if version == 4 else 16)


@st.composite
def flows(draw) -> Flow:
    version = draw(st.sampled_from([4, 6]))
    protocol = draw(st.sampled_from([TCP, UDP, ICMP[version]]) | st.sampled_from(OTHER_PROTOCOLS[version]))
    icmp_type = draw(st.none() | st.sampled_from(INFORMATIONAL[version]))
    fragment, options, extensions = 0, b"", ()
    if version == 4:
        fragment = draw(st.sampled_from([0, 0, 0, 0x4000, 0x2000, 0x0010, 0x20B9]))  # DF, MF, offsets
        options = b"\x01" * 4 * draw(st.integers(0, 10))  # NOPs: IHL 5 to 15
    else:
        extensions = tuple(draw(st.lists(st.tuples(st.sampled_from(EXTENSION_HEADERS),
                                                   st.integers(0, 20)), max_size=5)))
    return Flow(version, draw(address(version)), draw(address(version)), protocol,
                draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)), icmp_type,
                fragment, options, extensions, draw(st.binary(max_size=16)))


@st.composite
def icmp_errors(draw) -> IcmpError:
    version = draw(st.sampled_from([4, 6]))  # either may embed either: the rules go by the nibble
    return IcmpError(version, draw(st.sampled_from(ERRORS[version])), draw(address(version)),
                     draw(address(version)))


gue_headers = st.builds(Gue, hlen=st.integers(0, 31), flags=st.integers(0, 0xFFFF))


# -- reuseport groups -------------------------------------------------------------------------

@contextlib.contextmanager
def reuseport_group(family: int, host: str, size: int) -> Iterator[tuple[list[socket.socket], tuple]]:
    """``size`` UDP sockets on one ephemeral port, joined in list order."""
    socks: list[socket.socket] = []
    try:
        port = 0
        for _ in range(size):
            s = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            port = s.getsockname()[1]
            s.setblocking(False)
        yield socks, (host, port)
    finally:
        for s in socks:
            s.close()


@dataclass
class OnRamp:
    socks: list[socket.socket]
    address: tuple
    client: socket.socket

    @property
    def workers(self) -> int:
        return len(self.socks)

    def deliver(self, datagram: bytes, client: socket.socket | None = None) -> int:
        """Send ``datagram``; the index of the one socket it reached."""
        (client or self.client).sendto(datagram, self.address)
        select.select(self.socks, [], [], 2.0)  # loopback delivers within sendto; this is slack
        landed = []
        for index, s in enumerate(self.socks):
            with contextlib.suppress(BlockingIOError):
                while True:
                    landed.append((index, s.recv(65535)))
        assert [data for _, data in landed] == [datagram], f"expected the datagram once: {landed}"
        return landed[0][0]


def refused(exc: OSError) -> str:
    return f"{exc} (steering is not optional: this must work on the kernels we ship to)"


@pytest.fixture(scope="module", params=[(socket.AF_INET, "127.0.0.1", 2), (socket.AF_INET, "127.0.0.1", 3),
                                        (socket.AF_INET, "127.0.0.1", 5), (socket.AF_INET6, "::1", 3)],
                ids=["v4-2workers", "v4-3workers", "v4-5workers", "v6-3workers"])
def onramp(request) -> Iterator[OnRamp]:
    family, host, workers = request.param
    with (reuseport_group(family, host, workers) as (socks, address),
          contextlib.closing(socket.socket(family, socket.SOCK_DGRAM)) as client):
        try:
            attach(socks[workers // 2], workers)  # any member: the group has one program
        except OSError as exc:
            pytest.fail(refused(exc), pytrace=False)
        yield OnRamp(socks, address, client)


# -- the kernel ------------------------------------------------------------------------------

@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_the_kernel_runs_the_program_on_the_udp_payload_and_counts_sockets_in_bind_order(family, host):
    with (reuseport_group(family, host, 3) as (socks, address),
          contextlib.closing(socket.socket(family, socket.SOCK_DGRAM)) as client):
        ramp = OnRamp(socks, address, client)
        # Socket = the first byte: were offset 0 the UDP header, it would be the source port.
        attach_program(socks[2], [stmt(BPF_LD | BPF_B | BPF_ABS, 0), stmt(BPF_RET | BPF_A)])
        assert [ramp.deliver(bytes([i]) + b"gue") for i in (0, 1, 2, 1, 0)] == [0, 1, 2, 1, 0]
        attach_program(socks[0], [stmt(BPF_LD | BPF_W | BPF_LEN), stmt(BPF_RET | BPF_A)])
        assert [ramp.deliver(b"x" * n) for n in (2, 0, 1)] == [2, 0, 1]  # len = the UDP payload
        # A closed member's slot goes to the last member: the sockets must outlive the workers.
        attach_program(socks[0], [stmt(BPF_LD | BPF_B | BPF_ABS, 0), stmt(BPF_RET | BPF_A)])
        socks.pop(0).close()
        assert ramp.deliver(b"\x00") == 1  # index 0 is now what was socks[2]


@pytest.mark.parametrize("workers", [1, 2, 7, 64, 1000])
def test_the_kernel_accepts_the_program(workers):
    with reuseport_group(socket.AF_INET, "127.0.0.1", 1) as (socks, _):
        try:
            attach(socks[0], workers)
        except OSError as exc:
            pytest.fail(refused(exc), pytrace=False)


@BOUNDED
@given(flow=flows(), error=icmp_errors(), gue=gue_headers)
def test_each_flow_lands_on_its_owner_in_both_directions_and_with_its_icmp_errors(onramp, flow, error, gue):
    datagrams = [gue.wrap(flow.packet()), gue.wrap(flow.packet(reverse=True)),
                 gue.wrap(error.wrap(flow.packet())), gue.wrap(error.wrap(flow.packet(reverse=True)))]
    landed = set()
    for datagram in datagrams:
        fields = steering_hash_fields(datagram)
        assert fields is not None
        index = onramp.deliver(datagram)
        assert index == flow_hash(*fields) % onramp.workers
        landed.add(index)
    assert len(landed) == 1, "the two directions of a flow (or its errors) reached different owners"


@BOUNDED
@given(flow=flows(), first=icmp_errors(), second=icmp_errors(), gue=gue_headers)
def test_an_error_about_an_error_lands_by_the_embedded_error_without_ports(onramp, flow, first, second, gue):
    datagram = gue.wrap(second.wrap(first.wrap(flow.packet())))
    fields = steering_hash_fields(datagram)
    assert fields == HashFields(ICMP[first.version], first.router, 0, first.host, 0)
    assert onramp.deliver(datagram) == flow_hash(*fields) % onramp.workers


@BOUNDED
@given(flow=flows(), error=st.none() | icmp_errors(), gue=gue_headers, data=st.data())
def test_damaged_datagrams_land_on_the_owner_the_reference_names_or_fall_back(onramp, flow, error, gue, data):
    datagram = bytearray(gue.wrap(error.wrap(flow.packet()) if error else flow.packet()))
    for at, value in data.draw(st.lists(st.tuples(st.integers(0, len(datagram) - 1), st.integers(0, 255)),
                                        max_size=2)):
        datagram[at] = value
    datagram = bytes(datagram[:data.draw(st.integers(0, len(datagram)))])
    fields = steering_hash_fields(datagram)
    index = onramp.deliver(datagram)  # asserts it arrived, on one socket, even when not steered
    if fields is not None:
        assert index == flow_hash(*fields) % onramp.workers


UDP4 = Flow(4, b"\x0a\0\0\x02", b"\x0a\0\0\x01", UDP, 40000, 53).packet()


@pytest.mark.parametrize("datagram", [
    Gue(version=1).wrap(UDP4),
    Gue(control=1).wrap(UDP4),
    Gue().wrap(b"\x50" + UDP4[1:]),  # inner IP version 5
    Gue().wrap(b"\x44" + UDP4[1:]),  # IHL 4
    Gue().wrap(b""),
    Gue(hlen=2).wrap(b"")[:9],  # cut inside the GUE private data
    Gue().wrap(UDP4)[:4 + 20 + 3],  # cut inside the UDP ports
    Gue().wrap(IcmpError(6, 1, bytes(16), bytes(16)).wrap(UDP4)[:40 + 8 + 19]),  # inside the embedded
], ids=["gue-v1", "gue-control", "ip-v5", "ihl-4", "no-inner", "short-gue", "short-ports", "short-embedded"])
def test_what_cannot_be_steered_falls_back_to_the_kernel_hash(onramp, datagram):
    assert steering_hash_fields(datagram) is None
    landed = set()
    for _ in range(24):  # the kernel's own hash goes by the source port: fresh clients spread
        with contextlib.closing(socket.socket(onramp.client.family, socket.SOCK_DGRAM)) as client:
            landed.add(onramp.deliver(datagram, client))
    assert len(landed) > 1, "all on one socket: the program did not fall back (an aborted load gives 0)"


# -- the reference ----------------------------------------------------------------------------

@BOUNDED
@given(flow=flows(), error=icmp_errors(), gue=gue_headers)
def test_the_reference_reads_the_fields_the_rules_name(flow, error, gue):
    fields = flow.fields()
    reverse = fields._replace(src=fields.dst, dst=fields.src, sport=fields.dport, dport=fields.sport)
    if flow.protocol == ICMP[flow.version] and flow.icmp_type is None and not flow.fragment & 0x3FFF \
            and len(flow.extensions) <= 4:
        reverse = fields._replace(src=fields.dst, dst=fields.src)  # echo reply: same identifier
    assert steering_hash_fields(gue.wrap(flow.packet())) == fields
    assert steering_hash_fields(gue.wrap(flow.packet(reverse=True))) == reverse
    assert steering_hash_fields(gue.wrap(error.wrap(flow.packet()))) == fields
    assert flow_hash(*fields) == flow_hash(*reverse)


def test_the_reference_on_examples_from_the_rules():
    a, b = b"\x0a\0\0\x02", b"\xc6\x12\0\x01"
    tcp = Flow(4, a, b, TCP, 40000, 443)
    assert steering_hash_fields(Gue(hlen=3).wrap(tcp.packet())) == (TCP, a, 40000, b, 443)
    assert steering_hash_fields(Gue().wrap(Flow(4, a, b, TCP, 1, 2, fragment=0x2000).packet())) \
        == (TCP, a, 0, b, 0)
    assert steering_hash_fields(Gue().wrap(Flow(4, a, b, 1, 77, 0).packet(reverse=True))) == (1, b, 77, a, 0)
    error = IcmpError(4, 11, b"\x0a\0\0\xfe", a)
    assert steering_hash_fields(Gue().wrap(error.wrap(tcp.packet(reverse=True)))) == (TCP, b, 443, a, 40000)
    six, nine = bytes(15) + b"\x06", bytes(15) + b"\x09"
    four_extensions = ((0, 0), (43, 2), (60, 1), (60, 0))
    udp6 = Flow(6, six, nine, UDP, 5000, 53, extensions=four_extensions)
    assert steering_hash_fields(Gue().wrap(udp6.packet())) == (UDP, six, 5000, nine, 53)
    five = Flow(6, six, nine, UDP, 5000, 53, extensions=(*four_extensions, (43, 0)))
    assert steering_hash_fields(Gue().wrap(five.packet())) == (43, six, 0, nine, 0)


# -- the assembler ----------------------------------------------------------------------------

RET0 = stmt(BPF_RET | BPF_K, 0)


def test_labels_become_forward_offsets_from_the_next_instruction():
    assert assemble([jump(BPF_JEQ | BPF_K, 7, "seven", "other"), RET0, "seven", RET0, goto("end"),
                     "other", RET0, "end", stmt(BPF_RET | BPF_A)]) == [
        (BPF_JMP | BPF_JEQ, 1, 3, 7), RET0, RET0, (BPF_JMP, 0, 0, 1), RET0, (BPF_RET | BPF_A, 0, 0, 0)]


def test_a_conditional_jump_reaches_255_instructions_and_no_further():
    assert assemble([jump(BPF_JEQ | BPF_K, 0, "far"), *[RET0] * 255, "far", RET0])[0][1] == 255
    with pytest.raises(ValueError, match="exceeds 255"):
        assemble([jump(BPF_JEQ | BPF_K, 0, 0, "far"), *[RET0] * 256, "far", RET0])
    assert assemble([goto("far"), *[RET0] * 1000, "far", RET0])[0][3] == 1000  # BPF_JA has 32 bits


@pytest.mark.parametrize("lines, message", [
    (["back", RET0, jump(BPF_JEQ | BPF_K, 0, "back"), RET0], "backward"),
    ([jump(BPF_JEQ | BPF_K, 0, "nowhere"), RET0], "undefined"),
    (["twice", RET0, "twice", RET0], "twice"),
    ([jump(BPF_JEQ | BPF_K, 0, "end"), RET0, "end"], "leaves the program"),
    ([(BPF_ALU | BPF_MOD | BPF_K, 1, 0, 3), RET0], "not a jump"),
    ([stmt(BPF_RET | BPF_K, 1 << 32)], "32-bit"),
    ([RET0] * (BPF_MAXINSNS + 1), "cBPF takes"),
])
def test_the_assembler_refuses_what_the_kernel_would(lines, message):
    with pytest.raises(ValueError, match=message):
        assemble(lines)


@pytest.mark.parametrize("workers", [1, 2, 5, 64])
def test_the_program_fits_and_ends_in_owner_modulo_workers(workers):
    insns = program(workers)
    assert len(insns) <= BPF_MAXINSNS
    assert insns[-2:] == [(BPF_ALU | BPF_MOD | BPF_K, 0, 0, workers), (BPF_RET | BPF_A, 0, 0, 0)]
    with pytest.raises(ValueError, match="workers=0"):
        program(0)
