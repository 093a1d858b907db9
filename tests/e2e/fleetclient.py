"""Run inside ``ipferry connect``: COUNT concurrent TCP flows to the stream server's ECHO, kept
open through PHASES phases. In each phase every flow still open sends a block and checks that
the echo is the same bytes (sha256); a flow that fails stays failed. After phase k it writes
DIR/phase-k.json ({"flows": {local port: "ok" | "reset" | "timeout" | "corrupt" | ...}}) and,
unless it was the last, waits for DIR/go-k (the test changes the fleet meanwhile).

usage: fleetclient.py ADDR PORT COUNT DIR PHASES
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time

BLOCK = 32 * 1024
TIMEOUT = 20


def block(flow: int, phase: int) -> bytes:
    seed = hashlib.sha256(f"{flow}/{phase}".encode()).digest()
    return (seed * (BLOCK // len(seed) + 1))[:BLOCK]


class Flow:
    def __init__(self, index: int) -> None:
        self.index = index
        self.port = 0
        self.state = "ok"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, addr: str, port: int) -> None:
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(addr, port), TIMEOUT)
            self.port = self.writer.get_extra_info("sockname")[1]
            self.writer.write(b"ECHO\n")
        except (OSError, TimeoutError) as exc:
            self.state = f"connect: {type(exc).__name__}"

    async def exchange(self, phase: int) -> None:
        if self.state != "ok":
            return
        assert self.reader is not None and self.writer is not None
        data = block(self.index, phase)
        try:
            self.writer.write(data)
            got = await asyncio.wait_for(self.reader.readexactly(BLOCK), TIMEOUT)
        except ConnectionResetError:
            self.state = "reset"
        except asyncio.IncompleteReadError:
            self.state = "closed"
        except TimeoutError:
            self.state = "timeout"
        except OSError as exc:
            self.state = f"error: {exc.strerror}"
        else:
            if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
                self.state = "corrupt"
        if self.state != "ok":
            self.writer.transport.abort()


async def main(addr: str, port: int, count: int, out: str, phases: int) -> None:
    flows = [Flow(i) for i in range(count)]
    await asyncio.gather(*(f.open(addr, port) for f in flows))
    for phase in range(1, phases + 1):
        await asyncio.gather(*(f.exchange(phase) for f in flows))
        report = {"flows": {str(f.port or f"unconnected-{f.index}"): f.state for f in flows}}
        tmp = os.path.join(out, f".phase-{phase}.json")
        with open(tmp, "w") as fh:
            json.dump(report, fh)
        os.rename(tmp, os.path.join(out, f"phase-{phase}.json"))
        if phase < phases:
            go, deadline = os.path.join(out, f"go-{phase}"), time.monotonic() + 120
            while not os.path.exists(go) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    for f in flows:
        if f.writer is not None and f.state == "ok":
            f.writer.close()


if __name__ == "__main__":
    a, p, n, d, k = sys.argv[1:6]
    asyncio.run(main(a, int(p), int(n), d, int(k)))
