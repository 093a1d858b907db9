"""Audit records: one JSON object per flow start and per flow end, their own event stream."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO


class AuditLog:
    """Writes to stdout (``"stdout"``) or appends to a JSON-lines file (any other value)."""

    def __init__(self, sink: str, worker: int) -> None:
        self.worker = worker
        self._file: TextIO = sys.stdout if sink == "stdout" else open(sink, "a", buffering=1)
        self._owned = sink != "stdout"

    def record(self, event: str, **fields) -> None:
        line = {"audit": event, "ts": round(time.time(), 6), "worker": self.worker, **fields}
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._owned:
            self._file.close()
