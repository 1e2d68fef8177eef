"""Tests of the tap's flow table with scapy-built segments and exact timestamps."""

from __future__ import annotations

import random

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from spamflow.nfqueue_tap.flows import FlowTable, SequenceSpace, infer_initial_ttl
from spamflow.nfqueue_tap.packet import parse_packet
from spamflow.nfqueue_tap.protocol import parse_request
from spamflow.nfqueue_tap.schema import FEATURE_NAMES, MISSING

CLIENT = "198.51.100.7"
SERVER = "192.0.2.1"
CPORT = 40211
CLIENT_ISN = 1000
SERVER_ISN = 5000


def client(flags, seq, ack=0, data=b"", ttl=113, **tcp):
    packet = IP(src=CLIENT, dst=SERVER, ttl=ttl) / TCP(
        sport=CPORT, dport=25, flags=flags, seq=seq, ack=ack, **tcp
    )
    return parse_packet(bytes(packet / data if data else packet))


def server(flags, seq, ack=0, data=b""):
    packet = IP(src=SERVER, dst=CLIENT, ttl=64) / TCP(
        sport=25, dport=CPORT, flags=flags, seq=seq, ack=ack
    )
    return parse_packet(bytes(packet / data if data else packet))


def handshake(table, start=10.0, isn=CLIENT_ISN):
    """Feed SYN at start, SYN-ACK at start + 0.5 and ACK at start + 0.5625."""
    options = [("MSS", 1380), ("NOP", None), ("WScale", 8), ("SAckOK", b"")]
    table.update(client("S", isn, window=29200, options=options), start)
    table.update(server("SA", SERVER_ISN, isn + 1), start + 0.5)
    table.update(client("A", isn + 1, SERVER_ISN + 1), start + 0.5625)


def features(table, now=20.0):
    result = table.lookup(CLIENT, CPORT, now)
    assert result is not None
    return result["features"]


def test_initial_ttl_inference():
    cases = {1: 32, 32: 32, 33: 64, 64: 64, 113: 128, 128: 128, 129: 255, 255: 255}
    for ttl, initial in cases.items():
        assert infer_initial_ttl(ttl) == initial, ttl


def test_handshake_features():
    table = FlowTable(25)
    handshake(table)
    result = table.lookup(CLIENT, CPORT, 11.0)
    assert result is not None
    assert result["state"] == "open"
    values = result["features"]
    assert list(values) == list(FEATURE_NAMES)
    assert values["syn_ttl"] == 113.0
    assert values["initial_ttl"] == 128.0
    assert values["hop_count"] == 15.0
    assert values["syn_window"] == 29200.0
    assert values["syn_mss"] == 1380.0
    assert values["syn_wscale"] == 8.0
    assert values["syn_sack_permitted"] == 1.0
    assert values["syn_timestamps"] == 0.0
    assert values["handshake_rtt_ms"] == 62.5
    assert values["packets_in"] == 2.0
    assert values["packets_out"] == 1.0
    assert values["duration_s"] == 0.5625


def test_rtt_uses_latest_synack():
    table = FlowTable(25)
    table.update(client("S", CLIENT_ISN), 1.0)
    table.update(server("SA", SERVER_ISN, CLIENT_ISN + 1), 1.25)
    table.update(server("SA", SERVER_ISN, CLIENT_ISN + 1), 2.25)
    table.update(client("A", CLIENT_ISN + 1, SERVER_ISN + 1), 2.375)
    assert features(table)["handshake_rtt_ms"] == 125.0


def test_rtt_ignores_ack_not_covering_synack():
    table = FlowTable(25)
    table.update(client("S", CLIENT_ISN), 1.0)
    table.update(server("SA", SERVER_ISN, CLIENT_ISN + 1), 1.25)
    table.update(client("A", CLIENT_ISN + 1, SERVER_ISN), 1.5)
    assert features(table)["handshake_rtt_ms"] == MISSING
    table.update(client("A", CLIENT_ISN + 1, SERVER_ISN + 1), 1.75)
    assert features(table)["handshake_rtt_ms"] == 500.0


