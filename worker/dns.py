"""The daemon's resolver for its tunnels: per-query policy, forwarding and audit (UDP).

A UDP flow to the daemon's DNS address (:mod:`ipferry.wire.dns`) gets a :class:`DnsForwarder`
as the socket of its datagram leg: each query the client sends is parsed (a malformed one is
dropped and counted), put to the application (``on_dns_query``: allow, NXDOMAIN, REFUSED, or a
fixed address), and, when allowed, forwarded to the host's resolver; an upstream that does not
answer in time gets the client a SERVFAIL. Every query leaves one ``dns_query`` audit record
(tenant, source, name, type, decision, result code, answer addresses, latency) and is counted in
``ipferry_dns_queries_total{result}``.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Callable
from typing import Any

from ipferry.engine.decisions import DnsDecision, DnsQueryStart
from ipferry.wire import dnsmsg

from . import metrics
from .datagram_flows import DatagramUpstream
from .inspect import CloseStream, Inspector

TIMEOUT = 3.0  # for the upstream's answer, then SERVFAIL
MAX_PENDING = 256  # queries of one flow awaiting their answer (or their decision)


RCODE_LABELS = frozenset({"noerror", "formerr", "servfail", "nxdomain", "notimp", "refused"})


def rcode_label(rcode: str | None) -> str:
    """An answer code as a metric label: the common ones by name, the rest "other" (an
    upstream must not mint label values)."""
    label = (rcode or "malformed").lower()
    return label if label in RCODE_LABELS or label == "malformed" else "other"


def answers_query(answer: dnsmsg.DnsAnswer | dnsmsg.Malformed, query: dnsmsg.DnsQuery) -> bool:
    """Is this answer about this query's question (not only its id)? An answer without its
    question (a bare SERVFAIL) is taken on its id, but names nothing."""
    if not isinstance(answer, dnsmsg.DnsAnswer):
        return True
    return answer.name == query.name and answer.qtype == query.qtype


class DnsForwarder:
    """Quacks like :class:`~ipferry.worker.datagram_flows.DatagramUpstream` (send, close)."""

    def __init__(self, sock: socket.socket, *, start: Callable[[dnsmsg.DnsQuery], DnsQueryStart],
                 decide: Callable[[DnsQueryStart], Any], record: Callable[..., Any],
                 on_reply: Callable[[bytes], None], on_error: Callable[[str], None],
                 log: Any, learned: Callable[[str, str, list[tuple[str, int]]], None],
                 done: Callable[[], None] = lambda: None, timeout: float = TIMEOUT) -> None:
        self.done = done  # every query answered: the flow may end (a stub's next is new)
        self.upstream = DatagramUpstream(sock, self._answer, on_error)
        self.learned = learned  # (tenant, name, [(address, ttl)]): an answer's addresses
        self.start = start  # a query as the application sees it (the flow's tenant, source ...)
        self.decide = decide  # the application's on_dns_query (plain or async)
        self.record = record  # the audit log's
        self.on_reply = on_reply  # a DNS message back to the client
        self.log = log
        self.timeout = timeout
        self.pending: dict[int, tuple[dnsmsg.DnsQuery, DnsQueryStart, float,
                                      asyncio.TimerHandle, DnsDecision]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.closed = False
        self._loop = asyncio.get_running_loop()

    # -- queries from the client ---------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        query = dnsmsg.parse_query(bytes(data))
        if isinstance(query, dnsmsg.Malformed):
            metrics.DROPS.labels("dns_malformed").inc()
            metrics.DNS_QUERIES.labels("malformed").inc()
            return
        if len(self.pending) + len(self.tasks) >= MAX_PENDING:
            metrics.DROPS.labels("dns_pending_limit").inc()  # the client retries
            return
        if query.id in self.pending:
            # A second question under an id still awaiting its answer: that answer would be
            # taken for this one (and name the wrong addresses). The client retries.
            metrics.DROPS.labels("dns_duplicate_id").inc()
            return
        seen = self.start(query)
        try:
            decision = self.decide(seen)
        except Exception as exc:
            self._hook_failed(query, seen, exc)
            return
        if inspect.isawaitable(decision):
            task = self._loop.create_task(self._decide_later(query, seen, decision))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        self._decided(query, seen, decision)

    async def _decide_later(self, query: dnsmsg.DnsQuery, seen: DnsQueryStart,
                            pending: Any) -> None:
        try:
            decision = await pending
        except Exception as exc:
            self._hook_failed(query, seen, exc)
            return
        if not self.closed:
            self._decided(query, seen, decision)

    def _hook_failed(self, query: dnsmsg.DnsQuery, seen: DnsQueryStart, exc: Exception) -> None:
        self.log.warning("dns_hook_failed", error=repr(exc)[:200], name=query.name)
        self._answer_now(query, seen, DnsDecision.refused(f"hook error: {exc!r}"[:200]),
                         dnsmsg.servfail(query), "servfail")

    def _decided(self, query: dnsmsg.DnsQuery, seen: DnsQueryStart, decision: object) -> None:
        if not isinstance(decision, DnsDecision):
            self._hook_failed(query, seen, TypeError(f"not a DnsDecision: {decision!r}"))
            return
        if decision.action == "allow":
            if query.id in self.pending:  # (an async decision came late: see send)
                metrics.DROPS.labels("dns_duplicate_id").inc()
                return
            self.upstream.send(query.raw)
            timer = self._loop.call_later(self.timeout, self._timed_out, query.id)
            self.pending[query.id] = (query, seen, time.monotonic(), timer, decision)
            return
        if decision.action == "answer" and decision.address:
            try:
                reply, result = dnsmsg.answer_address(query, decision.address), "answered"
            except ValueError as exc:  # not an address: the application's mistake
                self._hook_failed(query, seen, exc)
                return
            if decision.address:
                self.learned(seen.tenant, seen.name, [(decision.address, 60)])
        elif decision.action == "nxdomain":
            reply, result = dnsmsg.nxdomain(query), "denied"
        else:
            reply, result = dnsmsg.refused(query), "refused"
        self._answer_now(query, seen, decision, reply, result)

    def _answer_now(self, query: dnsmsg.DnsQuery, seen: DnsQueryStart, decision: DnsDecision,
                    reply: bytes, result: str) -> None:
        metrics.DNS_QUERIES.labels(result).inc()
        answer = dnsmsg.parse_answer(reply)
        self._audit(seen, decision, answer, 0.0)
        if not self.closed:
            self.on_reply(reply)
            self._maybe_done()

    def _maybe_done(self) -> None:
        if not self.pending and not self.tasks and not self.closed:
            self.done()

    # -- the upstream's answers ----------------------------------------------------------------

    def _answer(self, data: bytes) -> None:
        answer = dnsmsg.parse_answer(data)
        # (an answer without its question, a SERVFAIL say, is still the client's: by its id)
        query_id = answer.id if isinstance(answer, dnsmsg.DnsAnswer) else (
            int.from_bytes(data[:2], "big") if len(data) >= 12 else -1)
        entry = self.pending.get(query_id)
        if entry is None or not answers_query(answer, entry[0]):
            metrics.DROPS.labels("dns_unexpected_answer").inc()
            return
        del self.pending[query_id]
        query, seen, started, timer, decision = entry
        timer.cancel()
        rcode = (answer.rcode_name if isinstance(answer, dnsmsg.DnsAnswer)
                 else dnsmsg.rcode_name(data[3] & 0x0F))
        metrics.DNS_QUERIES.labels(rcode_label(rcode)).inc()
        self._audit(seen, decision, answer, time.monotonic() - started, rcode=rcode)
        if isinstance(answer, dnsmsg.DnsAnswer) and answer.addresses:
            self.learned(seen.tenant, seen.name, list(answer.addresses))
        self.on_reply(data)
        self._maybe_done()

    def _timed_out(self, query_id: int) -> None:
        entry = self.pending.pop(query_id, None)
        if entry is None or self.closed:
            return
        query, seen, started, _, decision = entry
        reply = dnsmsg.servfail(query)
        metrics.DNS_QUERIES.labels("timeout").inc()
        self._audit(seen, decision, dnsmsg.parse_answer(reply),
                    time.monotonic() - started, result="timeout")
        self.on_reply(reply)
        self._maybe_done()

    def _audit(self, seen: DnsQueryStart, decision: DnsDecision,
               answer: dnsmsg.DnsAnswer | dnsmsg.Malformed, latency: float,
               result: str | None = None, rcode: str | None = None) -> None:
        addresses: list[str] = []
        if isinstance(answer, dnsmsg.DnsAnswer):
            rcode = rcode or answer.rcode_name
            addresses = [a for a, _ in answer.addresses]
        self.record("dns_query", tenant=seen.tenant, src=seen.src, sport=seen.sport,
                    name=seen.name, type=seen.type, decision=decision.action,
                    reason=decision.reason, rcode=rcode, answers=addresses, result=result,
                    latency=round(latency, 6))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for entry in self.pending.values():
            entry[3].cancel()
        self.pending.clear()
        for task in list(self.tasks):
            task.cancel()
        self.upstream.close()


class DnsStreamInspector(Inspector):
    """The same policy and audit for DNS over TCP (each message behind its 2-byte length): a
    query the application does not let go resets the connection (the client sees the stream
    cut, not an NXDOMAIN), so TCP is no way around the policy; an allowed one passes unchanged
    and its answer is audited as it comes back."""

    def __init__(self, *, start: Callable[[dnsmsg.DnsQuery], DnsQueryStart],
                 decide: Callable[[DnsQueryStart], Any], record: Callable[..., Any],
                 learned: Callable[[str, str, list[tuple[str, int]]], None]) -> None:
        self.learned = learned
        self.start = start
        self.decide = decide
        self.record = record
        self.queries = bytearray()
        self.answers = bytearray()
        self.pending: dict[int, tuple[DnsQueryStart, float, dnsmsg.DnsQuery, DnsDecision]] = {}

    @staticmethod
    def _messages(buf: bytearray) -> list[bytes]:
        out = []
        while len(buf) >= 2:
            size = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + size:
                break
            out.append(bytes(buf[2:2 + size]))
            del buf[:2 + size]
        return out

    def to_server(self, data: bytes) -> bytes | None:
        self.queries += data
        for message in self._messages(self.queries):
            query = dnsmsg.parse_query(message)
            if isinstance(query, dnsmsg.Malformed):
                metrics.DNS_QUERIES.labels("malformed").inc()
                raise CloseStream(f"malformed DNS query ({query.reason})")
            seen = self.start(query)
            try:
                decision = self.decide(seen)
            except Exception as exc:  # the application's: refused, recorded, the stream reset
                decision = DnsDecision.refused(f"hook error: {exc!r}"[:200])
            if inspect.isawaitable(decision):  # (no awaiting in a stream's bytes: fail closed)
                getattr(decision, "close", lambda: None)()
                decision = DnsDecision.refused("an async on_dns_query cannot decide over TCP")
            if not isinstance(decision, DnsDecision) or decision.action != "allow":
                why = decision if isinstance(decision, DnsDecision) else DnsDecision.refused(
                    f"not a DnsDecision: {decision!r}"[:200])
                metrics.DNS_QUERIES.labels("denied" if why.action == "nxdomain"
                                           else "refused").inc()
                self.record("dns_query", tenant=seen.tenant, src=seen.src, sport=seen.sport,
                            name=seen.name, type=seen.type, decision=why.action,
                            reason=why.reason, rcode=None, answers=[], result="reset",
                            latency=0.0)
                raise CloseStream(f"DNS query for {seen.name} not allowed ({why.action})")
            if len(self.pending) >= MAX_PENDING:
                raise CloseStream("too many DNS queries awaiting their answers")
            if query.id in self.pending:  # its answer would be taken for this one
                raise CloseStream("a second DNS query under an id awaiting its answer")
            self.pending[query.id] = (seen, time.monotonic(), query, decision)
        return None

    def to_client(self, data: bytes) -> bytes | None:
        self.answers += data
        for message in self._messages(self.answers):
            answer = dnsmsg.parse_answer(message)
            query_id = answer.id if isinstance(answer, dnsmsg.DnsAnswer) else (
                int.from_bytes(message[:2], "big") if len(message) >= 12 else -1)
            entry = self.pending.get(query_id)
            if entry is None or not answers_query(answer, entry[2]):
                continue
            del self.pending[query_id]
            seen, started, _, allowed = entry
            addresses: list[str] = []
            if isinstance(answer, dnsmsg.DnsAnswer):
                rcode: str | None = answer.rcode_name
                addresses = [a for a, _ in answer.addresses]
                if answer.addresses:
                    self.learned(seen.tenant, seen.name, list(answer.addresses))
            else:
                rcode = dnsmsg.rcode_name(message[3] & 0x0F) if len(message) >= 4 else None
            metrics.DNS_QUERIES.labels(rcode_label(rcode)).inc()
            self.record("dns_query", tenant=seen.tenant, src=seen.src, sport=seen.sport,
                        name=seen.name, type=seen.type, decision="allow", reason=allowed.reason,
                        rcode=rcode, answers=addresses, result=None,
                        latency=round(time.monotonic() - started, 6))
        return None
