"""The control protocol over real SEQPACKET socketpairs, with real fds crossing."""

import asyncio
import os
import socket

import pytest

from ipferry.runtime import fdpass


def test_named_fds_cross_and_refer_to_the_same_file(tmp_path):
    a, b = fdpass.channel_pair()
    path = tmp_path / "f"
    path.write_text("hello")
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    fdpass.send(a, "equip", {"worker": 3}, {"file": fd, "pipe": w})
    msg = fdpass.recv(b)
    assert msg.type == "equip" and msg["worker"] == 3
    assert set(msg.fds) == {"file", "pipe"}
    assert os.read(msg.fds["file"], 5) == b"hello"
    os.write(msg.fds["pipe"], b"x")
    assert os.read(r, 1) == b"x"
    got = msg.take_fd("file")
    msg.close_fds()
    assert msg.fds == {}
    os.fstat(got)  # still ours
    os.close(got)
    for f in (fd, r, w):
        os.close(f)


def test_version_mismatch_is_refused_and_fds_closed():
    a, b = fdpass.channel_pair()
    r, w = os.pipe()
    socket.send_fds(a, [b'{"v": 99, "type": "hello", "fds": ["p"]}'], [w])
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(fdpass.ProtocolError, match="protocol version 1"):
        fdpass.recv(b)
    assert len(os.listdir("/proc/self/fd")) == before  # the received copy was closed


def test_fd_count_mismatch_is_refused():
    a, b = fdpass.channel_pair()
    socket.send_fds(a, [b'{"v": 1, "type": "x", "fds": ["a", "b"]}'], [a.fileno()])
    with pytest.raises(fdpass.ProtocolError, match="names 2 fds but carries 1"):
        fdpass.recv(b)


def test_eof_is_channel_closed():
    a, b = fdpass.channel_pair()
    a.close()
    with pytest.raises(fdpass.ChannelClosed):
        fdpass.recv(b)


def test_async_request_reply_and_eof():
    async def main():
        a, b = fdpass.channel_pair()
        client = fdpass.AsyncChannel(a, "client")
        server = fdpass.AsyncChannel(b, "server")

        async def serve():
            while (msg := await server.inbox.get()) is not None:
                server.reply(msg, "pong", {"n": msg["n"]})

        task = asyncio.create_task(serve())
        replies = await asyncio.gather(*(client.request("ping", {"n": i}) for i in range(50)))
        assert [r["n"] for r in replies] == list(range(50))
        server.close()
        with pytest.raises(fdpass.ChannelClosed):
            await client.request("ping", {"n": 0}, timeout=2)
        await task
        assert await client.inbox.get() is None

    asyncio.run(main())


def test_a_message_too_large_is_refused_and_the_channel_lives_on():
    async def main():
        a, b = fdpass.channel_pair()
        client = fdpass.AsyncChannel(a, "client")
        server = fdpass.AsyncChannel(b, "server")
        # Over our limit, or over what the kernel takes in one datagram (~208 KiB by default):
        # either way MessageTooLarge, nothing sent, nothing closed.
        for size in (300_000, 220_000):
            with pytest.raises(fdpass.MessageTooLarge):
                client.send("big", {"x": "y" * size})
            assert not client.closed
        client.send("small", {"n": 1})
        msg = await asyncio.wait_for(server.inbox.get(), 2)
        assert msg.type == "small" and msg["n"] == 1
        assert not isinstance(fdpass.MessageTooLarge("x"), fdpass.ChannelClosed)
        client.close()
        server.close()

    asyncio.run(main())


def test_send_when_ready_waits_for_a_busy_peer():
    async def main():
        a, b = fdpass.channel_pair()
        client = fdpass.AsyncChannel(a, "client")
        b.setblocking(False)
        chunk = {"x": "y" * 90_000}
        sent = 0
        with pytest.raises(fdpass.ChannelBusy):  # still a ChannelClosed for older callers
            for _ in range(100):
                client.send("part", chunk)
                sent += 1
        assert not client.closed and sent >= 1

        async def drain_later():
            await asyncio.sleep(0.2)
            for _ in range(sent + 1):
                while True:
                    try:
                        fdpass.recv(b)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.01)

        reader = asyncio.create_task(drain_later())
        await client.send_when_ready("part", chunk, timeout=5)  # waits for room, then sends
        await reader
        with pytest.raises(fdpass.ChannelBusy):  # nobody reads: given up after the timeout
            for _ in range(100):
                await client.send_when_ready("part", chunk, timeout=0.2)
        client.close()
        b.close()

    asyncio.run(main())
