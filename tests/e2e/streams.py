"""A tiny stream protocol for the end-to-end tests, server and client in one file.

Server (runs in the test's namespace): ``python streams.py serve ADDR PORT``. A client sends one
command line: ``GET n`` -> n bytes of a known pattern, then close; ``PUT n`` + n bytes -> the
sha256 of what arrived; ``ECHO`` -> everything back until the client's FIN, then close.
Client (runs inside ``ipferry connect``): ``python streams.py MODE ...`` prints one JSON line.
"""

import asyncio
import hashlib
import json
import socket
import sys
import time

CHUNK = 1 << 16


def pattern(n: int) -> bytes:
    block = hashlib.sha256(b"ipferry").digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = (await reader.readline()).decode().split()
        if line[0] == "GET":
            n = int(line[1])
            data = pattern(min(n, 1 << 22))
            sent = 0
            while sent < n:
                chunk = data[: min(len(data), n - sent)]
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        elif line[0] == "PUT":
            n, h = int(line[1]), hashlib.sha256()
            while n:
                chunk = await reader.read(min(n, CHUNK))
                if not chunk:
                    break
                h.update(chunk)
                n -= len(chunk)
            writer.write(h.hexdigest().encode() + b"\n")
        elif line[0] == "DRAIN":  # our FIN first, then read slowly; report on stdout
            writer.write_eof()
            n, got, h = int(line[1]), 0, hashlib.sha256()
            while chunk := await reader.read(CHUNK):
                h.update(chunk)
                got += len(chunk)
                await asyncio.sleep(0.002)
            print(f"drained {got} of {n} {h.hexdigest()}", flush=True)
        elif line[0] == "ECHO":
            while chunk := await reader.read(CHUNK):
                writer.write(chunk)
                await writer.drain()
        await writer.drain()
    except (ConnectionError, IndexError, ValueError):
        pass
    finally:
        writer.close()


async def serve(addr: str, port: int) -> None:
    server = await asyncio.start_server(handle, addr, port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def get(addr: str, port: int, n: int) -> dict:
    with socket.create_connection((addr, port), timeout=60) as s:
        s.sendall(f"GET {n}\n".encode())
        h, got = hashlib.sha256(), 0
        while chunk := s.recv(1 << 20):
            h.update(chunk)
            got += len(chunk)
    return {"bytes": got, "sha256": h.hexdigest(), "sent": len(f"GET {n}\n")}


def put(addr: str, port: int, n: int) -> dict:
    data = pattern(min(n, 1 << 22))
    with socket.create_connection((addr, port), timeout=60) as s:
        s.sendall(f"PUT {n}\n".encode())
        view, sent = memoryview(data), 0
        while sent < n:  # the pattern repeats every len(data) bytes: resume where send stopped
            off = sent % len(data)
            sent += s.send(view[off:min(len(data), off + n - sent)])
        reply = s.makefile().readline().strip()
    return {"bytes": n, "server_sha256": reply}


def drain(addr: str, port: int, n: int) -> dict:
    data = pattern(n)
    with socket.create_connection((addr, port), timeout=60) as s:
        s.sendall(f"DRAIN {n}\n".encode() + data)
        s.shutdown(socket.SHUT_WR)
        while s.recv(1 << 16):
            pass
    return {"sent": n, "sha256": hashlib.sha256(data).hexdigest()}


def idle(addr: str, port: int, seconds: int) -> dict:
    """Connect, say nothing for ``seconds``, then ask for 10 bytes: what happens?"""
    with socket.create_connection((addr, port), timeout=30) as s:
        time.sleep(seconds)
        try:
            s.sendall(b"GET 10\n")
            data = s.recv(100)
            return {"outcome": "data" if data else "eof"}
        except ConnectionResetError:
            return {"outcome": "reset"}


def echo_half_close(addr: str, port: int, n: int) -> dict:
    data = pattern(n)
    with socket.create_connection((addr, port), timeout=60) as s:
        s.sendall(b"ECHO\n" + data)
        s.shutdown(socket.SHUT_WR)  # our FIN; the server goes on sending what it has
        back = b""
        while chunk := s.recv(1 << 20):
            back += chunk
    return {"intact": back == data, "bytes": len(back)}


async def many(addr: str, port: int, count: int, n: int, timeout: float = 30) -> dict:
    """``count`` concurrent GETs of ``n`` bytes; which local ports got everything."""
    async def one(i: int):
        sport = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(addr, port), 30)
            sport = w.get_extra_info("sockname")[1]
            w.write(f"GET {n}\n".encode())
            got = 0
            while chunk := await asyncio.wait_for(r.read(1 << 20), timeout):
                got += len(chunk)
            w.close()
            return sport, got == n
        except (TimeoutError, OSError):
            return sport, False
    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    return {"ok": sum(ok for _, ok in results), "count": count, "ports": dict(results),
            "seconds": round(time.monotonic() - t0, 3)}


if __name__ == "__main__":
    mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        asyncio.run(serve(addr, port))
    elif mode == "many":
        timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 30
        print(json.dumps(asyncio.run(many(addr, port, int(sys.argv[4]), int(sys.argv[5]),
                                          timeout))))
    else:
        fn = {"get": get, "put": put, "echo": echo_half_close, "drain": drain,
              "idle": idle}[mode]
        print(json.dumps(fn(addr, port, int(sys.argv[4]))))
