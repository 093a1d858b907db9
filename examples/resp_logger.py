"""A Redis command logger: each command a client sends through ipferry, as one JSON record.

The config's rules decide flows as usual (this is a :class:`RulesApplication`); a flow upgraded to
a stream (a rule with ``layer = "stream"``) whose destination port is a Redis port gets an
inspector that reads the plaintext RESP protocol: the client's commands (RESP arrays of bulk
strings, or inline commands like ``PING``), and the server's replies, counted (RESP2 and RESP3).
One record per command::

    {"event": "redis_command", "time": "2025-01-01T12:00:00.000000+00:00", "tenant": "acme",
     "client": "10.0.0.2:51234", "server": "198.18.0.1:6379", "n": 1, "command": "SET",
     "args": 2, "key": "user:42"}

``args`` counts the arguments after the command's name; ``key`` is the first of them (the key,
for most commands), at most 64 bytes of it, decoded as UTF-8 with ``\\xNN`` for other bytes,
``null`` for ``AUTH`` and ``HELLO`` (whose arguments are credentials). Values are never logged.
And one record per session, when it ends::

    {"event": "redis_session", ..., "commands": 3, "replies": 3, "error_replies": 0,
     "pushes": 0, "bytes_to_server": 95, "bytes_to_client": 27, "duration": 0.051,
     "end": "closed"}

The inspector only reads: it forwards every chunk unchanged and never raises, so the session is
never changed or cut by the logging. It parses incrementally (a command may arrive a byte at a
time, or many in one chunk, pipelined), is binary-safe (bulk strings are skipped by their length,
whatever they hold) and keeps only a partial line (at most 64 KiB, Redis's own limit for an inline
command) and the first 64 bytes of a command's name and key: a 500 MB value costs nothing. What it
cannot parse (not RESP) stops the parsing of that direction, said in the session's
``parse_errors``.

Use (see examples/README.md)::

    # PYTHONPATH=/path/to/ipferry/examples ipferry run --config ferry.toml
    [app]
    class = "resp_logger:RespLogger"

    [[rules]]
    name = "redis"
    action = "allow"
    ports = "6379"
    layer = "stream"

Environment (read when the application is built, at start and at each reload):

- ``IPFERRY_RESP_LOG_FILE``: append the records to this file, one JSON object per line. Unset:
  each record is a log line of the worker (events ``redis_command``, ``redis_session``).
- ``IPFERRY_RESP_PORTS``: the Redis ports, comma-separated (default ``6379``); a stream is logged
  when the client's destination port or the upstream's port is one of them.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from ipferry.engine.decisions import StreamStart
from ipferry.worker.app import Rule, RulesApplication
from ipferry.worker.inspect import Inspector, StreamStats

__all__ = ["RespLogger", "RespReplyCounter", "RespRequestParser", "RespSessionInspector"]

MAX_LINE = 64 * 1024  # Redis's PROTO_INLINE_MAX_SIZE: the longest line it takes
MAX_ARGS = 1024 * 1024  # Redis's limit on a command's arguments
MAX_BULK = 512 * 1024 * 1024  # Redis's proto-max-bulk-len default
MAX_AGGREGATE = 1 << 32  # elements of a reply's array, set or map (bounds the count, not memory)
KEEP = 64  # bytes kept of a command's name and of its first argument
REDACTED = frozenset({"AUTH", "HELLO"})  # their arguments are credentials

# An inline command's words, as Redis splits them (sdssplitargs, simplified): "quoted",
# 'quoted' or bare.
_WORD = re.compile(rb'"(?:\\.|[^"\\])*"|\'[^\']*\'|\S+')


class ProtocolError(Exception):
    """Not RESP: the parser of that direction stops (the session goes on)."""


_INTEGER = re.compile(rb"-?[0-9]{1,20}")


def _number(line: bytes, what: str) -> int:
    """The integer after a line's type byte (``*3``, ``$-1``), strictly."""
    if not _INTEGER.fullmatch(line, 1):
        raise ProtocolError(f"{what} {line[:20]!r} is not a number")
    return int(line[1:])


