"""The off-ramp connector with real non-blocking connects on loopback: a connect the kernel
finished in the call is reported on the loop's next turn, one still in flight when its handshake
ends, a forgotten one never (even when its fd number is reused at once)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ipferry.worker.connector import Connector

pytestmark = pytest.mark.timeout(30)


def connecting(address: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    s.connect_ex(address)
    return s


def test_connected_in_the_call_is_reported_next_turn() -> None:
    async def main():
        done: list[str] = []
        c = Connector(done.append)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            s = connecting(listener.getsockname())
            c.watch(s.fileno(), "first")
            assert done == []  # never from inside watch(): the caller is mid-way
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            s.close()
        c.close()
        return done

    assert asyncio.run(main()) == ["first"]


def test_in_flight_then_done_and_forgotten() -> None:
    """A full accept queue holds SYNs: those connects stay in flight until it has room."""
    async def main():
        loop = asyncio.get_running_loop()
        done: list[int] = []
        c = Connector(done.append)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        socks = [connecting(address) for _ in range(4)]
        for i, s in enumerate(socks):
            c.watch(s.fileno(), i)
        await asyncio.sleep(0.2)
        early = sorted(done)
        assert 0 < len(early) < 4, f"the accept queue should hold some SYNs: {early}"
        late = [i for i in range(4) if i not in early]
        c.forget(socks[late[-1]].fileno())  # given up: never reported
        while len(done) < 3:  # room in the queue: the SYNs retransmitted get through
            conn, _ = await loop.sock_accept(listener)
            conn.close()
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
        for s in socks:
            s.close()
        listener.close()
        c.close()
        return early, late, done

    early, late, done = asyncio.run(asyncio.wait_for(main(), 25))
    assert sorted(done) == sorted(early + late[:-1])
    assert late[-1] not in done


def test_forgotten_before_its_turn_is_never_reported_even_on_a_reused_fd() -> None:
    async def main():
        done: list[str] = []
        c = Connector(done.append)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            s = connecting(listener.getsockname())
            fd = s.fileno()
            c.watch(fd, "old")
            c.forget(fd)
            s.close()
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            assert t.fileno() == fd  # the kernel reuses the lowest free number
            c._waiting[fd] = "new, not connecting"  # watched again, still in flight
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            t.close()
        c.close()
        return done

    assert asyncio.run(main()) == []
