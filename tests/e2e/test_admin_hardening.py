"""The admin API under hostile or careless use: authorization before routing, strict JSON whatever
the contexts hold, and paging through tens of thousands of flows without hurting a worker."""

from __future__ import annotations

import json


def test_the_token_is_checked_before_routing(daemon_factory):
    token = "s3cret-token-0123456789"
    d = daemon_factory("--workers", "1", config=f'[admin]\ntoken = "{token}"\n')
    http = d.netns.http
    for method, path in [("POST", "/nope"), ("DELETE", "/api/workers/0/restart"),
                         ("PUT", "/api/flows"), ("PATCH", "/api/reload"), ("DELETE", "/"),
                         ("POST", "/api/workers/zz/restart")]:
        status, body = http(method, "127.0.0.1", 9180, path)
        assert status == 401 and b"bearer token" in body, (method, path, status, body)
        status, _ = http(method, "127.0.0.1", 9180, path, {"Authorization": "Bearer nope"})
        assert status == 401, (method, path)
    auth = {"Authorization": f"Bearer {token}"}
    # With the token, routing answers as usual.
    assert http("POST", "127.0.0.1", 9180, "/nope", auth)[0] == 404
    assert http("DELETE", "127.0.0.1", 9180, "/api/workers/0/restart", auth)[0] == 405
    assert http("POST", "127.0.0.1", 9180, "/api/workers/zz/restart", auth)[0] == 404
    # Reads stay open; OPTIONS is a read.
    assert http("GET", "127.0.0.1", 9180, "/nope")[0] == 404
    assert http("OPTIONS", "127.0.0.1", 9180, "/api/flows")[0] in (200, 405)
    # Over the unix socket (mode 0600) no token is needed, for routing errors either.
    assert d.request("POST", "/nope")[0] == 404
    assert d.request("DELETE", "/api/workers/0/restart")[0] == 405
    assert d.workers()[0]["restarts"] == 0


def test_without_a_configured_token_any_tcp_mutation_is_forbidden(daemon_factory):
    d = daemon_factory("--workers", "1")
    for method, path in [("POST", "/nope"), ("DELETE", "/api/workers/0/restart")]:
        status, body = d.netns.http(method, "127.0.0.1", 9180, path)
        assert status == 403 and b"admin.token" in body, (method, path, status)
    assert json.loads(d.netns.http("GET", "127.0.0.1", 9180, "/api/workers")[1])[0]["index"] == 0
