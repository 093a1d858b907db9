"""On-ramps by kind: the fd names the supervisor passes, the registries on both sides, and the
on-ramps' own tasks cancelled and drained at stop. No root: unix sockets and loopback UDP only."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import typing
from pathlib import Path

import pytest

from ipferry.runtime import fdnames
from ipferry.runtime.settings import GueSettings, WorkerSettings
from ipferry.supervisor import cli, config, listeners
from ipferry.wire import gue as gue_wire
from ipferry.worker import onramps
from ipferry.worker.app import TunnelContext
from ipferry.worker.onramps import OnrampRefused, OnrampUnusable, Wiring, resolve
from ipferry.worker.onramps.gue import GueOnramp
from ipferry.worker.onramps.seqpacket import SeqpacketOnramp

PACKET = bytes([0x45]) + bytes(19)  # the start of an IPv4 header: all GUE decapsulation checks


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **kw: self.events.append((level, event, kw))

    def named(self, event: str) -> list[dict]:
        return [kw for _, e, kw in self.events if e == event]


# -- fd names ----------------------------------------------------------------------------------

def test_an_onramp_fd_name_carries_kind_and_name():
    name = fdnames.onramp("gue", "edge-1")
    assert name == "onramp:gue:edge-1"
    assert fdnames.is_onramp(name)
    assert fdnames.parse_onramp(name) == ("gue", "edge-1")


@pytest.mark.parametrize("fdname", [
    "onramp:tunnel",  # the old form: no kind
    "gue:edge",  # the old GUE form
    "onramp::edge", "onramp:gue:", "onramp:GUE:edge", "onramp:gue:a:b", "onramp:gue:1st",
    "mesh:1", "tun", "onramp:" + "k" * 33 + ":edge",
])
def test_a_malformed_onramp_fd_name_is_refused(fdname):
    with pytest.raises(fdnames.BadFdName):
        fdnames.parse_onramp(fdname)


def test_only_onramp_fds_are_taken_for_onramps():
    assert not fdnames.is_onramp("tun") and not fdnames.is_onramp("mesh:2")
    assert not fdnames.is_onramp("upgrade4") and fdnames.is_onramp("onramp:x")


@pytest.mark.parametrize("kind,name", [("Gue", "x"), ("gue", "a:b"), ("", "x"), ("gue", "")])
def test_no_malformed_name_is_made(kind, name):
    with pytest.raises(fdnames.BadFdName):
        fdnames.onramp(kind, name)


# -- the registries ----------------------------------------------------------------------------

def config_kinds() -> set[str]:
    """The kinds the config accepts: the tags of its on-ramp union."""
    union = typing.get_args(config.Onramp)[0]
    return {typing.get_args(member)[1].tag for member in typing.get_args(union)}


def test_worker_and_supervisor_know_the_configs_kinds():
    assert config_kinds() == {"tunnel", "gue", "tcp", "http"}
    assert set(onramps.kinds()) == config_kinds()
    assert set(listeners._KINDS) == config_kinds()
    for kind in config_kinds():
        assert listeners.listener_class(kind).kind == kind
        name, cls = resolve(fdnames.onramp(kind, "x"))
        assert name == "x" and cls.kind == kind  # type: ignore[attr-defined]


def test_the_kinds_classes():
    assert resolve("onramp:tunnel:tunnel")[1] is SeqpacketOnramp
    assert resolve("onramp:gue:edge")[1] is GueOnramp
    assert listeners.listener_class("tunnel") is listeners.SeqpacketListener
    assert listeners.listener_class("gue") is listeners.GueListener


def test_an_unknown_kind_is_refused_by_name():
    with pytest.raises(OnrampRefused, match="unknown on-ramp kind 'quic'"):
        resolve("onramp:quic:edge")
    with pytest.raises(OnrampRefused, match="expected onramp:<kind>:<name>"):
        resolve("onramp:edge")
    with pytest.raises(listeners.ListenerError, match="'quic'"):
        listeners.listener_class("quic")


def test_a_kind_is_registered_once():
    with pytest.raises(ValueError, match="twice"):
        onramps.register("gue")(type("Other", (), {}))
    assert resolve("onramp:gue:x")[1] is GueOnramp


def test_each_worker_gets_its_fds_named_by_kind():
    shared = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    group = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        tunnel = listeners.SeqpacketListener("tunnel", shared)
        gue = listeners.GueListener("edge", group[0].dup(), address="127.0.0.1:1", group=group)
        for worker in range(3):
            assert tunnel.fds_for(worker) == {"onramp:tunnel:tunnel": shared.fileno()}
            assert gue.fds_for(worker) == {"onramp:gue:edge": group[worker].fileno()}
        gue.close()
        assert all(s.fileno() == -1 for s in group) and gue.sock.fileno() == -1
    finally:
        shared.close()


def test_where_each_kind_listens(tmp_path):
    tunnel = config.TunnelOnramp(name="t", path=tmp_path / "t.sock")
    gue = config.GueOnramp(kind="gue", name="g", listen="127.0.0.1:6080")
    assert cli._where(tunnel) == str(tmp_path / "t.sock")
    assert cli._where(gue) == "udp 127.0.0.1:6080 (GUE)"


def test_the_worker_closes_an_fd_it_cannot_take():
    from ipferry.worker.__main__ import Worker

    async def main() -> None:
        control, _peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log = Log()
        worker = Worker(0, control, log)
        kept = []
        # Unknown kind, no kind, taken, and the same again (a re-equip repeats on-ramps held).
        for fdname in ("onramp:quic:edge", "onramp:edge", "onramp:tunnel:t", "onramp:tunnel:t"):
            fd = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).detach()
            worker.take_onramp(fdname, fd)
            try:
                os.fstat(fd)
            except OSError:
                continue  # closed
            kept.append(fdname)
        assert kept == ["onramp:tunnel:t"]
        refused = log.named("onramp_refused")
        assert [r["fd"] for r in refused] == ["onramp:quic:edge", "onramp:edge"]
        assert "unknown on-ramp kind 'quic'" in refused[0]["error"]
        assert list(worker.onramp_socks) == ["t"]
        assert worker.onramp_socks["t"][0] is SeqpacketOnramp
        worker.onramp_socks["t"][1].close()
        worker.control.close()
        _peer.close()

    asyncio.run(main())


# -- connected tunnels -------------------------------------------------------------------------

def wiring(log: Log, *, parse_context=None, app_parse_context=None, settings=None,
           packets: list | None = None, closed: list | None = None) -> Wiring:
    async def accept(raw: bytes) -> TunnelContext:
        return TunnelContext("acme", {"raw": raw.decode()})

    return Wiring(worker=3, log=log, settings=settings or WorkerSettings.model_construct(gue={}, workers=4),
                  parse_context=parse_context or accept,
                  app_parse_context=app_parse_context or (lambda raw: TunnelContext("acme")),
                  on_packet=lambda t, p: (packets if packets is not None else []).append((t, p)),
                  on_close=lambda t, r: (closed if closed is not None else []).append((t, r)))


def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(path))
    sock.listen(16)
    return sock


async def until(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_a_connected_tunnel_opens_carries_and_closes(tmp_path):
    async def main() -> None:
        log, packets, closed = Log(), [], []
        listener = listen(tmp_path / "t.sock")
        onramp = SeqpacketOnramp("t", listener, wiring(log, packets=packets, closed=closed))
        onramp.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(str(tmp_path / "t.sock"))
        client.send(b"ctx")
        await until(lambda: len(onramp.tunnels()) == 1)
        (tunnel,) = onramp.tunnels()
        assert (tunnel.tenant, tunnel.origin, tunnel.local, tunnel.steered) == ("acme", 3, True, False)
        assert tunnel.context.extra == {"raw": "ctx"} and onramp.find(tunnel.id) is tunnel
        assert tunnel.as_dict()["kind"] == "tunnel" and tunnel.as_dict()["onramp"] == "t"
        client.send(b"packet")
        await until(lambda: packets)
        assert packets == [(tunnel, b"packet")]
        tunnel.send(b"reply")
        assert client.recv(100) == b"reply"
        client.close()
        await until(lambda: closed)
        assert closed == [(tunnel, "closed_by_peer")] and tunnel.closed and not onramp.tunnels()
        await onramp.stop()
        listener.close()

    asyncio.run(main())


def test_stop_cancels_and_drains_context_hooks_and_closes_waiting_tunnels(tmp_path):
    async def main() -> None:
        log, started, cancelled = Log(), asyncio.Event(), []

        async def slow(raw: bytes) -> TunnelContext:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(raw)
                raise
            return TunnelContext("never")

        listener = listen(tmp_path / "t.sock")
        onramp = SeqpacketOnramp("t", listener, wiring(log, parse_context=slow))
        onramp.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(str(tmp_path / "t.sock"))
        client.send(b"ctx")
        await asyncio.wait_for(started.wait(), 3)
        assert onramp.starting == 1 and len(onramp._tasks) == 1
        t0 = time.monotonic()
        await onramp.stop(timeout=2)
        assert time.monotonic() - t0 < 1
        assert cancelled == [b"ctx"] and not onramp._tasks and onramp.starting == 0
        client.settimeout(2)
        assert client.recv(100) == b""  # its socket was closed, not left behind
        assert not log.named("onramp_tasks_left")
        client.close()
        listener.close()

    asyncio.run(main())


def test_stop_waits_a_bounded_time_for_a_hook_that_will_not_end(tmp_path):
    async def main() -> None:
        log, started = Log(), asyncio.Event()
        release = asyncio.Event()

        async def stubborn(raw: bytes) -> TunnelContext:
            started.set()
            while not release.is_set():
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    continue  # ignores cancellation
            raise ValueError("late")

        listener = listen(tmp_path / "t.sock")
        onramp = SeqpacketOnramp("t", listener, wiring(log, parse_context=stubborn))
        onramp.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(str(tmp_path / "t.sock"))
        client.send(b"ctx")
        await asyncio.wait_for(started.wait(), 3)
        t0 = time.monotonic()
        await onramp.stop(timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 1.5
        assert log.named("onramp_tasks_left") == [{"onramp": "t", "tasks": 1}]
        release.set()
        await until(lambda: not onramp._tasks)
        client.close()
        listener.close()

    asyncio.run(main())


# -- GUE ---------------------------------------------------------------------------------------

def gue_settings(**conf) -> WorkerSettings:
    conf = {"allow": [], "tenants": [], "address": ("127.0.0.1", 6080), **conf}
    return WorkerSettings.model_construct(gue={"edge": GueSettings(**conf)})


def test_a_gue_socket_without_its_settings_is_not_served():
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            with pytest.raises(OnrampUnusable, match="edge"):
                GueOnramp("edge", sock, wiring(Log()))
            onramp = GueOnramp("edge", sock, wiring(Log(), settings=gue_settings(
                address=("0.0.0.0", 6080))))
            assert onramp.endpoints == ((None, 6080),)  # flows never go back to it
            assert onramp.find(1) is None  # steered: no reply crosses the mesh for it

    asyncio.run(main())


def test_gue_stop_cancels_and_drains_async_context_decisions():
    async def main() -> None:
        log, packets, started, cancelled = Log(), [], asyncio.Event(), []

        async def slow(raw: bytes) -> TunnelContext:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(raw)
                raise
            return TunnelContext("never")

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        onramp = GueOnramp("edge", sock, wiring(log, app_parse_context=slow, packets=packets,
                                                settings=gue_settings()))
        onramp.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(gue_wire.header(b"ctx", 4) + PACKET, sock.getsockname())
            await asyncio.wait_for(started.wait(), 3)
            assert len(onramp._tasks) == 1 and not packets  # dropped while the hook decides
            await onramp.stop(timeout=2)
        assert cancelled == [b"ctx"] and not onramp._tasks and not onramp._pending
        sock.close()

    asyncio.run(main())


def test_gue_tunnels_open_and_idle_ones_are_swept_asking_for_flows_only_then(monkeypatch):
    async def main() -> None:
        log, packets = Log(), []
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        onramp = GueOnramp("edge", sock, wiring(log, packets=packets, settings=gue_settings()))
        onramp.start()
        asked = []

        def in_use() -> set[int]:
            asked.append(1)
            return set()

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(gue_wire.header(b"ctx", 4) + PACKET, sock.getsockname())
            await until(lambda: packets)
        (tunnel,) = onramp.tunnels()
        assert packets == [(tunnel, PACKET)] and tunnel.steered and tunnel.tenant == "acme"
        onramp.sweep(in_use)
        assert not asked and list(onramp.tunnels()) == [tunnel]  # nothing idle: flows not walked
        tunnel.last_seen -= 10_000
        onramp.sweep(in_use)
        assert asked == [1] and not onramp.tunnels() and tunnel.closed
        await onramp.stop()
        sock.close()

    asyncio.run(main())
