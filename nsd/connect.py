"""``ipferry connect``: run a command whose every packet goes through ipferry's tunnel.

The command runs in a fresh user+net namespace (see :mod:`ipferry.nsd.sandbox`) whose default
routes (IPv4 and IPv6) are a TUN device; this process pumps the TUN's packets into a tunnel and
the tunnel's packets back into the TUN. The tunnel is either connected (a SOCK_SEQPACKET
connection to the daemon: the context first, then one raw packet per datagram) or, with
``--gue HOST:PORT``, unconnected: UDP datagrams with the context in each GUE header (see
:mod:`ipferry.wire.gue`). It exits with the command's status.

Names: the command gets its own ``/etc/resolv.conf`` (bind-mounted in a private mount namespace,
nothing on the host changed) naming the daemon's resolver inside the tunnel network
(:mod:`ipferry.wire.dns`) or the ``--dns`` addresses, with the host's ``search``/``domain`` and
``options`` lines; ``--no-dns`` leaves it the host's.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ipferry.runtime import fdpass
from ipferry.runtime.paths import default_runtime_dir
from ipferry.wire import gue as gue_wire  # (``gue`` is run()'s argument: HOST:PORT)
from ipferry.wire import vnet
from ipferry.wire.dns import DNS_ADDRESS4, DNS_ADDRESS6
from ipferry.wire.icmp import echo_message, icmp_packet, unreachable
from ipferry.wire.packet import Drop, Parsed, parse

READ_SIZE = 65536 + 16  # a packet at the largest MTU, and a virtio-net header
LINGER_IDLE = 0.1  # after the namespace's keeper exits, wait for this much quiet on the TUN ...
LINGER_MAX = 1.0  # ... but no longer than this (the keeper already waited for owed data)
# ``--gue``: how long the on-ramp has to answer the probe (GueTunnel.check) before CMD starts
# anyway, with a warning.
GUE_CHECK_TIMEOUT = 3.0
DEFAULT_GUE_PORTS = gue_wire.DEFAULT_SENDER_PORTS
# The probe goes to the daemon's own host, which no tunnel may reach whatever the rules say: the
# daemon answers it itself ("administratively prohibited"), opening nothing, auditing nothing.
PROBE_DST = ipaddress.IPv4Address("127.0.0.1")
PROBE_PAYLOAD = b"ipferry connect: is this GUE tunnel carried?"


class ConnectError(Exception):
    """Why the command could not be started; ``str()`` is the one line to print."""


def default_tunnel_path() -> Path:
    # The same rule as the daemon's default config (RUNTIME_DIRECTORY, XDG_RUNTIME_DIR, /run).
    path = default_runtime_dir() / "tunnel.sock"
    system = Path("/run/ipferry/tunnel.sock")
    return path if path.exists() or not system.exists() else system


def random_address() -> ipaddress.IPv4Interface:
    """A client address of its own for each tunnel, so two tunnels' flows never collide.

    (Never :data:`DNS_ADDRESS4`, the daemon's resolver: 100.100.100.100 is not in 10.98.0.0/16.)
    """
    return ipaddress.IPv4Interface(f"10.98.{random.randrange(256)}.{random.randrange(1, 255)}/32")


def random_address6() -> ipaddress.IPv6Interface:
    return ipaddress.IPv6Interface(f"fd98::{random.randrange(1, 0xFFFF):x}:"
                                   f"{random.randrange(1, 0xFFFF):x}/128")


# Addresses a device may not claim, nor be: they mean something on every host already.
_NOT_A_DEVICE = {
    4: [(ipaddress.ip_network("0.0.0.0/8"), "unspecified ('this network')"),
        (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
        (ipaddress.ip_network("169.254.0.0/16"), "link-local"),
        (ipaddress.ip_network("224.0.0.0/4"), "multicast"),
        (ipaddress.ip_network("255.255.255.255/32"), "the broadcast address")],
    6: [(ipaddress.ip_network("::/128"), "unspecified"),
        (ipaddress.ip_network("::1/128"), "loopback"),
        (ipaddress.ip_network("::ffff:0:0/96"), "IPv4-mapped (give the IPv4 address)"),
        (ipaddress.ip_network("fe80::/10"), "link-local"),
        (ipaddress.ip_network("ff00::/8"), "multicast")],
}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _refused(net: IPNetwork) -> str | None:
    for bad, what in _NOT_A_DEVICE[net.version]:
        if net.overlaps(bad):
            return what
    return None


def parse_address(text: str, flag: str = "--address") -> IPAddress:
    """An ``--address`` (or ``--source``, as ``flag`` says): one IPv4 or IPv6 host address;
    ValueError says what is wrong with it."""
    if "/" in text:
        raise ValueError(f"{flag} {text}: a network, not an address"
                         + (" (claim a prefix with --route)" if flag == "--address" else ""))
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{flag} {text}: not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError(f"{flag} {text}: no %scope: a device's address is global")
    what = _refused(ipaddress.ip_network(address))
    if what:
        raise ValueError(f"{flag} {text}: {what}; a device's address must be unicast")
    return address


def parse_route(text: str) -> IPNetwork:
    """A ``--route``: an IPv4 or IPv6 prefix (host bits are cleared: 10.77.1.9/24 is
    10.77.1.0/24; a bare address is a /32 or /128); ValueError says what is wrong with it."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"--route {text}: not an IPv4 or IPv6 prefix (e.g. 10.77.1.0/24, "
                         f"fd77:1::/64)") from None
    what = _refused(net)
    if what:
        raise ValueError(f"--route {text}: {'is' if net.num_addresses == 1 else 'overlaps'} "
                         f"{what}; a device's prefix must be unicast")
    return net


HOST_RESOLV_CONF = Path("/etc/resolv.conf")
DEFAULT_DNS = (DNS_ADDRESS4, DNS_ADDRESS6)
MAX_DNS = 3  # the C library's resolver (glibc's MAXNS, musl's too) reads no more nameservers
_RESOLV_KEPT = ("search", "domain", "options")  # what the host's file gives CMD's


def parse_dns(texts: Sequence[str]) -> list[str]:
    """The ``--dns`` values: IPv4 or IPv6 addresses of resolvers, each once, in order;
    ValueError: one line naming the bad value."""
    found: list[str] = []
    for text in texts:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"--dns {text}: not an IPv4 or IPv6 address") from None
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise ValueError(f"--dns {text}: no %scope: the namespace's only link is its tunnel")
        if address.is_unspecified or address.is_multicast:
            what = "unspecified" if address.is_unspecified else "multicast"
            raise ValueError(f"--dns {text}: {what}; a resolver's address must be unicast")
        if str(address) not in found:
            found.append(str(address))
    if len(found) > MAX_DNS:
        raise ValueError(f"--dns {found[MAX_DNS]}: at most {MAX_DNS} resolvers (the C library "
                         f"reads no more)")
    return found


