"""Tests of the tap's offline mode on real captures, checked against scapy dissection."""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinux, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import rdpcap, wrpcap, wrpcapng

from conftest import SHARED_DATA
from spamflow.config import ConfigError
from spamflow.nfqueue_tap import cli
from spamflow.nfqueue_tap.pcap import CaptureFormatError, capture_flows, read_capture
from spamflow.nfqueue_tap.schema import FEATURE_NAMES, MISSING

PCAPS = SHARED_DATA / "pcaps"
# Wireshark's smtp.pcap sample: 10.10.1.4:1470 sends one mail to 74.53.140.153:25.
WIRESHARK_SMTP = PCAPS / "suricata-verify/bug-3616-smtp/input.pcap"
# Merged trace: the session above plus a second port-25 flow and flows on other ports.
ZEEK_SMTP = PCAPS / "zeek/smtp.pcap"
# pcapng with three SMTP sessions over loopback.
PCAPNG_SMTP = PCAPS / "zeek/smtp__smtp-bdat-cmd-invalid.pcapng"
# Classic pcap with the BSD loopback link type (0).
NULL_LINK_SMTP = PCAPS / "suricata-verify/smtp-pipelining/input.pcap"
GZIP_SMTP = PCAPS / "zeek/smtp__mime-header-size-limit.pcap.gz"

pytestmark = pytest.mark.skipif(not PCAPS.is_dir(), reason=f"{PCAPS} not present")


def scapy_reference(path: Path, server_port: int = 25) -> dict[tuple[str, int], dict]:
    """Compute a subset of the flow features with scapy, one flow per remote endpoint."""
    if path.suffix == ".gz":
        with gzip.open(path) as handle:
            packets = rdpcap(handle)
    else:
        packets = rdpcap(str(path))
    flows: dict[tuple[str, int], dict] = {}
    for packet in packets:
        if TCP not in packet:
            continue
        ip = packet[IP] if IP in packet else packet[IPv6]
        tcp = packet[TCP]
        inbound = tcp.dport == server_port
        if not inbound and tcp.sport != server_port:
            continue
        key = (ip.src, tcp.sport) if inbound else (ip.dst, tcp.dport)
        flow = flows.setdefault(key, {
            "packets_in": 0, "packets_out": 0, "bytes_in": 0, "bytes_out": 0,
            "rst_in": 0, "rst_out": 0, "fin_in": 0, "fin_out": 0,
            "first": float(packet.time), "last": float(packet.time),
            "syn": None, "synack_time": None, "synack_seq": None, "rtt_ms": None,
        })
        direction = "in" if inbound else "out"
        payload = len(packet[Raw].load) if Raw in packet else 0
        flow[f"packets_{direction}"] += 1
        flow[f"bytes_{direction}"] += payload
        flow[f"rst_{direction}"] += 1 if tcp.flags.R else 0
        flow[f"fin_{direction}"] = max(flow[f"fin_{direction}"], 1 if tcp.flags.F else 0)
        flow["last"] = float(packet.time)
        if inbound and tcp.flags.S and not tcp.flags.A and flow["syn"] is None:
            ttl = ip.ttl if IP in packet else ip.hlim
            flow["syn"] = (ttl, tcp.window, dict(tcp.options).get("MSS"))
        if not inbound and tcp.flags.S and tcp.flags.A:
            flow["synack_time"] = float(packet.time)
            flow["synack_seq"] = tcp.seq
        if (
            inbound and tcp.flags.A and not tcp.flags.S and flow["rtt_ms"] is None
            and flow["synack_time"] is not None and tcp.ack == flow["synack_seq"] + 1
        ):
            flow["rtt_ms"] = (float(packet.time) - flow["synack_time"]) * 1000.0
    return flows


def assert_matches_scapy(path: Path) -> int:
    """Compare our features with the scapy reference for each flow. Return the flow count."""
    reference = scapy_reference(path)
    ours = {key: flow.features() for key, flow in capture_flows(str(path), 25)}
    assert set(ours) == set(reference)
    for key, expected in reference.items():
        features = ours[key]
        for name in ("packets_in", "packets_out", "bytes_in", "bytes_out",
                     "rst_in", "rst_out", "fin_in", "fin_out"):
            assert features[name] == expected[name], (key, name)
        assert features["duration_s"] == pytest.approx(
            expected["last"] - expected["first"], abs=1e-6
        ), key
        if expected["syn"] is None:
            assert features["syn_ttl"] == MISSING, key
        else:
            ttl, window, mss = expected["syn"]
            assert features["syn_ttl"] == ttl, key
            assert features["syn_window"] == window, key
            assert features["syn_mss"] == (MISSING if mss is None else mss), key
        if expected["rtt_ms"] is None:
            assert features["handshake_rtt_ms"] == MISSING, key
        else:
            assert features["handshake_rtt_ms"] == pytest.approx(expected["rtt_ms"], abs=1e-3)
    return len(reference)