def test_byte_and_packet_counts():
    table = FlowTable(25)
    handshake(table)
    table.update(server("PA", SERVER_ISN + 1, CLIENT_ISN + 1, b"220 ok\r\n"), 11.0)
    table.update(client("PA", CLIENT_ISN + 1, SERVER_ISN + 9, b"EHLO a\r\n"), 11.1)
    table.update(client("PA", CLIENT_ISN + 9, SERVER_ISN + 9, b"x" * 1000), 11.2)
    table.update(server("A", SERVER_ISN + 9, CLIENT_ISN + 1009), 11.3)
    values = features(table)
    assert values["packets_in"] == 4.0
    assert values["packets_out"] == 3.0
    assert values["bytes_in"] == 1008.0
    assert values["bytes_out"] == 8.0
    assert values["retransmissions_in"] == 0.0
    assert values["retransmissions_out"] == 0.0


def test_retransmission_counted_once():
    table = FlowTable(25)
    handshake(table)
    table.update(client("PA", CLIENT_ISN + 1, SERVER_ISN + 1, b"a" * 100), 11.0)
    table.update(client("PA", CLIENT_ISN + 101, SERVER_ISN + 1, b"b" * 100), 11.1)
    table.update(client("PA", CLIENT_ISN + 1, SERVER_ISN + 1, b"a" * 100), 11.5)
    values = features(table)
    assert values["retransmissions_in"] == 1.0
    assert values["retransmissions_out"] == 0.0
    assert values["bytes_in"] == 300.0


def test_server_retransmission_counted():
    table = FlowTable(25)
    handshake(table)
    table.update(server("PA", SERVER_ISN + 1, CLIENT_ISN + 1, b"220 ok\r\n"), 11.0)
    table.update(server("PA", SERVER_ISN + 1, CLIENT_ISN + 1, b"220 ok\r\n"), 12.0)
    values = features(table)
    assert values["retransmissions_out"] == 1.0
    assert values["retransmissions_in"] == 0.0


def test_partial_overlap_not_retransmission():
    table = FlowTable(25)
    handshake(table)
    table.update(client("PA", CLIENT_ISN + 1, SERVER_ISN + 1, b"a" * 100), 11.0)
    table.update(client("PA", CLIENT_ISN + 51, SERVER_ISN + 1, b"a" * 100), 11.1)
    assert features(table)["retransmissions_in"] == 0.0


def test_reordered_segment_not_retransmission():
    table = FlowTable(25)
    handshake(table)
    table.update(client("PA", CLIENT_ISN + 101, SERVER_ISN + 1, b"b" * 100), 11.0)
    table.update(client("PA", CLIENT_ISN + 1, SERVER_ISN + 1, b"a" * 100), 11.1)
    assert features(table)["retransmissions_in"] == 0.0
    table.update(client("PA", CLIENT_ISN + 1, SERVER_ISN + 1, b"a" * 100), 11.2)
    assert features(table)["retransmissions_in"] == 1.0


def test_retransmission_across_sequence_wrap():
    isn = 0xFFFFFFFF - 50
    table = FlowTable(25)
    handshake(table, isn=isn)
    first = (isn + 1) & 0xFFFFFFFF
    second = (first + 100) & 0xFFFFFFFF
    assert second < first
    table.update(client("PA", first, SERVER_ISN + 1, b"a" * 100), 11.0)
    table.update(client("PA", second, SERVER_ISN + 1, b"b" * 100), 11.1)
    assert features(table)["retransmissions_in"] == 0.0
    table.update(client("PA", first, SERVER_ISN + 1, b"a" * 100), 11.2)
    assert features(table)["retransmissions_in"] == 1.0


def test_sequence_space_holes():
    space = SequenceSpace()
    space.start(100)
    assert space.record(100, 10) is False
    assert space.record(120, 10) is False
    assert space.record(110, 5) is False
    assert space.record(110, 5) is True
    assert space.record(112, 8) is False
    assert space.record(100, 30) is True


