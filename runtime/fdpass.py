"""The message protocol between ipferry's processes: JSON messages with named fds beside them.

Every control link (supervisor <-> nsd, supervisor <-> worker, nsd <-> worker) is a
``SOCK_SEQPACKET`` socketpair, so one ``sendmsg`` is one message and fds travel with it as
SCM_RIGHTS. A message is a JSON object with a protocol version ``v``, a ``type`` and, when fds
ride along, ``fds``: their logical names in the order they were attached (as Pingora names its
passed listeners), so a receiver asks for ``fds["tun"]``, never for "the second fd".
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1
MAX_MESSAGE = 256 * 1024
MAX_FDS = 250  # SCM_MAX_FD is 253


class ProtocolError(Exception):
    """The peer spoke something other than our protocol version or sent a broken message."""


class MessageTooLarge(ProtocolError):
    """A message larger than one datagram of the link carries (``EMSGSIZE``). Nothing was sent
    and the channel is fine: the sender's bug, never the peer's death."""


class ChannelClosed(EOFError):
    """The peer closed its end (it exited or was killed)."""


class ChannelBusy(ChannelClosed):
    """The peer is not reading: the socket buffer is full. Nothing was sent; the channel stays
    open (:meth:`AsyncChannel.send_when_ready` waits for room instead)."""


@dataclass
class Message:
    type: str
    body: dict
    fds: dict[str, int] = field(default_factory=dict)

    def take_fd(self, name: str) -> int:
        """Take ownership of a named fd (it will not be closed by :meth:`close_fds`)."""
        return self.fds.pop(name)

    def close_fds(self) -> None:
        """Close every fd nobody took, so an ignored message leaks nothing."""
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def __getitem__(self, key: str):
        return self.body[key]

    def get(self, key: str, default=None):
        return self.body.get(key, default)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of SEQPACKET sockets, close-on-exec (pass one end with ``pass_fds``)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def encode(type_: str, body: Mapping | None, fd_names: list[str]) -> bytes:
    msg = {"v": PROTOCOL_VERSION, "type": type_, **(body or {})}
    if fd_names:
        msg["fds"] = fd_names
    # default=str: an application's context may hold values JSON does not know; they cross as text.
    data = json.dumps(msg, separators=(",", ":"), default=str).encode()
    if len(data) > MAX_MESSAGE:
        raise MessageTooLarge(f"message {type_!r} is {len(data)} bytes, over {MAX_MESSAGE}")
    return data


def decode(data: bytes, fds: list[int]) -> Message:
    try:
        msg = json.loads(data)
    except ValueError as exc:
        _close_all(fds)
        raise ProtocolError(f"undecodable message: {exc}") from None
    if not isinstance(msg, dict) or msg.get("v") != PROTOCOL_VERSION or "type" not in msg:
        _close_all(fds)
        raise ProtocolError(
            f"expected protocol version {PROTOCOL_VERSION}, got {str(msg)[:120]!r}"
        )
    names = msg.pop("fds", [])
    if len(names) != len(fds):
        _close_all(fds)
        raise ProtocolError(f"message {msg['type']!r} names {len(names)} fds but carries {len(fds)}")
    type_ = msg.pop("type")
    msg.pop("v")
    return Message(type_, msg, dict(zip(names, fds, strict=True)))


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send(sock: socket.socket, type_: str, body: Mapping | None = None,
         fds: Mapping[str, int] | None = None) -> None:
    """Send one message, blocking. ``fds`` maps logical names to fds (they stay open here)."""
    names = list(fds or {})
    data = encode(type_, body, names)
    try:
        if fds:
            socket.send_fds(sock, [data], [fds[n] for n in names])
        else:
            sock.sendall(data)
    except OSError as exc:
        if exc.errno == errno.EMSGSIZE:  # over what the socket's buffer takes in one datagram
            raise MessageTooLarge(f"message {type_!r} is {len(data)} bytes, more than the "
                                  f"link takes at once") from None
        raise


def recv(sock: socket.socket) -> Message:
    """Receive one message, blocking. Raises :class:`ChannelClosed` at EOF."""
    # CLOEXEC: a received fd must never leak into a process we spawn later.
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    if not data and not fds:
        raise ChannelClosed("peer closed the channel")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_all(fds)
        raise ProtocolError("message truncated")
    return decode(data, fds)


class AsyncChannel:
    """One end of a control link, driven by an asyncio loop.

    Messages that answer a request (they carry the request's ``id``) resolve that request's future;
    everything else lands in :attr:`inbox`. At EOF every waiter fails with :class:`ChannelClosed`
    and the inbox gets ``None``.
    """

    def __init__(self, sock: socket.socket, name: str = "channel") -> None:
        self.sock = sock
        self.name = name
        sock.setblocking(False)
        self.inbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 1
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        # Drain everything queued before yielding back to the loop.
        while not self.closed:
            try:
                msg = recv(self.sock)
            except BlockingIOError:
                return
            except (ChannelClosed, ConnectionError, OSError):
                self._shutdown()
                return
            except ProtocolError:
                self._shutdown()
                return
            reply_to = msg.body.get("reply_to")
            fut = self._pending.pop(reply_to, None) if reply_to is not None else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif fut is None and reply_to is not None:
                msg.close_fds()  # an answer nobody waits for any more (timed out)
            else:
                self.inbox.put_nowait(msg)

    def send(self, type_: str, body: Mapping | None = None,
             fds: Mapping[str, int] | None = None) -> None:
        if self.closed:
            raise ChannelClosed(f"{self.name} is closed")
        try:
            send(self.sock, type_, body, fds)
        except BlockingIOError:
            # Control messages are small and rare; a full socket buffer means the peer is stuck
            # (or busy: send_when_ready waits for room).
            raise ChannelBusy(f"{self.name}: peer is not reading") from None
        except OSError as exc:
            self._shutdown()
            raise ChannelClosed(f"{self.name}: {exc}") from None
        # MessageTooLarge (a ProtocolError) goes up as it is: the channel is not closed by it.

    async def send_when_ready(self, type_: str, body: Mapping | None = None,
                              timeout: float = 5.0) -> None:
        """Send, waiting up to ``timeout`` for room while the peer's queue is full (e.g. several
        large replies in a row); then :class:`ChannelBusy`. Never blocks the loop."""
        deadline = self._loop.time() + timeout
        while True:
            try:
                return self.send(type_, body)
            except ChannelBusy:
                left = deadline - self._loop.time()
                if left <= 0:
                    raise
            room = self._loop.create_future()
            fd = self.sock.fileno()
            self._loop.add_writer(fd, _wake, room)
            try:
                await asyncio.wait_for(room, left)
            except TimeoutError:
                pass
            finally:
                if not self.closed:
                    self._loop.remove_writer(fd)

    async def reply_when_ready(self, request: Message, type_: str, body: Mapping | None = None,
                               timeout: float = 5.0) -> None:
        await self.send_when_ready(type_, {**(body or {}), "reply_to": request.body.get("id")},
                                   timeout)

    async def request(self, type_: str, body: Mapping | None = None,
                      fds: Mapping[str, int] | None = None, timeout: float = 5.0) -> Message:
        """Send a request and wait for the message whose ``reply_to`` is its ``id``."""
        req_id = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Message] = self._loop.create_future()
        self._pending[req_id] = fut
        try:
            self.send(type_, {**(body or {}), "id": req_id}, fds)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(req_id, None)

    def reply(self, request: Message, type_: str, body: Mapping | None = None,
              fds: Mapping[str, int] | None = None) -> None:
        self.send(type_, {**(body or {}), "reply_to": request.body.get("id")}, fds)

    def _shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{self.name} closed"))
        self._pending.clear()
        self.inbox.put_nowait(None)

    def close(self) -> None:
        self._shutdown()
        self.sock.close()
