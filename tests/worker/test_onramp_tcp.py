"""The TCP on-ramp (a published service): accepted connections handed whole to the data path, the
PROXY v2 header read and never a byte past it, and every refusal closed and counted. Real sockets
on loopback; the data path is a recording callback (this tests the on-ramp, not the relay)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from ipferry.runtime.settings import TcpOnrampSettings, WorkerSettings
from ipferry.supervisor import cli, config, listeners
from ipferry.wire import proxy
from ipferry.worker import metrics
from ipferry.worker.onramps import OnrampUnusable, Wiring, resolve
from ipferry.worker.onramps import tcp as tcp_onramp
from ipferry.worker.onramps.tcp import TcpOnramp

UPSTREAM = ("10.77.0.2", 443)


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **kw: self.events.append((level, event, kw))

    def named(self, event: str) -> list[dict]:
        return [kw for _, e, kw in self.events if e == event]


class Streams:
    """A data path's on_stream that keeps what it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, socket.socket, tuple[str, int], tuple[str, int], str]] = []

    def __call__(self, tenant, sock, client, upstream, onramp) -> None:
        self.calls.append((tenant, sock, client, upstream, onramp))

    def close(self) -> None:
        for call in self.calls:
            call[1].close()


def settings(host: str = "127.0.0.1", port: int = 0, **conf) -> WorkerSettings:
    conf = {"tenant": "acme", "upstream": UPSTREAM, "proxy_protocol": False, "allow": [],
            "address": (host, port), **conf}
    return WorkerSettings.model_construct(gue={}, tcp={"web": TcpOnrampSettings(**conf)})


def wiring(log: Log, settings: WorkerSettings, on_stream=None) -> Wiring:
    async def never(raw: bytes):
        raise AssertionError("a TCP on-ramp has no context")

    return Wiring(worker=0, log=log, settings=settings, parse_context=never,
                  app_parse_context=never, on_packet=lambda t, p: None,
                  on_close=lambda t, r: None, on_stream=on_stream)


