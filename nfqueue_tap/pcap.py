"""Offline mode: read a capture file and compute flow features with the live FlowTable.

Reads classic pcap (microsecond or nanosecond timestamps, either byte order) and
pcapng, optionally gzip-compressed, with link types Ethernet (with 802.1Q/802.1ad
tags), raw IP, BSD loopback and Linux cooked capture (SLL and SLL2).
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from spamflow.nfqueue_tap.flows import Flow, FlowKey, FlowTable
from spamflow.nfqueue_tap.packet import parse_packet
from spamflow.nfqueue_tap.protocol import format_flow

log = logging.getLogger(__name__)

# Link-layer header types (https://www.tcpdump.org/linktypes.html).
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
# DLT_RAW as written by some BSD libpcap versions.
_DLT_RAW_BSD = (12, 14)

_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLAN = (0x8100, 0x88A8, 0x9100)

# AF_INET is 2 everywhere. AF_INET6 is 24 on NetBSD and OpenBSD, 28 on FreeBSD and
# 30 on macOS.
_NULL_FAMILIES = frozenset({2, 24, 28, 30})

_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BYTE_ORDER = 0x1A2B3C4D
_PCAPNG_IDB = 1
_PCAPNG_SPB = 3
_PCAPNG_EPB = 6
_PCAPNG_OPT_TSRESOL = 9
_PCAPNG_OPT_TSOFFSET = 14


# Largest packet record accepted, the maximum snapshot length of libpcap 1.x.
MAX_RECORD_LEN = 262144


class CaptureFormatError(ValueError):
    """A capture file in an unsupported or invalid format."""


class CaptureRecordError(CaptureFormatError):
    """A packet record or block that is cut off by the end of file or invalid."""


def read_capture(path: str) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp in seconds, packet starting at the IP header) for each packet.

    Packets of other network protocols (ARP, ...) are skipped. Raises
    CaptureFormatError for unknown formats and link types and for invalid gzip data.
    A record that is cut off or invalid, or a gzip file that ends early, ends the packets
    with a warning, keeping the packets before it.
    """
    with open(path, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
        try:
            yield from _read_packets(stream, path)
        except CaptureRecordError as error:
            log.warning("%s; ignoring the rest of the file", error)
        except EOFError:
            # GzipFile raises EOFError when the compressed data stops before its trailer.
            log.warning("%s: truncated gzip data; ignoring the rest of the file", path)
        except zlib.error as error:
            raise CaptureFormatError(f"{path}: invalid gzip data: {error}") from error


def _read_packets(stream: BinaryIO, path: str) -> Iterator[tuple[float, bytes]]:
    magic_bytes = stream.read(4)
    if len(magic_bytes) < 4:
        raise CaptureFormatError(f"{path}: file too short for a capture header")
    if struct.unpack("<I", magic_bytes)[0] == _PCAPNG_SHB:
        frames = _read_pcapng(stream, magic_bytes, path)
    else:
        frames = _read_pcap(stream, magic_bytes, path)
    for timestamp, linktype, frame in frames:
        packet = link_payload(linktype, frame, path)
        if packet is not None:
            yield timestamp, packet


def link_payload(linktype: int, frame: bytes, path: str = "capture") -> bytes | None:
    """Strip the link-layer header. Return None unless the frame carries IPv4 or IPv6."""
    if linktype == LINKTYPE_ETHERNET:
        offset = 12
        while len(frame) >= offset + 2:
            ethertype = (frame[offset] << 8) | frame[offset + 1]
            if ethertype in _ETHERTYPE_VLAN:
                offset += 4
                continue
            if ethertype in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6):
                return frame[offset + 2:]
            return None
        return None
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6) or linktype in _DLT_RAW_BSD:
        return frame
    if linktype == LINKTYPE_LINUX_SLL:
        return _if_ip(frame, 14, 16)
    if linktype == LINKTYPE_LINUX_SLL2:
        return _if_ip(frame, 0, 20)
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        # The 4-byte family is in the capturing host's byte order (NULL) or in network
        # byte order (LOOP), so accept either reading.
        if len(frame) < 4:
            return None
        family = frame[:4]
        if (
            struct.unpack("<I", family)[0] in _NULL_FAMILIES
            or struct.unpack(">I", family)[0] in _NULL_FAMILIES
        ):
            return frame[4:]
        return None
    raise CaptureFormatError(
        f"{path}: unsupported link type {linktype}; supported: Ethernet (1), raw IP "
        "(101, 228, 229), BSD loopback (0, 108), Linux cooked (113, 276)"
    )


