"""Tests of the tap's struct-based packet parser against scapy-built packets."""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment

from spamflow.nfqueue_tap.packet import ACK, FIN, PSH, RST, SYN, parse_packet

CLIENT = "198.51.100.7"
SERVER = "192.0.2.1"

SYN_OPTIONS = [
    ("MSS", 1460),
    ("SAckOK", b""),
    ("Timestamp", (123456, 0)),
    ("NOP", None),
    ("WScale", 7),
]


def test_parse_ipv4_data_segment_fields():
    raw = bytes(
        IP(src=CLIENT, dst=SERVER, ttl=113)
        / TCP(sport=40211, dport=25, seq=3_000_000_000, ack=77, flags="PA", window=501)
        / (b"x" * 37)
    )
    segment = parse_packet(raw)
    assert segment is not None
    assert segment.src == CLIENT
    assert segment.dst == SERVER
    assert segment.ttl == 113
    assert segment.sport == 40211
    assert segment.dport == 25
    assert segment.seq == 3_000_000_000
    assert segment.ack == 77
    assert segment.flags == PSH | ACK
    assert segment.window == 501
    assert segment.payload_len == 37
    assert segment.mss is None
    assert segment.wscale is None
    assert segment.sack_permitted is False
    assert segment.timestamps is False


def test_parse_syn_options():
    raw = bytes(
        IP(src=CLIENT, dst=SERVER, ttl=52)
        / TCP(sport=50000, dport=25, seq=1, flags="S", window=64240, options=SYN_OPTIONS)
    )
    segment = parse_packet(raw)
    assert segment is not None
    assert segment.flags == SYN
    assert segment.window == 64240
    assert segment.payload_len == 0
    assert segment.mss == 1460
    assert segment.wscale == 7
    assert segment.sack_permitted is True
    assert segment.timestamps is True


def test_parse_syn_without_options():
    raw = bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=50000, dport=25, flags="S"))
    segment = parse_packet(raw)
    assert segment is not None
    assert segment.mss is None
    assert segment.wscale is None
    assert segment.sack_permitted is False
    assert segment.timestamps is False


def test_options_ignored_without_syn():
    raw = bytes(
        IP(src=CLIENT, dst=SERVER)
        / TCP(sport=50000, dport=25, flags="A", options=[("MSS", 1200)])
    )
    segment = parse_packet(raw)
    assert segment is not None
    assert segment.mss is None


def test_parse_syn_with_invalid_option_length():
    # MSS is read, then a window scale option of length 1 stops the parse.
    options = [("MSS", 536), ("WScale", 7), ("NOP", None)]
    tcp = TCP(sport=50000, dport=25, flags="S", options=options)
    raw = bytearray(bytes(IP(src=CLIENT, dst=SERVER) / tcp))
    assert len(raw) == 48
    assert raw[44:47] == bytes([3, 3, 7])
    raw[45] = 1
    segment = parse_packet(bytes(raw))
    assert segment is not None
    assert segment.mss == 536
    assert segment.wscale is None


def test_parse_flag_combinations():
    for flags, expected in (("R", RST), ("FA", FIN | ACK), ("SA", SYN | ACK)):
        raw = bytes(IP(src=SERVER, dst=CLIENT) / TCP(sport=25, dport=40211, flags=flags))
        segment = parse_packet(raw)
        assert segment is not None
        assert segment.flags == expected


def test_parse_ipv6_segment():
    raw = bytes(
        IPv6(src="2001:db8::7", dst="2001:db8::1", hlim=57)
        / TCP(sport=40000, dport=25, seq=9, flags="PA")
        / b"EHLO x\r\n"
    )
    segment = parse_packet(raw)
    assert segment is not None
    assert segment.src == "2001:db8::7"
    assert segment.dst == "2001:db8::1"
    assert segment.ttl == 57
    assert segment.seq == 9
    assert segment.payload_len == 8


