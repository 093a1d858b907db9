"""The data path's part in a stream, alone: accept, connect the upstream, run the handler.

Run as a script (inside the test's namespace): it loads ``--app`` as a worker does
(``load_application``: ``module:Class``, importable from ``PYTHONPATH``), listens on ``--listen``,
and for each connection it accepts, connects ``--upstream`` and runs
``application_handler(lambda: app, log)`` between the two sockets, with a flow that says the
client asked for ``--dst``; it closes both sockets when the handler returns, as the driver does.
It prints ``ready`` once listening; the worker's structured log goes to stderr. On uvloop, as the
worker prefers.

    python relay_harness.py --app ssh_auditor:SshAuditor --listen 127.0.0.1:2200 \\
        --upstream 127.0.0.1:2222 --dst 198.18.0.1:22
"""

from __future__ import annotations

import argparse
import asyncio
import socket

from ipferry.engine.decisions import Decision, TunnelContext
from ipferry.engine.flows import Flow, FlowKey
from ipferry.engine.legs import AcceptedLeg, StreamLeg
from ipferry.runtime import child, logs
from ipferry.wire.packet import IPPROTO_TCP
from ipferry.worker.app import load_application
from ipferry.worker.relay import abort
from ipferry.worker.streams import application_handler


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def main(args: argparse.Namespace) -> None:
    log = logs.configure("worker", 0)
    app = load_application(args.app)
    handler = application_handler(lambda: app, log)
    loop = asyncio.get_running_loop()
    listen, upstream, dst = hostport(args.listen), hostport(args.upstream), hostport(args.dst)
    listener = socket.create_server(listen, family=family(listen[0]))
    listener.setblocking(False)
    tasks: set[asyncio.Task] = set()

    async def serve(conn: socket.socket, peer: tuple) -> None:
        conn.setblocking(False)
        up = socket.socket(family(upstream[0]), socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            try:
                await loop.sock_connect(up, upstream)
            except OSError as exc:
                log.warning("harness_upstream_failed", error=str(exc))
                abort(conn)
                return
            key = FlowKey(args.tenant, IPPROTO_TCP, socket.inet_pton(family(peer[0]), peer[0]),
                          peer[1], socket.inet_pton(family(dst[0]), dst[0]), dst[1])
            leg = AcceptedLeg(args.tenant, TunnelContext(args.tenant, {}), None, "harness", 0)
            flow = Flow(key, Decision.upgrade(upstream, layer="stream"), loop.time(), leg)
            flow.server = StreamLeg(upstream)
            await handler(flow, conn, up)
        finally:
            conn.close()
            up.close()

    print("ready", flush=True)
    while True:
        conn, peer = await loop.sock_accept(listener)
        task = asyncio.ensure_future(serve(conn, peer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--dst", required=True, help="the destination the flow says was asked")
    parser.add_argument("--tenant", default="acme")
    arguments = parser.parse_args()
    child.run(lambda: main(arguments), prefer_uvloop=True)
