"""Measure the tap's per-packet cost: struct parser vs scapy dissection, and flow update.

Run: /work/main/.venv/bin/python benchmarks/tap_parse.py [--help for the options]

All timings come from the same process and the same crafted SMTP-like packets: a
handshake with SYN options, data segments both ways, a retransmission and FIN/ACK.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from machine import cpu_model
from spamflow.nfqueue_tap.flows import FlowTable
from spamflow.nfqueue_tap.packet import parse_packet

CLIENT = "198.51.100.7"
SERVER = "192.0.2.1"
SYN_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
               ("WScale", 7)]


def crafted_session(client_port: int = 40211) -> list[bytes]:
    """Return the raw IPv4 packets of one SMTP-like session plus a few IPv6 ones."""
    client_seq, server_seq = 1000, 9000
    packets = [
        IP(src=CLIENT, dst=SERVER, ttl=113)
        / TCP(sport=client_port, dport=25, flags="S", seq=client_seq, options=SYN_OPTIONS),
        IP(src=SERVER, dst=CLIENT)
        / TCP(sport=25, dport=client_port, flags="SA", seq=server_seq, ack=client_seq + 1,
              options=SYN_OPTIONS),
        IP(src=CLIENT, dst=SERVER, ttl=113)
        / TCP(sport=client_port, dport=25, flags="A", seq=client_seq + 1, ack=server_seq + 1),
    ]

    # Data segments from the client, each acknowledged by the server.
    client_seq += 1
    server_seq += 1
    for _ in range(20):
        packets.append(
            IP(src=CLIENT, dst=SERVER, ttl=113)
            / TCP(sport=client_port, dport=25, flags="PA", seq=client_seq, ack=server_seq)
            / (b"m" * 1200)
        )
        client_seq += 1200
        packets.append(
            IP(src=SERVER, dst=CLIENT)
            / TCP(sport=25, dport=client_port, flags="A", seq=server_seq, ack=client_seq)
        )

    # A retransmission of the last data segment, the server's reply and the FIN.
    packets.append(packets[-2])
    packets.append(
        IP(src=SERVER, dst=CLIENT)
        / TCP(sport=25, dport=client_port, flags="PA", seq=server_seq, ack=client_seq)
        / b"250 2.0.0 Ok: queued\r\n"
    )
    packets.append(
        IP(src=CLIENT, dst=SERVER, ttl=113)
        / TCP(sport=client_port, dport=25, flags="FA", seq=client_seq, ack=server_seq + 22)
    )
    raw = [bytes(packet) for packet in packets]
    raw.extend(
        bytes(IPv6(src="2001:db8::7", dst="2001:db8::1") / TCP(sport=port, dport=25) / b"x")
        for port in (50001, 50002)
    )
    return raw


def per_packet_ns(action: Callable[[bytes], object], packets: list[bytes], rounds: int) -> float:
    """Return the mean nanoseconds per packet of action over rounds passes of packets."""
    start = time.perf_counter_ns()
    for _ in range(rounds):
        for packet in packets:
            action(packet)
    elapsed = time.perf_counter_ns() - start
    return elapsed / (rounds * len(packets))


def scapy_dissect(packet: bytes) -> object:
    return IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)


def update_ns(packets: list[bytes], rounds: int) -> float:
    """Return the mean nanoseconds per packet of parse_packet plus FlowTable.update.

    Each pass uses a new table, so every session starts a new flow as it would live.
    """
    elapsed = 0
    for _ in range(rounds):
        table = FlowTable(25, max_flows=65536, linger=600.0)
        timestamp = 0.0
        start = time.perf_counter_ns()
        for packet in packets:
            segment = parse_packet(packet)
            if segment is not None:
                timestamp += 1e-4
                table.update(segment, timestamp)
        elapsed += time.perf_counter_ns() - start
    return elapsed / (rounds * len(packets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=50,
                        help="sessions with distinct client ports (default 50)")
    parser.add_argument("--rounds", type=int, default=40,
                        help="passes over all packets for the struct parser (default 40)")
    parser.add_argument("--scapy-rounds", type=int, default=2,
                        help="passes over all packets for scapy, which is slower (default 2)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="measurements of each figure; the fastest is kept (default 5)")
    args = parser.parse_args()

    packets = []
    for port in range(40000, 40000 + args.flows):
        packets.extend(crafted_session(port))
    if any(parse_packet(packet) is None for packet in packets):
        raise SystemExit("a crafted packet did not parse; the benchmark is invalid")

    # Warm up the address cache before timing.
    per_packet_ns(parse_packet, packets, 1)

    # The minimum of several interleaved runs is least disturbed by other processes.
    parse = scapy = update = float("inf")
    for _ in range(args.repeat):
        parse = min(parse, per_packet_ns(parse_packet, packets, args.rounds))
        scapy = min(scapy, per_packet_ns(scapy_dissect, packets, args.scapy_rounds))
        update = min(update, update_ns(packets, args.rounds))

    print(f"python {platform.python_version()} on {cpu_model()}")
    print(f"packets: {len(packets)} in {args.flows} sessions (2 IPv6 packets per session)")
    print(f"fastest of {args.repeat} measurements each")
    print(f"struct parse_packet:        {parse:9.0f} ns/packet ({args.rounds} passes)")
    print(f"scapy IP/IPv6(raw) dissect: {scapy:9.0f} ns/packet ({args.scapy_rounds} passes)")
    print(f"parse + FlowTable.update:   {update:9.0f} ns/packet ({args.rounds} passes)")
    print(f"ratio scapy / struct parse: {scapy / parse:9.1f}")
    print(f"ratio parse+update / parse: {update / parse:9.2f}")


if __name__ == "__main__":
    main()
