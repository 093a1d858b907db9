"""examples/resp_logger.py: its parsers on any chunking, its records, and a real redis-server
(redis-cli and raw pipelined bytes) through the inspector relay, in a namespace of the test's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from resp_logger import KEEP, RespLogger, RespReplyCounter, RespRequestParser, RespSessionInspector

from ipferry.engine.decisions import FlowStart, StreamStart, TunnelContext
from ipferry.worker.inspect import StreamEnd, StreamStats
from tests.examples.conftest import EXAMPLES
from tests.examples.userns import UserNetNs, read_line
from tests.helpers import wait_for

HARNESS = Path(__file__).with_name("relay_harness.py")
CLIENT = Path(__file__).with_name("raw_client.py")


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def pieces(data: bytes, cuts: list[int]):
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def parse_requests(chunks) -> tuple[list[tuple[bytes, int, bytes | None]], RespRequestParser]:
    seen: list[tuple[bytes, int, bytes | None]] = []
    parser = RespRequestParser(lambda *c: seen.append(c))
    for chunk in chunks:
        parser.feed(chunk)
    return seen, parser


# -- the request parser -----------------------------------------------------------------------------

WORD = st.from_regex(rb"[A-Za-z0-9:_.-]{1,12}", fullmatch=True)
MULTIBULK = st.lists(st.binary(max_size=150), min_size=1, max_size=5).map(
    lambda args: (command(*args), (args[0][:KEEP], len(args), args[1][:KEEP] if len(args) > 1
                                   else None)))
INLINE = st.tuples(st.lists(WORD, min_size=1, max_size=4), st.sampled_from([b"\r\n", b"\n"])).map(
    lambda t: (b" ".join(t[0]) + t[1], (t[0][0], len(t[0]), t[0][1] if len(t[0]) > 1 else None)))


@settings(max_examples=300, deadline=None)
@given(commands=st.lists(st.one_of(MULTIBULK, INLINE), min_size=1, max_size=12),
       cuts=st.lists(st.integers(0, 100_000), max_size=60))
def test_any_chunking_gives_the_same_commands(commands, cuts):
    data = b"".join(raw for raw, _ in commands)
    expected = [c for _, c in commands]
    whole, _ = parse_requests([data])
    chunked, parser = parse_requests(pieces(data, cuts))
    assert whole == chunked == expected
    assert parser.error is None and not parser._line
    bytewise, _ = parse_requests(data[i:i + 1] for i in range(len(data)))
    assert bytewise == expected


def test_a_huge_value_is_skipped_not_kept():
    value = os.urandom(8 << 20)
    data = command(b"SET", b"k" * 100, value) + command(b"GET", b"k")
    chunks = pieces(data, list(range(0, len(data), 65536)))
    seen: list = []
    parser = RespRequestParser(lambda *c: seen.append(c))
    most = 0
    for chunk in chunks:
        parser.feed(chunk)
        most = max(most, len(parser._line), len(parser._kept))
    assert seen == [(b"SET", 3, b"k" * KEEP), (b"GET", 2, b"k")]
    assert most <= KEEP


def test_values_with_protocol_bytes_inside_are_data():
    evil = b"\r\n*1\r\n$4\r\nPING\r\n"
    seen, parser = parse_requests([command(b"SET", evil, evil), command(b"PING")])
    assert seen == [(b"SET", 3, evil), (b"PING", 1, None)] and parser.error is None


def test_inline_quotes_and_empty_lines():
    seen, _ = parse_requests([b'\r\n\nSET "a key" \'v v\'\r\n*0\r\n*-1\r\nPING\n'])
    assert seen == [(b"SET", 3, b"a key"), (b"PING", 1, None)]


@pytest.mark.parametrize("data, error", [
    (b"*2\r\n+OK\r\n", "expected '$'"),
    (b"*x\r\n", "is not a number"),
    (b"*2\r\n$-5\r\n", "invalid bulk length"),
    (b"*99999999\r\n", "invalid multibulk length"),
    (b"A" * 70_000, "a line over 65536 bytes"),
])
def test_what_is_not_resp_stops_the_request_parser(data, error):
    seen, parser = parse_requests(pieces(data, [3, 5000]))
    assert parser.error and error in parser.error and not seen and not parser._line
    parser.feed(command(b"PING"))  # stopped for good
    assert parser.error and error in parser.error


# -- the reply counter -------------------------------------------------------------------------------

LINE_TEXT = st.from_regex(rb"[ -~]{0,20}", fullmatch=True)
SCALAR = st.one_of(
    LINE_TEXT.map(lambda s: b"+" + s + b"\r\n"),
    st.integers(-10**12, 10**12).map(lambda i: b":%d\r\n" % i),
    st.binary(max_size=80).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.just(b"$-1\r\n"), st.just(b"*-1\r\n"), st.just(b"_\r\n"), st.just(b"#t\r\n"),
    st.just(b",3.14\r\n"), st.just(b"(3492890328409238509324850943850943825024385\r\n"),
    st.binary(max_size=30).map(lambda b: b"=%d\r\ntxt:%s\r\n" % (len(b) + 4, b)),
    LINE_TEXT.map(lambda s: b"-ERR " + s + b"\r\n"),  # an error inside an aggregate: no reply
)


def aggregates(children):
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: b"*%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(children, max_size=4).map(lambda xs: b"~%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda kv: b"%%%d\r\n" % len(kv) + b"".join(k + v for k, v in kv)),
        # An attribute, then the element it describes (no error: a top-level one is an error
        # reply, counted so only when the test knows it).
        st.tuples(st.lists(st.tuples(SCALAR, SCALAR), min_size=1, max_size=2),
                  children.filter(lambda v: not v.startswith((b"-", b"|")))).map(
            lambda t: b"|%d\r\n" % len(t[0]) + b"".join(k + v for k, v in t[0]) + t[1]),
    )


VALUE = st.recursive(SCALAR, aggregates, max_leaves=12)
# A top-level element: (its bytes, kind) with kind "reply", "error" or "push".
TOP = st.one_of(
    VALUE.filter(lambda v: not v.startswith(b"-")).map(lambda v: (v, "reply")),
    LINE_TEXT.map(lambda s: (b"-ERR " + s + b"\r\n", "error")),
    LINE_TEXT.map(lambda s: (b"|1\r\n+key\r\n:1\r\n-ERR " + s + b"\r\n", "error")),
    st.binary(max_size=20).map(lambda b: (b"!%d\r\n%s\r\n" % (len(b), b), "error")),
    st.lists(VALUE, min_size=1, max_size=3).map(
        lambda xs: (b">%d\r\n" % len(xs) + b"".join(xs), "push")),
)


@settings(max_examples=300, deadline=None)
@given(replies=st.lists(TOP, max_size=10), cuts=st.lists(st.integers(0, 100_000), max_size=60))
def test_any_chunking_gives_the_same_reply_counts(replies, cuts):
    data = b"".join(raw for raw, _ in replies)
    kinds = [k for _, k in replies]
    for chunks in ([data], pieces(data, cuts), [data[i:i + 1] for i in range(len(data))]):
        counter = RespReplyCounter()
        for chunk in chunks:
            counter.feed(chunk)
        assert counter.error is None
        assert (counter.replies, counter.errors, counter.pushes) == (
            len(kinds) - kinds.count("push"), kinds.count("error"), kinds.count("push"))


def test_an_unknown_reply_type_stops_the_counter():
    counter = RespReplyCounter()
    counter.feed(b"+OK\r\nHTTP/1.1 200 OK\r\n+OK\r\n")
    assert counter.replies == 1 and "unknown reply type" in (counter.error or "")


# -- the application and its records ------------------------------------------------------------------

def stream(dport: int = 6379, upstream=("198.18.0.1", 6379)) -> StreamStart:
    return StreamStart(FlowStart("acme", "tcp", "10.0.0.2", 40000, "198.18.0.1", dport,
                                 TunnelContext("acme")), upstream)


def test_redis_ports_are_inspected_others_spliced(monkeypatch):
    monkeypatch.delenv("IPFERRY_RESP_PORTS", raising=False)
    monkeypatch.delenv("IPFERRY_RESP_LOG_FILE", raising=False)
    app = RespLogger()
    assert isinstance(app.on_stream_start(stream()), RespSessionInspector)
    assert app.on_stream_start(stream(22, ("198.18.0.1", 22))) is None
    monkeypatch.setenv("IPFERRY_RESP_PORTS", "6380")
    assert RespLogger().on_stream_start(stream()) is None


def test_a_session_logs_each_command_and_its_summary_never_changing_a_byte():
    records: list[dict] = []
    insp = RespSessionInspector(stream(), records.append)
    client = (command(b"AUTH", b"hunter2") + command(b"set", b"user:\xff" + b"k" * 100, b"v")
              + b"PING\r\n")
    server = b"+OK\r\n+OK\r\n-ERR nope\r\n"
    for i in range(0, len(client), 5):
        assert insp.to_server(client[i:i + 5]) is None
    for i in range(0, len(server), 3):
        assert insp.to_client(server[i:i + 3]) is None
    insp.on_end(StreamStats(len(client), len(server), 0.25, StreamEnd.CLOSED))
    commands = [(r["n"], r["command"], r["args"], r["key"]) for r in records[:-1]]
    assert commands == [(1, "AUTH", 1, None),  # a password is never logged
                        (2, "SET", 2, "user:\\xff" + "k" * (KEEP - 6)),
                        (3, "PING", 0, None)]
    summary = records[-1]
    assert summary["event"] == "redis_session" and records[0]["event"] == "redis_command"
    assert (summary["commands"], summary["replies"], summary["error_replies"]) == (3, 3, 1)
    assert (summary["bytes_to_server"], summary["end"]) == (len(client), "closed")
    assert all(r["tenant"] == "acme" and r["client"] == "10.0.0.2:40000" for r in records)
    assert "parse_errors" not in summary
    json.dumps(records)


def test_records_go_to_the_log_or_to_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("IPFERRY_RESP_LOG_FILE", raising=False)
    with structlog.testing.capture_logs() as logs:
        insp = RespLogger().on_stream_start(stream())
        assert insp is not None
        insp.to_server(command(b"GET", b"k"))
        insp.on_end(StreamStats(1, 2, 0.5, StreamEnd.CLIENT_RESET))
    assert [(e["event"], e.get("key"), e.get("end")) for e in logs] == \
        [("redis_command", "k", None), ("redis_session", None, "client_reset")]
    out = tmp_path / "resp.jsonl"
    monkeypatch.setenv("IPFERRY_RESP_LOG_FILE", str(out))
    insp = RespLogger().on_stream_start(stream())
    assert insp is not None
    insp.to_server(b"not resp at all " * 5000)
    insp.on_end(StreamStats(1, 2, 0.5, StreamEnd.CLOSED))
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["parse_errors"] == {"client": "a line over 65536 bytes"}


# -- a real redis-server through the relay ----------------------------------------------------------

REDIS_PORT, RELAY_PORT = 6379, 6380


class Redis:
    def __init__(self, ns: UserNetNs) -> None:
        self.ns, home = ns, ns.home
        self.records = home / "resp.jsonl"
        self.log = home / "redis.log"
        with open(self.log, "wb") as log:
            ns.start("redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", str(home),
                     "--protected-mode", "no", stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        wait_for(lambda: self.cli(REDIS_PORT, "PING").stdout == b"PONG\n", 15, "redis-server")
        with open(home / "relay.log", "wb") as log:
            self.relay = ns.start(
                sys.executable, str(HARNESS), "--app", "resp_logger:RespLogger",
                "--listen", f"127.0.0.1:{RELAY_PORT}", "--upstream", f"127.0.0.1:{REDIS_PORT}",
                "--dst", "198.18.0.1:6379", stdout=subprocess.PIPE, stderr=log,
                stdin=subprocess.DEVNULL,
                env={"PYTHONPATH": str(EXAMPLES), "IPFERRY_RESP_LOG_FILE": str(self.records)})
        assert read_line(self.relay, 20) == "ready", (home / "relay.log").read_text()

    def cli(self, port: int, *args: str) -> subprocess.CompletedProcess:
        return self.ns.run("redis-cli", "-p", str(port), *args, stdin=subprocess.DEVNULL)

    def raw(self, port: int, data: bytes, until: bytes, piece: int) -> bytes:
        done = self.ns.run(sys.executable, str(CLIENT), f"127.0.0.1:{port}", "--piece", str(piece),
                           "--until", until.hex(), input=data)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def records_until(self, sessions: int) -> list[dict]:
        def read():
            text = self.records.read_text() if self.records.exists() else ""
            found = [json.loads(line) for line in text.splitlines()]
            done = sum(r["event"] == "redis_session" for r in found)
            return done >= sessions and found
        return wait_for(read, 15, f"{sessions} redis_session records")


@pytest.fixture
def redis(userns):
    return Redis(userns)


@pytest.mark.timeout(120)
def test_redis_cli_set_and_get_through_the_logger(redis):
    assert redis.cli(RELAY_PORT, "SET", "greeting", "hello world").stdout == b"OK\n"
    assert redis.cli(RELAY_PORT, "GET", "greeting").stdout == b"hello world\n"
    records = redis.records_until(2)
    commands = [(r["command"], r["args"], r["key"]) for r in records
                if r["event"] == "redis_command" and r["command"] in ("SET", "GET")]
    assert commands == [("SET", 2, "greeting"), ("GET", 1, "greeting")]
    for summary in (r for r in records if r["event"] == "redis_session"):
        assert summary["replies"] == summary["commands"] and summary["end"] == "closed"
        assert summary["bytes_to_server"] > 0 and summary["bytes_to_client"] > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("piece", [1, 7, 1 << 16])
def test_pipelined_binary_and_inline_commands_are_logged_and_replies_intact(redis, piece):
    # Binary, with the protocol inside (small when sent in small pieces: each waits a moment).
    value = bytes(range(256)) * (2 if piece < 64 else 40) + b"\r\n*1\r\n$4\r\nPING\r\n"
    marker = b"end-of-test"
    data = (command(b"FLUSHALL") + command(b"SET", b"bin", value) + command(b"GET", b"bin")
            + b"".join(command(b"INCR", b"counter") for _ in range(50))
            + b"PING\r\n" + b'ECHO "two words"\r\n' + command(b"NOPE", b"x")
            + command(b"ECHO", marker))
    until = b"$%d\r\n%s\r\n" % (len(marker), marker)
    if piece == 1:  # a byte at a time: fewer INCRs, or it takes a while
        data = data.replace(command(b"INCR", b"counter") * 45, b"")
    direct = redis.raw(REDIS_PORT, data, until, 1 << 16)  # the server's own answer
    relayed = redis.raw(RELAY_PORT, data, until, piece)
    assert relayed == direct and relayed.endswith(until)
    assert b"$%d\r\n%s\r\n" % (len(value), value) in relayed
    records = redis.records_until(1)
    commands = [r for r in records if r["event"] == "redis_command"]
    incrs = 50 if piece != 1 else 5
    assert [c["command"] for c in commands] == ["FLUSHALL", "SET", "GET", *["INCR"] * incrs,
                                                "PING", "ECHO", "NOPE", "ECHO"]
    assert [(c["args"], c["key"]) for c in commands[1:3]] == [(2, "bin"), (1, "bin")]
    assert (commands[-3]["args"], commands[-3]["key"]) == (1, "two words")
    assert [c["n"] for c in commands] == list(range(1, len(commands) + 1))
    (summary,) = [r for r in records if r["event"] == "redis_session"]
    assert summary["commands"] == summary["replies"] == len(commands)
    assert summary["error_replies"] == 1 and "parse_errors" not in summary
    assert (summary["bytes_to_server"], summary["bytes_to_client"]) == (len(data), len(relayed))
