"""The HTTP session at its edges: bad body framing right after the head, a client leaving
mid-upload, absolute-form targets on carried streams, answers that close (audited all the same),
HEAD answered by the layer itself, non-ASCII and huge ports."""
import asyncio
import json

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipferry.runtime.settings import Http
from ipferry.wire.httpmsg import BadTarget, parse_target
from ipferry.worker.app import Rule, RulesApplication
from tests.worker.test_http_session import LOOP, answer, dead_port, env, redirect_to, requests, run

pytestmark = pytest.mark.timeout(30)


@given(st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=6),
       st.sampled_from(["GET", "CONNECT"]))
@settings(max_examples=300, deadline=None)
def test_port_digits_are_ascii(port, method):
    target = f"http://example.com:{port}/" if method == "GET" else f"example.com:{port}"
    try:
        parse_target(method, target)
    except BadTarget:
        return
    assert port.isascii()


def test_huge_port_is_bad_target():
    with pytest.raises(BadTarget):
        parse_target("GET", "http://example.com:" + "9" * 5000 + "/")


def test_denied_request_with_a_body_is_audited():
    async def test():
        app = RulesApplication([Rule("deny", name="no-post", method="POST")])
        async with env(app=app) as e:
            port = await e.aiohttp()
            before = requests("4xx")
            conn = await e.open(port)
            await conn.send(h11.Request(method="POST", target="/echo",
                                        headers=[("host", "o"), ("content-length", "1000")]))
            await conn.send(h11.Data(data=b"x" * 10))
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 403 and closes
            assert requests("4xx") - before == 1
            assert len(e.audit.records) == 1
            assert e.audit.records[0]["status"] == 403
    run(test)


def test_refused_upstream_for_a_request_with_a_body_is_audited():
    async def test():
        dead = (LOOP, dead_port())
        async with env(app=redirect_to(dead)) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.send(h11.Request(method="POST", target="/echo",
                                        headers=[("host", "o"), ("content-length", "5")]))
            await conn.send(h11.Data(data=b"hello"), h11.EndOfMessage())
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 502
            assert len(e.audit.records) == 1
            assert e.audit.records[0]["status"] == 502
    run(test)


def test_connect_without_a_data_path_is_audited_as_501():
    async def test():
        async with env() as e:
            conn = await e.open(served=e.onramp())
            await conn.write(b"CONNECT 10.9.8.7:443 HTTP/1.1\r\nHost: 10.9.8.7:443\r\n\r\n")
            assert await conn.done() is False
            resp, _, closes = answer(await conn.rest(), method="CONNECT")
            assert resp.status_code == 501 and closes
            assert [r["status"] for r in e.audit.records] == [501]
    run(test)


def test_absolute_form_on_a_carried_stream_goes_on_in_origin_form():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            resp, body = await conn.request("GET", f"http://{LOOP}:{port}/echo?x=1")
            assert resp.status_code == 200, body
            assert json.loads(body)["path"] == "/echo?x=1"
    run(test)


def test_whole_head_over_the_limit_is_431():
    async def test():
        async with env(settings=Http(max_header_bytes=1024)) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.write(b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 5000
                             + b"\r\n\r\n")
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 431, body[:100]
    run(test)


def test_client_abandoning_an_upload_ends_the_session():
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.send(h11.Request(method="POST", target="/sha256",
                                        headers=[("host", "o"), ("content-length", "100000")]))
            await conn.send(h11.Data(data=b"x" * 1000))
            await asyncio.sleep(0.1)
            conn.sock.close()
            await conn.done(timeout=3)  # hangs: waits for the upstream's answer forever
    run(test, timeout=10)


@pytest.mark.parametrize("raw", [
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
])
def test_bad_chunk_right_after_the_head_never_raises(raw):
    async def test():
        async with env() as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.write(raw)
            assert await conn.done() is False
            resp, body, closes = answer(await conn.rest())
            assert resp.status_code == 400 and closes
    run(test)


def test_denied_head_request_keeps_the_connection_and_is_audited():
    async def test():
        app = RulesApplication([Rule("deny", name="no-admin", path="/admin")])
        async with env(app=app) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.send(h11.Request(method="HEAD", target="/admin",
                                        headers=[("host", "o")]), h11.EndOfMessage())
            resp, body = await conn.response()
            assert resp.status_code == 403 and body == b""
            await asyncio.sleep(0.2)
            print("serve ended:", conn.task.done(), "records:", e.audit.records,
                  "logs:", e.log.events)
            assert [r["status"] for r in e.audit.records] == [403]
            assert not conn.task.done()  # kept: it had no body
    run(test)


def test_denied_connect_is_audited():
    async def test():
        handed = []

        async def hand_connect(*args):
            handed.append(args)
            return 200, None

        app = RulesApplication([Rule("deny", name="no-tunnels", method="CONNECT")])
        async with env(app=app, hand_connect=hand_connect) as e:
            conn = await e.open(served=e.onramp())
            await conn.write(b"CONNECT 10.9.8.7:443 HTTP/1.1\r\nHost: 10.9.8.7:443\r\n\r\n")
            assert await conn.done() is False
            resp, body, _ = answer(await conn.rest(), method="CONNECT")
            assert resp.status_code == 403 and b"no-tunnels" in body
            assert handed == []
            assert [(r["status"], r["method"], r["decision"]) for r in e.audit.records] == \
                [(403, "CONNECT", "deny")]
    run(test)


def test_denied_upgrade_is_audited():
    async def test():
        app = RulesApplication([Rule("deny", name="no-ws", path="/ws")])
        async with env(app=app) as e:
            port = await e.aiohttp()
            conn = await e.open(port)
            await conn.send(h11.Request(method="GET", target="/ws", headers=[
                ("host", "o"), ("connection", "upgrade"), ("upgrade", "websocket")]),
                h11.EndOfMessage())
            resp, body = await conn.response()
            assert resp.status_code == 403
            assert await conn.done() is False
            assert [r["status"] for r in e.audit.records] == [403]
    run(test)


@pytest.mark.parametrize("target", [b"http://a:" + b"9" * 5000 + b"/", b"http://a:\xb2/"])
def test_bad_port_through_the_onramp_is_400(target):
    async def test():
        async with env() as e:
            conn = await e.open(served=e.onramp())
            await conn.write(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await conn.done() is False
            resp, _, closes = answer(await conn.rest())
            assert resp.status_code == 400 and closes
    run(test)
