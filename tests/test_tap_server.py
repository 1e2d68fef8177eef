"""Tests of the tap's query socket and NFQUEUE callback that need no root."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import pytest
from scapy.layers.inet import IP, TCP

from spamflow.nfqueue_tap.flows import FlowTable
from spamflow.nfqueue_tap.packet import parse_packet
from spamflow.nfqueue_tap.protocol import MAX_REQUEST_LINE, format_request, parse_response
from spamflow.nfqueue_tap.query import (
    QueryServer,
    TapSocketError,
    answer_request,
    prepare_socket_path,
)
from spamflow.nfqueue_tap.server import PacketTap
from spamflow.nfqueue_tap.schema import FEATURE_NAMES

CLIENT = "198.51.100.7"
SERVER = "192.0.2.1"


def syn_bytes(sport=40211, ttl=113):
    return bytes(
        IP(src=CLIENT, dst=SERVER, ttl=ttl)
        / TCP(sport=sport, dport=25, flags="S", options=[("MSS", 1400)])
    )


def table_with_flow():
    table = FlowTable(25)
    table.update(parse_packet(syn_bytes()), 5.0)
    return table


def test_answer_ok():
    response = answer_request(table_with_flow(), b"FLOW 198.51.100.7 40211", 6.0)
    assert response["status"] == "ok"
    assert response["flow"] == "198.51.100.7:40211"
    assert response["state"] == "open"
    assert list(response["features"]) == list(FEATURE_NAMES)
    assert response["features"]["syn_ttl"] == 113.0
    assert response["features"]["syn_mss"] == 1400.0


def test_answer_unknown_flow_not_found():
    response = answer_request(table_with_flow(), b"FLOW 198.51.100.7 40212", 6.0)
    assert response == {"status": "not-found", "flow": "198.51.100.7:40212"}


@pytest.mark.parametrize(
    "line",
    [b"", b"HELLO", b"FLOW 198.51.100.7", b"FLOW not-an-ip 25", b"FLOW 10.0.0.1 0",
     b"FLOW 10.0.0.1 70000", b"flow 10.0.0.1 25", b"FLOW \xff 25"],
)
def test_answer_bad_request_error(line):
    response = answer_request(table_with_flow(), line, 6.0)
    assert response["status"] == "error"
    assert response["message"]


async def open_server(tmp_path, table=None, **options):
    path = str(tmp_path / "run" / "tap.sock")
    clock = options.pop("clock", lambda: 6.0)
    if table is None:
        table = table_with_flow()
    server = QueryServer(table, path, clock=clock, **options)
    await server.start()
    return server, path


async def request(reader, writer, line: bytes) -> dict:
    writer.write(line)
    await writer.drain()
    return parse_response(await reader.readline())


async def test_socket_several_requests_per_connection(tmp_path):
    server, path = await open_server(tmp_path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        reader, writer = await asyncio.open_unix_connection(path)
        first = await request(reader, writer, format_request(CLIENT, 40211))
        second = await request(reader, writer, format_request(CLIENT, 1))
        third = await request(reader, writer, b"GET / HTTP/1.0\r\n")
        fourth = await request(reader, writer, format_request(CLIENT, 40211))
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()
    assert first["status"] == "ok"
    assert first["features"]["syn_ttl"] == 113.0
    assert second == {"status": "not-found", "flow": f"{CLIENT}:1"}
    assert third["status"] == "error"
    assert "expected 'FLOW IP PORT'" in third["message"]
    assert fourth["status"] == "ok"
    assert not os.path.exists(path)


async def test_socket_long_line_error_and_close(tmp_path):
    server, path = await open_server(tmp_path)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"FLOW " + b"1" * (MAX_REQUEST_LINE + 50) + b"\n")
        await writer.drain()
        response = parse_response(await reader.readline())
        rest = await asyncio.wait_for(reader.read(), 5.0)
        writer.close()
    finally:
        await server.close()
    assert response["status"] == "error"
    assert str(MAX_REQUEST_LINE) in response["message"]
    assert rest == b""


async def test_socket_idle_connection_closed(tmp_path):
    server, path = await open_server(tmp_path, request_timeout=0.2)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"FLOW 198.51")
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5.0)
        writer.close()

        # The server keeps serving new connections after closing the idle one.
        reader, writer = await asyncio.open_unix_connection(path)
        response = await request(reader, writer, format_request(CLIENT, 40211))
        writer.close()
    finally:
        await server.close()
    assert rest == b""
    assert response["status"] == "ok"


async def test_socket_lookup_failure_is_error_reply(tmp_path):
    class BrokenTable(FlowTable):
        def lookup(self, ip, port, now):
            raise KeyError("broken")

    server, path = await open_server(tmp_path, table=BrokenTable(25))
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        broken = await request(reader, writer, format_request(CLIENT, 40211))
        bad = await request(reader, writer, b"nonsense\n")
        writer.close()
    finally:
        await server.close()
    assert broken == {"status": "error", "message": "internal error during lookup"}
    assert bad["status"] == "error"


async def test_socket_uses_clock_for_linger(tmp_path):
    now = [6.0]
    table = FlowTable(25, linger=10.0)
    table.update(parse_packet(syn_bytes()), 5.0)
    server, path = await open_server(tmp_path, table=table, clock=lambda: now[0])
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        fresh = await request(reader, writer, format_request(CLIENT, 40211))
        now[0] = 15.5
        expired = await request(reader, writer, format_request(CLIENT, 40211))
        writer.close()
    finally:
        await server.close()
    assert fresh["status"] == "ok"
    assert expired["status"] == "not-found"


def test_stale_socket_removed(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    prepare_socket_path(path)
    assert not os.path.exists(path)


def test_live_socket_not_removed(tmp_path):
    path = str(tmp_path / "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(TapSocketError, match="another process is serving"):
            prepare_socket_path(path)
        assert os.path.exists(path)
    finally:
        live.close()


def test_regular_file_not_removed(tmp_path):
    path = tmp_path / "file.sock"
    path.write_text("keep me")
    with pytest.raises(TapSocketError, match="is not a socket"):
        prepare_socket_path(str(path))
    assert path.read_text() == "keep me"


def test_parent_directory_created(tmp_path):
    path = tmp_path / "a" / "b" / "tap.sock"
    prepare_socket_path(str(path))
    assert path.parent.is_dir()


class FakePacket:
    """Stand-in for netfilterqueue.Packet that records verdicts."""

    def __init__(self, payload: bytes, packet_id: int = 1):
        self.payload = payload
        self.id = packet_id
        self.verdicts: list[str] = []

    def get_payload(self) -> bytes:
        return self.payload

    def get_payload_len(self) -> int:
        return len(self.payload)

    def accept(self) -> None:
        self.verdicts.append("accept")


def test_packet_tap_accepts_and_counts():
    table = FlowTable(25)
    tap = PacketTap(table, queue=3, clock=lambda: 7.0)
    packet = FakePacket(syn_bytes())
    tap(packet)
    assert packet.verdicts == ["accept"]
    assert tap.packets == 1
    assert tap.parse_failures == 0
    result = table.lookup(CLIENT, 40211, 7.0)
    assert result is not None
    assert result["features"]["syn_ttl"] == 113.0


def test_packet_tap_accepts_garbage():
    tap = PacketTap(FlowTable(25), clock=lambda: 7.0)
    packets = [FakePacket(b"\x00garbage", packet_id) for packet_id in range(5)]
    for packet in packets:
        tap(packet)
    for packet in packets:
        assert packet.verdicts == ["accept"]
    assert tap.parse_failures == 5
    assert tap.errors == 0


def test_packet_tap_accepts_when_table_fails():
    class BrokenTable(FlowTable):
        def update(self, segment, timestamp):
            raise RuntimeError("broken")

    tap = PacketTap(BrokenTable(25), clock=lambda: 7.0)
    packet = FakePacket(syn_bytes())
    tap(packet)
    assert packet.verdicts == ["accept"]
    assert tap.errors == 1


def test_packet_tap_logs_failures_rate_limited(caplog):
    now = [0.0]
    tap = PacketTap(FlowTable(25), clock=lambda: now[0])
    caplog.set_level("WARNING", logger="spamflow.nfqueue_tap.server")
    for step in range(10):
        now[0] = step * 10.0
        tap(FakePacket(b"junk", step))
    warnings = [record for record in caplog.records if "not parsed" in record.getMessage()]

    # Failures at 0, 10, ..., 90 s with a 60 s interval: reports at 0 and 60 s.
    assert len(warnings) == 2
    assert "6 packets not parsed" in warnings[1].getMessage()
    assert tap.parse_failures == 10