def test_parse_ipv6_after_extension_header():
    raw = bytes(
        IPv6(src="2001:db8::7", dst="2001:db8::1")
        / IPv6ExtHdrDestOpt()
        / TCP(sport=40000, dport=25, flags="S", options=[("MSS", 1440)])
    )
    segment = parse_packet(raw)
    assert segment is not None
    assert segment.dport == 25
    assert segment.mss == 1440
    assert segment.payload_len == 0


def test_ipv6_fragment_is_none():
    raw = bytes(
        IPv6(src="2001:db8::7", dst="2001:db8::1")
        / IPv6ExtHdrFragment()
        / TCP(sport=40000, dport=25)
    )
    assert parse_packet(raw) is None


def test_payload_length_from_ip_header():
    # The queue may copy only the headers, so the payload length comes from the IP
    # total length and not from the bytes present.
    raw = bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=40211, dport=25) / (b"y" * 1000))
    segment = parse_packet(raw[:40])
    assert segment is not None
    assert segment.payload_len == 1000


def test_ipv4_total_length_zero_uses_captured_length():
    raw = bytearray(bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=40211, dport=25) / b"abc"))
    raw[2:4] = b"\x00\x00"
    segment = parse_packet(bytes(raw))
    assert segment is not None
    assert segment.payload_len == 3


def test_truncated_headers_are_none():
    raw = bytes(
        IP(src=CLIENT, dst=SERVER)
        / TCP(sport=50000, dport=25, flags="S", options=SYN_OPTIONS)
    )
    for length in range(len(raw)):
        assert parse_packet(raw[:length]) is None, length


def test_truncated_ipv6_headers_are_none():
    raw = bytes(IPv6(src="2001:db8::7", dst="2001:db8::1") / TCP(sport=40000, dport=25))
    for length in range(len(raw)):
        assert parse_packet(raw[:length]) is None, length


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 60,
        b"\x45" + b"\x00" * 10,
        bytes(IP(src=CLIENT, dst=SERVER) / UDP(sport=53, dport=25)),
        bytes(IP(src=CLIENT, dst=SERVER, frag=10) / TCP(sport=1, dport=25)),
        bytes(IP(src=CLIENT, dst=SERVER, flags="MF") / TCP(sport=1, dport=25)),
    ],
    ids=["empty", "zeros", "short-ipv4", "udp", "fragment-offset", "more-fragments"],
)
def test_non_tcp_or_garbage_is_none(raw):
    assert parse_packet(raw) is None


def test_invalid_header_lengths_are_none():
    raw = bytearray(bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=40211, dport=25)))

    # IHL below 5 words.
    bad_ihl = bytearray(raw)
    bad_ihl[0] = 0x44
    assert parse_packet(bytes(bad_ihl)) is None

    # TCP data offset below 5 words.
    bad_offset = bytearray(raw)
    bad_offset[32] = 0x40
    assert parse_packet(bytes(bad_offset)) is None

    # IP total length shorter than the two headers.
    short_total = bytearray(raw)
    short_total[2:4] = struct.pack("!H", 30)
    assert parse_packet(bytes(short_total)) is None


def test_random_bytes_never_raise():
    rng = random.Random(7)
    base = bytes(
        IP(src=CLIENT, dst=SERVER) / TCP(sport=1, dport=25, flags="S", options=SYN_OPTIONS)
    )
    for _ in range(5000):
        mutated = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        cut = rng.randint(0, len(mutated))
        segment = parse_packet(bytes(mutated[:cut]))
        if segment is None:
            continue
        assert 0 <= segment.sport < 65536
        assert 0 <= segment.dport < 65536
        assert 0 <= segment.flags < 256
        assert 0 <= segment.ttl < 256
        assert segment.payload_len >= 0


def test_truncated_options_without_syn_are_none():
    tcp = TCP(sport=40211, dport=25, flags="A", options=[("Timestamp", (5, 6))])
    raw = bytes(IP(src=CLIENT, dst=SERVER) / tcp / b"data")
    assert parse_packet(raw) is not None
    for length in range(40, 52):
        assert parse_packet(raw[:length]) is None, length
    segment = parse_packet(raw[:52])
    assert segment is not None
    assert segment.payload_len == 4
