"""Small TCP request/response server and clients for the benchmark's connection-rate and latency
workloads. The server runs in the benchmark's server namespace, the clients inside the namespace a
transport (ipferry connect, pasta, slirp4netns, veth) gives them. Standard library only, plus
uvloop when it is installed (the project's venv has it), so that the client is not the bottleneck
sooner than it must be.

    rr.py serve --host 198.18.0.1 --port 5300
    rr.py ping --host 198.18.0.1 --port 5300 [--timeout 20]
    rr.py connrate --host ... --port ... [--count 2000] [--concurrency 8] [--size 64]
    rr.py latency --host ... --port ... [--round-trips 5000] [--size 64]

Every client prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time


def use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Echo(asyncio.Protocol):
    """Echo every byte back: a request of N bytes gets a response of N bytes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=4096, reuse_address=True)
    print(f"rr: serving on {host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def ping(host: str, port: int, timeout: float) -> dict:
    """Until one request/response succeeds: the transport's namespace is ready."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.sendall(b"p")
                if s.recv(1) == b"p":
                    return {"ok": True, "waited_s": timeout - (deadline - time.monotonic())}
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    return {"ok": False, "error": f"no answer from {host}:{port} in {timeout}s ({last})"}


async def connrate(host: str, port: int, count: int, concurrency: int, size: int) -> dict:
    """``count`` connections, ``concurrency`` at a time, each one request and its response."""
    payload = b"q" * size
    todo = iter(range(count))
    errors: dict[str, int] = {}
    ok = 0

    loop = asyncio.get_running_loop()

    async def one() -> None:
        # Bare non-blocking sockets, not streams: the client should cost as little as it can.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            await loop.sock_connect(s, (host, port))
            await loop.sock_sendall(s, payload)
            got = 0
            while got < size:
                chunk = await loop.sock_recv(s, size - got)
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", size)
                got += len(chunk)

    async def lane() -> None:
        nonlocal ok
        for _ in todo:
            try:
                await asyncio.wait_for(one(), 10)
                ok += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                key = type(exc).__name__ + (f" {exc.strerror}" if isinstance(exc, OSError) and
                                            exc.strerror else "")
                errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"count": count, "ok": ok, "errors": errors, "seconds": elapsed,
            "rate": ok / elapsed if elapsed > 0 else 0.0}


def _percentile(samples: list[float], p: float) -> float:
    return samples[min(len(samples) - 1, int(p / 100 * len(samples)))]


def setup_times(host: str, port: int, count: int) -> list[float]:
    """``count`` connections one after another: how long ``connect()`` took (µs), sorted. Through
    a proxy that connects its off-ramp first (ipferry), this includes the off-ramp's handshake."""
    samples = []
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            t0 = time.perf_counter_ns()
            s.connect((host, port))
            samples.append((time.perf_counter_ns() - t0) / 1000)
    return sorted(samples)


def latency(host: str, port: int, round_trips: int, size: int, warmup: int = 100,
            setups: int = 200) -> dict:
    """Round trips on one connection with TCP_NODELAY, then ``setups`` connection set-ups, one
    at a time; percentiles in microseconds."""
    payload = b"l" * size
    samples: list[float] = []
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(size)
        view = memoryview(buf)
        for i in range(warmup + round_trips):
            t0 = time.perf_counter_ns()
            s.sendall(payload)
            got = 0
            while got < size:
                n = s.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("server closed the connection")
                got += n
            if i >= warmup:
                samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    setup = setup_times(host, port, setups)
    return {"round_trips": round_trips, "p50_us": _percentile(samples, 50),
            "p90_us": _percentile(samples, 90), "p99_us": _percentile(samples, 99),
            "mean_us": statistics.fmean(samples), "max_us": samples[-1], "setups": setups,
            "setup_p50_us": _percentile(setup, 50), "setup_p99_us": _percentile(setup, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["serve", "ping", "connrate", "latency"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    use_uvloop()
    if args.mode == "serve":
        try:
            asyncio.run(serve(args.host, args.port))
        except KeyboardInterrupt:
            pass
        return
    if args.mode == "ping":
        result = ping(args.host, args.port, args.timeout)
    elif args.mode == "connrate":
        result = asyncio.run(connrate(args.host, args.port, args.count, args.concurrency, args.size))
    else:
        result = latency(args.host, args.port, args.round_trips, args.size)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
