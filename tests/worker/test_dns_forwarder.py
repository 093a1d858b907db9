"""The resolver's forwarder with real sockets: a query id cannot be reused while its answer is
awaited, an answer must match its question, and the flow is done once every query is answered."""

from __future__ import annotations

import asyncio
import socket

import dnslib
import structlog

from ipferry.engine.decisions import DnsDecision, DnsQueryStart, TunnelContext
from ipferry.wire import dnsmsg
from ipferry.worker.dns import DnsForwarder


def query(name: str, qid: int) -> bytes:
    q = dnslib.DNSRecord.question(name)
    q.header.id = qid
    return q.pack()


def answer(raw: bytes, name: str, address: str) -> bytes:
    q = dnslib.DNSRecord.parse(raw)
    a = q.reply()
    a.questions = [dnslib.DNSQuestion(name)]
    a.add_answer(dnslib.RR(name, rdata=dnslib.A(address), ttl=60))
    return a.pack()


async def scenario() -> tuple[list, list, int]:
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.setblocking(False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(upstream.getsockname())
    learned: list = []
    replies: list = []
    done = []

    def start(q: dnsmsg.DnsQuery) -> DnsQueryStart:
        return DnsQueryStart("acme", "10.0.0.2", 5000, q.name, q.qtype_name, TunnelContext("acme"))

    forwarder = DnsForwarder(sock, start=start, decide=lambda q: DnsDecision.allow(),
                             record=lambda *a, **k: None, on_reply=replies.append,
                             on_error=lambda kind: None, log=structlog.get_logger(),
                             learned=lambda *a: learned.append(a), done=lambda: done.append(1))
    loop = asyncio.get_running_loop()
    first = query("evil.attacker.test", 7)
    forwarder.send(first)
    forwarder.send(query("x.corp.example", 7))  # the same id: refused while 7 is awaited
    got = await loop.sock_recv(upstream, 4096)
    assert got == first
    # An answer under the awaited id but for another question is not taken.
    await loop.sock_sendto(upstream, answer(first, "x.corp.example", "6.6.6.6"),
                           sock.getsockname())
    await asyncio.sleep(0.1)
    assert not replies and not learned
    await loop.sock_sendto(upstream, answer(first, "evil.attacker.test", "6.6.6.6"),
                           sock.getsockname())
    await asyncio.sleep(0.1)
    forwarder.close()
    upstream.close()
    return learned, replies, len(done)


def test_an_awaited_id_cannot_be_reused_nor_answered_for_another_question():
    learned, replies, done = asyncio.run(scenario())
    assert len(replies) == 1
    assert learned == [("acme", "evil.attacker.test", [("6.6.6.6", 60)])]
    assert done == 1  # every query answered: the flow may end
