"""Fixtures for the flow engine's unit tests: pure functions, no root, no sockets, any user.

The test kit (fake tunnel, packets, matchers, the playbook) is in :mod:`tests.engine.kit`.
"""

from __future__ import annotations

import ipaddress

import pytest

from ipferry.engine.core import FlowEngine
from ipferry.engine.flows import FlowTable, Timeouts
from ipferry.wire.nat import NatPool

from .kit import LOCAL4, LOCAL6, NAT4, NAT6, FakeTunnel, Playbook

CONNECT_TIMEOUT = 10.0


def make_engine(*, max_flows: int = 100_000, max_flows_per_tenant: int = 10_000,
                max_datagram_flows_per_tenant: int = 1_000, timeouts: Timeouts | None = None,
                **kw) -> FlowEngine:
    """An engine over real NAT pools (100.64.0.0/16, fd00:64::/64; the listeners' .1 and ::1
    reserved), its table's limits and the engine's options as given. The pools take the first
    64 addresses of their block only: every address of a /16 costs 0.1 s per test to list."""
    pools = {4: NatPool(ipaddress.IPv4Network(NAT4), {ipaddress.ip_address(LOCAL4)},
                        max_addresses=64),
             6: NatPool(ipaddress.IPv6Network(NAT6), {ipaddress.ip_address(LOCAL6)},
                        max_addresses=64)}
    table = FlowTable(max_flows=max_flows, max_flows_per_tenant=max_flows_per_tenant,
                      max_datagram_flows_per_tenant=max_datagram_flows_per_tenant,
                      timeouts=timeouts)
    kw.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return FlowEngine(flows=table, pools=pools, local={4: LOCAL4, 6: LOCAL6}, **kw)


@pytest.fixture
def engine() -> FlowEngine:
    return make_engine()


@pytest.fixture
def tunnel() -> FakeTunnel:
    return FakeTunnel()


@pytest.fixture
def pb(engine: FlowEngine) -> Playbook:
    return Playbook(engine)
