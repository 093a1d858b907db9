"""The route registry of private networks (#11), its protocol with the workers, and
``GET /api/routes``."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from ipferry.runtime import fdpass
from ipferry.supervisor import pool as poolmod
from ipferry.supervisor.admin import AdminServer, encode_route_cursor
from ipferry.supervisor.routes import MAX_PREFIXES, Route, RouteRefused, RouteRegistry
from tests.supervisor.test_arbiter import next_event, supervisor


def net(tenant: str, cidr: str) -> SimpleNamespace:
    return SimpleNamespace(tenant=tenant, cidr=cidr)


NETWORKS = [net("acme", "10.77.0.0/16"), net("acme", "fd77::/64"), net("globex", "10.77.0.0/16")]
SITES = [("lab", "acme", ["10.77.5.0/24"])]


def registry(**kw) -> RouteRegistry:
    return RouteRegistry(NETWORKS, SITES, **kw)


# -- the registry ---------------------------------------------------------------------------------

def test_a_claim_is_normalised_and_listed():
    r = registry()
    got = r.claim(0, 3, "acme", ["10.77.0.2", "fd77::2/128", "10.77.1.9/24"], vnet=True)
    assert [x.prefix for x in got] == ["10.77.0.2/32", "fd77::2/128", "10.77.1.0/24"]
    assert got[0] == Route("acme", "10.77.0.2/32", 0, 3, True, None)
    assert len(r) == 3
    assert r.rows() == [
        {"tenant": "acme", "prefix": "10.77.0.2/32", "kind": "tunnel", "worker": 0, "tunnel": 3,
         "vnet": True, "site": None},
        {"tenant": "acme", "prefix": "10.77.1.0/24", "kind": "tunnel", "worker": 0, "tunnel": 3,
         "vnet": True, "site": None},
        {"tenant": "acme", "prefix": "10.77.5.0/24", "kind": "site", "worker": None,
         "tunnel": None, "vnet": False, "site": "lab"},
        {"tenant": "acme", "prefix": "fd77::2/128", "kind": "tunnel", "worker": 0, "tunnel": 3,
         "vnet": True, "site": None}]
    assert r.entries() == [
        {"tenant": "acme", "prefix": p, "worker": 0, "tunnel": 3, "vnet": True}
        for p in ("10.77.0.2/32", "10.77.1.0/24", "fd77::2/128")]  # no sites


def test_each_prefix_must_be_inside_the_tenants_networks():
    r = registry()
    with pytest.raises(RouteRefused) as info:
        r.claim(0, 1, "acme", ["10.77.0.2/32", "10.9.0.0/24"], False)
    assert str(info.value) == ("10.9.0.0/24 is outside tenant acme's networks "
                               "(10.77.0.0/16, fd77::/64)")
    with pytest.raises(RouteRefused, match=r"10.0.0.0/8 is outside tenant acme's networks"):
        r.claim(0, 1, "acme", ["10.0.0.0/8"], False)  # bigger than the network
    with pytest.raises(RouteRefused, match=r"outside tenant nobody's networks \(none\)"):
        r.claim(0, 1, "nobody", ["10.77.0.2"], False)
    assert len(r) == 0 and r.rows(tenant="acme") == [r.rows()[0]]  # only the site


def test_tenants_are_address_spaces_of_their_own():
    r = registry()
    r.claim(0, 1, "acme", ["10.77.0.2"], False)
    r.claim(1, 1, "globex", ["10.77.0.2", "10.77.5.0/24"], False)  # acme's site is not globex's
    assert len(r) == 3 and r.count("globex") == 2 and r.count("acme") == 2


def test_overlaps_with_another_tunnel_or_a_site_are_refused_all_or_nothing():
    r = registry()
    r.claim(0, 3, "acme", ["10.77.0.2"], False)
    with pytest.raises(RouteRefused) as info:
        r.claim(1, 7, "acme", ["10.77.9.0/24", "10.77.0.2/32"], False)
    assert str(info.value) == "10.77.0.2/32 overlaps 10.77.0.2/32 held by tunnel 3 of worker 0"
    with pytest.raises(RouteRefused, match="10.77.0.0/16 overlaps 10.77.5.0/24 held by site lab"):
        r.claim(1, 7, "acme", ["10.77.0.0/16"], False)
    with pytest.raises(RouteRefused, match=r"10.77.5.7/32 overlaps 10.77.5.0/24 held by site lab"):
        r.claim(1, 7, "acme", ["10.77.5.7"], False)
    with pytest.raises(RouteRefused, match=r"10.77.8.1/32 overlaps 10.77.8.0/24 of the same claim"):
        r.claim(1, 7, "acme", ["10.77.8.0/24", "10.77.8.1"], False)
    assert r.held(1, 7) == [] and len(r) == 1
    assert [row["prefix"] for row in r.rows()] == ["10.77.0.2/32", "10.77.5.0/24"]


def test_a_new_claim_replaces_the_tunnels_previous_one():
    r = registry()
    r.claim(0, 3, "acme", ["10.77.0.2", "10.77.0.3"], False)
    new = r.claim(0, 3, "acme", ["10.77.0.2", "10.77.0.0/31"], True)
    assert [x.prefix for x in new] == ["10.77.0.2/32", "10.77.0.0/31"]
    assert r.held(0, 3) == new and len(r) == 2
    # A refused replacement leaves the old claim whole.
    other = r.claim(1, 1, "acme", ["10.77.1.1"], False)
    with pytest.raises(RouteRefused):
        r.claim(0, 3, "acme", ["10.77.0.8", "10.77.1.1"], False)
    assert r.held(0, 3) == new and r.held(1, 1) == other and len(r) == 3
    assert r.claim(0, 3, "acme", [], False) == [] and r.held(0, 3) == [] and len(r) == 1


def test_withdrawals():
    r = registry()
    a = r.claim(0, 1, "acme", ["10.77.0.1"], False)
    b = r.claim(0, 2, "acme", ["10.77.0.2", "fd77::2"], False)
    c = r.claim(1, 1, "globex", ["10.77.0.1"], False)
    assert r.withdraw(0, 9) == [] and r.withdraw(5, 1) == []
    assert r.withdraw(0, 1) == a and r.withdraw(0, 1) == []
    r.claim(0, 1, "acme", ["10.77.0.1"], False)  # free again
    assert sorted(x.prefix for x in r.withdraw_worker(0)) == sorted(
        [x.prefix for x in b] + ["10.77.0.1/32"])
    assert r.withdraw_worker(0) == [] and len(r) == 1 and r.entries() == [c[0].wire()]


def test_limits():
    r = registry(max_routes=3)
    with pytest.raises(RouteRefused, match=f"65 prefixes claimed, over {MAX_PREFIXES} a tunnel"):
        r.claim(0, 1, "acme", [f"10.77.{i}.1" for i in range(MAX_PREFIXES + 1)], False)
    assert len(r.claim(0, 1, "acme", [f"10.77.0.{i}" for i in range(3)], False)) == 3
    with pytest.raises(RouteRefused, match="the daemon holds 3 routes; 1 more would pass its "
                                           "limit of 3"):
        r.claim(0, 2, "acme", ["10.77.1.1"], False)
    r.claim(0, 1, "acme", ["10.77.2.0/24"], False)  # a replacement counts what it replaces
    r.claim(0, 2, "acme", ["10.77.1.1", "10.77.1.2"], False)
    for bad in (["nope"], ["fe80::1%eth0"], [7]):
        with pytest.raises(RouteRefused, match="is not an IPv4 or IPv6 network"):
            r.claim(0, 3, "acme", bad, False)  # type: ignore[arg-type]


def test_paging_by_offset_and_after():
    r = registry()
    r.claim(0, 1, "acme", [f"10.77.0.{i}" for i in range(10)], False)
    r.claim(0, 2, "globex", [f"10.77.0.{i}" for i in range(5)], False)
    everything = list(r)
    assert len(everything) == 16 and r.count() == 16
    total, page = r.page(offset=8, limit=5)
    assert total == 16 and page == everything[8:13]
    assert r.page(offset=20)[1] == []
    total, page = r.page("globex", offset=1, limit=2)
    assert total == 5 and [x.prefix for x in page] == ["10.77.0.1/32", "10.77.0.2/32"]
    last = everything[9]
    assert r.page(after=(last.tenant, last.prefix))[1] == everything[10:]
    assert r.page(after=("acme", "10.77.0.4/32"), limit=2)[1] == everything[5:7]
    r.withdraw(0, 1)  # a cursor whose route is gone still says where it was
    assert r.page(after=("acme", "10.77.0.4/32"))[1] == everything[10:]
    assert r.page("nobody") == (0, [])


# -- properties -----------------------------------------------------------------------------------

PREFIXES = st.one_of(
    st.builds(lambda a, n: str(ipaddress.ip_network(f"10.77.0.{a}/{n}", strict=False)),
              st.integers(0, 255), st.integers(26, 32)),
    st.builds(lambda a, n: str(ipaddress.ip_network(f"10.78.0.{a}/{n}", strict=False)),
              st.integers(0, 255), st.integers(30, 32)),  # outside every network
    st.builds(lambda a, n: str(ipaddress.ip_network(f"fd77::{a:x}/{n}", strict=False)),
              st.integers(0, 255), st.integers(124, 128)),
)
OPS = st.lists(st.one_of(
    st.tuples(st.just("claim"), st.integers(0, 2), st.integers(1, 4),
              st.sampled_from(["acme", "globex"]), st.lists(PREFIXES, max_size=4), st.booleans()),
    st.tuples(st.just("withdraw"), st.integers(0, 2), st.integers(1, 4)),
    st.tuples(st.just("worker"), st.integers(0, 2)),
), max_size=40)
SMALL_NETWORKS = [net("acme", "10.77.0.0/24"), net("acme", "fd77::/120"),
                  net("globex", "10.77.0.0/24")]
SMALL_SITES = [("lab", "acme", ["10.77.0.128/28"])]


def model_accepts(model, worker, tunnel, tenant, prefixes, limit) -> bool:
    nets = [ipaddress.ip_network(p) for p in prefixes]
    owned = [ipaddress.ip_network(n.cidr) for n in SMALL_NETWORKS if n.tenant == tenant]
    if not all(any(x.version == o.version and x.subnet_of(o) for o in owned) for x in nets):
        return False
    others = [ipaddress.ip_network(p) for (w, t), (ten, ps, _) in model.items()
              if (w, t) != (worker, tunnel) and ten == tenant for p in ps]
    others += [ipaddress.ip_network(p) for _, ten, ps in SMALL_SITES if ten == tenant for p in ps]
    for i, x in enumerate(nets):
        if any(x.version == o.version and x.overlaps(o) for o in others + nets[:i]):
            return False
    count = sum(len(ps) for key, (_, ps, _) in model.items() if key != (worker, tunnel))
    return count + len(nets) <= limit


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_the_registry_agrees_with_a_simple_model(ops):
    limit = 12
    r = RouteRegistry(SMALL_NETWORKS, SMALL_SITES, max_routes=limit)
    model: dict[tuple[int, int], tuple[str, list[str], bool]] = {}
    for op in ops:
        if op[0] == "claim":
            _, worker, tunnel, tenant, prefixes, vnet = op
            expected = model_accepts(model, worker, tunnel, tenant, prefixes, limit)
            before = sorted(map(str, r))
            try:
                got = r.claim(worker, tunnel, tenant, prefixes, vnet)
            except RouteRefused:
                assert not expected
                assert sorted(map(str, r)) == before  # all or nothing
                continue
            assert expected
            assert [x.prefix for x in got] == prefixes
            model.pop((worker, tunnel), None)
            if prefixes:
                model[(worker, tunnel)] = (tenant, prefixes, vnet)
        elif op[0] == "withdraw":
            _, worker, tunnel = op
            gone = r.withdraw(worker, tunnel)
            assert [x.prefix for x in gone] == model.pop((worker, tunnel), (0, [], 0))[1]
        else:
            gone = r.withdraw_worker(op[1])
            expected_gone = sorted(p for (w, _), (_, ps, _) in model.items() if w == op[1]
                                   for p in ps)
            assert sorted(x.prefix for x in gone) == expected_gone
            model = {k: v for k, v in model.items() if k[0] != op[1]}
        # Invariants: the model's routes and the sites, each tenant's pairwise disjoint.
        want = sorted((ten, p, w, t) for (w, t), (ten, ps, _) in model.items() for p in ps)
        assert sorted((x.tenant, x.prefix, x.worker, x.tunnel) for x in r
                      if x.site is None) == want
        assert len(r) == len(want) and r.count() == len(want) + 1
        for tenant in ("acme", "globex"):
            nets = [ipaddress.ip_network(x.prefix) for x in r if x.tenant == tenant]
            for i, a in enumerate(nets):
                assert not any(a.version == b.version and a.overlaps(b) for b in nets[i + 1:])


# -- the protocol with the workers --------------------------------------------------------------

CONFIG = """\
    [[onramps]]
    kind = "gue"
    [[networks]]
    tenant = "acme"
    cidr = "10.77.0.0/16"
    [[sites]]
    name = "lab"
    tenant = "acme"
    prefixes = ["10.77.5.0/24"]
    sender = "127.0.0.1:7001"
    """


def said(sup, index: int, kind: str, body: dict) -> None:
    sup.post("child_said", sup.workers[index].child, kind, body)


def sent(sup, index: int) -> list[tuple[str, dict]]:
    out = sup.workers[index].child.channel.sent
    sup.workers[index].child.channel.sent = []
    return out


def wire(prefix: str, worker: int = 0, tunnel: int = 3, vnet: bool = False) -> dict:
    return {"tenant": "acme", "prefix": prefix, "worker": worker, "tunnel": tunnel, "vnet": vnet}


def test_a_claim_is_answered_then_told_to_every_worker(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG, workers=3)
        sup.workers[2].equipped = False  # starting: it gets every route with its equipment
        said(sup, 0, "claim_routes", {"id": 7, "tunnel": 3, "tenant": "acme",
                                      "prefixes": ["10.77.0.2", "10.77.1.9/24"], "vnet": True})
        assert sent(sup, 0) == []  # only the loop changes state
        await next_event(sup)
        add = [wire("10.77.0.2/32", vnet=True), wire("10.77.1.0/24", vnet=True)]
        assert sent(sup, 0) == [
            ("routes_claimed", {"prefixes": ["10.77.0.2/32", "10.77.1.0/24"], "reply_to": 7}),
            ("routes", {"add": add, "remove": []})]
        assert sent(sup, 1) == [("routes", {"add": add, "remove": []})]
        assert sent(sup, 2) == []
        # A replacement: what changed only.
        said(sup, 0, "claim_routes", {"id": 8, "tunnel": 3, "tenant": "acme",
                                      "prefixes": ["10.77.0.2/32", "10.77.2.0/24"], "vnet": True})
        await next_event(sup)
        change = {"add": [wire("10.77.2.0/24", vnet=True)],
                  "remove": [wire("10.77.1.0/24", vnet=True)]}
        assert sent(sup, 1) == [("routes", change)]
        assert sent(sup, 0)[1] == ("routes", change)
        # Refused: only the claimant hears, with the reason.
        said(sup, 1, "claim_routes", {"id": 1, "tunnel": 1, "tenant": "acme",
                                      "prefixes": ["10.77.0.2"], "vnet": False})
        await next_event(sup)
        assert sent(sup, 1) == [("error", {
            "error": "10.77.0.2/32 overlaps 10.77.0.2/32 held by tunnel 3 of worker 0",
            "reply_to": 1})]
        assert sent(sup, 0) == []
        said(sup, 1, "claim_routes", {"id": 2, "tunnel": 1, "tenant": "acme",
                                      "prefixes": ["10.77.5.1"], "vnet": False})
        await next_event(sup)
        assert "held by site lab" in sent(sup, 1)[0][1]["error"]
        # Released: removed everywhere.
        said(sup, 0, "release_routes", {"tunnel": 3})
        await next_event(sup)
        remove = {"add": [], "remove": [wire("10.77.0.2/32", vnet=True),
                                         wire("10.77.2.0/24", vnet=True)]}
        assert sent(sup, 0) == sent(sup, 1) == [("routes", remove)]
        said(sup, 0, "release_routes", {"tunnel": 3})  # nothing held: nothing said
        await next_event(sup)
        assert sent(sup, 0) == sent(sup, 1) == []
        assert len(sup.routes) == 0

    asyncio.run(go())


@pytest.mark.parametrize("body, error", [
    ({"tenant": "acme", "prefixes": ["10.77.0.2"], "vnet": False}, "tunnel must be an integer"),
    ({"tunnel": "3", "tenant": "acme", "prefixes": []}, "tunnel must be an integer"),
    ({"tunnel": True, "tenant": "acme", "prefixes": []}, "tunnel must be an integer"),
    ({"tunnel": -1, "tenant": "acme", "prefixes": []}, "tunnel must be an integer"),
    ({"tunnel": 3, "tenant": 5, "prefixes": []}, "tenant must be a string"),
    ({"tunnel": 3, "tenant": "acme"}, "prefixes must be a list of strings"),
    ({"tunnel": 3, "tenant": "acme", "prefixes": "10.77.0.2"}, "prefixes must be a list"),
    ({"tunnel": 3, "tenant": "acme", "prefixes": [1]}, "prefixes must be a list of strings"),
    ({"tunnel": 3, "tenant": "acme", "prefixes": [], "vnet": "yes"}, "vnet must be true or false"),
    ({"tunnel": 3, "tenant": "acme", "prefixes": ["x"] * 65}, "65 prefixes claimed, over 64"),
    ({"tunnel": 3, "tenant": "acme", "prefixes": ["nope"]}, "'nope' is not an IPv4 or IPv6"),
])
def test_bad_claims_are_answered_with_an_error_never_a_crash(tmp_path, body, error):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG)
        said(sup, 0, "claim_routes", {"id": 4, **body})
        await next_event(sup)
        ((kind, reply),) = sent(sup, 0)
        assert kind == "error" and reply["reply_to"] == 4 and error in reply["error"], reply
        assert sent(sup, 1) == [] and len(sup.routes) == 0
        for bad in ({"tunnel": 3, "tenant": "acme", "prefixes": []},  # no id: nobody to answer
                    {"id": "x", "tunnel": 3, "tenant": "acme", "prefixes": []}):
            said(sup, 0, "claim_routes", bad)
            await next_event(sup)
        said(sup, 0, "release_routes", {"tunnel": "all"})
        await next_event(sup)
        assert sent(sup, 0) == []

    asyncio.run(go())


def test_a_worker_that_exits_loses_its_routes_and_the_others_hear(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG, workers=2)
        for worker, tunnel, prefix in [(0, 1, "10.77.0.1"), (0, 2, "10.77.0.2"),
                                       (1, 1, "10.77.1.1")]:
            said(sup, worker, "claim_routes", {"id": 1, "tunnel": tunnel, "tenant": "acme",
                                               "prefixes": [prefix], "vnet": False})
            await next_event(sup)
        sent(sup, 0), sent(sup, 1)
        dead = sup.workers[0].child
        dead.returncode = -9
        sup.post("exit", dead)
        await next_event(sup)
        assert sent(sup, 1) == [("routes", {"add": [], "remove": [
            wire("10.77.0.1/32", 0, 1), wire("10.77.0.2/32", 0, 2)]})]
        assert dead.channel.sent == []
        assert [x["prefix"] for x in sup.routes.entries()] == ["10.77.1.1/32"]
        # A claim from the dead process, read after its exit, is not its slot's.
        said_by_dead = ("claim_routes", {"id": 2, "tunnel": 1, "tenant": "acme",
                                         "prefixes": ["10.77.9.9"], "vnet": False})
        sup.post("child_said", dead, *said_by_dead)
        await next_event(sup)
        assert len(sup.routes) == 1

    asyncio.run(go())


def test_equip_carries_every_route_and_what_does_not_fit_follows(tmp_path, monkeypatch):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG, workers=2)
        for tunnel in range(1, 4):
            sup.routes.claim(1, tunnel, "acme", [f"10.77.{tunnel}.{i}" for i in range(4)], False)
        slot = sup.workers[0]
        slot.equipped = False
        slot.equipment = {}
        sup.pool._send_equipment(slot, slot.child, nsd_fd=0)
        ((kind, body),) = sent(sup, 0)
        assert kind == "equip" and body["routes"] == sup.routes.entries()
        assert len(body["routes"]) == 12 and "sites" in body["settings"]
        # When they do not all fit one message, equip carries the first, routes messages the rest.
        monkeypatch.setattr(poolmod, "ROUTES_PER_MESSAGE", 5)
        slot.equipped = False
        sup.pool._send_equipment(slot, slot.child, nsd_fd=0)
        out = sent(sup, 0)
        assert [k for k, _ in out] == ["equip", "routes", "routes"]
        assert out[0][1]["routes"] + out[1][1]["add"] + out[2][1]["add"] == sup.routes.entries()
        assert [len(b["add"]) for _, b in out[1:]] == [5, 2]
        assert poolmod._fitting(sup.routes.entries(), 100) == 1

    asyncio.run(go())


def test_route_messages_are_cut_removals_first(monkeypatch):
    monkeypatch.setattr(poolmod, "ROUTES_PER_MESSAGE", 2)
    add = [Route("a", f"10.0.0.{i}/32", 0, 1) for i in range(3)]
    remove = [Route("a", "10.0.1.0/32", 0, 1)]
    bodies = poolmod.route_messages(add, remove)
    assert bodies == [{"add": [add[0].wire()], "remove": [remove[0].wire()]},
                      {"add": [add[1].wire(), add[2].wire()], "remove": []}]


class BusyChannel:
    """A worker's channel whose queue is full until ``room`` is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.room = asyncio.Event()

    def send(self, type_, body=None, fds=None) -> None:
        if not self.room.is_set():
            raise fdpass.ChannelBusy("full")
        self.sent.append((type_, body))

    async def send_when_ready(self, type_, body=None, timeout=5.0) -> None:
        try:
            await asyncio.wait_for(self.room.wait(), timeout)
        except TimeoutError:
            raise fdpass.ChannelBusy("still full") from None
        self.send(type_, body)


def test_route_messages_wait_for_room_in_order_and_a_stuck_worker_is_killed(tmp_path,
                                                                            monkeypatch):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG)
        child = sup.workers[0].child
        child.channel = BusyChannel()
        feed = sup.pool.feed(sup.workers[0])
        feed.send("routes", {"n": 1})
        feed.send("routes", {"n": 2})
        assert child.channel.sent == [] and len(feed.queue) == 2
        child.channel.room.set()
        feed.send("routes", {"n": 3})  # behind the queued ones, never before
        await asyncio.sleep(0.01)
        assert [b["n"] for _, b in child.channel.sent] == [1, 2, 3] and feed.task is None
        monkeypatch.setattr(poolmod, "FEED_TIMEOUT", 0.01)
        child.channel.room.clear()
        feed.send("routes", {"n": 4})
        await asyncio.sleep(0.1)
        assert child.signals == [9] and not feed.queue

    asyncio.run(go())


# -- GET /api/routes ------------------------------------------------------------------------------

def test_api_routes_lists_pages_and_filters(tmp_path):
    async def go():
        sup = supervisor(tmp_path / "c.toml", CONFIG + """\
            [[networks]]
            tenant = "globex"
            cidr = "10.77.0.0/16"
            """.replace("            ", "    "))
        sup.routes.claim(0, 3, "acme", ["10.77.0.2"], True)
        sup.routes.claim(1, 1, "globex", [f"10.77.0.{i}" for i in range(1, 6)], False)
        server = AdminServer(sup, sup.config.admin, None)
        async with TestClient(TestServer(server.app)) as client:
            async def get(query: str = "", status: int = 200):
                resp = await client.get("/api/routes" + query)
                assert resp.status == status, await resp.text()
                return json.loads(await resp.text()) if status == 200 else await resp.text()

            body = await get()
            assert body["total"] == 7 and body["next"] is None and body["limit"] == 100
            assert body["networks"] == [{"tenant": "acme", "cidr": "10.77.0.0/16"},
                                        {"tenant": "globex", "cidr": "10.77.0.0/16"}]
            assert body["routes"][0] == {"tenant": "acme", "prefix": "10.77.0.2/32",
                                         "kind": "tunnel", "worker": 0, "tunnel": 3,
                                         "vnet": True, "site": None}
            assert body["routes"][1]["kind"] == "site" and body["routes"][1]["site"] == "lab"
            acme = await get("?tenant=acme")
            assert acme["total"] == 2 and acme["networks"] == [
                {"tenant": "acme", "cidr": "10.77.0.0/16"}]
            assert (await get("?tenant="))["total"] == 0
            page = await get("?tenant=globex&limit=2&offset=1")
            assert [r["prefix"] for r in page["routes"]] == ["10.77.0.2/32", "10.77.0.3/32"]
            assert page["next"] == encode_route_cursor("globex", "10.77.0.3/32")
            seen, after = [], None
            while True:
                page = await get("?limit=3" + (f"&after={after}" if after else ""))
                seen += page["routes"]
                if not (after := page["next"]):
                    break
            assert seen == body["routes"]
            assert (await get("?limit=100000"))["limit"] == 200
            for bad in ("?limit=0", "?offset=-1", "?offset=x"):
                assert "offset must be" in await get(bad, 400)
            assert "not both" in await get("?offset=1&after=x", 400)
            for cursor in ("x", "bm9wZQ", encode_route_cursor("ac me", "10.0.0.0/8"),
                           encode_route_cursor("acme", "10.0.0.0/33"), "A" * 200):
                assert "after must be a cursor" in await get(f"?after={cursor}", 400)

    asyncio.run(go())


def test_the_supervisor_builds_its_registry_from_networks_and_sites(tmp_path):
    sup = supervisor(tmp_path / "c.toml", CONFIG)
    assert sup.routes.networks == {"acme": [ipaddress.ip_network("10.77.0.0/16")]}
    assert sup.routes.rows() == [{"tenant": "acme", "prefix": "10.77.5.0/24", "kind": "site",
                                  "worker": None, "tunnel": None, "vnet": False, "site": "lab"}]