def _if_ip(frame: bytes, type_offset: int, header_len: int) -> bytes | None:
    if len(frame) < header_len:
        return None
    protocol = (frame[type_offset] << 8) | frame[type_offset + 1]
    if protocol in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6):
        return frame[header_len:]
    return None


def _read_exact(stream: BinaryIO, size: int, path: str, what: str) -> bytes | None:
    """Read size bytes. Return None at a clean end of file, raise if cut inside."""
    data = stream.read(size)
    if not data:
        return None
    if len(data) < size:
        raise CaptureRecordError(f"{path}: truncated {what} ({len(data)} of {size} bytes)")
    return data


def _read_pcap(
    stream: BinaryIO, magic_bytes: bytes, path: str
) -> Iterator[tuple[float, int, bytes]]:
    for order in ("<", ">"):
        magic = struct.unpack(order + "I", magic_bytes)[0]
        if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
            break
    else:
        raise CaptureFormatError(
            f"{path}: not a pcap or pcapng file (magic {magic_bytes.hex()})"
        )
    divisor = 1e9 if magic == _PCAP_MAGIC_NS else 1e6

    rest = _read_exact(stream, 20, path, "pcap file header")
    if rest is None:
        raise CaptureFormatError(f"{path}: truncated pcap file header")

    # The link type is in the low 16 bits. The upper bits may carry FCS information.
    linktype = struct.unpack(order + "HHiIII", rest)[5] & 0xFFFF
    record = struct.Struct(order + "IIII")
    while True:
        header = _read_exact(stream, record.size, path, "pcap record header")
        if header is None:
            return
        seconds, fraction, captured, _original = record.unpack(header)
        if captured > MAX_RECORD_LEN:
            raise CaptureRecordError(
                f"{path}: invalid pcap record length {captured} (max {MAX_RECORD_LEN})"
            )
        frame = _read_exact(stream, captured, path, "pcap record")
        if frame is None and captured:
            raise CaptureRecordError(f"{path}: truncated pcap record")
        yield seconds + fraction / divisor, linktype, frame or b""


def _read_pcapng(
    stream: BinaryIO, magic_bytes: bytes, path: str
) -> Iterator[tuple[float, int, bytes]]:
    # Each interface: (link type, timestamp units per second, offset in seconds).
    interfaces: list[tuple[int, float, int]] = []
    order = "<"
    block_type_bytes: bytes | None = magic_bytes
    while block_type_bytes is not None:
        if struct.unpack("<I", block_type_bytes)[0] == _PCAPNG_SHB:
            order, interfaces = _read_section_header(stream, path), []
            block_type_bytes = _read_exact(stream, 4, path, "pcapng block type")
            continue

        block_type = struct.unpack(order + "I", block_type_bytes)[0]
        length_bytes = _read_exact(stream, 4, path, "pcapng block length")
        if length_bytes is None:
            raise CaptureRecordError(f"{path}: truncated pcapng block")
        total_length = struct.unpack(order + "I", length_bytes)[0]
        if total_length < 12 or total_length % 4 or total_length > MAX_RECORD_LEN + 1024:
            raise CaptureFormatError(f"{path}: invalid pcapng block length {total_length}")
        body = _read_exact(stream, total_length - 8, path, "pcapng block")
        if body is None:
            raise CaptureRecordError(f"{path}: truncated pcapng block")
        body = body[:-4]

        if block_type == _PCAPNG_IDB:
            interfaces.append(_parse_interface(body, order))
        elif block_type == _PCAPNG_EPB:
            yield _parse_enhanced_packet(body, order, interfaces, path)
        elif block_type == _PCAPNG_SPB:
            # A simple packet block has no timestamp and always uses interface 0.
            # NOTE: its packets get timestamp 0, so RTT and duration are meaningless.
            if not interfaces:
                raise CaptureFormatError(f"{path}: simple packet block before any interface")
            captured_len = min(struct.unpack_from(order + "I", body)[0], len(body) - 4)
            yield 0.0, interfaces[0][0], body[4:4 + captured_len]
        block_type_bytes = _read_exact(stream, 4, path, "pcapng block type")


