"""``ipferry top``: a refreshing terminal view of a running daemon, from its admin API.

Three layers, so that all but the last are tested without a daemon or a terminal:

- :func:`fetch` takes one :class:`Sample` through a ``call(method, path)`` function:
  ``/api/status``, ``/api/tunnels``, ``/metrics`` and every page of ``/api/flows`` (up to
  ``max_flows``).
- :func:`compute` turns two successive samples into a :class:`View` (rates from their
  differences, rows sorted and cut), and :func:`render` a view into a rich renderable (or
  :func:`render_text` into plain text); both are pure.
- :func:`cmd_top` runs it: one snapshot (``--once``), or :func:`live`, a ``rich.live.Live`` screen
  refreshed every ``--interval`` that reads sort keys from stdin in cbreak mode.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

SORTS = ("rate", "packets", "bytes", "duration")
SORT_LABELS = {"rate": "byte rate", "packets": "packet rate", "bytes": "bytes",
               "duration": "duration"}
# Keys of the live view: sort orders, and quit.
KEYS = {"b": "rate", "p": "packets", "t": "bytes", "d": "duration"}
QUIT_KEYS = ("q", "Q")
DEFAULT_INTERVAL = 2.0
DEFAULT_LIMIT = 20
DEFAULT_MAX_FLOWS = 10_000
FLOW_PAGE = 200  # the admin API's largest page
PLAIN_WIDTH = 400  # --once into a pipe: wide enough that no row is cut or wrapped

# The metrics a sample keeps (the rest of /metrics is dropped at once).
WANTED_METRICS = frozenset({
    "ipferry_drops_total", "ipferry_flows_active", "ipferry_bytes_total",
    "ipferry_process_cpu_seconds_total", "ipferry_tunnels_active", "ipferry_gue_tunnels_active",
})

Caller = Callable[[str, str], tuple[int, Any]]  # (method, path) -> (HTTP status, body)
Series = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


class TopError(Exception):
    """The admin API could not be read (unreachable, or an unexpected answer)."""


@dataclass(frozen=True)
class Sample:
    """What the admin API said at one moment."""

    taken: float  # monotonic seconds, for rates
    wall: float  # Unix time, for uptimes
    status: dict
    tunnels: list[dict]
    flows: list[dict]
    flows_total: int  # matching flows in the daemon (may exceed len(flows): max_flows)
    workers_missing: list[int]
    metrics: dict[Series, float]
    tenant: str | None = None


@dataclass(frozen=True)
class FlowRow:
    tenant: str
    protocol: str
    source: str
    destination: str
    state: str
    worker: int
    up: float | None  # payload bytes/s to the server
    down: float | None  # payload bytes/s to the client
    packet_rate: float | None  # packets/s, both directions
    bytes: int  # payload bytes so far, both directions
    age: float

    @property
    def rate(self) -> float | None:
        return None if self.up is None or self.down is None else self.up + self.down


@dataclass(frozen=True)
class WorkerRow:
    index: int
    pid: int | None
    state: str
    restarts: int
    uptime: float | None
    flows: int | None
    tunnels: int | None
    rate_in: float | None  # bytes/s read from tunnels
    rate_out: float | None  # bytes/s handed to tunnels
    cpu: float | None  # percent of one CPU
    drop_rate: float | None


@dataclass(frozen=True)
class TunnelRow:
    worker: int
    id: int
    kind: str
    onramp: str
    tenant: str
    where: str  # a GUE sender's address, or a connected tunnel's context
    rate_in: float | None  # packets/s
    rate_out: float | None
    packets_in: int
    packets_out: int


@dataclass(frozen=True)
class DropRow:
    reason: str
    total: float
    rate: float | None


@dataclass(frozen=True)
class View:
    """Everything one screen shows."""

    ready: bool
    headline: str
    nsd: str
    workers: list[WorkerRow]
    flows: list[FlowRow]
    flows_total: int
    flows_by_protocol: dict[str, int]
    tunnels: list[TunnelRow]
    tunnels_total: int
    drops: list[DropRow]
    drops_total: float
    drops_rate: float | None
    sort: str
    limit: int
    interval: float | None  # seconds between the two samples; None: one sample, no rates
    tenant: str | None = None
    notes: list[str] = field(default_factory=list)


# -- sampling -----------------------------------------------------------------------------------

def _get(call: Caller, path: str) -> Any:
    status, body = call("GET", path)
    if status != 200:
        raise TopError(f"admin API answered {status} to GET {path}: {body}")
    return body


def parse_metrics(text: str) -> dict[Series, float]:
    """The samples of :data:`WANTED_METRICS` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[Series, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in WANTED_METRICS:
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    except ValueError as exc:
        raise TopError(f"cannot parse /metrics: {exc}") from None
    return out


def fetch(call: Caller, *, tenant: str | None = None, max_flows: int = DEFAULT_MAX_FLOWS,
          clock: Callable[[], float] = time.monotonic,
          wall: Callable[[], float] = time.time) -> Sample:
    """One sample: status, tunnels, metrics, then the flows page by page (by cursor)."""
    status = _get(call, "/api/status")
    taken, now = clock(), wall()
    tunnels = _get(call, "/api/tunnels")
    body = _get(call, "/metrics")
    metrics = parse_metrics(body if isinstance(body, str) else str(body))
    if tenant is not None:
        tunnels = [t for t in tunnels if t.get("tenant") == tenant]
    query = f"tenant={quote(tenant, safe='')}&" if tenant is not None else ""
    flows: list[dict] = []
    missing: set[int] = set()
    total, after = 0, None
    while True:
        limit = min(FLOW_PAGE, max_flows - len(flows))
        page = f"&after={quote(after, safe='')}" if after else ""
        body = _get(call, f"/api/flows?{query}limit={limit}{page}")
        if after is None:
            total = body["total"]
        flows.extend(body["flows"])
        missing.update(body.get("workers_missing") or ())
        after = body["next"]
        if not after or len(flows) >= max_flows or not body["flows"]:
            break
    return Sample(taken=taken, wall=now, status=status, tunnels=tunnels, flows=flows,
                  flows_total=max(total, len(flows)), workers_missing=sorted(missing),
                  metrics=metrics, tenant=tenant)


# -- computing a view ---------------------------------------------------------------------------

def flow_key(f: dict) -> tuple:
    """A flow's identity from one sample to the next."""
    return (f["tenant"], f["protocol"], f["src"], f["sport"], f["dst"], f["dport"])


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _flow_row(f: dict, before: dict | None, interval: float | None) -> FlowRow:
    up = down = packet_rate = None
    sent, packets = f["payload_bytes"], f["packets"]
    if before is not None:
        dt = f["age"] - before["age"]
        if dt > 0 and all(a >= b for a, b in zip([*sent, *packets],
                                                  [*before["payload_bytes"], *before["packets"]],
                                                  strict=True)):
            up = (sent[0] - before["payload_bytes"][0]) / dt
            down = (sent[1] - before["payload_bytes"][1]) / dt
            packet_rate = (sum(packets) - sum(before["packets"])) / dt
        else:
            before = None  # the same key, but a new flow: one ended and another began
    if before is None and interval and f["age"] <= interval:
        # Started since the previous sample: all it carried, it carried within the interval.
        up, down, packet_rate = sent[0] / interval, sent[1] / interval, sum(packets) / interval
    if f["protocol"] == "icmp":
        source, destination = f"{f['src']} id {f['sport']}", f["dst"]
    else:
        source, destination = _endpoint(f["src"], f["sport"]), _endpoint(f["dst"], f["dport"])
    return FlowRow(tenant=f["tenant"], protocol=f["protocol"], source=source,
                   destination=destination, state=f["state"], worker=f["worker"], up=up,
                   down=down, packet_rate=packet_rate, bytes=sum(sent), age=f["age"])


def _known(value: float | None) -> float:
    return -1.0 if value is None else value


def sort_flows(rows: list[FlowRow], sort: str) -> list[FlowRow]:
    """Busiest first by ``sort`` (unknown rates last); ties by bytes, then age."""
    def key(r: FlowRow) -> tuple:
        primary = {"rate": lambda: _known(r.rate), "packets": lambda: _known(r.packet_rate),
                   "bytes": lambda: float(r.bytes), "duration": lambda: r.age}[sort]()
        return (-primary, -r.bytes, -r.age, r.tenant, r.source, r.destination)

    if sort not in SORT_LABELS:
        raise ValueError(f"unknown sort {sort!r}; one of {', '.join(SORTS)}")
    return sorted(rows, key=key)


def _sum_by(metrics: dict[Series, float], name: str, label: str,
            **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, labels), v in metrics.items():
        if metric != name:
            continue
        d = dict(labels)
        if all(d.get(k) == want for k, want in match.items()):
            out[d.get(label, "")] = out.get(d.get(label, ""), 0.0) + v
    return out


def _increase(prev: Sample, cur: Sample, name: str, label: str,
              **match: str) -> dict[str, float]:
    """Each series' increase from ``prev`` to ``cur``, summed by ``label``. A counter that went
    down was reset (its worker restarted): its increase is its value now. A series new in ``cur``
    counts whole if its worker answered the previous scrape (it appeared on first use), and not
    at all if that worker was left out of it (its value is no increase of this interval)."""
    known = {dict(labels).get("worker") for (metric, labels) in prev.metrics
             if metric == "ipferry_bytes_total"}
    out: dict[str, float] = {}
    for series, v in cur.metrics.items():
        metric, labels = series
        d = dict(labels)
        if metric != name or not all(d.get(k) == want for k, want in match.items()):
            continue
        before = prev.metrics.get(series)
        if before is None:
            if d.get("worker") not in known:
                continue
            before = 0.0
        key = d.get(label, "")
        out[key] = out.get(key, 0.0) + (v - before if v >= before else v)
    return out


def compute(prev: Sample | None, cur: Sample, *, sort: str = "rate",
            limit: int = DEFAULT_LIMIT) -> View:
    """The view of ``cur``, with rates over the interval since ``prev`` (none without it)."""
    interval = cur.taken - prev.taken if prev is not None and cur.taken > prev.taken else None
    before = {flow_key(f): f for f in prev.flows} if prev is not None and interval else {}
    flows = [_flow_row(f, before.get(flow_key(f)), interval) for f in cur.flows]

    def rates(name: str, label: str, **match: str) -> dict[str, float] | None:
        if prev is None or not interval:
            return None
        return {k: v / interval for k, v in _increase(prev, cur, name, label, **match).items()}

    active = _sum_by(cur.metrics, "ipferry_flows_active", "worker")
    tunnels_active = _sum_by(cur.metrics, "ipferry_tunnels_active", "worker")
    gue_active = _sum_by(cur.metrics, "ipferry_gue_tunnels_active", "worker")
    rate_in = rates("ipferry_bytes_total", "worker", direction="from_tunnel")
    rate_out = rates("ipferry_bytes_total", "worker", direction="to_tunnel")
    cpu = rates("ipferry_process_cpu_seconds_total", "worker", role="worker")
    worker_drops = rates("ipferry_drops_total", "worker")
    # Workers that answered the scrape: the per-packet counters are there from the start (the
    # labelled series, such as flows_active{protocol}, only once used).
    scraped = {dict(labels).get("worker") for (metric, labels) in cur.metrics
               if metric == "ipferry_bytes_total"}
    workers = []
    for w in cur.status.get("workers", []):
        i = str(w["index"])
        has_metrics = i in scraped
        workers.append(WorkerRow(
            index=w["index"], pid=w.get("pid"), state=w["state"], restarts=w["restarts"],
            uptime=(cur.wall - w["started_at"]) if w.get("pid") and w.get("started_at") else None,
            flows=int(active.get(i, 0)) if has_metrics else None,
            tunnels=int(tunnels_active.get(i, 0) + gue_active.get(i, 0)) if has_metrics else None,
            rate_in=rate_in.get(i) if rate_in is not None and has_metrics else None,
            rate_out=rate_out.get(i) if rate_out is not None and has_metrics else None,
            cpu=cpu[i] * 100 if cpu is not None and i in cpu else None,
            drop_rate=(worker_drops.get(i, 0.0) if worker_drops is not None and has_metrics
                       else None)))

    tunnel_before = {_tunnel_key(t): t for t in prev.tunnels} if prev is not None else {}
    tunnels = [_tunnel_row(t, tunnel_before.get(_tunnel_key(t)), interval) for t in cur.tunnels]
    tunnels.sort(key=lambda r: (-_known(None if r.rate_in is None or r.rate_out is None
                                        else r.rate_in + r.rate_out),
                                -(r.packets_in + r.packets_out), r.worker, r.id))

    drop_totals = _sum_by(cur.metrics, "ipferry_drops_total", "reason")
    drop_rates = rates("ipferry_drops_total", "reason")
    drops = [DropRow(reason, total, drop_rates.get(reason, 0.0) if drop_rates is not None
                     else None) for reason, total in drop_totals.items() if total > 0]
    drops.sort(key=lambda r: (-_known(r.rate), -r.total, r.reason))

    st = cur.status
    nsd = st.get("nsd", {})
    config = st.get("config") or "built-in default"
    uptime = f", up {human_duration(cur.wall - st['started_at'])}" if st.get("started_at") else ""
    headline = f"{st.get('status', '?')} (supervisor pid {st.get('pid')}{uptime}, config {config})"
    notes = []
    if cur.workers_missing:
        notes.append(f"worker {', '.join(map(str, cur.workers_missing))} did not answer in time: "
                     f"its flows are left out")
    if len(cur.flows) < cur.flows_total:
        notes.append(f"rates and order over the first {len(cur.flows)} of {cur.flows_total} "
                     f"flows (--max-flows)")
    if cur.tenant is not None:
        notes.append(f"flows and tunnels of tenant {cur.tenant} only; workers and drops of all")
    protocols = _sum_by(cur.metrics, "ipferry_flows_active", "protocol")
    return View(
        ready=bool(st.get("ready")), headline=headline,
        nsd=f"{_pid(nsd.get('pid'))}, {nsd.get('state', '?')}, restarts {nsd.get('restarts', 0)}",
        workers=workers, flows=sort_flows(flows, sort)[:limit], flows_total=cur.flows_total,
        flows_by_protocol={p: int(n) for p, n in sorted(protocols.items()) if n},
        tunnels=tunnels[:limit], tunnels_total=len(cur.tunnels), drops=drops[:limit],
        drops_total=sum(drop_totals.values()),
        drops_rate=sum(drop_rates.values()) if drop_rates is not None else None,
        sort=sort, limit=limit, interval=interval, tenant=cur.tenant, notes=notes)


def _tunnel_key(t: dict) -> tuple:
    return (t["worker"], t["id"], t.get("onramp"), t.get("kind"), t.get("peer"))


def _tunnel_row(t: dict, before: dict | None, interval: float | None) -> TunnelRow:
    rate_in = rate_out = None
    if interval:
        if before is None or t["packets_in"] < before["packets_in"] \
                or t["packets_out"] < before["packets_out"]:
            before = {"packets_in": 0, "packets_out": 0}  # opened since (or its worker restarted)
        rate_in = (t["packets_in"] - before["packets_in"]) / interval
        rate_out = (t["packets_out"] - before["packets_out"]) / interval
    if t.get("kind") == "gue":
        where = t.get("peer") or ""
    elif t.get("context") is None and "context_omitted" in t:
        where = f"(context of {t['context_omitted']} bytes)"
    else:
        where = " ".join(f"{k}={v}" for k, v in (t.get("context") or {}).items())
    return TunnelRow(worker=t["worker"], id=t["id"], kind=t.get("kind", "?"),
                     onramp=t.get("onramp", "?"), tenant=t.get("tenant", ""), where=where,
                     rate_in=rate_in, rate_out=rate_out, packets_in=t["packets_in"],
                     packets_out=t["packets_out"])


# -- rendering ----------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_rate(r: float | None) -> str:
    return "-" if r is None else f"{human_bytes(r)}/s"


def human_count(n: float | None) -> str:
    """A count or a rate of things: 7, 12.5, 980, 12.3k, 4.1M."""
    if n is None:
        return "-"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f}M"
    if abs(n) >= 1e4:
        return f"{n / 1e3:.1f}k"
    if n == int(n) or abs(n) >= 100:
        return f"{n:.0f}"
    return f"{n:.1f}"


