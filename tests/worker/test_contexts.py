"""The default application's context syntax: what it takes and what it refuses, with a reason."""

from __future__ import annotations

import json
import math

import pytest

from ipferry.worker.app import MAX_CONTEXT, RulesApplication, TunnelContext, valid_tenant
from ipferry.worker.views import strict, strict_dumps

app = RulesApplication()


@pytest.mark.parametrize("raw, extra", [
    (b'{"tenant": "acme"}', {}),
    (b'{"tenant": "acme", "device": "laptop-7", "n": 1.5, "tags": ["a", {"b": null}]}',
     {"device": "laptop-7", "n": 1.5, "tags": ["a", {"b": None}]}),
    (b'{"tenant": "a.b_c:d@e-f9"}', {}),
    ('{"tenant": "acme", "name": "caf\u00e9"}'.encode(), {"name": "caf\u00e9"}),
])
def test_good_contexts(raw, extra):
    ctx = app.parse_context(raw)
    assert ctx == TunnelContext(json.loads(raw)["tenant"], extra)


@pytest.mark.parametrize("raw, reason", [
    (b'{"tenant": "ac\\u0000me"}', "tenant"),
    (b'{"tenant": "acme\\n"}', "tenant"),
    (b'{"tenant": "ac\\u001bme"}', "tenant"),
    (b'{"tenant": "ac me"}', "tenant"),
    (b'{"tenant": "-acme"}', "tenant"),
    (b'{"tenant": ".."}', "tenant"),
    (b'{"tenant": "caf\\u00e9"}', "tenant"),
    (b'{"tenant": "' + b"a" * 65 + b'"}', "tenant"),
    (b'{"tenant": ""}', "no tenant"),
    (b'{"tenant": 7}', "no tenant"),
    (b'{"tenant": "acme", "tenant": "root"}', "duplicate key 'tenant'"),
    (b'{"tenant": "acme", "x": {"k": 1, "k": 2}}', "duplicate key 'k'"),
    (b'{"tenant": "acme", "x": NaN}', "NaN"),
    (b'{"tenant": "acme", "x": -Infinity}', "-Infinity"),
    (b'{"tenant": "acme", "x": 1e400}', "out of range"),
    (b'{"tenant": "acme", "x": "' + b"y" * MAX_CONTEXT + b'"}', "bytes, over 4096"),
    (b'{"tenant": "acme", "x": ' + b"[" * 17 + b"]" * 17 + b"}", "nested"),
    (b'{"tenant": "acme", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nested"),
    (b'{"tenant": "acme"', "not strict JSON"),
    (b'\xff{"tenant": "acme"}', "not strict JSON"),
    (b'["tenant", "acme"]', "not a JSON object"),
])
def test_refused_contexts_say_why(raw, reason):
    with pytest.raises(ValueError) as info:
        app.parse_context(raw)
    assert reason in str(info.value), str(info.value)
    assert len(str(info.value)) < 300


def test_tenant_syntax():
    assert valid_tenant("a") and valid_tenant("A" * 64) and valid_tenant("x-1.b_c:d@e")
    assert not any(valid_tenant(t) for t in ("", "a" * 65, "_a", "a/b", "a\x00", "a\u0130", 5))


def test_strict_turns_anything_into_strict_json():
    class Odd:
        def __str__(self):
            return "odd"

    class Broken:
        def __str__(self):
            raise RuntimeError("no")

    loop: dict = {}
    loop["self"] = loop
    value = {"nan": math.nan, "inf": [math.inf, -math.inf], 1: b"bytes", None: Odd(),
             "set": {1, 2}, "broken": Broken(), "loop": loop, "ok": [1, "two", 3.5, True, None]}
    out = strict_dumps(value)

    def refuse(name):
        raise ValueError(name)

    back = json.loads(out, parse_constant=refuse)
    assert back["nan"] == "nan" and back["inf"] == ["inf", "-inf"] and back["1"] == "b'bytes'"
    assert back["None"] == "odd" and back["broken"] == "<Broken>" and back["ok"] == value["ok"]
    assert strict("x" * 10) == "x" * 10