class _Lines:
    """Splits chunks into lines (``\\n``-terminated, a ``\\r`` before it dropped) and skips
    byte counts; keeps at most one partial line of MAX_LINE bytes."""

    def __init__(self) -> None:
        self.error: str | None = None
        self._line = bytearray()
        self._skip = 0  # bytes still to pass over (a bulk string and its CRLF)

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self._feed(data)
        except ProtocolError as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug here must not cut the session: the log says so
            self.error = f"parser error: {exc!r}"
        if self.error is not None:
            self._line = bytearray()

    def _feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self.skipped(data[pos:pos + take])
                self._skip -= take
                pos += take
                if not self._skip:
                    self.bulk_done()
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_LINE:
                    raise ProtocolError(f"a line over {MAX_LINE} bytes")
                return
            if self._line:
                self._line += data[pos:nl]
                line = bytes(self._line)
                self._line = bytearray()
            else:
                line = data[pos:nl]
            pos = nl + 1
            if len(line) > MAX_LINE:
                raise ProtocolError(f"a line over {MAX_LINE} bytes")
            self.line(line.removesuffix(b"\r"))

    def skip(self, count: int) -> None:
        self._skip = count

    def line(self, line: bytes) -> None:
        raise NotImplementedError

    def skipped(self, data: bytes) -> None:
        pass

    def bulk_done(self) -> None:
        pass


class RespRequestParser(_Lines):
    """The commands in what a client sends: ``on_command(name, argc, first_arg)`` for each, with
    at most :data:`KEEP` bytes of the name and of the first argument (None without one)."""

    def __init__(self, on_command: Callable[[bytes, int, bytes | None], None]) -> None:
        super().__init__()
        self.on_command = on_command
        self._argc = 0  # arguments of the command being read (0: between commands)
        self._args: list[bytes] = []  # the first two, kept
        self._argi = 0
        self._bulk = 0  # length of the bulk string being read
        self._kept = bytearray()

    def line(self, line: bytes) -> None:
        if self._argc:  # within a command: the next argument's length
            if not line.startswith(b"$"):
                raise ProtocolError(f"expected '$', got {line[:20]!r}")
            size = _number(line, "bulk length")
            if not 0 <= size <= MAX_BULK:
                raise ProtocolError(f"invalid bulk length {size}")
            self._bulk = size
            self.skip(size + 2)  # and its CRLF
            return
        if line.startswith(b"*"):
            argc = _number(line, "multibulk length")
            if argc > MAX_ARGS:
                raise ProtocolError(f"invalid multibulk length {argc}")
            if argc > 0:  # (*0 and *-1 are no command)
                self._argc, self._argi, self._args = argc, 0, []
            return
        words = _WORD.findall(line[:MAX_LINE])
        if words:  # (an empty line is no command)
            first = words[1].strip(b"\"'")[:KEEP] if len(words) > 1 else None
            self.on_command(words[0][:KEEP], len(words), first)

    def skipped(self, data: bytes) -> None:
        if self._argi < 2:
            want = min(self._bulk, KEEP) - len(self._kept)
            if want > 0:
                self._kept += data[:want]

    def bulk_done(self) -> None:
        if self._argi < 2:
            self._args.append(bytes(self._kept))
            self._kept = bytearray()
        self._argi += 1
        if self._argi == self._argc:
            argc, args = self._argc, self._args
            self._argc, self._argi, self._args = 0, 0, []
            self.on_command(args[0], argc, args[1] if argc > 1 else None)


class RespReplyCounter(_Lines):
    """Counts the replies in what a server sends (RESP2 and RESP3, nested aggregates,
    attributes), and among them the errors; RESP3 pushes (``>``) apart."""

    def __init__(self) -> None:
        super().__init__()
        self.replies = 0
        self.errors = 0
        self.pushes = 0
        self._open: list[list[int]] = []  # aggregates being read: [elements left, is attribute]
        self._top = b""  # the type of the reply being read

    def line(self, line: bytes) -> None:
        if not line:
            raise ProtocolError("an empty line where a reply was expected")
        kind = line[:1]
        if not self._open and kind != b"|":
            self._top = kind
        if kind in b"+-:,#(_":
            self._element()
        elif kind in b"$!=":
            size = _number(line, "bulk length")
            if size < 0:
                self._element()  # a null
            elif size > MAX_BULK:
                raise ProtocolError(f"invalid bulk length {size}")
            else:
                self.skip(size + 2)
        elif kind in b"*~>%|":
            count = _number(line, "aggregate length")
            if count > MAX_AGGREGATE:
                raise ProtocolError(f"invalid aggregate length {count}")
            if kind in b"%|":
                count *= 2
            if count > 0:
                self._open.append([count, kind == b"|"])
            elif kind != b"|":
                self._element()  # empty, or a null
        else:
            raise ProtocolError(f"unknown reply type {kind!r}")

    def bulk_done(self) -> None:
        self._element()

    def _element(self) -> None:
        """An element is complete: so is each aggregate it completes, and at the top, a reply."""
        while self._open:
            top = self._open[-1]
            top[0] -= 1
            if top[0]:
                return
            self._open.pop()
            if top[1]:
                return  # an attribute's end: the element it describes comes next
        if self._top == b">":
            self.pushes += 1
        else:
            self.replies += 1
            if self._top in (b"-", b"!"):
                self.errors += 1


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


