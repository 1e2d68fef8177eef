"""Parse the IPv4 or IPv6 header and the TCP header of one raw packet with struct.

This runs once per queued packet, so it reads only the fields the flow table needs
and parses TCP options only on SYN segments.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

# TCP flag bits (RFC 9293, section 3.1).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

IPPROTO_TCP = 6

# IPv4: version/IHL, TOS, total length, id, flags/fragment offset, TTL, protocol.
_IPV4 = struct.Struct("!BBHHHBB")
# IPv6: payload length, next header, hop limit, source, destination (bytes 4-39).
_IPV6 = struct.Struct("!HBB16s16s")
# TCP: ports, seq, ack, data offset, flags, window.
_TCP = struct.Struct("!HHIIBBH")
# An IPv4 header without options followed by a TCP header, read in one call.
_IPV4_TCP = struct.Struct("!xxHxxHBxxx4s4sHHIIBBH")
_U16 = struct.Struct("!H")

_IPV4_MIN_HEADER = 20
_IPV6_HEADER = 40
_TCP_MIN_HEADER = 20

# IPv6 extension headers that can precede TCP and whose length is (byte 1 + 1) * 8.
_IPV6_SKIPPABLE = frozenset({0, 43, 60})

# TCP option kinds from RFC 9293, RFC 7323 (timestamps, window scale) and RFC 2018 (SACK).
_OPT_END = 0
_OPT_NOP = 1
_OPT_MSS = 2
_OPT_WSCALE = 3
_OPT_SACK_PERMITTED = 4
_OPT_TIMESTAMPS = 8

_ADDRESS_CACHE_SIZE = 65536
_address_cache: dict[bytes, str] = {}

# Building the tuple directly skips the Python-level Segment.__new__, which took about
# 2.5 times as long on CPython 3.11 (benchmarks/tap_parse.py measures the parser).
_new_tuple = tuple.__new__


class Segment(NamedTuple):
    """One TCP segment, with the fields the flow table reads.

    ``payload_len`` comes from the IP length fields, so it stays right when only the
    headers were copied. The option fields are None (or False) unless the segment is a
    SYN that carries them.
    """

    src: str
    dst: str
    ttl: int
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload_len: int
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamps: bool = False


def address_to_str(raw: bytes) -> str:
    """Format a 4- or 16-byte address, caching the result for repeated peers.

    IPv6 addresses are written as Python's ipaddress writes them, which is how
    protocol.parse_request normalizes the address of a request.
    """
    text = _address_cache.get(raw)
    if text is None:
        if len(raw) == 4:
            text = socket.inet_ntop(socket.AF_INET, raw)
        else:
            text = str(ipaddress.IPv6Address(raw))
        if len(_address_cache) >= _ADDRESS_CACHE_SIZE:
            _address_cache.clear()
        _address_cache[raw] = text
    return text


def parse_packet(data: bytes) -> Segment | None:
    """Parse a packet that starts with an IP header. Return None unless it is TCP.

    The IP and TCP headers, options included, must be complete, but the payload may
    be cut off. Returns None for truncated or malformed headers, for IP fragments and for
    protocols other than TCP. It raises no exception on any input bytes.
    """
    if not data:
        return None
    # Fast path: IPv4 without options (IHL 5) and enough bytes for a bare TCP header.
    if data[0] == 0x45 and len(data) >= 40:
        return _parse_ipv4_tcp(data)
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data)
    if version == 6:
        return _parse_ipv6(data)
    return None


def _parse_ipv4_tcp(data: bytes) -> Segment | None:
    (
        total_len, frag, ttl, src_raw, dst_raw,
        sport, dport, seq, ack, data_offset, flags, window,
    ) = _IPV4_TCP.unpack_from(data)
    if data[9] != IPPROTO_TCP or frag & 0x3FFF:
        return None
    header_len = (data_offset >> 4) * 4
    if flags & SYN or header_len < _TCP_MIN_HEADER:
        return _parse_ipv4(data)
    if len(data) < 20 + header_len:
        return None

    if total_len == 0:
        total_len = len(data)
    payload_len = total_len - 20 - header_len
    if payload_len < 0:
        return None
    cache = _address_cache
    src = cache.get(src_raw) or address_to_str(src_raw)
    dst = cache.get(dst_raw) or address_to_str(dst_raw)
    return _new_tuple(Segment, (
        src, dst, ttl, sport, dport, seq, ack, flags, window, payload_len,
        None, None, False, False,
    ))


def _parse_ipv4(data: bytes) -> Segment | None:
    if len(data) < _IPV4_MIN_HEADER:
        return None
    version_ihl, _tos, total_len, _ident, frag, ttl, proto = _IPV4.unpack_from(data)
    header_len = (version_ihl & 0x0F) * 4
    if proto != IPPROTO_TCP or header_len < _IPV4_MIN_HEADER:
        return None

    # A fragment other than a whole datagram has no complete TCP segment.
    if frag & 0x3FFF:
        return None

    # Segmentation offload leaves total length 0 in some captures of sent packets.
    if total_len == 0:
        total_len = len(data)
    src = address_to_str(data[12:16])
    dst = address_to_str(data[16:20])
    return _parse_tcp(data, header_len, total_len - header_len, src, dst, ttl)


def _parse_ipv6(data: bytes) -> Segment | None:
    if len(data) < _IPV6_HEADER:
        return None
    payload_len, next_header, hop_limit, src_raw, dst_raw = _IPV6.unpack_from(data, 4)

    # Skip hop-by-hop, routing and destination options headers to reach TCP.
    offset = _IPV6_HEADER
    while next_header in _IPV6_SKIPPABLE:
        if len(data) < offset + 8:
            return None
        ext_len = (data[offset + 1] + 1) * 8
        next_header = data[offset]
        offset += ext_len
    if next_header != IPPROTO_TCP:
        return None

    # A jumbogram has payload length 0, so its length comes from the captured bytes.
    if payload_len == 0:
        payload_len = len(data) - _IPV6_HEADER
    tcp_len = payload_len - (offset - _IPV6_HEADER)
    src = address_to_str(src_raw)
    dst = address_to_str(dst_raw)
    return _parse_tcp(data, offset, tcp_len, src, dst, hop_limit)


def _parse_tcp(
    data: bytes, offset: int, tcp_len: int, src: str, dst: str, ttl: int
) -> Segment | None:
    if len(data) < offset + _TCP_MIN_HEADER:
        return None
    sport, dport, seq, ack, data_offset, flags, window = _TCP.unpack_from(data, offset)
    header_len = (data_offset >> 4) * 4
    payload_len = tcp_len - header_len
    end = offset + header_len
    if header_len < _TCP_MIN_HEADER or payload_len < 0 or len(data) < end:
        return None
    if not flags & SYN:
        return _new_tuple(Segment, (
            src, dst, ttl, sport, dport, seq, ack, flags, window, payload_len,
            None, None, False, False,
        ))
    mss, wscale, sack_permitted, timestamps = _parse_syn_options(data, offset + 20, end)
    return Segment(
        src, dst, ttl, sport, dport, seq, ack, flags, window, payload_len,
        mss, wscale, sack_permitted, timestamps,
    )


def _parse_syn_options(
    data: bytes, start: int, end: int
) -> tuple[int | None, int | None, bool, bool]:
    """Read MSS, window scale, SACK-permitted and timestamps from a SYN's options.

    Parsing stops at the end-of-options kind or at the first option whose length
    is invalid, keeping the options read before it.
    """
    mss = None
    wscale = None
    sack_permitted = False
    timestamps = False
    i = start
    while i < end:
        kind = data[i]
        if kind == _OPT_END:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = data[i + 1]
        if length < 2 or i + length > end:
            break
        if kind == _OPT_MSS and length == 4:
            mss = _U16.unpack_from(data, i + 2)[0]
        elif kind == _OPT_WSCALE and length == 3:
            wscale = data[i + 2]
        elif kind == _OPT_SACK_PERMITTED and length == 2:
            sack_permitted = True
        elif kind == _OPT_TIMESTAMPS and length == 10:
            timestamps = True
        i += length
    return mss, wscale, sack_permitted, timestamps
