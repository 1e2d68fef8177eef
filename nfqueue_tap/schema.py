"""Flow feature schema shared by the tap (which measures) and the models (which learn).

Every feature is a float. A value that could not be measured is MISSING.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MISSING = -1.0

# Name and meaning of each feature, in model-vector order. "in" is from the remote
# peer (the SMTP client) to the mail server, "out" is the reverse direction.
FEATURES: dict[str, str] = {
    "syn_ttl": "IP TTL of the client's SYN as received",
    "initial_ttl": "smallest common initial TTL (32, 64, 128, 255) >= syn_ttl",
    "hop_count": "initial_ttl - syn_ttl",
    "syn_window": "TCP window field of the client's SYN",
    "syn_mss": "MSS option of the client's SYN",
    "syn_wscale": "window scale option of the client's SYN",
    "syn_sack_permitted": "1 if the client's SYN offers SACK, else 0",
    "syn_timestamps": "1 if the client's SYN carries the timestamps option, else 0",
    "handshake_rtt_ms": "ms from the server's SYN-ACK to the client's ACK",
    "packets_in": "TCP segments from the client",
    "packets_out": "TCP segments to the client",
    "bytes_in": "TCP payload bytes from the client",
    "bytes_out": "TCP payload bytes to the client",
    "retransmissions_in": "client data segments whose bytes were all seen before",
    "retransmissions_out": "server data segments whose bytes were all seen before",
    "rst_in": "RST segments from the client",
    "rst_out": "RST segments to the client",
    "fin_in": "1 if the client sent FIN, else 0",
    "fin_out": "1 if the server sent FIN, else 0",
    "duration_s": "seconds from the first to the last segment of the flow",
}

FEATURE_NAMES: tuple[str, ...] = tuple(FEATURES)


def features_to_vector(features: Mapping[str, float]) -> list[float]:
    """Order a feature mapping as a model vector, with MISSING for absent names."""
    return [float(features.get(name, MISSING)) for name in FEATURE_NAMES]


def vector_to_features(vector: Sequence[float]) -> dict[str, float]:
    """Name the values of a model vector. Raises ValueError on a wrong length."""
    if len(vector) != len(FEATURE_NAMES):
        raise ValueError(
            f"feature vector has {len(vector)} values, expected {len(FEATURE_NAMES)}"
        )
    return dict(zip(FEATURE_NAMES, (float(value) for value in vector)))
