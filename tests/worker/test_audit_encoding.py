"""Audit records as JSON lines: whatever an application put in a record's values comes out as
valid JSON, one line per record, through a real file."""

from __future__ import annotations

import json
import math

from ipferry.worker.audit import AuditLog, encode


class Odd:
    def __str__(self) -> str:
        return "odd!"


def test_values_json_has_no_form_for() -> None:
    line = encode({"nan": math.nan, "inf": [math.inf, -math.inf], "obj": Odd(), "n": 1.5,
                   "ctx": {"tenant": "acme", "deep": {"x": [1, "two", None]}}})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"nan": None, "inf": [None, None], "obj": "odd!", "n": 1.5,
                                "ctx": {"tenant": "acme", "deep": {"x": [1, "two", None]}}}


def test_keys_and_integers_the_fast_encoder_refuses() -> None:
    line = encode({"ctx": {1: "a", (2, 3): "b", None: Odd()}, "big": 2 ** 80,
                   "nan": math.nan})
    assert json.loads(line) == {"ctx": {"1": "a", "(2, 3)": "b", "None": "odd!"},
                                "big": 2 ** 80, "nan": None}


def test_records_are_lines_of_a_file(tmp_path) -> None:
    sink = tmp_path / "audit.jsonl"
    audit = AuditLog(str(sink), worker=3)
    try:
        for i in range(100):
            assert audit.record("flow_end", flow=i, context={"k": math.nan, 7: Odd()})
    finally:
        audit.close()
    records = [json.loads(line) for line in sink.read_text().splitlines()]
    assert len(records) == 100
    assert [r["flow"] for r in records] == list(range(100))
    assert all(r["audit"] == "flow_end" and r["worker"] == 3 for r in records)
    assert records[0]["context"] == {"k": None, "7": "odd!"}