def human_duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{max(s, 0.0):.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _pid(pid: int | None) -> str:
    return f"pid {pid}" if pid is not None else "no process"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _table(plain: bool, *columns: str, wide: tuple[str, ...] = (),
           sort_column: str | None = None) -> Table:
    """Columns named in ``wide`` are left-aligned text (ellipsised in a narrow terminal), the
    others right-aligned numbers; ``sort_column``'s header is highlighted."""
    t = Table(box=None if plain else box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              header_style="" if plain else "bold", highlight=False)
    for c in columns:
        left = c in wide or c in ("STATE", "PROTO", "KIND", "ON-RAMP", "TENANT")
        t.add_column(c, justify="left" if left else "right", no_wrap=True,
                     overflow="fold" if plain else "ellipsis",
                     header_style="" if plain else ("bold reverse" if c == sort_column
                                                    else "bold"),
                     max_width=None if plain or c not in wide else 40)
    return t


def _heading(text: str, plain: bool) -> Text:
    return Text(text, style="" if plain else "bold cyan")


SORT_COLUMNS = {"rate": "RATE", "packets": "PKT/S", "bytes": "BYTES", "duration": "AGE"}


def render(view: View, *, plain: bool = False, keys: bool = False,
           error: str | None = None) -> RenderableType:
    """The screen for ``view``: a headline, then workers, drops by reason, tunnels and flows.
    ``plain``: no styles or box lines (for scripts); ``keys``: the live view's key help."""
    parts: list[RenderableType] = []
    ready = "ready" if view.ready else "NOT READY"
    parts.append(Text.assemble((f"{ready}: ", "" if plain else
                                ("bold green" if view.ready else "bold red")), view.headline))
    protocols = ", ".join(f"{p} {n}" for p, n in view.flows_by_protocol.items())
    summary = (f"nsd: {view.nsd}; flows {view.flows_total}"
               + (f" ({protocols})" if protocols and view.tenant is None else "")
               + f"; tunnels {view.tunnels_total}; drops {human_count(view.drops_total)}"
               + (f" ({human_count(view.drops_rate)}/s)" if view.drops_rate is not None else "")
               + (f"; rates over {view.interval:.1f}s" if view.interval else
                  "; one sample: no rates"))
    parts.append(Text(summary))
    for note in view.notes:
        parts.append(Text(f"note: {note}", style="" if plain else "yellow"))
    if error:
        parts.append(Text(f"error: {error}", style="" if plain else "bold red"))

    parts.append(Text(""))
    parts.append(_heading(f"workers ({len(view.workers)})", plain))
    wt = _table(plain, "WORKER", "PID", "STATE", "RESTARTS", "UP", "FLOWS", "TUNNELS", "IN/S",
                "OUT/S", "CPU", "DROPS/S")
    for w in view.workers:
        state_style = "" if plain or w.state == "ready" else "red"
        wt.add_row(str(w.index), str(w.pid) if w.pid is not None else "-",
                   Text(w.state, style=state_style), str(w.restarts), human_duration(w.uptime),
                   human_count(w.flows), human_count(w.tunnels), human_rate(w.rate_in),
                   human_rate(w.rate_out), "-" if w.cpu is None else f"{w.cpu:.0f}%",
                   human_count(w.drop_rate))
    parts.append(wt)

    parts.append(Text(""))
    if view.drops:
        parts.append(_heading(f"drops by reason ({len(view.drops)} shown)", plain))
        dt = _table(plain, "REASON", "TOTAL", "PER S", wide=("REASON",))
        for d in view.drops:
            dt.add_row(d.reason, human_count(d.total), human_count(d.rate))
        parts.append(dt)
    else:
        parts.append(_heading("drops by reason: none", plain))

    parts.append(Text(""))
    if view.tunnels:
        parts.append(_heading(f"tunnels: busiest {len(view.tunnels)} of {view.tunnels_total} by "
                              f"packet rate", plain))
        tt = _table(plain, "WORKER", "ID", "KIND", "ON-RAMP", "TENANT", "PEER/CONTEXT", "IN PKT/S",
                    "OUT PKT/S", "IN PKTS", "OUT PKTS", wide=("TENANT", "PEER/CONTEXT"))
        for t in view.tunnels:
            tt.add_row(str(t.worker), str(t.id), t.kind, t.onramp, t.tenant, t.where,
                       human_count(t.rate_in), human_count(t.rate_out), human_count(t.packets_in),
                       human_count(t.packets_out))
        parts.append(tt)
    else:
        parts.append(_heading("tunnels: none", plain))

    parts.append(Text(""))
    if view.flows:
        parts.append(_heading(f"flows: busiest {len(view.flows)} of {view.flows_total} by "
                              f"{SORT_LABELS[view.sort]}", plain))
        ft = _table(plain, "TENANT", "PROTO", "SOURCE", "DESTINATION", "STATE", "WORKER", "RATE",
                    "UP/S", "DOWN/S", "PKT/S", "BYTES", "AGE",
                    wide=("TENANT", "SOURCE", "DESTINATION"), sort_column=SORT_COLUMNS[view.sort])
        for f in view.flows:
            ft.add_row(f.tenant, f.protocol, f.source, f.destination, f.state, str(f.worker),
                       human_rate(f.rate), human_rate(f.up), human_rate(f.down),
                       human_count(f.packet_rate), human_bytes(f.bytes), human_duration(f.age))
        parts.append(ft)
    else:
        parts.append(_heading(f"flows: none{' of tenant ' + view.tenant if view.tenant else ''}",
                              plain))

    if keys:
        hint = Text("keys: ")
        for key, sort in KEYS.items():
            style = "reverse" if sort == view.sort and not plain else ""
            hint.append(f"{key}", style=f"bold {style}".strip()).append(f" {SORT_LABELS[sort]}  ")
        hint.append("q", style="bold").append(" quit")
        parts.insert(2 + len(view.notes) + (1 if error else 0), hint)
    return Group(*parts)


def render_text(view: View, *, width: int = PLAIN_WIDTH) -> str:
    """``view`` as plain text: no escape codes, no box lines, no trailing spaces."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False)
    console.print(render(view, plain=True))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def render_waiting(error: str | None) -> RenderableType:
    """The live screen before the first sample could be had."""
    if error:
        return Group(Text(f"error: {error}", style="bold red"),
                     Text("retrying; q quits"))
    return Text("reading the admin API ...")


# -- running ------------------------------------------------------------------------------------

@contextlib.contextmanager
def cbreak(fd: int | None) -> Iterator[None]:
    """The terminal at ``fd`` in cbreak mode (keys arrive one by one, unechoed) while inside."""
    if fd is None:
        yield
        return
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def read_keys(fd: int | None, timeout: float) -> str:
    """The keys typed within ``timeout`` seconds (at once when one is), or ''."""
    if fd is None:
        time.sleep(max(timeout, 0.0))
        return ""
    ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
    if not ready:
        return ""
    data = os.read(fd, 64)
    if not data:  # end of input: no more keys; wait out the interval
        time.sleep(max(timeout, 0.0))
        return ""
    return data.decode(errors="replace")


def live(source: Callable[[], Sample], console: Console, *, keys_fd: int | None,
         interval: float, sort: str, limit: int,
         clock: Callable[[], float] = time.monotonic) -> int:
    """Refresh the screen from ``source`` every ``interval`` seconds until ``q`` (or Ctrl-C)."""
    prev: Sample | None = None
    cur: Sample | None = None
    error: str | None = None

    def screen() -> RenderableType:
        if cur is None:
            return render_waiting(error)
        return render(compute(prev, cur, sort=sort, limit=limit), keys=keys_fd is not None,
                      error=error)

    with cbreak(keys_fd), Live(console=console, screen=True, auto_refresh=False,
                               redirect_stdout=False, redirect_stderr=False) as lv:
        try:
            while True:
                try:
                    sample = source()
                    prev, cur, error = cur, sample, None
                except TopError as exc:
                    error = str(exc)
                lv.update(screen(), refresh=True)
                deadline = clock() + interval
                while (left := deadline - clock()) > 0:
                    keys = read_keys(keys_fd, left)
                    if any(k in QUIT_KEYS for k in keys):
                        return 0
                    chosen = [KEYS[k] for k in keys if k in KEYS]
                    if chosen and chosen[-1] != sort:
                        sort = chosen[-1]
                        lv.update(screen(), refresh=True)
        except KeyboardInterrupt:
            return 0


def cmd_top(args) -> int:
    """``ipferry top`` with the parsed ``args`` (see cli.py)."""
    from .adminclient import AdminClientError, call

    problems = []
    if args.once and args.interval < 0 or not args.once and args.interval <= 0:
        problems.append(f"--interval {args.interval}: must be above 0 (with --once, 0 or more)")
    if args.limit < 1:
        problems.append(f"--limit {args.limit}: must be at least 1")
    if args.max_flows < 1:
        problems.append(f"--max-flows {args.max_flows}: must be at least 1")
    if not args.once and not sys.stdout.isatty():
        problems.append("standard output is not a terminal: use --once for a plain snapshot")
    if problems:
        for p in problems:
            print(f"ipferry top: {p}", file=sys.stderr)
        return 2

    def caller(method: str, path: str) -> tuple[int, Any]:
        try:
            return call(args.admin, method, path, args.token)
        except AdminClientError as exc:
            raise TopError(str(exc)) from None

    def source() -> Sample:
        return fetch(caller, tenant=args.tenant, max_flows=args.max_flows)

    if args.once:
        try:
            first = source()
            second = None
            if args.interval > 0:
                time.sleep(args.interval)
                second = source()
        except TopError as exc:
            print(f"ipferry: {exc}", file=sys.stderr)
            return 1
        prev, cur = (first, second) if second is not None else (None, first)
        view = compute(prev, cur, sort=args.sort, limit=args.limit)
        if sys.stdout.isatty():
            Console(highlight=False).print(render(view))
        else:
            sys.stdout.write(render_text(view))
        return 0
    keys_fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    return live(source, Console(highlight=False), keys_fd=keys_fd, interval=args.interval,
                sort=args.sort, limit=args.limit)
