"""Audit records: one JSON object per flow start and per flow end, their own event stream.

Writing a record never raises. A sink that fails (a full disk, ``/dev/full``, a closed pipe) is
*degraded*: the record is lost and counted (``ipferry_audit_errors_total``), the failure is logged
at most once per :data:`LOG_INTERVAL` with how many records were lost since, and the worker tells
the supervisor (``/readyz`` and ``/api/status`` name the sink) through ``on_state``. The first
record that goes through again ends the degraded state. What a flow does while its record cannot
be written is the data path's policy (``audit.on_error``), not this module's.

Each record is one ``os.write`` on an ``O_APPEND`` descriptor, so workers sharing a file never
interleave inside a line. A write cut short by a full disk leaves a torn line; the next record
that goes through starts on a fresh line, so a reader loses that one record only.

Refusals past a limit are not written one by one (a SYN flood would turn into a disk flood):
:class:`Refusals` counts them per tenant and reason and writes one ``flows_refused`` record per
interval.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec

from . import metrics

LOG_INTERVAL = 10.0  # seconds between two "audit_write_failed" log lines
REFUSALS_INTERVAL = 10.0  # seconds a flows_refused record covers at most

# msgspec: a record in about 0.5 µs, where the standard library takes 4; a value it does not know
# is written as its str(), NaN and the infinities as null (as most JSON encoders do).
_encode = msgspec.json.Encoder(enc_hook=str).encode
_slow = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=str).encode


def encode(record: dict[str, Any]) -> bytes:
    """One record as a JSON line."""
    try:
        return _encode(record) + b"\n"
    except (TypeError, ValueError, OverflowError):
        # What msgspec refuses (keys that are not strings or numbers, integers past 64 bits):
        # the standard library's encoder, every key and odd value as its str().
        return (_slow(_plain(record)) + "\n").encode()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, str | int | float | bool | None) else str(value)


class AuditLog:
    """Writes to stdout (``"stdout"``) or appends to a JSON-lines file (any other value)."""

    def __init__(self, sink: str, worker: int, *, log=None,
                 on_state: Callable[[str | None], None] | None = None, node: str = "") -> None:
        self.sink = sink
        self.worker = worker
        # Who wrote a record, in a fleet's merged stream: the node, then its worker.
        self._who: dict[str, object] = {"node": node, "worker": worker} if node else \
            {"worker": worker}
        self.log = log
        self.on_state = on_state  # called with the error (degraded) or None (healthy again)
        self.error: str | None = None  # why the sink is degraded; None while it is healthy
        self.lost = 0  # records lost since the last log line
        self._logged = -LOG_INTERVAL
        self._torn = False  # the last write was cut short: start the next on a fresh line
        if sink == "stdout":
            self._fd, self._owned = 1, False
        else:
            self._fd = os.open(sink, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owned = True

    @property
    def healthy(self) -> bool:
        return self.error is None

    def record(self, event: str, **fields) -> bool:
        """Write one record; False when it was lost (the sink is degraded)."""
        data = encode({"audit": event, "ts": round(time.time(), 6), **self._who, **fields})
        if self._torn:
            data = b"\n" + data
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._failed(exc.strerror or str(exc))
            return False
        if written < len(data):
            self._torn = True  # the disk filled up in the middle of the line
            self._failed(os.strerror(errno.ENOSPC))
            return False
        self._torn = False
        if self.error is not None:
            self._recovered()
        return True

    def _failed(self, error: str) -> None:
        metrics.AUDIT_ERRORS.inc()
        self.lost += 1
        first = self.error is None
        self.error = error
        now = time.monotonic()
        if self.log is not None and (first or now - self._logged >= LOG_INTERVAL):
            self._logged = now
            self.log.error("audit_write_failed", sink=self.sink, error=error,
                           records_lost=self.lost,
                           fix="free space on the audit sink's file system or fix its path; "
                               "audit.on_error decides whether flows go on meanwhile")
            self.lost = 0
        if first and self.on_state is not None:
            self.on_state(error)

    def _recovered(self) -> None:
        if self.log is not None:
            self.log.warning("audit_recovered", sink=self.sink, records_lost=self.lost)
        self.error = None
        self.lost = 0
        if self.on_state is not None:
            self.on_state(None)

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)
            self._owned = False


class Refusals:
    """Flows refused past a limit, counted per (tenant, reason) and written as one
    ``flows_refused`` record each per interval (with the count and the interval)."""

    def __init__(self, audit: AuditLog, interval: float = REFUSALS_INTERVAL) -> None:
        self.audit = audit
        self.interval = interval
        self._counts: dict[tuple[str, str], int] = {}
        self._since: float | None = None  # wall clock of the interval's first refusal

    def add(self, tenant: str, reason: str) -> None:
        key = (tenant, reason)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._since is None:
            self._since = time.time()

    def due(self, now: float) -> bool:
        return self._since is not None and now - self._since >= self.interval

    def flush(self) -> None:
        """Write what was counted (a record whose write fails is lost, and counted as such)."""
        if self._since is None:
            return
        since, counts = self._since, self._counts
        self._since, self._counts = None, {}
        until = round(time.time(), 6)
        for (tenant, reason), count in counts.items():
            self.audit.record("flows_refused", tenant=tenant, reason=reason, count=count,
                              since=round(since, 6), until=until)