def test_rst_counts_and_closes():
    table = FlowTable(25)
    handshake(table)
    table.update(client("R", CLIENT_ISN + 1), 11.0)
    table.update(server("R", SERVER_ISN + 1), 11.1)
    table.update(server("R", SERVER_ISN + 1), 11.2)
    result = table.lookup(CLIENT, CPORT, 12.0)
    assert result is not None
    assert result["state"] == "closed"
    assert result["features"]["rst_in"] == 1.0
    assert result["features"]["rst_out"] == 2.0


def test_fin_both_sides_closes():
    table = FlowTable(25)
    handshake(table)
    table.update(client("FA", CLIENT_ISN + 1, SERVER_ISN + 1), 11.0)
    result = table.lookup(CLIENT, CPORT, 11.0)
    assert result is not None
    assert result["state"] == "open"
    assert result["features"]["fin_in"] == 1.0
    assert result["features"]["fin_out"] == 0.0
    table.update(server("FA", SERVER_ISN + 1, CLIENT_ISN + 2), 11.1)
    result = table.lookup(CLIENT, CPORT, 11.2)
    assert result is not None
    assert result["state"] == "closed"
    assert result["features"]["fin_out"] == 1.0


def test_port_reuse_after_close_starts_new_flow():
    expired = []
    table = FlowTable(25, on_expire=lambda key, flow: expired.append(key))
    handshake(table, start=10.0)
    table.update(client("PA", CLIENT_ISN + 1, SERVER_ISN + 1, b"q" * 50), 10.7)
    table.update(client("FA", CLIENT_ISN + 51, SERVER_ISN + 1), 11.0)
    table.update(server("FA", SERVER_ISN + 1, CLIENT_ISN + 52), 11.1)

    handshake(table, start=30.0, isn=777_000)
    assert expired == [(CLIENT, CPORT)]
    assert len(table) == 1
    result = table.lookup(CLIENT, CPORT, 31.0)
    assert result is not None
    assert result["state"] == "open"
    values = result["features"]
    assert values["packets_in"] == 2.0
    assert values["bytes_in"] == 0.0
    assert values["fin_in"] == 0.0
    assert values["duration_s"] == 0.5625


def test_syn_retransmission_keeps_flow():
    table = FlowTable(25)
    table.update(client("S", CLIENT_ISN), 1.0)
    table.update(client("S", CLIENT_ISN), 2.0)
    values = features(table, now=2.0)
    assert values["packets_in"] == 2.0
    assert values["duration_s"] == 1.0


def test_syn_after_linger_starts_new_flow():
    table = FlowTable(25, linger=100.0)
    handshake(table, start=0.0)
    handshake(table, start=200.0, isn=CLIENT_ISN)
    values = features(table, now=201.0)
    assert values["packets_in"] == 2.0
    assert values["duration_s"] == 0.5625


def test_lookup_after_linger_is_none():
    table = FlowTable(25, linger=60.0)
    handshake(table, start=0.0)
    table.update(client("R", CLIENT_ISN + 1), 1.0)
    assert table.lookup(CLIENT, CPORT, 61.0) is not None
    assert table.lookup(CLIENT, CPORT, 61.5) is None


def test_expiry_amortised_on_update():
    expired = []
    table = FlowTable(25, linger=10.0, on_expire=lambda key, flow: expired.append(key))
    for port in range(1000, 1005):
        segment = parse_packet(bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=port, dport=25)))
        table.update(segment, float(port - 1000))
    other = parse_packet(bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=2000, dport=25)))

    # Flows seen at 0..4 s are all idle for more than 10 s at 30 s, but one update
    # removes at most two of them.
    table.update(other, 30.0)
    assert expired == [(CLIENT, 1000), (CLIENT, 1001)]
    assert len(table) == 4
    assert table.expire(30.0) == 3
    assert len(table) == 1


