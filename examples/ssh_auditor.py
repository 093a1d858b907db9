"""An SSH auditor: one JSON record per SSH session ipferry carries, bytes never touched.

The config's rules decide flows as usual (this is a :class:`RulesApplication`); a flow upgraded to
a stream (a rule with ``layer = "stream"``) whose destination port is an SSH port gets an
inspector that reads, in each direction, the peer's identification string
(``SSH-2.0-OpenSSH_9.2p1 Debian-2``) and its first binary packet, ``SSH_MSG_KEXINIT``, with the
algorithms it offers (RFC 4253 sections 4.2, 6 and 7.1). When the session ends, one record::

    {"event": "ssh_session", "time": "2025-01-01T12:00:00.000000+00:00", "tenant": "acme",
     "client": "10.0.0.2:51234", "server": "198.18.0.1:22", "upstream": "198.18.0.1:22",
     "downgraded": false, "client_ident": "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
     "server_ident": "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
     "client_kexinit": {"kex_algorithms": ["sntrup761x25519-sha512@openssh.com",
                                           "curve25519-sha256", ...],
                        "server_host_key_algorithms": [...], "encryption_client_to_server": [...],
                        ...},
     "server_kexinit": {...},
     "negotiated": {"kex": "sntrup761x25519-sha512@openssh.com", "host_key": "ssh-ed25519",
                    "cipher_client_to_server": "chacha20-poly1305@openssh.com",
                    "cipher_server_to_client": "chacha20-poly1305@openssh.com"},
     "bytes_to_server": 3412, "bytes_to_client": 4180, "duration": 0.412, "end": "closed"}

``end`` is how the stream ended (``closed``, ``client_reset``, ``server_reset``, ``cancelled``...:
:class:`ipferry.worker.inspect.StreamEnd`). A side that did not speak SSH has ``null`` fields and
says why in ``errors`` (``{"server": "the first packet is message 1, not KEXINIT (20)"}``).

The inspector only reads: it returns ``None`` for every chunk (forward unchanged) and never
raises, so a session is never changed or cut by the audit. It parses incrementally (the bytes come
in any pieces), keeps at most one KEXINIT packet per direction (35,000 bytes, RFC 4253's limit,
plus the chunk at hand), and stops buffering once both are read: the rest of the session (all of
it encrypted) only counts bytes.

Use (see examples/README.md)::

    # PYTHONPATH=/path/to/ipferry/examples ipferry run --config ferry.toml
    [app]
    class = "ssh_auditor:SshAuditor"

    [[rules]]
    name = "ssh"
    action = "allow"
    ports = "22"
    layer = "stream"

Environment (read when the application is built, at start and at each reload):

- ``IPFERRY_SSH_AUDIT_FILE``: append the records to this file, one JSON object per line (each
  worker appends with one ``write`` per record: lines never interleave). Unset: each record is a
  log line of the worker (event ``ssh_session``), where the daemon's logs go.
- ``IPFERRY_SSH_AUDIT_PORTS``: the SSH ports, comma-separated (default ``22``); a stream is audited
  when the client's destination port or the upstream's port is one of them.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from ipferry.engine.decisions import StreamStart
from ipferry.worker.app import Rule, RulesApplication
from ipferry.worker.inspect import Inspector, StreamStats

__all__ = ["NAME_LISTS", "JsonLinesFile", "SshAuditor", "SshHelloParser", "SshSessionInspector",
           "log_record", "negotiated", "parse_kexinit"]

MAX_IDENT = 255  # RFC 4253 4.2: the identification line, CR LF included
MAX_PRELUDE = 8192  # the other lines a server may send before it (bounded here)
MAX_PACKET = 35000  # RFC 4253 6.1: the packet length every implementation must take
SSH_MSG_KEXINIT = 20
# The name-lists of SSH_MSG_KEXINIT, in order (RFC 4253 7.1).
NAME_LISTS = ("kex_algorithms", "server_host_key_algorithms",
              "encryption_client_to_server", "encryption_server_to_client",
              "mac_client_to_server", "mac_server_to_client",
              "compression_client_to_server", "compression_server_to_client",
              "languages_client_to_server", "languages_server_to_client")


class _Stop(Exception):
    """The side's bytes are not what the parser expects: it gives up (the session goes on)."""


