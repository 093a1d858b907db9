"""UDP servers and clients for the end-to-end tests, in one file like streams.py.

Servers (in the test's namespace) print ``ready`` once bound:
``python datagrams.py echo-server ADDR PORT`` echoes every datagram;
``python datagrams.py dns-server ADDR PORT`` answers A queries for *.ipferry.test with 192.0.2.7.
Clients (inside ``ipferry connect``) print one JSON line:
``echo ADDR PORT COUNT`` sends COUNT numbered datagrams (at most WINDOW unanswered) and checks
every echo; ``dns ADDR PORT NAME`` resolves NAME; ``refused ADDR PORT`` expects ECONNREFUSED.
"""

import hashlib
import json
import select
import socket
import sys
import time

WINDOW = 32


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def payload(i: int) -> bytes:
    """Datagram ``i``: its number, then 0..1400 bytes derived from it (checked on return)."""
    body = hashlib.sha256(str(i).encode()).digest() * 44
    return i.to_bytes(4, "big") + body[: (i * 37) % 1401]


def echo_server(addr: str, port: int) -> None:
    with socket.socket(family(addr), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((addr, port))
        print("ready", flush=True)
        while True:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)


def dns_server(addr: str, port: int) -> None:
    from dnslib import QTYPE, RR, A
    from dnslib.server import BaseResolver, DNSServer

    class Resolver(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            name = str(request.q.qname)
            if name.endswith("ipferry.test.") and request.q.qtype == QTYPE.A:
                reply.add_answer(RR(name, QTYPE.A, rdata=A("192.0.2.7"), ttl=60))
            return reply

    server = DNSServer(Resolver(), address=addr, port=port)
    server.start_thread()
    print("ready", flush=True)
    while server.isAlive():
        time.sleep(1)


def echo(addr: str, port: int, count: int) -> dict:
    with socket.socket(family(addr), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.connect((addr, port))
        s.setblocking(False)
        sent = received = corrupt = 0
        waiting: set[int] = set()
        deadline = time.monotonic() + 60
        while received + corrupt < count and time.monotonic() < deadline:
            while sent < count and len(waiting) < WINDOW:
                s.send(payload(sent))
                waiting.add(sent)
                sent += 1
            if not select.select([s], [], [], 2)[0]:
                break  # nothing for 2 s: whatever is missing was lost
            while True:
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    break
                i = int.from_bytes(data[:4], "big")
                if i in waiting and data == payload(i):
                    waiting.discard(i)
                    received += 1
                else:
                    corrupt += 1
    return {"sent": sent, "received": received, "corrupt": corrupt, "lost": len(waiting)}


def dns(addr: str, port: int, name: str) -> dict:
    from dnslib import DNSRecord
    q = DNSRecord.question(name)
    reply = DNSRecord.parse(q.send(addr, port, tcp=False, timeout=5, ipv6=":" in addr))
    return {"answers": [str(rr.rdata) for rr in reply.rr], "id_matches": reply.header.id == q.header.id}


def refused(addr: str, port: int) -> dict:
    with socket.socket(family(addr), socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((addr, port))
        s.send(b"anyone there?")
        try:
            s.recv(100)
            return {"outcome": "data"}
        except ConnectionRefusedError:
            return {"outcome": "refused"}
        except TimeoutError:
            return {"outcome": "timeout"}


def main(argv: list[str]) -> None:
    mode, addr, port, *rest = argv
    if mode == "echo-server":
        echo_server(addr, int(port))
    elif mode == "dns-server":
        dns_server(addr, int(port))
    else:
        result = {"echo": lambda: echo(addr, int(port), int(rest[0])),
                  "dns": lambda: dns(addr, int(port), rest[0]),
                  "refused": lambda: refused(addr, int(port))}[mode]()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