def resolv_conf(nameservers: Sequence[str], host: str, ipv6: bool = True) -> str:
    """CMD's ``/etc/resolv.conf``: ``nameservers`` (IPv6 ones only if the namespace has IPv6),
    then the ``search``/``domain`` and ``options`` lines of the host's file ``host``, as they are
    (its nameservers are not CMD's: a loopback stub there is unreachable from the namespace)."""
    lines = ["# ipferry connect: resolvers through the tunnel; search and options from the "
             "host's /etc/resolv.conf"]
    lines += [f"nameserver {ns}" for ns in nameservers if ipv6 or ":" not in ns]
    for line in host.splitlines():
        words = line.split()
        if words and words[0] in _RESOLV_KEPT:
            lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def _host_resolv_conf() -> str:
    try:
        return HOST_RESOLV_CONF.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""  # (none: the sandbox has nothing to bind over and says so)


def _namespace_has_ipv6() -> bool:
    return socket.has_ipv6 and os.path.exists("/proc/net/if_inet6")


@dataclass
class Addressing:
    """What ``--address``, ``--source`` and ``--route`` make of a device's namespace, and what it
    claims.

    ``address``/``address6``: the TUN's addresses (the sources of what CMD sends: the
    ``--source`` or first ``--address`` of each family, else random); ``extra``: the other
    ``--address`` es (on ``lo``, so a server binds to them without their being chosen as
    sources); ``local``: the ``--route`` prefixes, local in the namespace (AnyIP); ``routes``:
    what the tunnel context claims (every ``--address`` as a /32 or /128, then every
    ``--route``; none: no claim; a ``--source`` is never claimed).
    """

    address: ipaddress.IPv4Interface
    address6: ipaddress.IPv6Interface
    extra: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(default_factory=list)
    local: list[IPNetwork] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)


def addressing(addresses: Sequence[str], routes: Sequence[str],
               sources: Sequence[str] = ()) -> Addressing:
    """From the ``--address``, ``--route`` and ``--source`` values, in order; ValueError: one line
    naming the bad value.

    A ``--source`` is the namespace's address for its family, as a first ``--address`` would be,
    but claimed by nothing: a fixed client address (for audit records, rules), not a device others
    reach. At most one per family, and not with an ``--address`` of that family."""
    parsed = list(dict.fromkeys(parse_address(a) for a in addresses))
    local = list(dict.fromkeys(parse_route(r) for r in routes))
    fixed: dict[int, IPAddress] = {}
    for text in sources:
        source = parse_address(text, "--source")
        if source.version in fixed:
            raise ValueError(f"--source {text}: one --source per family, and IPv{source.version} "
                             f"has --source {fixed[source.version]} already")
        claimed_too = next((a for a in parsed if a.version == source.version), None)
        if claimed_too is not None:
            raise ValueError(f"--source {text} and --address {claimed_too}: both IPv"
                             f"{source.version}; a family's address is claimed (--address) or "
                             f"not (--source): give one of them")
        fixed[source.version] = source
    first4 = fixed.get(4) or next((a for a in parsed if a.version == 4), None)
    first6 = fixed.get(6) or next((a for a in parsed if a.version == 6), None)
    claimed = [ipaddress.ip_network(a) for a in parsed] + local
    return Addressing(
        address=ipaddress.IPv4Interface(f"{first4}/32") if first4 else random_address(),
        address6=ipaddress.IPv6Interface(f"{first6}/128") if first6 else random_address6(),
        extra=[ipaddress.ip_interface(a) for a in parsed if a not in (first4, first6)],
        # (a --route of one --address or --source is local already: the kernel routed it with
        # the address)
        local=[n for n in local
               if n.num_addresses > 1 or n.network_address not in (*parsed, *fixed.values())],
        routes=list(dict.fromkeys(str(n) for n in claimed)))