def test_max_flows_evicts_least_recent():
    expired = []
    table = FlowTable(25, max_flows=3, on_expire=lambda key, flow: expired.append(key))
    for port in (1001, 1002, 1003):
        segment = parse_packet(bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=port, dport=25)))
        table.update(segment, 1.0)
    again = parse_packet(bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=1001, dport=25)))
    table.update(again, 2.0)
    fourth = parse_packet(bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=1004, dport=25)))
    table.update(fourth, 3.0)
    assert len(table) == 3
    assert expired == [(CLIENT, 1002)]
    assert table.lookup(CLIENT, 1002, 3.0) is None
    assert table.lookup(CLIENT, 1001, 3.0) is not None


def test_other_ports_ignored():
    table = FlowTable(25)
    segment = parse_packet(bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=1234, dport=80)))
    assert table.update(segment, 1.0) is None
    assert len(table) == 0


def test_midstream_flow_has_missing_syn_features():
    table = FlowTable(25)
    table.update(client("PA", 42, 7, b"DATA\r\n"), 5.0)
    values = features(table, now=5.0)
    assert values["syn_ttl"] == MISSING
    assert values["initial_ttl"] == MISSING
    assert values["syn_mss"] == MISSING
    assert values["handshake_rtt_ms"] == MISSING
    assert values["bytes_in"] == 6.0


def test_ipv4_mapped_lookup_and_ipv6_flow():
    table = FlowTable(25)
    handshake(table)
    assert table.lookup(f"::ffff:{CLIENT}", CPORT, 11.0) is not None
    assert table.lookup("::ffff:c633:6407", CPORT, 11.0) is not None
    assert table.lookup("::ffff:c633:6408", CPORT, 11.0) is None

    segment = parse_packet(
        bytes(IPv6(src="2001:db8::7", dst="2001:db8::1", hlim=50) / TCP(sport=555, dport=25))
    )
    table.update(segment, 1.0)
    result = table.lookup("2001:db8::7", 555, 1.0)
    assert result is not None
    assert result["features"]["packets_in"] == 1.0


def test_ipv6_key_matches_request_spelling():
    # glibc's inet_ntop writes ::a.b.c.d for this deprecated form, ipaddress does not.
    raw_source = bytes(12) + bytes([0x49, 0x5B, 0, 0])
    packet = IPv6(src="::1", dst="2001:db8::1") / TCP(sport=555, dport=25)
    raw = bytearray(bytes(packet))
    raw[8:24] = raw_source
    table = FlowTable(25)
    table.update(parse_packet(bytes(raw)), 1.0)
    ip, port = parse_request(b"FLOW ::495b:0 555")
    assert table.lookup(ip, port, 1.0) is not None


def test_random_segments_keep_invariants():
    rng = random.Random(11)
    table = FlowTable(25, max_flows=20, linger=5.0)
    timestamp = 0.0
    for _ in range(2000):
        timestamp += rng.random() * 0.05
        inbound = rng.random() < 0.5
        flags = rng.choice(["S", "SA", "A", "PA", "FA", "R", "RA"])
        sport, dport = (rng.randint(1000, 1040), 25) if inbound else (25, rng.randint(1000, 1040))
        packet = IP(src=CLIENT if inbound else SERVER, dst=SERVER if inbound else CLIENT) / TCP(
            sport=sport, dport=dport, flags=flags, seq=rng.randrange(2**32),
            ack=rng.randrange(2**32),
        )
        data = b"z" * rng.choice([0, 0, 1, 100, 1448])
        table.update(parse_packet(bytes(packet / data if data else packet)), timestamp)
        assert len(table) <= 20
    for (ip, port), flow in table.items():
        result = table.lookup(ip, port, timestamp)
        assert result is not None
        values = result["features"]
        assert values["packets_in"] + values["packets_out"] >= 1.0
        assert values["retransmissions_in"] <= values["packets_in"]
        assert values["retransmissions_out"] <= values["packets_out"]
        assert values["duration_s"] >= 0.0
