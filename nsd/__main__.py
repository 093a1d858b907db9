"""nsd, the namespace helper: ``python -m ipferry.nsd --control-fd N``.

Handshake with the supervisor on the control channel (each step one message):

1. nsd -> ``hello`` {pid}
2. supervisor -> ``setup`` {blocks, mtu, offload, sysctls}
3. nsd unshares its user+net namespace -> ``namespace_ready`` {user_ns, net_ns}
   (or ``error`` {cause, fix} and exit 2 when the host forbids it)
4. nsd -> one ``worker_equipment`` {block} per worker, fds ``tun``, ``upgrade4``, ``upgrade6``
5. nsd -> ``network_ready``

Then nsd serves requests until the control channel closes: ``ping`` -> ``pong``;
``open_channel`` {worker} -> ``channel`` with fd ``nsd`` (a fresh link between that worker and nsd).

On a worker's link: ``ping`` -> ``pong``; ``connect`` {address, port} -> ``socket`` with fd
``socket``: a TCP socket of the namespace, connecting (non-blocking) to that NAT slot of the
worker's own block, for a stream downgraded into a device's tunnel (the kernel's SYN comes out of
the worker's TUN); or ``error`` {error}.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import sys

from ipferry.runtime import child, fdpass
from ipferry.runtime.logs import set_level

from .addressing import WorkerBlock
from .namespace import HostError, enter_user_and_net_namespace, namespace_ids, write_sysctls


def _block(d: dict) -> WorkerBlock:
    return WorkerBlock(d["index"], d["tun"], ipaddress.IPv4Network(d["ipv4"]),
                       ipaddress.IPv6Network(d["ipv6"]))


def handshake(control: socket.socket, log) -> dict[int, WorkerBlock]:
    """Steps 1-5 above, blocking: nothing else runs before the network is ready. Returns the
    workers' blocks."""
    fdpass.send(control, "hello", {"pid": os.getpid()})
    setup = fdpass.recv(control)
    if setup.type != "setup":
        raise fdpass.ProtocolError(f"expected setup, got {setup.type}")
    try:
        enter_user_and_net_namespace()
    except HostError as exc:
        fdpass.send(control, "error", {"cause": exc.cause, "fix": exc.fix})
        sys.exit(2)
    fdpass.send(control, "namespace_ready", namespace_ids())

    # pyroute2 is imported only now: the unshare above must happen while we are single-threaded.
    from pyroute2 import IPRoute

    from .network import DEFAULT_SYSCTLS, add_worker_tun, bring_up_loopback

    failed = write_sysctls({**DEFAULT_SYSCTLS, **setup["sysctls"]})
    for key, reason in failed.items():
        log.warning("sysctl_not_set", key=key, reason=reason)
    blocks: dict[int, WorkerBlock] = {}
    with IPRoute() as ipr:
        bring_up_loopback(ipr)
        for raw in setup["blocks"]:
            block = blocks[raw["index"]] = _block(raw)
            try:
                equipment = add_worker_tun(ipr, block, setup["mtu"],
                                           offload=setup.get("offload", False))
            except HostError as exc:
                fdpass.send(control, "error", {"cause": exc.cause, "fix": exc.fix})
                sys.exit(2)
            # The supervisor keeps these for the worker's whole life (and its restarts).
            fdpass.send(control, "worker_equipment", {"block": block.as_dict()}, equipment.fds())
            equipment.close()
    fdpass.send(control, "network_ready")
    return blocks


class NamespaceHelper:
    """Serves the control channel and one channel per worker, inside the namespace."""

    def __init__(self, control: socket.socket, log,
                 blocks: dict[int, WorkerBlock] | None = None) -> None:
        self.control = fdpass.AsyncChannel(control, "control")
        self.log = log
        self.worker_channels: dict[int, fdpass.AsyncChannel] = {}
        self.blocks = blocks or {}  # by worker: a worker may only connect into its own
        self.tasks: set[asyncio.Task] = set()

    async def serve(self) -> None:
        while (msg := await self.control.inbox.get()) is not None:
            self.dispatch(self.control, msg)
        self.log.info("control_channel_closed")

    def dispatch(self, channel: fdpass.AsyncChannel, msg: fdpass.Message) -> None:
        handler = getattr(self, f"handle_{msg.type}", None)
        if handler is None:
            self.log.warning("unknown_request", type=msg.type, channel=channel.name)
            msg.close_fds()
            return
        handler(channel, msg)

    def handle_ping(self, channel: fdpass.AsyncChannel, msg: fdpass.Message) -> None:
        channel.reply(msg, "pong", {"pid": os.getpid()})

    def handle_connect(self, channel: fdpass.AsyncChannel, msg: fdpass.Message) -> None:
        """A downgraded stream's socket: connecting from inside the namespace to a NAT slot of the
        asking worker's block (only there: its packets must come out of that worker's TUN)."""
        worker = next((w for w, link in self.worker_channels.items() if link is channel), None)
        block = self.blocks.get(worker) if worker is not None else None
        try:
            address = ipaddress.ip_address(msg["address"])
            port = int(msg["port"])
            if not 0 < port < 65536:
                raise ValueError(f"port {port}")
        except (KeyError, TypeError, ValueError) as exc:
            channel.reply(msg, "error", {"error": f"bad connect request: {exc}"})
            return
        if block is None or address not in (block.ipv4 if address.version == 4 else block.ipv6):
            channel.reply(msg, "error", {"error": f"{address} is not in the worker's block"})
            return
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            channel.reply(msg, "error", {"error": f"socket: {exc.strerror}"})
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((str(address), port))
            if err not in (0, errno.EINPROGRESS):
                channel.reply(msg, "error", {"error": f"connect: {os.strerror(err)}"})
                return
            channel.reply(msg, "socket", {}, {"socket": sock.fileno()})
        finally:
            sock.close()  # the worker has its own copy now (or nothing was sent)

    def handle_open_channel(self, channel: fdpass.AsyncChannel, msg: fdpass.Message) -> None:
        worker = int(msg["worker"])
        ours, theirs = fdpass.channel_pair()
        old = self.worker_channels.pop(worker, None)
        if old is not None:
            old.close()
        link = fdpass.AsyncChannel(ours, f"worker{worker}")
        self.worker_channels[worker] = link
        channel.reply(msg, "channel", {"worker": worker}, {"nsd": theirs.fileno()})
        theirs.close()
        task = asyncio.get_running_loop().create_task(self.serve_worker(worker, link))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def handle_reconfigure(self, channel: fdpass.AsyncChannel, msg: fdpass.Message) -> None:
        set_level(msg["log_level"])

    async def serve_worker(self, worker: int, channel: fdpass.AsyncChannel) -> None:
        while (msg := await channel.inbox.get()) is not None:
            self.dispatch(channel, msg)
        if self.worker_channels.get(worker) is channel:
            del self.worker_channels[worker]
        channel.close()


def main(argv: list[str] | None = None) -> int:
    _, control, log = child.start("nsd", argv, __doc__)
    try:
        blocks = handshake(control, log)
    except (fdpass.ChannelClosed, ConnectionError):
        return 1  # the supervisor went away mid-handshake
    log.info("nsd_ready", pid=os.getpid(), **namespace_ids())

    async def run() -> None:
        loop = asyncio.get_running_loop()
        # SIGTERM: stop serving; the namespace goes when the last fd into it closes.
        stop = asyncio.Event()
        child.stop_on_sigterm(stop.set)
        helper = NamespaceHelper(control, log, blocks)
        serve = loop.create_task(helper.serve())
        await asyncio.wait([serve, loop.create_task(stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)

    child.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