def tunnel_context(extra: dict, tenant: str, claims: Addressing, gue: bool) -> dict:
    """The tunnel context: ``extra`` (``--context``), the tenant, and on a connected tunnel the
    routes the device claims. GUE headers never carry routes: the daemon takes a site's prefixes
    from its config (``[[sites]]``). ValueError: one line saying why not."""
    if "routes" in extra:
        if gue:
            raise ValueError("--context: with --gue the context carries no routes (the daemon "
                             "takes a GUE site's prefixes from its [[sites]] config)")
        if claims.routes:
            raise ValueError("--context has routes and so do --address/--route: claim them one "
                             "way")
    context = {**extra, "tenant": tenant}
    if claims.routes and not gue:
        context["routes"] = claims.routes
    return context


class GueTunnel:
    """The unconnected tunnel: UDP sockets towards the daemon's GUE on-ramp.

    Quacks like the SEQPACKET socket the pumps use (send, recv, shutdown, close). A packet too big
    for one datagram is answered into the TUN with ICMP "fragmentation needed" / "packet too big",
    as a router would, so the command's TCP lowers its segment size.

    Source ports (RFC 8086's entropy): up to ``ports`` sockets, each on its own local port, and
    each inner flow's datagrams leave from the one its symmetric hash picks
    (:func:`ipferry.wire.gue.flow_entropy`), opened when a flow first needs it. A router's ECMP
    hash over the outer ports then spreads the flows over the nodes behind the on-ramp's
    address, and keeps each on one. One socket (``ports`` = 1, or a fixed ``local_port``) is a
    single sender, as a ``[[sites]]`` entry names it.
    """

    def __init__(self, host: str, port: int, context: bytes, offload: bool = False,
                 local_port: int | None = None, ports: int = 1) -> None:
        self.offload = offload  # TUN reads and writes carry a virtio-net header: so do datagrams
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.family, self.target = family, (host, port)
        self.sock = self._open(local_port)  # the first: the probe's, and every flow's at ports=1
        self.socks: list[socket.socket | None] = \
            [self.sock] + [None] * ((ports if local_port is None else 1) - 1)
        self._poll: select.epoll | None = None
        self._wake = (-1, -1)
        self.closed = False
        self._by_fd = {self.sock.fileno(): self.sock}
        self._ready: collections.deque[bytes] = collections.deque()
        self._opening = threading.Lock()  # (the sender opens sockets; close() ends that)
        if len(self.socks) > 1:  # the reader waits on them all, and on shutdown's wake-up
            try:
                self._poll = select.epoll()
                self._wake = os.pipe()
                self._poll.register(self._wake[0], select.EPOLLIN)
                self._poll.register(self.sock.fileno(), select.EPOLLIN)
            except OSError as exc:
                self.close()
                raise ConnectError(f"cannot open the GUE tunnel's sockets: {exc.strerror}") \
                    from None
        self.headers = {4: gue_wire.header(context, 4, offload), 6: gue_wire.header(context, 6, offload)}
        # The largest inner packet (superframes are kept below it: vnet.GSO_MAX_SIZE).
        self.mtu = gue_wire.room(self.headers[4], offload, family == socket.AF_INET6)
        self.tun_fd: int | None = None
        self.shut = False
        self.where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self.refused_said = False  # the daemon went away mid-run: said once

    def _open(self, local_port: int | None = None) -> socket.socket:
        """A socket connected to the on-ramp, from ``local_port`` or one the kernel picks."""
        host, port = self.target
        try:
            sock = socket.socket(self.family, socket.SOCK_DGRAM)
        except OSError as exc:  # (out of fds)
            raise ConnectError(f"cannot open a socket: {exc.strerror}") from None
        try:
            if local_port is not None:
                self._bind(sock, local_port)
            sock.connect((host, port))
        except ConnectError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot reach the GUE on-ramp at {host}:{port}: "
                               f"{exc.strerror}") from None
        return sock

    def _bind(self, sock: socket.socket, local_port: int) -> None:
        """Send from ``local_port`` (``--gue-port``), on the address the kernel would send from
        to the on-ramp (no wildcard: the port is taken on that address only)."""
        family = self.family
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(self.target)  # (a UDP connect sends nothing: it picks the route)
            local = probe.getsockname()[0]
        try:
            sock.bind((local, local_port))
        except OSError as exc:
            where = f"[{local}]:{local_port}" if family == socket.AF_INET6 else \
                f"{local}:{local_port}"
            if exc.errno == errno.EADDRINUSE:
                raise ConnectError(f"--gue-port {local_port}: {where} is in use (another sender "
                                   f"there?); pick another port") from None
            raise ConnectError(f"--gue-port {local_port}: cannot bind {where}: "
                               f"{exc.strerror}") from None

    def _socket_of(self, data: bytes, offset: int) -> socket.socket:
        """The socket (so the source port) of the packet's flow: opened on its first use."""
        index = gue_wire.flow_entropy(data, offset) % len(self.socks)
        sock = self.socks[index]
        if sock is None:
            with self._opening:
                if (sock := self.socks[index]) is not None:
                    return sock
                if self.closed or self._poll is None:
                    return self.sock  # (closed: its send fails, and the sender stops)
                try:
                    opened = self._open()
                except ConnectError:  # (out of fds, say): the first port carries this bucket
                    opened = self.sock
                else:
                    try:
                        self._poll.register(opened.fileno(), select.EPOLLIN)
                    except OSError:
                        opened.close()
                        opened = self.sock
                self.socks[index] = opened  # for good: a flow never changes its port
                self._by_fd[opened.fileno()] = opened
                return opened
        return sock

    def send(self, data: bytes) -> None:
        offset = vnet.HEADER_SIZE if self.offload else 0
        head = self.headers.get(data[offset] >> 4 if len(data) > offset else 0)
        if head is None:
            return  # not IP: nothing the daemon could use
        if len(data) - offset > self.mtu:
            self._too_big(data[offset:])
            return
        sock = self.sock if len(self.socks) == 1 else self._socket_of(data, offset)
        try:
            if self.offload:  # the header goes in the GUE option, the packet where Hlen says
                sock.sendmsg([head, data[:offset], b"\0\0", memoryview(data)[offset:]])
            else:
                sock.send(head + data)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise  # closed: we are done
            if exc.errno == errno.EMSGSIZE:
                self._too_big(data[offset:])
            # Anything else (refused while the daemon restarts, no route for a moment, a full
            # queue) is a lost datagram, as on any UDP path: the command's TCP resends it.

    def _too_big(self, packet: bytes) -> None:
        p = parse(packet)
        if isinstance(p, Drop) or self.tun_fd is None:
            return
        answer = unreachable(packet, p, "too_big", mtu=self.mtu)
        if answer is not None:
            os.write(self.tun_fd, (vnet.PLAIN if self.offload else b"") + answer)

    def recv(self, size: int) -> bytes:
        if self._poll is not None:
            return self._recv_any(size)
        while True:
            try:
                datagram = self.sock.recv(size)
            except ConnectionRefusedError:
                self._refused()
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF or self.shut:
                    raise
                continue  # an ICMP error for an earlier datagram (no route for a moment): lost
            if self.shut:
                return b""  # we shut down: done
            data = self._inner(datagram)
            if data is not None:
                return data

    def _recv_any(self, size: int) -> bytes:
        """The next packet from any of the sockets (a batch read from each one ready)."""
        assert self._poll is not None
        while not self._ready:
            if self.shut:
                return b""
            for fd, _ in self._poll.poll():
                sock = self._by_fd.get(fd)
                if sock is None:  # the wake-up: shut down
                    return b""
                for _ in range(64):
                    try:
                        datagram = sock.recv(size, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    except ConnectionRefusedError:
                        self._refused()
                        continue
                    except OSError as exc:
                        if exc.errno == errno.EBADF:
                            raise
                        break  # an ICMP error for an earlier datagram: that one is lost
                    data = self._inner(datagram)
                    if data is not None:
                        self._ready.append(data)
        return b"" if self.shut else self._ready.popleft()

    def _refused(self) -> None:
        """An ICMP error for an earlier datagram: nothing listens on the on-ramp's port any
        more. The tunnel itself goes on (a daemon started again is carrying it)."""
        if not self.refused_said and not self.shut:
            self.refused_said = True
            print(f"ipferry connect: warning: the GUE on-ramp at {self.where} answered ICMP port "
                  f"unreachable: no daemon listens there any more (stopped?); CMD's packets are "
                  f"lost until one does", file=sys.stderr, flush=True)

    def _inner(self, datagram: bytes) -> bytes | None:
        """What a datagram of the daemon carries for the TUN (None: nothing usable)."""
        try:
            context, data = gue_wire.decapsulate(datagram)
        except gue_wire.BadGue:
            return None
        if context.startswith(gue_wire.VNET_MAGIC) == self.offload:
            return data
        if self.offload:
            # Plain GUE to an offload sender (a site the daemon reached before it spoke):
            # a plain packet is a vnet one with an empty header.
            return vnet.PLAIN + data
        return None  # (a superframe to a TUN without offload would be garbage: dropped)

    def check(self, source: ipaddress.IPv4Address, tenant: str,
              timeout: float = GUE_CHECK_TIMEOUT) -> str | None:
        """Is the on-ramp carrying this tunnel? None: yes; a warning to print when it does not
        answer; ConnectError when nothing listens on its port.

        GUE has no handshake, and the daemon drops a sender it does not take without a word (a
        tenant outside the on-ramp's ``tenants``, a source outside its ``allow``, a context its
        application refuses). So one packet of the tunnel, an ICMP echo request from ``source``
        (the namespace's address), goes where no tunnel may go, 127.0.0.1, and the daemon
        answers it itself with ICMP "administratively prohibited" (counted as the drop
        ``forbidden_destination``; no flow, no audit record): that answer proves the on-ramp
        took the context. ICMP port unreachable means that nothing listens on the port. Silence
        means the daemon drops the tunnel, or the peer is not ipferry (a GUE endpoint of another
        kind answers no probe): a warning, and CMD still runs. Sent again, more and more slowly,
        until ``timeout`` (an application's asynchronous ``parse_context`` drops the first).
        """
        ident = random.randrange(1, 0x10000)
        probe = (vnet.PLAIN if self.offload else b"") + icmp_packet(
            source.packed, PROBE_DST.packed, echo_message(8, ident, 1, PROBE_PAYLOAD))
        head = self.headers[4]
        deadline = time.monotonic() + timeout
        interval, next_send = 0.05, 0.0
        try:
            while (now := time.monotonic()) < deadline:
                if now >= next_send:
                    if self.offload:
                        self.sock.sendmsg([head, probe[:vnet.HEADER_SIZE], b"\0\0",
                                           probe[vnet.HEADER_SIZE:]])
                    else:
                        self.sock.send(head + probe)
                    next_send, interval = now + interval, min(interval * 2, 1.0)
                self.sock.settimeout(max(0.001, min(next_send, deadline) - now))
                try:
                    datagram = self.sock.recv(READ_SIZE)
                except TimeoutError:
                    continue
                answer = self._inner(datagram)
                if answer is not None and _answers_probe(
                        answer[vnet.HEADER_SIZE if self.offload else 0:], source, ident):
                    return None
        except ConnectionRefusedError:
            raise ConnectError(f"nothing listens on udp {self.where} (ICMP port unreachable): is "
                               f"ipferry running there with a kind = \"gue\" on-ramp? (--gue "
                               f"names its listen address)") from None
        except OSError as exc:
            raise ConnectError(f"cannot reach the GUE on-ramp at {self.where}: "
                               f"{exc.strerror}") from None
        finally:
            self.sock.settimeout(None)
        return (f"the GUE on-ramp at {self.where} did not answer in {timeout:g} s, so it likely "
                f"drops this tunnel's datagrams: tenant {tenant!r} not in its tenants, this "
                f"sender ({self.sock.getsockname()[0]}) outside its allow list, a context its "
                f"application refused, or no daemon there and no ICMP error back (the daemon's "
                f"log says gue_unknown_tenant or gue_context_refused; ipferry_drops_total counts "
                f"gue_source_denied); running CMD anyway")

    def shutdown(self, how: int) -> None:
        # Unblock the reader: recv on a UDP socket returns once it is shut down (and the epoll
        # of several wakes on the pipe).
        self.shut = True
        if self._poll is not None:
            os.write(self._wake[1], b"x")
            return
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def close(self) -> None:
        with self._opening:
            self.closed = True
            for sock in self.socks:
                if sock is not None:
                    sock.close()
            if self._poll is not None:
                self._poll.close()
                self._poll = None
            for fd in self._wake:
                if fd >= 0:
                    os.close(fd)
            self._wake = (-1, -1)


def _answers_probe(packet: bytes, source: ipaddress.IPv4Address, ident: int) -> bool:
    """Is ``packet`` an ICMP error about the probe, the echo request ``ident`` from ``source``?"""
    p = parse(packet)
    inner = p.inner if isinstance(p, Parsed) else None
    return (inner is not None and inner.protocol == socket.IPPROTO_ICMP
            and inner.src == source.packed and inner.dst == PROBE_DST.packed
            and inner.sport == ident)


def open_gue(target: str, context: dict, offload: bool = False,
             local_port: int | None = None, ports: int = 1) -> GueTunnel:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectError(f"--gue {target!r}: expected HOST:PORT, e.g. 127.0.0.1:6080")
    raw = json.dumps(context, separators=(",", ":")).encode()
    try:
        return GueTunnel(host.strip("[]"), int(port), raw, offload, local_port, ports)
    except ValueError as exc:
        raise ConnectError(f"--gue: {exc}") from None


def connect_tunnel(path: Path) -> socket.socket:
    """A connection to the connected tunnel on-ramp at ``path`` (nothing sent yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        raise ConnectError(f"no tunnel on-ramp at {path}: is ipferry running? "
                           f"(--tunnel selects another)") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to the tunnel on-ramp at {path}: {exc.strerror}") from None
    return sock


def send_context(sock: socket.socket, context: dict, offload: bool = False,
                 attach: bool = False) -> None:
    """The tunnel's first datagram. With offload it says so before the context: every later
    packet then carries the TUN's virtio-net header, superframes and partial checksums as they
    are. With ``attach`` the TUN's queues follow (:func:`attach_tun`), not packets."""
    sock.send((vnet.ATTACH_MAGIC if attach else b"") + (vnet.TUNNEL_MAGIC if offload else b"")
              + json.dumps(context).encode())


def open_tunnel(path: Path, context: dict, offload: bool = False) -> socket.socket:
    sock = connect_tunnel(path)
    send_context(sock, context, offload)
    return sock


ATTACH_TIMEOUT = 15.0  # for the daemon's answer to the context (its application may be slow)


def attach_queues(sock: socket.socket, timeout: float = ATTACH_TIMEOUT) -> int:
    """After an attach context: how many queues the daemon wants (one per worker)."""
    sock.settimeout(timeout)
    try:
        answer = sock.recv(256)
    except TimeoutError:
        raise ConnectError(f"the daemon did not answer the tunnel's context in {timeout:g} s") \
            from None
    except OSError as exc:
        if exc.errno not in DAEMON_CLOSED:
            raise ConnectError(f"the tunnel failed: {exc.strerror}") from None
        answer = b""
    finally:
        sock.settimeout(None)
    if not answer:
        raise ConnectError("the daemon closed the tunnel: it refused the context (see its log: "
                           "tunnel_refused says why)")
    try:
        queues = json.loads(answer)["queues"]
    except (ValueError, KeyError, TypeError):
        queues = None
    if not isinstance(queues, int) or not 1 <= queues <= 64:
        raise ConnectError(f"the daemon answered the tunnel's context with {answer[:80]!r}, "
                           f"not the number of queues: is it ipferry of this version?")
    return queues


def _watch_daemon(sock: socket.socket, stop: threading.Event, activity: _Activity) -> None:
    """An attached tunnel's connection carries nothing more: it ends when the daemon closes it
    (or, after we shut our end, when the daemon has carried the last packets)."""
    try:
        while sock.recv(256):
            pass
    except OSError:
        pass
    _daemon_closed(stop, activity)
    stop.set()


PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")
SUPERVISOR_NAME = "ipf-supervisor"  # the daemon's supervisor, as /proc/PID/comm names it


def ping_hint(tunnel: socket.socket) -> str | None:
    """What to say when CMD pings through the connected ``tunnel`` and the daemon cannot send
    pings; None when it can, or when we cannot tell.

    The daemon sends echo requests from unprivileged ICMP ("ping") sockets, which the kernel
    allows only to the groups in ``net.ipv4.ping_group_range`` of the daemon's network namespace;
    without them, it drops every echo request (``icmp_not_permitted``) and says so in its log
    alone. We can tell when the process that listens at the tunnel's other end (SO_PEERCRED) is
    ipferry's supervisor (its workers have its groups) in our own network namespace: the sysctl
    is then ours to read. Not through GUE, nor for a socket systemd passed (PID 1 listens), nor
    for a daemon whose ``/proc/PID`` we may not read.
    """
    try:
        creds = tunnel.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        proc = Path(f"/proc/{struct.unpack('3i', creds)[0]}")
        if (proc / "comm").read_text().strip() != SUPERVISOR_NAME:
            return None
        theirs, ours = os.stat(proc / "ns" / "net"), os.stat("/proc/self/ns/net")
        if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
            return None
        groups = _groups((proc / "status").read_text())
        low, high = map(int, PING_GROUP_RANGE.read_text().split())
    except (OSError, ValueError, struct.error):
        return None
    return ping_hint_for(groups, low, high)


def _groups(status: str) -> set[int]:
    """The effective group and the supplementary groups of a ``/proc/PID/status``: what the
    kernel compares with ``net.ipv4.ping_group_range``."""
    groups: set[int] = set()
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Gid":
            groups.add(int(value.split()[1]))  # real, effective, saved, file system
        elif key == "Groups":
            groups.update(int(g) for g in value.split())
    if not groups:
        raise ValueError("no Gid line")
    return groups


PING_HINT_LEAD = "CMD sends pings, but the daemon cannot: "
PING_NOTE_LEAD = "the daemon cannot send CMD's pings: "  # said up front, when attached


def ping_hint_for(groups: set[int], low: int, high: int,
                  lead: str = PING_HINT_LEAD) -> str | None:
    """The hint for a daemon of ``groups`` under ``net.ipv4.ping_group_range = low high``."""
    if any(low <= g <= high for g in groups):
        return None
    return (f"{lead}net.ipv4.ping_group_range is '{low} {high}' "
            f"here, which leaves out its groups ({', '.join(map(str, sorted(groups)))}), so it "
            f"drops echo requests (icmp_not_permitted); fix, as root: "
            f"sysctl -w net.ipv4.ping_group_range='0 2147483647'")


def is_echo_request(packet: bytes, offset: int = 0) -> bool:
    """Is ``packet`` (after ``offset`` bytes of virtio-net header) an ICMP or ICMPv6 echo
    request?"""
    if len(packet) <= offset:
        return False
    version = packet[offset] >> 4
    if version == 4:
        ihl = (packet[offset] & 0x0F) * 4
        return (len(packet) > offset + ihl and packet[offset + 9] == 1
                and packet[offset + ihl] == 8)
    return version == 6 and len(packet) > offset + 40 and packet[offset + 6] == 58 \
        and packet[offset + 40] == 128


class _Activity:
    """When the last packet left the namespace: the tunnel stays until the command's last words
    (its FINs, sent by the kernel as the command exits) have crossed. And a hint to give the
    first time CMD sends a ping (see :func:`ping_hint`), if any."""

    def __init__(self, ping_hint: str | None = None, offset: int = 0) -> None:
        self.last = time.monotonic()
        self.closed_by_daemon = False
        self.ping_hint = ping_hint
        self.offset = offset  # of the packets in the TUN: a virtio-net header with offload


# How a connected tunnel fails once the daemon has closed its end (a worker restarted or stopped):
# on send (its receive queue is gone) or on recv (it went with our packets unread), before or
# instead of a plain EOF. Whichever pump meets it first records the daemon's close.
DAEMON_CLOSED = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


def _daemon_closed(stop: threading.Event, activity: _Activity) -> None:
    # Not when we stop: then we shut the tunnel ourselves, after setting ``stop``.
    if not stop.is_set():
        activity.closed_by_daemon = True


def _pump_tun_to_tunnel(tun_fd: int, tunnel: GueTunnel | socket.socket, stop: threading.Event,
                        activity: _Activity) -> None:
    while not stop.is_set():
        try:
            packet = os.read(tun_fd, READ_SIZE)
        except OSError:
            break  # the namespace is gone (the command exited)
        activity.last = time.monotonic()
        if activity.ping_hint is not None and is_echo_request(packet, activity.offset):
            print(f"ipferry connect: {activity.ping_hint}", file=sys.stderr, flush=True)
            activity.ping_hint = None
        try:
            tunnel.send(packet)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                continue  # larger than the tunnel takes: dropped, as a router would
            if exc.errno == errno.ENOBUFS:
                continue  # a full socket queue on a datagram path: lost, TCP resends it
            if exc.errno in DAEMON_CLOSED:
                _daemon_closed(stop, activity)
            break
    stop.set()


def _pump_tunnel_to_tun(tun_fd: int, tunnel: GueTunnel | socket.socket, stop: threading.Event,
                        activity: _Activity) -> None:
    while not stop.is_set():
        try:
            packet = tunnel.recv(READ_SIZE)
        except OSError as exc:
            if exc.errno in DAEMON_CLOSED:
                _daemon_closed(stop, activity)
            break
        if not packet:
            _daemon_closed(stop, activity)  # EOF: the daemon closed the tunnel
            break
        try:
            os.write(tun_fd, packet)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EMSGSIZE):
                continue  # a packet the TUN refuses is dropped, the tunnel goes on
            break
    stop.set()