def listen(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen(64)
    return sock


def refused(reason: str) -> float:
    return metrics.registry.get_sample_value("ipferry_tunnels_closed_total",
                                             {"reason": reason}) or 0.0


async def until(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def connect(listener: socket.socket) -> socket.socket:
    client = socket.socket(listener.family)
    client.connect(listener.getsockname()[:2])
    return client


def closed_by_server(client: socket.socket) -> bool:
    """The on-ramp closed the connection (EOF, or a reset if it left bytes unread)."""
    client.settimeout(2)
    try:
        return client.recv(100) == b""
    except ConnectionResetError:
        return True


async def read_all(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a non-blocking socket (the handed one), waiting for them."""
    got = b""
    deadline = time.monotonic() + 3
    while len(got) < size:
        assert time.monotonic() < deadline, f"only {got!r}"
        try:
            chunk = sock.recv(size - len(got))
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        assert chunk, f"EOF after {got!r}"
        got += chunk
    return got


class Served:
    """An on-ramp serving a listener, and what it hands over."""

    def __init__(self, listener: socket.socket, log: Log, conf: WorkerSettings,
                 wired: bool = True, **kw) -> None:
        self.listener = listener
        self.streams = Streams()
        self.onramp = TcpOnramp("web", listener, wiring(log, conf, self.streams if wired else None),
                                **kw)
        self.onramp.start()

    async def close(self) -> None:
        await self.onramp.stop()
        self.streams.close()
        self.listener.close()


# -- handing connections over ------------------------------------------------------------------

def test_a_plain_connection_is_handed_over_with_the_clients_address_and_first_bytes():
    async def main() -> None:
        served = Served(listen(), Log(), settings())
        client = connect(served.listener)
        client.sendall(b"GET / HTTP/1.1\r\n")
        await until(lambda: served.streams.calls)
        ((tenant, sock, who, upstream, name),) = served.streams.calls
        assert (tenant, who, upstream, name) == ("acme", client.getsockname(), UPSTREAM, "web")
        assert not sock.getblocking()
        assert await read_all(sock, 16) == b"GET / HTTP/1.1\r\n"  # nothing of it read
        sock.sendall(b"reply")
        assert client.recv(100) == b"reply"
        assert served.onramp.pending == 0 and not served.onramp.tunnels()
        client.close()
        await served.close()

    asyncio.run(main())


@pytest.mark.parametrize("src,dst", [(("203.0.113.7", 51000), ("192.0.2.1", 443)),
                                     (("2001:db8::7", 51000), ("2001:db8::1", 443))])
def test_the_proxy_headers_source_is_the_client_and_the_stream_after_it_intact(src, dst):
    async def main() -> None:
        served = Served(listen(), Log(), settings(proxy_protocol=True))
        client = connect(served.listener)
        # One segment: the header and the client's first bytes together.
        payload = b"\x16\x03\x01\x00\x05hello"  # a TLS record's start, as a client's first bytes
        client.sendall(proxy.build_v2(src, dst) + payload)
        await until(lambda: served.streams.calls)
        ((tenant, sock, who, upstream, _),) = served.streams.calls
        assert (tenant, who, upstream) == ("acme", src, UPSTREAM)
        assert await read_all(sock, len(payload)) == payload
        assert served.onramp.pending == 0
        client.close()
        await served.close()

    asyncio.run(main())


def test_a_header_dribbled_a_byte_at_a_time_is_read_whole_and_no_further():
    async def main() -> None:
        served = Served(listen(), Log(), settings(proxy_protocol=True))
        client = connect(served.listener)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = proxy.build_v2(("198.51.100.9", 7), ("192.0.2.1", 443), proxy.tlv(0xEE, b"x" * 40))
        for byte in header:
            client.send(bytes([byte]))
            await asyncio.sleep(0.001)
        client.sendall(b"after")
        await until(lambda: served.streams.calls)
        ((_, sock, who, _, _),) = served.streams.calls
        assert who == ("198.51.100.9", 7)
        assert await read_all(sock, 5) == b"after"
        client.close()
        await served.close()

    asyncio.run(main())


def test_a_local_header_leaves_the_connections_own_address():
    async def main() -> None:
        served = Served(listen(), Log(), settings(proxy_protocol=True))
        client = connect(served.listener)
        client.sendall(proxy.build_v2(None, None) + b"ping")
        await until(lambda: served.streams.calls)
        ((_, sock, who, _, _),) = served.streams.calls
        assert who == client.getsockname()
        assert await read_all(sock, 4) == b"ping"
        client.close()
        await served.close()

    asyncio.run(main())


def test_an_ipv6_listener_hands_over_ipv6_clients():
    try:
        listener = listen("::1")
    except OSError as exc:
        pytest.fail(f"this test needs an IPv6 loopback (::1), and binding it failed: {exc}")

    async def main() -> None:
        served = Served(listener, Log(), settings("::1"))
        assert served.onramp.endpoints == ((socket.inet_pton(socket.AF_INET6, "::1"), 0),)
        client = connect(listener)
        await until(lambda: served.streams.calls)
        assert served.streams.calls[0][2] == client.getsockname()[:2]
        client.close()
        await served.close()

    asyncio.run(main())


# -- refusals ----------------------------------------------------------------------------------

def test_garbage_instead_of_a_header_is_closed_and_counted():
    async def main() -> None:
        log = Log()
        served = Served(listen(), log, settings(proxy_protocol=True))
        before = refused("tcp_bad_proxy_header")
        client = connect(served.listener)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: refused("tcp_bad_proxy_header") == before + 1)
        assert closed_by_server(client) and not served.streams.calls
        assert served.onramp.pending == 0
        (warning,) = log.named("tcp_connection_refused")
        assert warning["reason"] == "tcp_bad_proxy_header" and "signature" in warning["error"]
        client.close()
        await served.close()

    asyncio.run(main())


def test_a_header_for_udp_is_refused():
    async def main() -> None:
        served = Served(listen(), Log(), settings(proxy_protocol=True))
        before = refused("tcp_bad_proxy_header")
        client = connect(served.listener)
        header = bytearray(proxy.build_v2(("10.0.0.1", 1), ("10.0.0.2", 2)))
        header[13] = 0x12  # UDP over IPv4
        client.sendall(header)
        await until(lambda: refused("tcp_bad_proxy_header") == before + 1)
        assert closed_by_server(client) and not served.streams.calls
        client.close()
        await served.close()

    asyncio.run(main())


def test_half_a_header_then_silence_is_closed_at_the_timeout():
    async def main() -> None:
        log = Log()
        served = Served(listen(), log, settings(proxy_protocol=True), header_timeout=0.2)
        before = refused("tcp_header_timeout")
        client = connect(served.listener)
        client.sendall(proxy.build_v2(("10.0.0.1", 1), ("10.0.0.2", 2))[:20])
        await until(lambda: served.onramp.pending == 1)
        t0 = time.monotonic()
        await until(lambda: served.onramp.pending == 0)
        assert 0.05 < time.monotonic() - t0 < 1.5
        assert refused("tcp_header_timeout") == before + 1
        assert closed_by_server(client) and not served.streams.calls
        assert "20 bytes" in log.named("tcp_connection_refused")[0]["error"]
        client.close()
        await served.close()

    asyncio.run(main())


def test_a_client_gone_before_its_header_is_forgotten():
    async def main() -> None:
        served = Served(listen(), Log(), settings(proxy_protocol=True))
        before = refused("tcp_no_proxy_header")
        client = connect(served.listener)
        client.sendall(proxy.SIGNATURE[:6])
        await until(lambda: served.onramp.pending == 1)
        client.close()
        await until(lambda: served.onramp.pending == 0)
        assert refused("tcp_no_proxy_header") == before + 1 and not served.streams.calls
        await served.close()

    asyncio.run(main())


def test_a_source_outside_the_allow_list_is_closed_at_once():
    async def main() -> None:
        log = Log()
        served = Served(listen(), log, settings(allow=["10.0.0.0/8", "2001:db8::/32"]))
        before = refused("tcp_source_denied")
        client = connect(served.listener)
        await until(lambda: refused("tcp_source_denied") == before + 1)
        assert closed_by_server(client) and not served.streams.calls
        assert log.named("tcp_connection_refused")[0]["source"] == "127.0.0.1"
        client.close()
        await served.close()
        # A PROXY header does not get a source past the list: the list is about who connects.
        served = Served(listen(), log, settings(allow=["10.0.0.0/8"], proxy_protocol=True))
        client = connect(served.listener)
        client.sendall(proxy.build_v2(("10.1.1.1", 1), ("10.0.0.2", 2)))
        await until(lambda: refused("tcp_source_denied") == before + 2)
        assert closed_by_server(client) and not served.streams.calls
        client.close()
        await served.close()
        # Inside the list: handed over.
        served = Served(listen(), log, settings(allow=["127.0.0.0/8"]))
        client = connect(served.listener)
        await until(lambda: served.streams.calls)
        client.close()
        await served.close()

    asyncio.run(main())


def test_connections_waiting_for_a_header_are_capped():
    async def main() -> None:
        served = Served(listen(), Log(), settings(proxy_protocol=True), max_pending=3)
        before = refused("tcp_pending_limit")
        clients = [connect(served.listener) for _ in range(5)]
        await until(lambda: refused("tcp_pending_limit") == before + 2)
        assert served.onramp.pending == 3
        assert sum(closed_by_server(c) for c in clients[3:]) == 2  # the last ones accepted
        # A header frees a place: the next connection waits again.
        clients[0].sendall(proxy.build_v2(None, None))
        await until(lambda: served.onramp.pending == 2)
        clients.append(connect(served.listener))
        await until(lambda: served.onramp.pending == 3)
        assert refused("tcp_pending_limit") == before + 2 and len(served.streams.calls) == 1
        for client in clients:
            client.close()
        await served.close()

    asyncio.run(main())


def test_refusals_are_warned_of_at_most_once_a_minute_each_and_all_counted():
    async def main() -> None:
        log = Log()
        served = Served(listen(), log, settings(allow=["10.0.0.0/8"]))
        before = refused("tcp_source_denied")
        clients = [connect(served.listener) for _ in range(4)]
        await until(lambda: refused("tcp_source_denied") == before + 4)
        assert len(log.named("tcp_connection_refused")) == 1
        served.onramp._logged["tcp_source_denied"] = (time.monotonic() - 61, 3)
        clients.append(connect(served.listener))
        await until(lambda: refused("tcp_source_denied") == before + 5)
        warnings = log.named("tcp_connection_refused")
        assert len(warnings) == 2 and warnings[1]["unlogged_since"] == 3
        for client in clients:
            client.close()
        await served.close()

    asyncio.run(main())


def test_without_a_data_path_connections_are_closed_and_counted():
    async def main() -> None:
        served = Served(listen(), Log(), settings(), wired=False)
        before = refused("tcp_no_datapath")
        client = connect(served.listener)
        await until(lambda: refused("tcp_no_datapath") == before + 1)
        assert closed_by_server(client)
        client.close()
        await served.close()

    asyncio.run(main())


def test_a_data_path_that_raises_loses_that_connection_only():
    async def main() -> None:
        log, calls = Log(), []

        def broken(tenant, sock, client, upstream, onramp):
            calls.append(sock)
            raise RuntimeError("bug")

        listener = listen()
        onramp = TcpOnramp("web", listener, wiring(log, settings(), broken))
        onramp.start()
        before = refused("tcp_datapath_error")
        first, second = connect(listener), connect(listener)
        await until(lambda: len(calls) == 2)
        assert refused("tcp_datapath_error") == before + 2
        assert closed_by_server(first) and closed_by_server(second)
        assert all(sock.fileno() == -1 for sock in calls)
        (warning,) = log.named("tcp_connection_refused")  # once a minute, however many
        assert (warning["reason"], warning["error"], warning["exc_info"]) == (
            "tcp_datapath_error", "bug", True)
        first.close()
        second.close()
        await onramp.stop()
        listener.close()

    asyncio.run(main())


# -- the on-ramp's life ------------------------------------------------------------------------

def test_stop_closes_waiting_connections_and_accepts_no_more():
    async def main() -> None:
        served = Served(listen(), Log(), settings(proxy_protocol=True))
        waiting = connect(served.listener)
        await until(lambda: served.onramp.pending == 1)
        await served.onramp.stop()
        assert served.onramp.pending == 0 and closed_by_server(waiting)
        late = connect(served.listener)  # the kernel's backlog takes it; no worker accepts it
        late.sendall(proxy.build_v2(None, None))
        await asyncio.sleep(0.1)
        assert not served.streams.calls and served.onramp.pending == 0
        assert served.listener.fileno() != -1  # the listener is the worker's, not closed
        await served.onramp.stop()  # twice is fine
        waiting.close()
        late.close()
        await served.close()

    asyncio.run(main())


def test_a_listener_without_its_settings_is_not_served():
    async def main() -> None:
        with listen() as listener:
            with pytest.raises(OnrampUnusable, match="TCP on-ramp web: no settings"):
                TcpOnramp("web", listener, wiring(Log(), WorkerSettings.model_construct(gue={})))

    asyncio.run(main())


def test_the_onramps_endpoints_and_protocol_answers():
    async def main() -> None:
        with listen() as listener:
            onramp = TcpOnramp("web", listener, wiring(Log(), settings("0.0.0.0", 8443)))
            assert onramp.endpoints == ((None, 8443),)  # a wildcard address: any of the host's
            onramp = TcpOnramp("web", listener, wiring(Log(), settings("127.0.0.1", 8443)))
            assert onramp.endpoints == ((bytes([127, 0, 0, 1]), 8443),)
            assert onramp.find(1) is None and list(onramp.tunnels()) == []
            onramp.sweep(lambda: pytest.fail("no flows to walk"))
            onramp.reset_contexts()

    asyncio.run(main())


def test_the_tcp_kind_is_registered():
    assert resolve("onramp:tcp:web") == ("web", TcpOnramp)
    assert TcpOnramp.kind == "tcp"
    assert tcp_onramp.HEADER_TIMEOUT == 5.0 and tcp_onramp.MAX_PENDING == 1024


# -- the supervisor's listener -----------------------------------------------------------------

def tcp_config(listen: str = "127.0.0.1:0", **kw):
    return config.TcpOnramp(kind="tcp", name="web", listen=listen, tenant="acme",
                            upstream="10.77.0.2:443", **kw)


def test_the_listener_is_one_socket_every_worker_accepts_on():
    listener = listeners.listener_class("tcp").open(tcp_config(backlog=16), 3, {})
    try:
        assert isinstance(listener, listeners.TcpListener) and not listener.from_systemd
        sock = listener.sock
        assert (sock.family, sock.type, sock.getblocking()) == (socket.AF_INET,
                                                                socket.SOCK_STREAM, False)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        port = sock.getsockname()[1]
        assert listener.address == f"127.0.0.1:{port}"
        for worker in range(3):
            assert listener.fds_for(worker) == {"onramp:tcp:web": sock.fileno()}
    finally:
        listener.close()
    assert listener.sock.fileno() == -1


def test_an_ipv6_listener_is_ipv6_only():
    try:
        listener = listeners.TcpListener.open(tcp_config("[::1]:0"), 1, {})
    except listeners.ListenerError as exc:
        pytest.fail(f"this test needs an IPv6 loopback (::1), and binding it failed: {exc}")
    try:
        assert listener.sock.family == socket.AF_INET6
        assert listener.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        assert listener.address == f"[::1]:{listener.sock.getsockname()[1]}"
    finally:
        listener.close()


def test_a_bind_that_fails_says_why_and_what_to_do():
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(listeners.ListenerError,
                           match=f"web at 127.0.0.1:{port}: cannot listen .*another process"):
            listeners.TcpListener.open(tcp_config(f"127.0.0.1:{port}"), 1, {})
    # TEST-NET-1: no host has it (unless it binds any address: net.ipv4.ip_nonlocal_bind).
    try:
        listener = listeners.TcpListener.open(tcp_config("192.0.2.1:0", allow=["10.0.0.0/8"]), 1, {})
    except listeners.ListenerError as exc:
        assert "192.0.2.1 is not an address of this host" in str(exc)
    else:
        listener.close()
        pytest.fail("this host binds addresses it does not have (net.ipv4.ip_nonlocal_bind=1): "
                    "the check of a bind to a foreign address needs it off")


def test_a_socket_from_systemd_is_taken_if_it_is_a_tcp_listener():
    given = socket.socket()
    given.bind(("127.0.0.1", 0))
    given.listen(4)
    passed = {"web": given, "other": socket.socket()}
    listener = listeners.TcpListener.open(tcp_config("127.0.0.1:8443"), 2, passed)
    assert listener.sock is given and listener.from_systemd and "web" not in passed
    assert listener.address == f"127.0.0.1:{given.getsockname()[1]}"
    listener.close()
    passed["other"].close()

    for wrong in (socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket()):
        with pytest.raises(listeners.ListenerError, match="not a listening TCP socket"):
            listeners.TcpListener.open(tcp_config(), 1, {"web": wrong})
        assert wrong.fileno() == -1  # closed, not leaked


def test_where_a_tcp_onramp_listens():
    assert cli._where(tcp_config("127.0.0.1:8443")) == "tcp 127.0.0.1:8443 -> 10.77.0.2:443 (tenant acme)"


def test_the_worker_serves_what_the_supervisor_bound():
    """The fd a worker is passed, by its name, is served by the tcp kind's class."""
    (listener,) = listeners.open_onramps([tcp_config()], workers=2)

    async def main() -> None:
        ((fdname, fd),) = listener.fds_for(1).items()
        name, cls = resolve(fdname)
        host, port = listener.sock.getsockname()
        sock = socket.socket(fileno=socket.dup(fd))  # the worker's copy of the one listener
        served = Served(sock, Log(), settings(host, port))
        assert isinstance(served.onramp, cls) and name == "web"
        client = connect(listener.sock)
        await until(lambda: served.streams.calls)
        assert served.streams.calls[0][2] == client.getsockname()
        client.close()
        await served.close()

    try:
        asyncio.run(main())
    finally:
        listener.close()