class RespSessionInspector(Inspector):
    """Logs each command of the session and, at its end, the session; forwards every byte
    unchanged and never raises."""

    def __init__(self, stream: StreamStart, write: Callable[[dict[str, Any]], None]) -> None:
        flow = stream.flow
        self.write = write
        self.who = {"tenant": flow.tenant, "client": _address(flow.src, flow.sport),
                    "server": _address(flow.dst, flow.dport)}
        self.commands = 0
        self.requests = RespRequestParser(self._command)
        self.replies = RespReplyCounter()

    def _command(self, name: bytes, argc: int, first: bytes | None) -> None:
        self.commands += 1
        command = _text(name).upper()
        self._write("redis_command", n=self.commands, command=command, args=argc - 1,
                    key=None if first is None or command in REDACTED else _text(first))

    def _write(self, event: str, **fields: Any) -> None:
        try:
            self.write({"event": event, "time": datetime.datetime.now(datetime.UTC).isoformat(),
                        **self.who, **fields})
        except Exception as exc:  # a full disk must not cut the session: the log says so
            structlog.get_logger().warning("resp_log_failed", error=repr(exc)[:200])

    def to_server(self, data: bytes) -> bytes | None:
        self.requests.feed(data)
        return None

    def to_client(self, data: bytes) -> bytes | None:
        self.replies.feed(data)
        return None

    def on_end(self, stats: StreamStats) -> None:
        errors = {side: p.error for side, p in (("client", self.requests),
                                                ("server", self.replies)) if p.error}
        self._write("redis_session", commands=self.commands, replies=self.replies.replies,
                    error_replies=self.replies.errors, pushes=self.replies.pushes,
                    bytes_to_server=stats.to_server, bytes_to_client=stats.to_client,
                    duration=round(stats.duration, 3), end=str(stats.end),
                    **({"parse_errors": errors} if errors else {}))


class JsonLinesFile:
    """Appends records to ``path``, one JSON object per line, each with one ``write`` (workers
    appending to the same file never interleave lines). Kept open (a command is a record):
    rotate with copy-and-truncate."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def __call__(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def __del__(self) -> None:  # the application replaced by a reload
        try:
            os.close(self._fd)
        except (OSError, AttributeError):
            pass


def log_record(record: dict[str, Any]) -> None:
    """A record as a log line of the worker (structlog, as the worker configured it)."""
    fields = dict(record)
    structlog.get_logger().info(fields.pop("event"), **fields)


def _ports(text: str) -> frozenset[int]:
    ports = frozenset(int(p) for p in text.replace(" ", "").split(",") if p)
    if not ports or not all(0 < p < 65536 for p in ports):
        raise ValueError(f"IPFERRY_RESP_PORTS={text!r}: not a list of ports")
    return ports


class RespLogger(RulesApplication):
    """Rules decide the flows; Redis streams are logged (see the module's docstring)."""

    def __init__(self, rules: list[Rule] | None = None, default_action: str = "allow", *,
                 ports: Iterable[int] | None = None, path: str | None = None) -> None:
        super().__init__(rules, default_action)
        self.ports = frozenset(ports) if ports is not None else \
            _ports(os.environ.get("IPFERRY_RESP_PORTS", "6379"))
        path = path if path is not None else os.environ.get("IPFERRY_RESP_LOG_FILE") or None
        self.write: Callable[[dict[str, Any]], None] = JsonLinesFile(path) if path else log_record

    def on_stream_start(self, stream: StreamStart) -> Inspector | None:
        if stream.flow.dport in self.ports or stream.upstream[1] in self.ports:
            return RespSessionInspector(stream, self.write)
        return None  # spliced, unseen