def test_wireshark_smtp_session_values():
    flows = capture_flows(str(WIRESHARK_SMTP), 25)
    assert len(flows) == 1
    key, flow = flows[0]
    assert key == ("10.10.1.4", 1470)
    assert flow.state == "closed"
    features = flow.features()
    assert list(features) == list(FEATURE_NAMES)
    assert features["packets_in"] == 28.0
    assert features["packets_out"] == 25.0
    assert features["syn_ttl"] == 128.0
    assert features["initial_ttl"] == 128.0
    assert features["hop_count"] == 0.0
    assert features["syn_mss"] == 1460.0
    assert features["syn_sack_permitted"] == 1.0
    assert features["fin_in"] == 1.0
    assert features["fin_out"] == 1.0
    assert features["bytes_in"] > 10000.0
    assert 0.0 < features["handshake_rtt_ms"] < 1000.0


def test_wireshark_smtp_matches_scapy():
    assert assert_matches_scapy(WIRESHARK_SMTP) == 1


def test_merged_trace_matches_scapy():
    assert assert_matches_scapy(ZEEK_SMTP) == 2


def test_pcapng_matches_scapy():
    assert assert_matches_scapy(PCAPNG_SMTP) == 3


def test_null_link_type_matches_scapy():
    assert assert_matches_scapy(NULL_LINK_SMTP) == 1


def test_gzip_capture_matches_scapy():
    assert assert_matches_scapy(GZIP_SMTP) == 1


def test_other_server_port_has_no_port_25_flow():
    flows = capture_flows(str(ZEEK_SMTP), 443)
    assert flows
    for (_ip, port), _flow in flows:
        assert port != 25


def synthetic_session(client="203.0.113.9", server="192.0.2.25"):
    """A handshake at t=100.0 / 100.25 / 100.375 and one data segment of 11 bytes."""
    packets = [
        IP(src=client, dst=server, ttl=49)
        / TCP(sport=41000, dport=25, flags="S", seq=10, options=[("MSS", 1200)]),
        IP(src=server, dst=client) / TCP(sport=25, dport=41000, flags="SA", seq=90, ack=11),
        IP(src=client, dst=server, ttl=49) / TCP(sport=41000, dport=25, flags="A", seq=11, ack=91),
        IP(src=client, dst=server, ttl=49)
        / TCP(sport=41000, dport=25, flags="PA", seq=11, ack=91)
        / b"HELO a.b\r\n\x00",
    ]
    for packet, timestamp in zip(packets, (100.0, 100.25, 100.375, 100.5)):
        packet.time = timestamp
    return packets


def ether():
    # Fixed addresses keep scapy from resolving MAC addresses through the host's routes.
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def framed(link=lambda packet: ether() / packet):
    """Return the synthetic session with a link-layer header, keeping the timestamps."""
    packets = []
    for packet in synthetic_session():
        frame = link(packet)
        frame.time = packet.time
        packets.append(frame)
    return packets


def check_synthetic(path: Path):
    flows = capture_flows(str(path), 25)
    assert len(flows) == 1
    key, flow = flows[0]
    assert key == ("203.0.113.9", 41000)
    features = flow.features()
    assert features["syn_ttl"] == 49.0
    assert features["initial_ttl"] == 64.0
    assert features["hop_count"] == 15.0
    assert features["syn_mss"] == 1200.0
    assert features["handshake_rtt_ms"] == 125.0
    assert features["bytes_in"] == 11.0
    assert features["packets_out"] == 1.0
    assert features["duration_s"] == 0.5


@pytest.mark.parametrize(
    "link",
    [
        lambda packet: ether() / packet,
        lambda packet: ether() / Dot1Q(vlan=7) / packet,
        lambda packet: ether() / Dot1Q(vlan=7) / Dot1Q(vlan=8) / packet,
        lambda packet: CookedLinux(proto=0x0800) / packet,
        lambda packet: packet,
    ],
    ids=["ethernet", "vlan", "qinq", "linux-sll", "raw-ip"],
)
def test_link_types(tmp_path, link):
    path = tmp_path / "session.pcap"
    wrpcap(str(path), framed(link))
    check_synthetic(path)


def test_nanosecond_pcap(tmp_path):
    path = tmp_path / "nano.pcap"
    wrpcap(str(path), framed(), nano=True)
    check_synthetic(path)


def test_written_pcapng(tmp_path):
    path = tmp_path / "session.pcapng"
    wrpcapng(str(path), framed())
    check_synthetic(path)


def test_truncated_record_keeps_earlier_packets(tmp_path):
    path = tmp_path / "cut.pcap"
    wrpcap(str(path), framed())
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    packets = list(read_capture(str(path)))
    assert len(packets) == 3
    assert packets[2][0] == 100.375


