"""Private networks in the flow engine: routes, layer 3 between devices, downgraded streams, and
the flows of accepted connections (a TCP on-ramp)."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from ipferry.engine.actions import (
    Audit,
    AuditFlowStart,
    CloseAccepted,
    ConnectOfframp,
    Count,
    DecideFlow,
    FlowEnded,
    FlowStarted,
    Log,
    RelayStreams,
    SendToTunnel,
    WriteTun,
)
from ipferry.engine.decisions import Decision, TunnelContext
from ipferry.engine.flows import TcpState
from ipferry.engine.legs import AcceptedLeg, DowngradedLeg, RoutedLeg
from ipferry.engine.routes import NO_ROUTE, PROHIBITED, Route, RouteTable
from ipferry.wire.sharding import owner

from .conftest import make_engine
from .kit import (
    ACK,
    ANY,
    FIN,
    LOCAL4,
    PSH,
    RST,
    SYN,
    FakeTunnel,
    Has,
    Pkt,
    Placeholder,
    Playbook,
    _input,
    audit_written,
    close_tunnel,
    decided,
    echo,
    icmp_about,
    ip,
    kernel,
    offramp_connected,
    offramp_failed,
    packet,
    rst_for,
    tcp,
    timer,
    udp,
)

stream_finished = _input("stream_finished")

A4, B4, C4 = ip("10.77.0.3"), ip("10.77.0.2"), ip("10.77.0.9")
A6, B6 = ip("fd77::3"), ip("fd77::2")
OTHER = ip("10.88.0.5")  # globex's
NETWORKS = [("acme", "10.77.0.0/16"), ("acme", "fd77::/64"), ("globex", "10.88.0.0/16"),
            ("globex", "10.77.0.0/16")]  # (globex has its own 10.77/16: tenants overlap freely)
DEVICE_SEQ = 9000


@pytest.fixture
def client() -> FakeTunnel:
    return FakeTunnel(id=1)


@pytest.fixture
def device() -> FakeTunnel:
    return FakeTunnel(id=2)


@pytest.fixture
def routes(client, device) -> RouteTable:
    table = RouteTable(NETWORKS)
    table.add("acme", "10.77.0.2/32", device)
    table.add("acme", "fd77::2/128", device)
    table.add("acme", "10.77.0.3/32", client)  # the client is a device too
    table.add("acme", "fd77::3/128", client)
    return table


@pytest.fixture
def engine(routes):
    return make_engine(routes=routes)


@pytest.fixture
def pb(engine) -> Playbook:
    return Playbook(engine)


# -- the table ----------------------------------------------------------------------------------

def test_lookup_answers_route_no_route_prohibited_or_public(routes, device):
    wide = FakeTunnel(id=3)
    routes.add("acme", "10.77.0.0/24", wide)
    assert routes.lookup("acme", B4).target is device  # the longest prefix wins
    assert routes.lookup("acme", C4).target is wide
    assert routes.lookup("acme", ip("10.77.5.5")) is NO_ROUTE  # acme's, held by nobody
    assert routes.lookup("acme", OTHER) is PROHIBITED  # globex's only
    assert routes.lookup("globex", B4) is NO_ROUTE  # globex's own 10.77/16: never acme's device
    assert routes.lookup("acme", ip("198.18.0.1")) is None  # nobody's: the internet
    assert routes.lookup("acme", B6).target is device
    assert [r.prefix for r in routes.remove_target(wide)] == ["10.77.0.0/24"]
    assert routes.lookup("acme", C4) is NO_ROUTE
    assert isinstance(routes.remove("acme", "10.77.0.2/32"), Route)
    assert routes.lookup("acme", B4) is NO_ROUTE and len(routes) == 3


def test_a_table_without_networks_is_not_private():
    table = RouteTable()
    assert not table.private() and table.lookup("acme", B4) is None


# -- layer 3 ------------------------------------------------------------------------------------

def open_routed(pb, client, device, syn=None):
    flow = Placeholder("flow")
    syn = syn or tcp(A4, B4, 40000, 22)
    assert (pb >> packet(client, syn) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade())
            << AuditFlowStart(flow, Has(decision="upgrade", client_leg="ip", server_leg="ip",
                                        destination_tunnel=2, dst="10.77.0.2"))
            >> audit_written(flow, True)
            << Count("routed", "to_device") << SendToTunnel(device, syn, None))
    return flow()


def test_tcp_between_two_devices_goes_as_ip_both_ways_and_ends_with_its_fins(pb, engine,
                                                                            client, device):
    flow = open_routed(pb, client, device)
    assert isinstance(flow.server, RoutedLeg) and flow.slot is None  # no NAT: no kernel
    synack = tcp(B4, A4, 22, 40000, SYN | ACK, DEVICE_SEQ, 1001)
    data = tcp(A4, B4, 40000, 22, ACK | PSH, 1001, DEVICE_SEQ + 1, b"SSH-2.0-x\r\n")
    assert (pb >> packet(device, synack)
            << Count("routed", "to_client") << SendToTunnel(client, synack, None)
            >> packet(client, data) << Count("routed", "to_device") << SendToTunnel(device, ANY, None))
    assert flow.state is TcpState.ESTABLISHED and flow.payload == [11, 0]
    # The same 4-tuple from the client's side of another tunnel is not the flow.
    assert pb >> packet(FakeTunnel(id=7), data) << Count("drop", "tunnel_mismatch")
    fin_a = tcp(A4, B4, 40000, 22, FIN | ACK, 1012, DEVICE_SEQ + 1)
    fin_b = tcp(B4, A4, 22, 40000, FIN | ACK, DEVICE_SEQ + 1, 1013)
    last = tcp(A4, B4, 40000, 22, ACK, 1013, DEVICE_SEQ + 2)
    assert (pb >> packet(client, fin_a) << Count << SendToTunnel
            >> packet(device, fin_b) << Count << SendToTunnel
            >> packet(client, last) << Count << SendToTunnel
            << Audit("flow_end", Has(close_reason="fin", server_leg="ip"))
            << FlowEnded(flow, "fin", True))
    assert not engine.from_device and not engine.by_key


def test_a_blind_reset_from_the_device_passes_but_does_not_end_the_flow(pb, client, device):
    flow = open_routed(pb, client, device)
    blind = tcp(B4, A4, 22, 40000, RST, DEVICE_SEQ + 50_000)
    assert pb >> packet(device, tcp(B4, A4, 22, 40000, SYN | ACK, DEVICE_SEQ, 1001)) << Count << SendToTunnel
    assert pb >> packet(device, blind) << Count("routed", "to_client") << SendToTunnel(client, blind, None)
    assert not flow.ended
    assert (pb >> packet(device, tcp(B4, A4, 22, 40000, RST, DEVICE_SEQ + 1))
            << Count << SendToTunnel << Audit << FlowEnded(flow, "rst", False))


def test_a_device_answers_through_our_queue_of_its_tun_and_no_other_device_does(pb, client,
                                                                                device):
    """The route names another worker's tunnel; the device's answers may reach us through our
    own queue of its TUN, whose id is this worker's: the device decides, not the id. A queue of
    another device whose id happens to equal the route's tunnel's is not it."""
    flow = open_routed(pb, client, device)
    queue = FakeTunnel(id=9, lands=True, device=(device.origin, device.id))
    impostor = FakeTunnel(id=device.id, lands=True, device=(device.origin, 5))
    synack = tcp(B4, A4, 22, 40000, SYN | ACK, DEVICE_SEQ, 1001)
    assert pb >> packet(impostor, synack) << Count("drop", "tunnel_mismatch")
    assert flow.state is TcpState.SYN_SENT
    assert (pb >> packet(queue, synack)
            << Count("routed", "to_client") << SendToTunnel(client, synack, None))


def test_udp_and_ping_between_devices(pb, client, device):
    query = udp(A4, B4, 5353, 53, b"q")
    flow = Placeholder("flow")
    assert (pb >> packet(client, query) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << AuditFlowStart(flow, Has(server_leg="ip"))
            >> audit_written(flow, True) << Count << SendToTunnel(device, query, None)
            >> packet(device, udp(B4, A4, 53, 5353, b"a"))
            << Count("routed", "to_client") << SendToTunnel(client, ANY, None))
    assert flow().payload == [1, 1]
    ping, pong = echo(A4, B4, ident=77), echo(B4, A4, ident=77, reply=True)
    flow = Placeholder("ping")
    assert (pb >> packet(client, ping) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade()) << AuditFlowStart
            >> audit_written(flow, True) << Count << SendToTunnel(device, ping, None)
            >> packet(device, pong) << Count("routed", "to_client") << SendToTunnel(client, pong, None))


def test_udp_asked_for_as_datagrams_is_wrapped_in_fresh_headers(pb, client, device):
    flow = Placeholder("flow")
    assert (pb >> packet(client, udp(A4, B4, 5353, 53, b"q")) << FlowStarted(flow)
            << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(layer="stream"))
            << AuditFlowStart(flow, Has(client_leg="udp:upgraded", server_leg="udp:downgraded"))
            >> audit_written(flow, True) << Count
            << SendToTunnel(device, Pkt(src="10.77.0.3", sport=5353, dst="10.77.0.2", dport=53,
                                        payload=b"q"))
            >> packet(device, udp(B4, A4, 53, 5353, b"answer")) << Count
            << SendToTunnel(client, Pkt(src="10.77.0.2", dport=5353, payload=b"answer")))


def test_another_tenants_network_is_prohibited_and_an_unheld_address_unreachable(pb, client):
    syn = tcp(A4, OTHER, 40000, 80)
    assert (pb >> packet(client, syn) << Count("drop", "other_tenant_network")
            << Count("icmp_sent", "admin") << SendToTunnel(client, icmp_about(syn, "admin")))
    syn = tcp(A4, C4, 40000, 80)
    assert (pb >> packet(client, syn) << Count("drop", "no_route")
            << Count("icmp_sent", "host") << SendToTunnel(client, icmp_about(syn, "host")))
    globex = FakeTunnel(id=5, tenant="globex")  # its own 10.77/16: acme's device is not there
    syn = tcp(ip("10.77.9.9"), B4, 40000, 22)
    assert pb >> packet(globex, syn) << Count("drop", "no_route") << Count << SendToTunnel


def test_a_device_cannot_route_to_itself(pb, device):
    assert pb >> packet(device, tcp(B4, B4, 40000, 22)) << Count("drop", "route_loop")


def test_a_route_gone_while_deciding_refuses_the_flow(pb, engine, routes, client, device):
    flow = Placeholder("flow")
    syn = tcp(A4, B4, 40000, 22)
    assert pb >> packet(client, syn) << FlowStarted(flow) << DecideFlow(flow)
    routes.remove_target(device)
    assert (pb >> decided(flow, Decision.upgrade())
            << Count("drop", "no_route") << Count("icmp_sent", "host")
            << SendToTunnel(client, icmp_about(syn, "host"))
            << Audit("flow_start", Has(decision="drop", reason="no_route"))
            << Audit("flow_end", Has(close_reason="no_route")) << FlowEnded)
    assert flow().ended


def test_a_device_that_disconnects_ends_its_flows(pb, engine, client, device):
    flow = open_routed(pb, client, device)
    assert (pb >> packet(device, tcp(B4, A4, 22, 40000, SYN | ACK, DEVICE_SEQ, 1001))
            << Count << SendToTunnel)
    # The client is reset in its window (as if by the device): its connection fails now.
    assert (pb >> close_tunnel(device)
            << SendToTunnel(client, Pkt(src="10.77.0.2", sport=22, dst="10.77.0.3",
                                        dport=40000, flags=RST | ACK, seq=DEVICE_SEQ + 1,
                                        ack=1001))
            << Audit("flow_end", Has(close_reason="device_disconnected"))
            << FlowEnded(flow, "device_disconnected", False))
    assert not engine.from_device


# -- downgrade: a stream back into IP packets ---------------------------------------------------

KERNEL_PORT = 45000  # the downgraded socket's ephemeral port, inside the namespace


def open_downgraded(pb, engine, client, device, version=4):
    a, b = (A4, B4) if version == 4 else (A6, B6)
    syn = tcp(a, b, 40000, 22)
    flow = Placeholder("flow")
    assert (pb >> packet(client, syn) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(layer="stream"))
            << Count("downgraded")
            << AuditFlowStart(flow, Has(client_leg="tcp:upgraded", server_leg="tcp:downgraded",
                                        destination_tunnel=2))
            >> audit_written(flow, True) << ConnectOfframp(flow))
    f = flow()
    server = f.server
    assert isinstance(server, DowngradedLeg) and f.slot is not None and server.slot != f.slot
    # nsd's socket connects to the second slot: its SYN leaves by the TUN, into the device's
    # tunnel as from the client.
    local = engine.local[version]
    ksyn = tcp(local, server.slot.address, KERNEL_PORT, server.slot.port, SYN, 7000)
    text_a, text_b = ("10.77.0.3", "10.77.0.2") if version == 4 else ("fd77::3", "fd77::2")
    assert (pb >> kernel(ksyn)
            << SendToTunnel(device, Pkt(src=text_a, sport=40000, dst=text_b, dport=22,
                                        flags=SYN, seq=7000), None))
    # The device answers: into the kernel, to the socket.
    assert (pb >> packet(device, tcp(b, a, 22, 40000, SYN | ACK, DEVICE_SEQ, 7001))
            << WriteTun(Pkt(src=str(ipaddress.ip_address(server.slot.address)),
                            sport=server.slot.port, dport=KERNEL_PORT, flags=SYN | ACK), None))
    # Connected (the device answered): only now the client's SYN reaches the kernel.
    assert pb >> offramp_connected(f) << WriteTun(Pkt(flags=SYN, dport=1), None)
    return f, server, local


@pytest.mark.parametrize("version", [4, 6])
def test_a_downgraded_stream_reaches_the_device_and_ends_when_both_connections_do(
        pb, engine, client, device, version):
    flow, server, local = open_downgraded(pb, engine, client, device, version)
    a, b = (A4, B4) if version == 4 else (A6, B6)
    slot = flow.slot
    # The client's connection (with the kernel's upgrade listener) closes first ...
    assert (pb >> kernel(tcp(local, slot.address, 1, slot.port, SYN | ACK, 5000, 1001))
            << SendToTunnel
            >> packet(client, tcp(a, b, 40000, 22, FIN | ACK, 1001, 5001)) << WriteTun
            >> kernel(tcp(local, slot.address, 1, slot.port, FIN | ACK, 5001, 1002))
            << SendToTunnel
            >> packet(client, tcp(a, b, 40000, 22, ACK, 1002, 5002)) << WriteTun)
    assert flow.state is TcpState.TIME_WAIT and not flow.ended  # the device's is still open
    # ... then the device's: the kernel's FIN, the device's, the kernel's last ACK.
    k = (local, server.slot.address, KERNEL_PORT, server.slot.port)
    assert (pb >> kernel(tcp(k[0], k[1], k[2], k[3], FIN | ACK, 7001, DEVICE_SEQ + 1))
            << SendToTunnel(device, Pkt(flags=FIN | ACK), None)
            >> packet(device, tcp(b, a, 22, 40000, FIN | ACK, DEVICE_SEQ + 1, 7002))
            << WriteTun(Pkt(flags=FIN | ACK), None))
    assert not flow.ended
    assert (pb >> kernel(tcp(k[0], k[1], k[2], k[3], ACK, 7002, DEVICE_SEQ + 2))
            << SendToTunnel(device, Pkt(flags=ACK), None) << Audit << FlowEnded(flow, "fin", True))
    assert not engine.by_slot and not engine.from_device
    assert all(pool.in_use == 0 for pool in engine.pools.values())


def test_the_device_refusing_resets_the_client(pb, engine, client, device):
    syn = tcp(A4, B4, 40000, 23)
    flow = Placeholder("flow")
    assert (pb >> packet(client, syn) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(layer="stream")) << Count << AuditFlowStart
            >> audit_written(flow, True) << ConnectOfframp(flow))
    f = flow()
    assert (pb >> offramp_failed(f, "refused", errno.ECONNREFUSED)
            << Count("upstream_failure", "refused") << Log
            << SendToTunnel(client, rst_for(syn)) << Audit << FlowEnded(f, "upstream_refused", False))
    assert not engine.by_slot and not engine.from_device


def test_a_rerouted_flow_downgrades_from_a_port_this_worker_owns(routes, client, device):
    engine = make_engine(routes=routes, workers=4, index=1)
    pb = Playbook(engine)
    sport = next(p for p in range(40000, 41000)
                 if owner(6, A4, p, ip("203.0.113.5"), 443, 4) == 1
                 and owner(6, A4, p, B4, 8022, 4) != 1)
    flow = Placeholder("flow")
    assert (pb >> packet(client, tcp(A4, ip("203.0.113.5"), sport, 443)) << FlowStarted(flow)
            << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(("10.77.0.2", 8022))) << Count("downgraded")
            << AuditFlowStart(flow, Has(upstream="10.77.0.2:8022", server_leg="tcp:downgraded")))
    peer_port = flow().server.peer[1]
    assert peer_port != sport and owner(6, A4, peer_port, B4, 8022, 4) == 1


# -- accepted connections (a TCP on-ramp) -------------------------------------------------------

LOOPBACK = ip("127.0.0.1")


def accepted(engine, upstream=B4, port=8000, client=(LOOPBACK, 5555)):
    return engine.stream_accepted("acme", TunnelContext("acme"), client, (upstream, port),
                                  "sock", "web", 0.0)


def test_an_accepted_connection_to_a_device_is_downgraded_from_the_proxys_address(engine):
    out = accepted(engine)
    assert [type(a) for a in out] == [FlowStarted, DecideFlow]
    flow = out[0].flow
    assert isinstance(flow.client, AcceptedLeg) and flow.client.handle == "sock"
    pb = Playbook(engine)
    assert (pb >> decided(flow, Decision.upgrade()) << Count("downgraded")
            << AuditFlowStart(flow, Has(client_leg="tcp:accepted", server_leg="tcp:downgraded",
                                        tunnel=None, src="127.0.0.1"))
            >> audit_written(flow, True) << ConnectOfframp(flow))
    server = flow.server
    assert flow.slot is None and server.peer[0] == LOCAL4  # (127.0.0.1: a martian to the device)
    assert pb >> offramp_connected(flow) << RelayStreams(flow)
    assert flow.state is TcpState.SYN_SENT  # its state is the downgraded connection's


def test_an_accepted_connection_to_the_internet_relays_until_its_handler_ends(engine):
    flow = accepted(engine, upstream=ip("198.18.0.1"), port=80)[0].flow
    pb = Playbook(engine)
    assert (pb >> decided(flow, Decision.upgrade()) << AuditFlowStart(flow, Has(server_leg="tcp"))
            >> audit_written(flow, True) << ConnectOfframp(flow)
            >> offramp_connected(flow) << RelayStreams(flow))
    assert flow.state is TcpState.RELAYING
    assert engine.flows.timeouts.for_flow(flow) == float("inf")  # never idle to us
    assert pb >> stream_finished(flow) << Audit << FlowEnded(flow, "fin", True)


def test_an_accepted_connection_twice_over_is_closed(engine):
    accepted(engine)
    out = accepted(engine)
    assert out == [Count("drop", "duplicate_flow"), CloseAccepted("sock")]


def test_the_kernels_resets_of_a_flow_cut_short_still_reach_both_ends(pb, engine, client,
                                                                      device):
    flow, server, local = open_downgraded(pb, engine, client, device)
    slot = flow.slot
    assert (pb >> close_tunnel(device) << Audit("flow_end", Has(close_reason="device_disconnected"))
            << FlowEnded(flow, "device_disconnected", False))
    # The driver aborts both sockets: the kernel's resets come out of the TUN after the end.
    assert (pb >> kernel(tcp(local, slot.address, 1, slot.port, RST | ACK, 5001, 1001))
            << SendToTunnel(client, Pkt(src="10.77.0.2", sport=22, dst="10.77.0.3",
                                        dport=40000, flags=RST | ACK), None)
            >> kernel(tcp(local, slot.address, 1, slot.port, RST | ACK, 5001, 1001))
            << Count("drop", "kernel_no_flow"))  # once: then the slot is forgotten
    assert not engine.cut  # (not the device's slot: its tunnel is gone)


def test_a_client_reset_reaches_the_device_through_the_downgraded_socket(pb, engine, client,
                                                                        device):
    flow, server, local = open_downgraded(pb, engine, client, device)
    assert (pb >> packet(client, tcp(A4, B4, 40000, 22, RST, 1001)) << WriteTun
            << Audit << FlowEnded(flow, "rst", False))
    # The driver aborts the downgraded socket: its reset goes to the device, as the client's.
    k = (local, server.slot.address, KERNEL_PORT, server.slot.port)
    assert (pb >> kernel(tcp(*k[:2], k[2], k[3], RST | ACK, 7001, DEVICE_SEQ + 1))
            << SendToTunnel(device, Pkt(src="10.77.0.3", sport=40000, dst="10.77.0.2",
                                        dport=22, flags=RST | ACK), None))
    assert pb >> timer(10.0)
    assert not engine.cut  # (the client's slot, unused, forgotten after 5 s)


def test_the_device_refusing_the_downgraded_connect_is_the_connectors_to_report(
        pb, engine, client, device):
    syn = tcp(A4, B4, 40000, 23)
    flow = Placeholder("flow")
    assert (pb >> packet(client, syn) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(layer="stream")) << Count << AuditFlowStart
            >> audit_written(flow, True) << ConnectOfframp(flow))
    server = flow().server
    ksyn = tcp(engine.local[4], server.slot.address, KERNEL_PORT, server.slot.port, SYN, 7000)
    assert (pb >> kernel(ksyn) << SendToTunnel
            >> packet(device, tcp(B4, A4, 23, 40000, RST | ACK, 0, 7001))
            << WriteTun(Pkt(flags=RST | ACK), None))  # to the socket; the flow waits
    assert not flow().ended
    assert (pb >> offramp_failed(flow(), "refused", errno.ECONNREFUSED) << Count << Log
            << SendToTunnel(client, rst_for(syn)) << Audit
            << FlowEnded(flow(), "upstream_refused", False))


def test_a_reroute_cannot_pose_as_another_device(routes, device):
    engine = make_engine(routes=routes)
    pb = Playbook(engine)
    intruder = FakeTunnel(id=9)
    flow = Placeholder("flow")
    assert (pb >> packet(intruder, tcp(A4, ip("198.18.0.1"), 40000, 443)) << FlowStarted(flow)
            << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(("10.77.0.2", 22))) << Count("drop", "source_not_held")
            << Count << SendToTunnel << Audit << Audit << FlowEnded)


def test_an_upstream_that_is_no_device_wins_over_a_device_destination(pb, client):
    flow = Placeholder("flow")
    assert (pb >> packet(client, udp(A4, B4, 5353, 53)) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(("198.18.0.53", 53)))
            << AuditFlowStart(flow, Has(server_leg="udp", destination_tunnel=None)))
    flow = Placeholder("tcp")
    assert (pb >> packet(client, tcp(A4, B4, 40000, 80)) << FlowStarted(flow) << DecideFlow(flow)
            >> decided(flow, Decision.upgrade(("proxy.example", 3128)))
            << AuditFlowStart(flow, Has(server_leg="tcp", destination_tunnel=None)))


def test_a_lost_namespace_ends_only_the_flows_that_lived_in_it(pb, engine, client, device):
    routed = open_routed(pb, client, device, syn=tcp(A4, B4, 40005, 22))
    downgraded, _, _ = open_downgraded(pb, engine, client, device)
    out = engine.namespace_lost(1.0)
    ended = [a.flow for a in out if isinstance(a, FlowEnded)]
    assert ended == [downgraded] and not routed.ended
    assert engine.by_key.get(routed.key) is routed


def test_a_tunnel_cannot_pose_as_another_device(pb, routes, client, device):
    """A's address is A's: another tunnel sending from it (or from an address of the network
    nobody holds) to a device is refused; from outside the networks it may."""
    intruder = FakeTunnel(id=9)
    spoofed = tcp(A4, B4, 40000, 22)
    assert (pb >> packet(intruder, spoofed) << Count("drop", "source_not_held")
            << Count("icmp_sent", "admin") << SendToTunnel(intruder, icmp_about(spoofed, "admin")))
    unheld = tcp(C4, B4, 40000, 22)
    assert (pb >> packet(intruder, unheld) << Count("drop", "source_not_held") << Count
            << SendToTunnel)
    assert pb >> packet(intruder, tcp(ip("10.98.1.2"), B4, 40000, 22)) << FlowStarted << DecideFlow
    assert pb >> packet(client, spoofed) << FlowStarted << DecideFlow  # from its holder: fine


def test_a_stray_segment_to_a_device_gone_is_reset_not_answered_unreachable(pb, routes, client,
                                                                              device):
    """The client of a flow that ended with its device (its reset lost, say) keeps sending: a
    reset ends its connection; an ICMP unreachable would not (TCP takes it as a soft error)."""
    routes.remove_target(device)
    stray = tcp(A4, B4, 40000, 22, ACK, 1001, DEVICE_SEQ + 1)
    assert (pb >> packet(client, stray) << Count("drop", "no_flow")
            << SendToTunnel(client, rst_for(stray)))
    syn = tcp(A4, B4, 40001, 22)
    assert pb >> packet(client, syn) << Count("drop", "no_route") << Count << SendToTunnel