def _read_section_header(stream: BinaryIO, path: str) -> str:
    """Read the rest of a section header block and return its struct byte order."""
    head = _read_exact(stream, 8, path, "pcapng section header")
    if head is None:
        raise CaptureFormatError(f"{path}: truncated pcapng section header")
    if struct.unpack("<I", head[4:])[0] == _PCAPNG_BYTE_ORDER:
        order = "<"
    elif struct.unpack(">I", head[4:])[0] == _PCAPNG_BYTE_ORDER:
        order = ">"
    else:
        raise CaptureFormatError(f"{path}: invalid pcapng byte-order magic")
    total_length = struct.unpack(order + "I", head[:4])[0]
    if total_length < 28 or total_length % 4:
        raise CaptureFormatError(f"{path}: invalid pcapng section length {total_length}")
    if _read_exact(stream, total_length - 12, path, "pcapng section header") is None:
        raise CaptureFormatError(f"{path}: truncated pcapng section header")
    return order


def _parse_interface(body: bytes, order: str) -> tuple[int, float, int]:
    linktype = struct.unpack_from(order + "H", body)[0]
    units_per_second = 1e6
    offset_seconds = 0
    position = 8
    while position + 4 <= len(body):
        code, length = struct.unpack_from(order + "HH", body, position)
        value = body[position + 4:position + 4 + length]
        if code == 0:
            break
        if code == _PCAPNG_OPT_TSRESOL and length == 1:
            # High bit set: a power of two, else a power of ten.
            exponent = value[0] & 0x7F
            units_per_second = float(2**exponent if value[0] & 0x80 else 10**exponent)
        elif code == _PCAPNG_OPT_TSOFFSET and length == 8:
            offset_seconds = struct.unpack(order + "q", value)[0]
        position += 4 + (length + 3) // 4 * 4
    return linktype, units_per_second, offset_seconds


def _parse_enhanced_packet(
    body: bytes, order: str, interfaces: list[tuple[int, float, int]], path: str
) -> tuple[float, int, bytes]:
    if len(body) < 20:
        raise CaptureFormatError(f"{path}: truncated pcapng enhanced packet block")
    interface, high, low, captured, _original = struct.unpack_from(order + "IIIII", body)
    if interface >= len(interfaces):
        raise CaptureFormatError(f"{path}: packet on undeclared interface {interface}")
    linktype, units_per_second, offset_seconds = interfaces[interface]
    timestamp = ((high << 32) | low) / units_per_second + offset_seconds
    return timestamp, linktype, body[20:20 + captured]


def capture_flows(
    path: str, server_port: int, max_flows: int = 65536, linger: float = 600.0
) -> list[tuple[FlowKey, Flow]]:
    """Feed a capture file to a FlowTable and return every flow, in order of first packet.

    Flows that expired or were evicted while reading are included, as are flows that
    a later SYN on the same key replaced.
    """
    finished: list[tuple[FlowKey, Flow]] = []
    table = FlowTable(
        server_port, max_flows, linger, on_expire=lambda key, flow: finished.append((key, flow))
    )
    for timestamp, packet in read_capture(path):
        segment = parse_packet(packet)
        if segment is not None:
            table.update(segment, timestamp)
    finished.extend(table.items())
    finished.sort(key=lambda item: item[1].first_seen)
    return finished


def flow_record(key: FlowKey, flow: Flow) -> dict[str, Any]:
    """Describe one flow as the JSON object the offline mode prints."""
    return {"flow": format_flow(*key), "state": flow.state, "features": flow.features()}