def test_truncated_gzip_keeps_earlier_packets(tmp_path, caplog):
    complete = list(read_capture(str(GZIP_SMTP)))
    data = GZIP_SMTP.read_bytes()
    path = tmp_path / "cut.pcap.gz"
    path.write_bytes(data[: len(data) // 2])
    packets = list(read_capture(str(path)))
    assert 0 < len(packets) < len(complete)
    assert packets == complete[: len(packets)]
    assert "truncated gzip data" in caplog.text


def test_corrupt_gzip_raises(tmp_path):
    data = bytearray(GZIP_SMTP.read_bytes())
    # Flipping bytes of the deflate stream after the 10-byte gzip header makes it invalid.
    for index in range(20, 60):
        data[index] ^= 0xFF
    path = tmp_path / "corrupt.pcap.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(CaptureFormatError, match="invalid gzip data"):
        list(read_capture(str(path)))


def test_unknown_format_raises(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a capture file\n")
    with pytest.raises(CaptureFormatError, match="not a pcap or pcapng file"):
        list(read_capture(str(path)))


def test_unsupported_link_type_raises(tmp_path):
    path = tmp_path / "ppp.pcap"
    wrpcap(str(path), [Raw(b"\xff\x03\x00\x21" + bytes(synthetic_session()[0]))], linktype=9)
    with pytest.raises(CaptureFormatError, match="unsupported link type 9"):
        list(read_capture(str(path)))


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="spamflow")
    parser.add_argument("-c", "--config")
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli.register(subparsers)
    args = parser.parse_args(argv)
    status = args.func(args)
    return status, capsys.readouterr()


def test_cli_pcap_prints_json_lines(capsys):
    status, output = run_cli(["tap", "--pcap", str(PCAPNG_SMTP)], capsys)
    assert status == 0
    lines = output.out.splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    for record in records:
        assert record["flow"].startswith("127.0.0.1:")
        assert record["state"] == "closed"
        assert list(record["features"]) == list(FEATURE_NAMES)
        assert record["features"]["packets_in"] == 13.0


def test_cli_server_port_from_config(tmp_path, capsys):
    config = tmp_path / "spamflow.toml"
    config.write_text("[tap]\nserver_port = 443\n")
    status, output = run_cli(["-c", str(config), "tap", "--pcap", str(ZEEK_SMTP)], capsys)
    assert status == 0
    flows = [json.loads(line)["flow"] for line in output.out.splitlines()]
    assert flows
    assert all(not flow.endswith(":25") for flow in flows)

    # The command-line option overrides the file.
    argv = ["-c", str(config), "tap", "--server-port", "25", "--pcap", str(ZEEK_SMTP)]
    status, output = run_cli(argv, capsys)
    assert status == 0
    assert len(output.out.splitlines()) == 2


def test_cli_missing_file_fails(tmp_path, capsys):
    status, output = run_cli(["tap", "--pcap", str(tmp_path / "absent.pcap")], capsys)
    assert status == 1
    assert "cannot read capture" in output.err
    assert output.out == ""


@pytest.mark.parametrize(
    "option, message",
    [
        (["--server-port", "0"], "invalid tap.server_port 0 from option --server-port"),
        (["--queue", "70000"], "invalid tap.queue 70000 from option --queue"),
        (["--max-flows", "0"], "invalid tap.max_flows 0 from option --max-flows"),
        (["--linger", "0"], "invalid tap.linger 0.0 from option --linger"),
    ],
)
def test_cli_invalid_option_raises(option, message, capsys):
    with pytest.raises(ConfigError, match=message):
        run_cli(["tap", *option, "--pcap", str(WIRESHARK_SMTP)], capsys)


def test_cli_truncated_gzip_prints_flows(tmp_path, capsys):
    data = GZIP_SMTP.read_bytes()
    path = tmp_path / "cut.pcap.gz"
    path.write_bytes(data[: len(data) // 2])
    status, output = run_cli(["tap", "--pcap", str(path)], capsys)
    assert status == 0
    assert len(output.out.splitlines()) == 1


def test_cli_no_flows_on_port_notes_it(capsys):
    status, output = run_cli(["tap", "--server-port", "2525", "--pcap", str(ZEEK_SMTP)], capsys)
    assert status == 0
    assert output.out == ""
    assert "no TCP flows on port 2525 found in" in output.err


def test_cli_closed_stdout_exits_quietly():
    # The read end of the pipe is closed before the tap writes, so every write fails
    # with EPIPE, as after `spamflow tap --pcap FILE | head -1`.
    process = subprocess.Popen(
        [sys.executable, "-m", "spamflow", "tap", "--pcap", str(ZEEK_SMTP)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    status = process.wait(timeout=60)
    assert status == 1
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr
