"""What the admin API reads of a worker, shaped so that no answer can outgrow a control message.

- :class:`FlowIndex`: the worker's live flows in start order (a sequence number per flow), all of
  them and per tenant, in sorted lists: a count, a slice at any position, or the flows after a
  cursor cost O(log n + page) whatever the depth, with no sort and no list of every flow.
- :class:`Snapshots`: lists too long for one reply (tunnels, metrics) are taken once and handed
  out in parts, each part at most :data:`REPLY_BUDGET` bytes of rows.
- :func:`strict`: any value as strict JSON data (no NaN or Infinity, string keys, no odd objects),
  for what an application may have put in a context.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

from sortedcontainers import SortedKeyList

MAX_PAGE = 200  # flows in one page of the admin API
# Bytes of rows in one reply. A control message may be up to ~208 KiB (the kernel's default
# socket buffer); half of that leaves room for the envelope and for a second reply in flight.
REPLY_BUDGET = 96 * 1024
MAX_EXTRA = 4096  # bytes of JSON a tunnel's context may show; a larger one is left out
MAX_TEXT = 256  # characters of a tenant (or an odd value's text) shown
MAX_NODES = 2000  # values of a context's extra visited to make it strict
MAX_DEPTH = 32

_SEQ = attrgetter("seq")


class FlowIndex:
    """A worker's live flows in start order, and each tenant's: sorted by ``entry.seq``."""

    def __init__(self) -> None:
        # Tells this worker process from its predecessors: a cursor of another epoch starts over.
        self.epoch = secrets.token_hex(4)
        self.last_seq = 0
        self.all: SortedKeyList = SortedKeyList(key=_SEQ)
        self.tenants: dict[str, SortedKeyList] = {}

    def add(self, entry) -> None:
        self.last_seq += 1
        entry.seq = self.last_seq
        self.all.add(entry)  # the largest key: an append, O(log n)
        tenant = entry.key.tenant
        flows = self.tenants.get(tenant)
        if flows is None:
            flows = self.tenants[tenant] = SortedKeyList(key=_SEQ)
        flows.add(entry)

    def discard(self, entry) -> None:
        if not entry.seq:
            return  # never added
        self.all.discard(entry)
        tenant = entry.key.tenant
        flows = self.tenants.get(tenant)
        if flows is not None:
            flows.discard(entry)
            if not flows:
                del self.tenants[tenant]

    def __len__(self) -> int:
        return len(self.all)

    def flows(self, tenant: str | None) -> SortedKeyList:
        if tenant is None:
            return self.all
        return self.tenants.get(tenant) or _EMPTY

    def count_after(self, tenant: str | None, seq: int) -> int:
        flows = self.flows(tenant)
        return len(flows) - flows.bisect_key_right(seq)

    def at(self, tenant: str | None, start: int) -> Iterable:
        """The flows from position ``start`` on (an iterator; take what a page needs)."""
        flows = self.flows(tenant)
        return flows.islice(start) if start < len(flows) else iter(())

    def after(self, tenant: str | None, seq: int) -> Iterable:
        """The flows started after the one numbered ``seq`` (ended or not)."""
        return self.flows(tenant).irange_key(min_key=seq, inclusive=(False, True))


_EMPTY: SortedKeyList = SortedKeyList(key=_SEQ)


def fit(rows: Iterable[dict | None], budget: int = REPLY_BUDGET,
        limit: int | None = None) -> tuple[list[dict], int, bool]:
    """Rows while they fit ``budget`` bytes of JSON (at least one) and ``limit``.

    Returns (rows, how many were consumed, cut): ``cut`` when rows were left for want of room.
    None rows (e.g. a tunnel closed since its snapshot) are consumed and skipped."""
    out: list[dict] = []
    used = consumed = 0
    for row in rows:
        if limit is not None and len(out) >= limit:
            return out, consumed, True
        if row is None:
            consumed += 1
            continue
        size = len(json.dumps(row, separators=(",", ":"), default=str)) + 1
        if out and used + size > budget:
            return out, consumed, True
        out.append(row)
        used += size
        consumed += 1
    return out, consumed, False


class Snapshots:
    """Lists handed out in parts: the first request takes the list, later ones name it."""

    def __init__(self, keep: int = 8, ttl: float = 30.0) -> None:
        self.keep = keep
        self.ttl = ttl
        self._lists: OrderedDict[str, tuple[float, list]] = OrderedDict()

    def part(self, body: dict, take: Callable[[], list], row: Callable[[Any], dict | None],
             budget: int = REPLY_BUDGET) -> dict:
        """The reply to a request for a part: ``{"rows", "snapshot", "next"}`` (next: None when
        this part is the last). Raises KeyError for a snapshot that is gone (expired)."""
        now = time.monotonic()
        while self._lists and (len(self._lists) > self.keep
                               or next(iter(self._lists.values()))[0] < now - self.ttl):
            self._lists.popitem(last=False)
        token = body.get("snapshot")
        start = int(body.get("start") or 0)
        if token is None:
            token = secrets.token_hex(6)
            items = take()
            self._lists[token] = (now, items)
        else:
            items = self._lists[str(token)][1]
        start = max(0, min(start, len(items)))
        rows, consumed, _ = fit((row(items[i]) for i in range(start, len(items))), budget)
        end = start + consumed
        if end >= len(items):
            self._lists.pop(token, None)
            return {"rows": rows, "snapshot": token, "next": None}
        return {"rows": rows, "snapshot": token, "next": end}


def metric_pieces(families: list[dict], budget: int = REPLY_BUDGET // 2) -> list[dict]:
    """Metric families, a family too large for one part cut into several of the same name."""
    out = []
    for family in families:
        samples = family["samples"]
        if len(json.dumps(family, default=str)) <= budget:
            out.append(family)
            continue
        piece: list[Any] = []
        used = 0
        for sample in samples:
            size = len(json.dumps(sample, default=str)) + 2
            if piece and used + size > budget:
                out.append({**family, "samples": piece})
                piece, used = [], 0
            if size <= budget:  # a sample alone larger than a part cannot be shown
                piece.append(sample)
                used += size
        out.append({**family, "samples": piece})
    return out


def strict(value):
    """``value`` as strict JSON data: finite numbers, strings, booleans, null, lists and objects
    with string keys. NaN and infinities become their text ("nan", "inf"), other objects their
    ``str()`` (cut at :data:`MAX_TEXT`), anything nested over :data:`MAX_DEPTH` deep too."""
    return _strict(value, None)[0]


def _strict(value, nodes: int | None) -> tuple[object, bool]:
    """:func:`strict`, visiting at most ``nodes`` values: (the value, whether it ran out)."""
    budget = [math.inf if nodes is None else nodes]

    def walk(v, depth: int):
        budget[0] -= 1
        if budget[0] < 0:
            return None
        if v is None or isinstance(v, bool | str):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else str(v)
        if depth < MAX_DEPTH:
            if isinstance(v, dict):
                return {k if isinstance(k, str) else _text(k): walk(x, depth + 1)
                        for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [walk(x, depth + 1) for x in v]
        return _text(v)

    out = walk(value, 0)
    return out, budget[0] < 0


def _text(value) -> str:
    try:
        text = str(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text[:MAX_TEXT]


def strict_dumps(value) -> str:
    """JSON that a strict parser reads (``allow_nan=False``), whatever ``value`` holds."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps(strict(value), allow_nan=False)


def tenant_text(tenant) -> str:
    """A tenant as rows show it: the default application's are short tokens; another
    application's odd value is shown as bounded text."""
    if isinstance(tenant, str) and len(tenant) <= MAX_TEXT:
        return tenant
    return _text(tenant)


def tunnel_row(tunnel) -> dict | None:
    """A tunnel's row for ``/api/tunnels``: strict JSON, its context at most :data:`MAX_EXTRA`
    bytes (a larger one is shown as ``null`` with ``context_omitted``: its size)."""
    if getattr(tunnel, "closed", False):
        return None
    row = tunnel.as_dict()
    if "queue_of" in row:  # a queue of another worker's attached tunnel: counts only
        return row
    row["tenant"] = tenant_text(row.get("tenant"))
    context = row.get("context")
    if context is not None:
        row["context"], omitted = bounded_context(context)
        if omitted is not None:
            row["context_omitted"] = omitted
    return row


def bounded_context(extra) -> tuple[object, int | None]:
    """(``extra`` made strict, None), or (None, its size in bytes) when its JSON is over
    :data:`MAX_EXTRA` bytes (at least that size: a huge one is not walked whole)."""
    shown, ran_out = _strict(extra, MAX_NODES)
    size = len(json.dumps(shown, allow_nan=False))
    if ran_out or size > MAX_EXTRA:
        return None, size
    return shown, None


def take(iterable: Iterable, n: int) -> list:
    return list(itertools.islice(iterable, n))
