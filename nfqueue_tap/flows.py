"""Per-connection TCP features, keyed by the remote peer's address and port.

The flow table keeps one Flow per (remote IP, remote port) of connections to the mail
server's port and computes the features named in schema.FEATURES from the segments it
is fed. Timestamps come from the caller (time.monotonic() live, capture times offline).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterator

from spamflow.nfqueue_tap.packet import ACK, FIN, RST, SYN, Segment
from spamflow.nfqueue_tap.schema import MISSING

FlowKey = tuple[str, int]

_SEQ_MOD_MASK = 0xFFFFFFFF
_SEQ_HALF = 0x80000000

# Common initial TTLs of operating systems, smallest first.
INITIAL_TTLS = (32, 64, 128, 255)

# Expired flows removed per update at most, so no single packet pays for a full scan.
_EXPIRE_BATCH = 2

# Gaps in the received byte range tracked per direction at most.
_MAX_HOLES = 8


def infer_initial_ttl(ttl: int) -> int:
    """Return the smallest common initial TTL (32, 64, 128, 255) that is >= ttl."""
    for initial in INITIAL_TTLS:
        if ttl <= initial:
            return initial
    return INITIAL_TTLS[-1]


class SequenceSpace:
    """Byte ranges seen in one direction of a connection.

    Sequence numbers are unwrapped (mod 2**32) into offsets from the first byte tracked,
    so flows longer than 4 GiB keep working. Ranges below the highest byte seen that were
    skipped are kept as holes, so a reordered segment filling a hole is new data and not
    a retransmission.
    """

    __slots__ = ("_high", "_high_seq", "_holes")

    def __init__(self) -> None:
        self._high = 0
        self._high_seq: int | None = None
        self._holes: list[tuple[int, int]] = []

    def start(self, seq: int) -> None:
        """Set the sequence number of the first data byte, taken from a SYN."""
        if self._high_seq is None:
            self._high_seq = seq & _SEQ_MOD_MASK

    def record(self, seq: int, length: int) -> bool:
        """Record the bytes [seq, seq + length). Return True if all were seen before."""
        if self._high_seq is None:
            self._high_seq = (seq + length) & _SEQ_MOD_MASK
            self._high = length
            return False

        # Signed distance of seq from the highest sequence number seen.
        delta = ((seq - self._high_seq + _SEQ_HALF) & _SEQ_MOD_MASK) - _SEQ_HALF
        start = self._high + delta
        end = start + length

        # Bytes before the first tracked byte were never seen, so they are not a retransmission.
        if start < 0:
            return False

        if start >= self._high:
            if start > self._high:
                self._add_hole(self._high, start)
            self._advance(end, seq, length)
            return False
        if end > self._high:
            if self._holes:
                self._fill(start, self._high)
            self._advance(end, seq, length)
            return False
        if not self._holes:
            return True
        return not self._fill(start, end)

    def _advance(self, end: int, seq: int, length: int) -> None:
        self._high = end
        self._high_seq = (seq + length) & _SEQ_MOD_MASK

    def _add_hole(self, start: int, end: int) -> None:
        # NOTE: past _MAX_HOLES gaps the oldest gap is dropped, so a late segment
        # filling it counts as a retransmission.
        if len(self._holes) >= _MAX_HOLES:
            del self._holes[0]
        self._holes.append((start, end))

    def _fill(self, start: int, end: int) -> bool:
        """Remove [start, end) from the holes. Return True if any hole overlapped it."""
        overlapped = False
        remaining = []
        for low, high in self._holes:
            if high <= start or low >= end:
                remaining.append((low, high))
                continue
            overlapped = True
            if low < start:
                remaining.append((low, start))
            if high > end:
                remaining.append((end, high))
        self._holes = remaining
        return overlapped


class Flow:
    """Counters and handshake facts of one TCP connection to the mail server."""

    __slots__ = (
        "first_seen", "last_seen",
        "syn_ttl", "syn_window", "syn_mss", "syn_wscale", "syn_sack_permitted",
        "syn_timestamps", "client_isn",
        "synack_time", "synack_ack", "handshake_rtt_ms",
        "packets_in", "packets_out", "bytes_in", "bytes_out",
        "retransmissions_in", "retransmissions_out",
        "rst_in", "rst_out", "fin_in", "fin_out",
        "seq_in", "seq_out",
    )

    def __init__(self, timestamp: float) -> None:
        self.first_seen = timestamp
        self.last_seen = timestamp
        self.syn_ttl: int | None = None
        self.syn_window = 0
        self.syn_mss: int | None = None
        self.syn_wscale: int | None = None
        self.syn_sack_permitted = False
        self.syn_timestamps = False
        self.client_isn: int | None = None
        self.synack_time: float | None = None
        self.synack_ack = 0
        self.handshake_rtt_ms: float | None = None
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.retransmissions_in = 0
        self.retransmissions_out = 0
        self.rst_in = 0
        self.rst_out = 0
        self.fin_in = False
        self.fin_out = False
        self.seq_in = SequenceSpace()
        self.seq_out = SequenceSpace()

    @property
    def closed(self) -> bool:
        """True after a RST in either direction or a FIN in both."""
        return bool(self.rst_in or self.rst_out or (self.fin_in and self.fin_out))

    @property
    def state(self) -> str:
        return "closed" if self.closed else "open"

    def add_inbound(self, segment: Segment, now: float) -> None:
        """Count one segment from the remote peer."""
        self.last_seen = now
        flags = segment.flags
        length = segment.payload_len
        self.packets_in += 1
        self.bytes_in += length
        if flags & RST:
            self.rst_in += 1
        if flags & FIN:
            self.fin_in = True

        # The first copy of the client's SYN (without ACK) gives the SYN features.
        seq = segment.seq
        if flags & SYN:
            if not flags & ACK and self.syn_ttl is None:
                self._record_syn(segment)
            seq = (seq + 1) & _SEQ_MOD_MASK
            self.seq_in.start(seq)

        # The first ACK that covers the server's SYN ends the handshake.
        elif (
            flags & ACK
            and self.handshake_rtt_ms is None
            and self.synack_time is not None
            and ((segment.ack - self.synack_ack) & _SEQ_MOD_MASK) < _SEQ_HALF
        ):
            self.handshake_rtt_ms = (now - self.synack_time) * 1000.0

        if length and self.seq_in.record(seq, length):
            self.retransmissions_in += 1

    def add_outbound(self, segment: Segment, now: float) -> None:
        """Count one segment sent to the remote peer."""
        self.last_seen = now
        flags = segment.flags
        length = segment.payload_len
        self.packets_out += 1
        self.bytes_out += length
        if flags & RST:
            self.rst_out += 1
        if flags & FIN:
            self.fin_out = True

        # A repeated SYN-ACK restarts the RTT clock, because the client's ACK
        # acknowledges the copy that reached it.
        seq = segment.seq
        if flags & SYN:
            seq = (seq + 1) & _SEQ_MOD_MASK
            self.seq_out.start(seq)
            if flags & ACK and self.handshake_rtt_ms is None:
                self.synack_time = now
                self.synack_ack = seq

        if length and self.seq_out.record(seq, length):
            self.retransmissions_out += 1

    def _record_syn(self, segment: Segment) -> None:
        self.syn_ttl = segment.ttl
        self.syn_window = segment.window
        self.syn_mss = segment.mss
        self.syn_wscale = segment.wscale
        self.syn_sack_permitted = segment.sack_permitted
        self.syn_timestamps = segment.timestamps
        self.client_isn = segment.seq

    def features(self) -> dict[str, float]:
        """Return the features of schema.FEATURES, with MISSING where unmeasured."""
        features: dict[str, float] = {}
        if self.syn_ttl is None:
            for name in (
                "syn_ttl", "initial_ttl", "hop_count", "syn_window", "syn_mss",
                "syn_wscale", "syn_sack_permitted", "syn_timestamps",
            ):
                features[name] = MISSING
        else:
            initial_ttl = infer_initial_ttl(self.syn_ttl)
            features["syn_ttl"] = float(self.syn_ttl)
            features["initial_ttl"] = float(initial_ttl)
            features["hop_count"] = float(initial_ttl - self.syn_ttl)
            features["syn_window"] = float(self.syn_window)
            features["syn_mss"] = _or_missing(self.syn_mss)
            features["syn_wscale"] = _or_missing(self.syn_wscale)
            features["syn_sack_permitted"] = 1.0 if self.syn_sack_permitted else 0.0
            features["syn_timestamps"] = 1.0 if self.syn_timestamps else 0.0

        # Rounded to microseconds, the timestamp resolution of most capture files.
        if self.handshake_rtt_ms is None:
            features["handshake_rtt_ms"] = MISSING
        else:
            features["handshake_rtt_ms"] = round(self.handshake_rtt_ms, 3)

        features["packets_in"] = float(self.packets_in)
        features["packets_out"] = float(self.packets_out)
        features["bytes_in"] = float(self.bytes_in)
        features["bytes_out"] = float(self.bytes_out)
        features["retransmissions_in"] = float(self.retransmissions_in)
        features["retransmissions_out"] = float(self.retransmissions_out)
        features["rst_in"] = float(self.rst_in)
        features["rst_out"] = float(self.rst_out)
        features["fin_in"] = 1.0 if self.fin_in else 0.0
        features["fin_out"] = 1.0 if self.fin_out else 0.0
        features["duration_s"] = round(self.last_seen - self.first_seen, 6)
        return features


def _ipv4_mapped(ip: str) -> str | None:
    """Return the IPv4 address inside an IPv4-mapped IPv6 address, else None."""
    try:
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
    except ValueError:
        return None
    return None if mapped is None else str(mapped)


def _or_missing(value: float | None) -> float:
    return MISSING if value is None else float(value)


class FlowTable:
    """Bounded table of flows to one server port, in least recently updated order.

    A flow stays queryable until ``linger`` seconds after its last segment, closed or
    not. Past ``max_flows`` the least recently updated flow is evicted. Each update
    removes at most a few expired flows, so no packet pays for a scan of the table.
    ``on_expire(key, flow)`` is called for every flow that leaves the table.
    """

    def __init__(
        self,
        server_port: int,
        max_flows: int = 65536,
        linger: float = 600.0,
        on_expire: Callable[[FlowKey, Flow], None] | None = None,
    ) -> None:
        if max_flows < 1:
            raise ValueError(f"invalid max_flows {max_flows}: expected at least 1")
        if linger <= 0:
            raise ValueError(f"invalid linger {linger}: expected seconds > 0")
        self.server_port = server_port
        self.max_flows = max_flows
        self.linger = linger
        self.on_expire = on_expire
        self._flows: OrderedDict[FlowKey, Flow] = OrderedDict()
        # Earliest time at which the least recently updated flow can expire. It is a
        # lower bound, because that flow may since have been updated and moved.
        self._next_expiry = float("-inf")

    def __len__(self) -> int:
        return len(self._flows)

    def update(self, segment: Segment, timestamp: float) -> Flow | None:
        """Add a segment to its flow. Return the flow, or None if neither port matches.

        A segment whose destination port is the server port is inbound, one whose
        source port is the server port is outbound.
        """
        if segment.dport == self.server_port:
            inbound = True
            key = (segment.src, segment.sport)
        elif segment.sport == self.server_port:
            inbound = False
            key = (segment.dst, segment.dport)
        else:
            return None

        flows = self._flows
        flow = flows.get(key)
        if flow is None:
            flow = self._insert(key, timestamp)
        elif inbound and segment.flags & (SYN | ACK) == SYN and self._is_reuse(
            flow, segment, timestamp
        ):
            del flows[key]
            self._notify(key, flow)
            flow = self._insert(key, timestamp)
        else:
            flows.move_to_end(key)

        if inbound:
            flow.add_inbound(segment, timestamp)
        else:
            flow.add_outbound(segment, timestamp)
        if timestamp > self._next_expiry:
            self._expire_some(timestamp)
        return flow

    def lookup(self, ip: str, port: int, now: float) -> dict | None:
        """Return {"state": "open" | "closed", "features": {...}} of a flow, or None.

        An IPv4-mapped IPv6 address (``::ffff:192.0.2.7``, in any spelling) also finds
        the IPv4 flow, because a dual-stack server socket reports IPv4 peers that way.
        """
        flow = self._flows.get((ip, port))
        if flow is None and ":" in ip:
            mapped = _ipv4_mapped(ip)
            if mapped is not None:
                flow = self._flows.get((mapped, port))
        if flow is None or now - flow.last_seen > self.linger:
            return None
        return {"state": flow.state, "features": flow.features()}

    def items(self) -> Iterator[tuple[FlowKey, Flow]]:
        """Yield (key, flow) pairs, least recently updated first."""
        return iter(list(self._flows.items()))

    def expire(self, now: float) -> int:
        """Remove every flow idle for more than linger seconds. Return how many."""
        removed = 0
        while self._flows:
            key, flow = next(iter(self._flows.items()))
            if now - flow.last_seen <= self.linger:
                break
            del self._flows[key]
            self._notify(key, flow)
            removed += 1
        return removed

    def _is_reuse(self, flow: Flow, segment: Segment, now: float) -> bool:
        """Tell whether a client SYN on a known key opens a new connection."""
        if flow.closed or now - flow.last_seen > self.linger:
            return True

        # After a FIN, a SYN with a new initial sequence number is a new connection.
        return (flow.fin_in or flow.fin_out) and segment.seq != flow.client_isn

    def _insert(self, key: FlowKey, timestamp: float) -> Flow:
        flow = Flow(timestamp)
        self._flows[key] = flow
        if len(self._flows) > self.max_flows:
            old_key, old_flow = self._flows.popitem(last=False)
            self._notify(old_key, old_flow)
        return flow

    def _expire_some(self, now: float) -> None:
        flows = self._flows
        for _ in range(_EXPIRE_BATCH):
            key = next(iter(flows))
            flow = flows[key]
            if now - flow.last_seen <= self.linger:
                self._next_expiry = flow.last_seen + self.linger
                return
            del flows[key]
            self._notify(key, flow)

    def _notify(self, key: FlowKey, flow: Flow) -> None:
        if self.on_expire is not None:
            self.on_expire(key, flow)