def parse_kexinit(payload: bytes) -> dict[str, list[str]]:
    """The name-lists of an SSH_MSG_KEXINIT payload (message number, 16-byte cookie, ten
    ``uint32``-prefixed comma-separated lists, ...). Raises ValueError if it is not one."""
    if not payload or payload[0] != SSH_MSG_KEXINIT:
        raise ValueError("not a KEXINIT payload")
    if len(payload) < 17:
        raise ValueError(f"a KEXINIT of {len(payload)} bytes, shorter than its cookie")
    pos, lists = 17, {}
    for name in NAME_LISTS:
        if pos + 4 > len(payload):
            raise ValueError(f"KEXINIT truncated before {name}")
        size = int.from_bytes(payload[pos:pos + 4], "big")
        pos += 4
        if pos + size > len(payload):
            raise ValueError(f"KEXINIT's {name} runs past its end")
        raw = payload[pos:pos + size]
        pos += size
        lists[name] = raw.decode("ascii", "backslashreplace").split(",") if raw else []
    return lists


class SshHelloParser:
    """One direction's start of an SSH connection, fed in chunks of any size: the sender's
    identification string, then its first binary packet, which must be SSH_MSG_KEXINIT.

    ``done`` once it has both (``ident``, ``kexinit``) or has given up (``error`` says why);
    after that it buffers nothing.
    """

    def __init__(self) -> None:
        self.ident: str | None = None
        self.kexinit: dict[str, list[str]] | None = None
        self.error: str | None = None
        self.done = False
        self._buf = bytearray()
        self._prelude = 0  # bytes of lines before the identification

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._buf += data
        try:
            self._parse()
        except _Stop as exc:
            self._finish(str(exc))
        except Exception as exc:  # a bug here must not cut the session: the audit says so
            self._finish(f"parser error: {exc!r}")

    def _finish(self, error: str | None) -> None:
        self.error = error
        self.done = True
        self._buf = bytearray()

    def _parse(self) -> None:
        buf = self._buf
        while self.ident is None:
            nl = buf.find(b"\n", 0, MAX_IDENT)
            if nl < 0:
                if len(buf) >= MAX_IDENT:
                    raise _Stop(f"no line end within {MAX_IDENT} bytes: not SSH")
                return
            line = bytes(buf[:nl]).removesuffix(b"\r")
            del buf[:nl + 1]
            if line.startswith(b"SSH-"):
                self.ident = line.decode("ascii", "backslashreplace")
            else:  # a server may send other lines first
                self._prelude += nl + 1
                if self._prelude > MAX_PRELUDE:
                    raise _Stop(f"no identification string in the first {MAX_PRELUDE} bytes")
        if len(buf) < 5:
            return
        length = int.from_bytes(buf[:4], "big")
        if not 5 <= length <= MAX_PACKET:
            raise _Stop(f"a first packet of {length} bytes: not SSH's binary packet protocol")
        if len(buf) < 4 + length:
            return
        padding = buf[4]
        if padding >= length:
            raise _Stop(f"padding of {padding} bytes in a packet of {length}")
        payload = bytes(buf[5:4 + length - padding])
        if payload[0] != SSH_MSG_KEXINIT:
            raise _Stop(f"the first packet is message {payload[0]}, not KEXINIT ({SSH_MSG_KEXINIT})")
        try:
            self.kexinit = parse_kexinit(payload)
        except ValueError as exc:
            raise _Stop(str(exc)) from None
        self._finish(None)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _first_common(client: list[str], server: list[str]) -> str | None:
    """RFC 4253 7.1: the first of the client's algorithms the server also offers."""
    offered = set(server)
    return next((name for name in client if name in offered), None)