def _dns_warning(why: str) -> None:
    print(f"ipferry connect: warning: CMD gets no resolv.conf of its own: {why}",
          file=sys.stderr, flush=True)


def run(command: list[str], *, tunnel_path: Path | None, context: dict, mtu: int | None,
        address: ipaddress.IPv4Interface, address6: ipaddress.IPv6Interface | None = None,
        gue: str | None = None, offload: bool = True,
        extra: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = (),
        local: Sequence[IPNetwork] = (),
        gue_port: int | None = None, gue_ports: int = DEFAULT_GUE_PORTS,
        dns: Sequence[str] | None = DEFAULT_DNS, attach: bool = True) -> int:
    """Run ``command`` behind a tunnel: connected at ``tunnel_path``, or GUE to ``gue``.

    ``mtu`` None: 65520 on a connected tunnel, the largest packet a GUE datagram carries on GUE.
    ``offload``: TSO superframes with partial checksums through the tunnel (virtio-net headers).
    ``extra``, ``local``: more addresses and AnyIP prefixes in the namespace (see
    :class:`Addressing`; ``context`` carries the routes claimed). ``gue_port``: the GUE socket's
    local port; else ``gue_ports``: how many source ports the flows spread over (ECMP).
    ``dns``: the nameservers of CMD's own ``/etc/resolv.conf`` (see
    :func:`resolv_conf`); None: CMD reads the host's. ``attach``: on a connected tunnel, pass
    the TUN's queues to the daemon, which then reads and writes the TUN itself (the hint
    :func:`ping_hint` gives is then said up front, since no ping of CMD's is seen here).
    """
    tunnel: GueTunnel | socket.socket
    hint = None
    if gue is not None:
        tunnel = open_gue(gue, context, offload, gue_port, gue_ports)
        try:
            warning = tunnel.check(address.ip, str(context.get("tenant")))
        except ConnectError:
            tunnel.close()
            raise
        if warning is not None:
            print(f"ipferry connect: warning: {warning}", file=sys.stderr, flush=True)
        mtu = mtu or tunnel.mtu
    else:
        tunnel = connect_tunnel(tunnel_path or default_tunnel_path())
        hint = ping_hint(tunnel)
        if attach and hint is not None:
            # The daemon reads CMD's TUN itself: no ping of CMD's is seen here, so the hint is
            # said up front (once), and the packets still take the fast way.
            print(f"ipferry connect: note: {PING_NOTE_LEAD}{hint.removeprefix(PING_HINT_LEAD)}",
                  file=sys.stderr, flush=True)
            hint = None
        send_context(tunnel, context, offload, attach)
        mtu = mtu or 65520
    queues = 1
    if attach and not isinstance(tunnel, GueTunnel):
        try:
            queues = attach_queues(tunnel)
        except ConnectError:
            tunnel.close()
            raise
    # CMD's resolv.conf: a file the sandbox binds over /etc/resolv.conf in its own mount
    # namespace; once it has (or could not), the file goes: the bind keeps what it holds.
    scratch: str | None = None
    resolv: list[str] = []
    if dns is not None:
        try:
            scratch = tempfile.mkdtemp(prefix="ipferry-connect-")
            path = Path(scratch) / "resolv.conf"
            path.write_text(resolv_conf(dns, _host_resolv_conf(), _namespace_has_ipv6()))
            path.chmod(0o644)
            resolv = ["--resolv-conf", str(path)]
        except OSError as exc:
            _dns_warning(f"cannot write it in {scratch or tempfile.gettempdir()} "
                         f"({exc.strerror})")
    try:
        ours, theirs = fdpass.channel_pair()
        child = subprocess.Popen(
            [sys.executable, "-m", "ipferry.nsd.sandbox", "--control-fd", str(theirs.fileno()),
             "--address", str(address), "--address6", str(address6 or random_address6()),
             *(f"--extra-address={a}" for a in extra), *(f"--local-route={n}" for n in local),
             "--mtu", str(mtu), *(["--offload"] if offload else []), "--queues", str(queues),
             *resolv, "--", *command],
            pass_fds=[theirs.fileno()])
        theirs.close()
        try:
            msg = fdpass.recv(ours)
        except (fdpass.ChannelClosed, fdpass.ProtocolError):
            child.wait()
            raise ConnectError(f"the namespace could not be set up (status {child.returncode})") \
                from None
        finally:
            ours.close()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if msg.type == "error":
        child.wait()
        raise ConnectError(f"{msg['cause']}; fix: {msg['fix']}")
    if msg.get("dns_warning"):
        _dns_warning(msg["dns_warning"])
    stop = threading.Event()
    activity = _Activity(hint, vnet.HEADER_SIZE if offload else 0)
    if attach and not isinstance(tunnel, GueTunnel):
        return _run_attached(child, tunnel, msg, queues, stop, activity)
    tun_fd = msg.take_fd("tun")
    msg.close_fds()
    os.set_blocking(tun_fd, True)
    if isinstance(tunnel, GueTunnel):
        tunnel.tun_fd = tun_fd

    pumps = [threading.Thread(target=fn, args=(tun_fd, tunnel, stop, activity), daemon=True)
             for fn in (_pump_tun_to_tunnel, _pump_tunnel_to_tun)]
    for t in pumps:
        t.start()
    # ^C reaches the command (same process group); we wait for it to decide.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            try:
                status = child.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                if activity.closed_by_daemon:
                    # No way out any more: the command would only hang. Say why and end it.
                    child.terminate()
        deadline = time.monotonic() + LINGER_MAX
        while time.monotonic() < deadline and time.monotonic() - activity.last < LINGER_IDLE:
            time.sleep(LINGER_IDLE / 4)
    finally:
        signal.signal(signal.SIGINT, previous)
        stop.set()
        tunnel.shutdown(socket.SHUT_RDWR)
        tunnel.close()
        os.close(tun_fd)  # unblocks the TUN reader (the namespace is gone with the command)
    if activity.closed_by_daemon:
        raise ConnectError("the daemon closed the tunnel (a refused context, or it stopped; "
                           "see its log)")
    return status if status >= 0 else 128 - status


