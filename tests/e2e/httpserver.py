"""The end-to-end tests' HTTP upstream (aiohttp, run inside the test's namespace).

``python httpserver.py ADDR PORT [NAME]``: prints ``ready`` once listening. Routes:

- ``GET /hello``: ``hello from NAME``; ``GET /headers``: the request's headers as JSON;
- ``POST|PUT /sha256``: the body's SHA-256 and length (read as it streams, never whole);
- ``GET /bytes/N``: N bytes (streamed);
- ``GET /ws``: a WebSocket echo.
"""

from __future__ import annotations

import hashlib
import json
import sys

from aiohttp import WSMsgType, web


def app(name: str) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name}\n")

    async def headers(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps({"name": name, "method": request.method,
                                             "path": request.path_qs,
                                             "headers": dict(request.headers)}),
                            content_type="application/json")

    async def sha256(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        return web.Response(text=json.dumps({"sha256": digest.hexdigest(), "size": size}),
                            content_type="application/json")

    async def many(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse()
        resp.content_length = n
        await resp.prepare(request)
        block = b"x" * (1 << 16)
        while n > 0:
            await resp.write(block[:n])
            n -= len(block)
        await resp.write_eof()
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(f"{name}: {msg.data}")
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    application = web.Application()
    application.router.add_get("/hello", hello)
    application.router.add_get("/headers", headers)
    application.router.add_route("*", "/sha256", sha256)
    application.router.add_get("/bytes/{n:\\d+}", many)
    application.router.add_get("/ws", ws)
    return application


async def main(addr: str, port: int, name: str) -> None:
    runner = web.AppRunner(app(name), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, addr, port).start()
    print("ready", flush=True)
    import asyncio
    await asyncio.Event().wait()


if __name__ == "__main__":
    import asyncio
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "a"))