def negotiated(client: dict[str, list[str]], server: dict[str, list[str]]) -> dict[str, str | None]:
    """What the two KEXINITs agree on (RFC 4253 7.1's rule; without the guess of
    ``first_kex_packet_follows``, and without the MACs, implied by an AEAD cipher)."""
    return {
        "kex": _first_common(client["kex_algorithms"], server["kex_algorithms"]),
        "host_key": _first_common(client["server_host_key_algorithms"],
                                  server["server_host_key_algorithms"]),
        "cipher_client_to_server": _first_common(client["encryption_client_to_server"],
                                                 server["encryption_client_to_server"]),
        "cipher_server_to_client": _first_common(client["encryption_server_to_client"],
                                                 server["encryption_server_to_client"]),
    }


class SshSessionInspector(Inspector):
    """Reads both sides' hello; writes the session's record when it ends. Forwards every byte
    unchanged and never raises."""

    def __init__(self, stream: StreamStart, write: Callable[[dict[str, Any]], None]) -> None:
        self.stream = stream
        self.write = write
        self.client = SshHelloParser()
        self.server = SshHelloParser()

    def to_server(self, data: bytes) -> bytes | None:
        if not self.client.done:
            self.client.feed(data)
        return None

    def to_client(self, data: bytes) -> bytes | None:
        if not self.server.done:
            self.server.feed(data)
        return None

    def on_end(self, stats: StreamStats) -> None:
        self.write(self.record(stats))

    def record(self, stats: StreamStats) -> dict[str, Any]:
        flow, c, s = self.stream.flow, self.client, self.server
        record: dict[str, Any] = {
            "event": "ssh_session",
            "time": datetime.datetime.now(datetime.UTC).isoformat(),
            "tenant": flow.tenant,
            "client": _address(flow.src, flow.sport),
            "server": _address(flow.dst, flow.dport),
            "upstream": _address(*self.stream.upstream),
            "downgraded": self.stream.downgraded,
            "client_ident": c.ident,
            "server_ident": s.ident,
            "client_kexinit": c.kexinit,
            "server_kexinit": s.kexinit,
            "negotiated": negotiated(c.kexinit, s.kexinit) if c.kexinit and s.kexinit else None,
            "bytes_to_server": stats.to_server,
            "bytes_to_client": stats.to_client,
            "duration": round(stats.duration, 3),
            "end": str(stats.end),
        }
        missing = "the stream ended before it"
        errors = {side: p.error or missing for side, p in (("client", c), ("server", s))
                  if p.kexinit is None}
        if errors:
            record["errors"] = errors
        return record


class JsonLinesFile:
    """Appends records to ``path``, one JSON object per line, each with one ``write`` (workers
    appending to the same file never interleave lines). Opened at each record: a rotated file
    (``mv`` then a new one) is picked up at the next."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def log_record(record: dict[str, Any]) -> None:
    """A record as a log line of the worker (structlog, as the worker configured it)."""
    fields = dict(record)
    structlog.get_logger().info(fields.pop("event"), **fields)


def _ports(text: str) -> frozenset[int]:
    ports = frozenset(int(p) for p in text.replace(" ", "").split(",") if p)
    if not ports or not all(0 < p < 65536 for p in ports):
        raise ValueError(f"IPFERRY_SSH_AUDIT_PORTS={text!r}: not a list of ports")
    return ports


class SshAuditor(RulesApplication):
    """Rules decide the flows; SSH streams are audited (see the module's docstring)."""

    def __init__(self, rules: list[Rule] | None = None, default_action: str = "allow", *,
                 ports: Iterable[int] | None = None, path: str | None = None) -> None:
        super().__init__(rules, default_action)
        self.ports = frozenset(ports) if ports is not None else \
            _ports(os.environ.get("IPFERRY_SSH_AUDIT_PORTS", "22"))
        path = path if path is not None else os.environ.get("IPFERRY_SSH_AUDIT_FILE") or None
        self.write: Callable[[dict[str, Any]], None] = JsonLinesFile(path) if path else log_record

    def on_stream_start(self, stream: StreamStart) -> Inspector | None:
        if stream.flow.dport in self.ports or stream.upstream[1] in self.ports:
            return SshSessionInspector(stream, self.write)
        return None  # spliced, unseen