def _wait(child: subprocess.Popen, activity: _Activity) -> int:
    """CMD's status; ^C reaches CMD (same process group) and CMD decides. Ended when the
    daemon closed the tunnel: with no way out any more, CMD would only hang."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            try:
                return child.wait(0.2)
            except subprocess.TimeoutExpired:
                if activity.closed_by_daemon:
                    child.terminate()
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_attached(child: subprocess.Popen, tunnel: socket.socket, msg: fdpass.Message,
                  queues: int, stop: threading.Event, activity: _Activity) -> int:
    """The TUN's queues go to the daemon; we only wait for CMD, then for the daemon to carry
    the namespace's last packets (it closes the tunnel when the TUN has been quiet a while)."""
    try:
        fds = [msg.take_fd("tun" if i == 0 else f"tun:{i}") for i in range(queues)]
    except KeyError:
        msg.close_fds()
        child.kill()
        child.wait()
        tunnel.close()
        raise ConnectError("the namespace helper passed fewer TUN queues than asked") from None
    try:
        socket.send_fds(tunnel, [b"tun"], fds)
    except OSError as exc:
        child.kill()
        child.wait()
        tunnel.close()
        raise ConnectError(f"cannot pass the TUN to the daemon: {exc.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)  # the daemon's now (the namespace lives while it holds them)
        msg.close_fds()
    watcher = threading.Thread(target=_watch_daemon, args=(tunnel, stop, activity), daemon=True)
    watcher.start()
    try:
        status = _wait(child, activity)
    finally:
        stop.set()
        try:
            tunnel.send(b"done")  # the daemon carries the last packets, then closes
            tunnel.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        watcher.join(LINGER_MAX + 1.0)
        tunnel.close()
    if activity.closed_by_daemon:
        raise ConnectError("the daemon closed the tunnel (it stopped, or the tunnel failed; "
                           "see its log)")
    return status if status >= 0 else 128 - status
