"""The spamd proxy's counters and gauges, named spamflow_proxy_*."""

from __future__ import annotations

from collections.abc import Callable

from spamflow.proxy import spamd_protocol as protocol
from spamflow.proxy.metrics import MetricsRegistry
from spamflow.proxy.tapclient import TAP_RESULTS

PREFIX = "spamflow_proxy_"
# requests_total's method label for a request line that is not METHOD SPAMC/x.y,
# including a connection closed before its first line.
INVALID_METHOD = "invalid"
# Reasons why a request reached spamd unchanged (passthrough_total's reason label).
PASSTHROUGH_REASONS = (
    "empty",
    "invalid_request",
    "unscored_method",
    "unsupported_version",
    "no_content_length",
    "too_large",
    "client_timeout",
)
# spamd failures (spamd_errors_total's reason label): no connection, no complete
# exchange within spamd_timeout, or a connection closed without a response.
SPAMD_ERROR_REASONS = ("unreachable", "timeout", "closed")


class ProxyMetrics:
    """Counters that the proxy increments per request, and gauges read at each scrape."""

    def __init__(
        self,
        active_connections: Callable[[], float],
        scoring_queue_size: Callable[[], float],
        model_examples: Callable[[], float],
    ) -> None:
        self.registry = MetricsRegistry()
        counter = self.registry.counter
        self.requests = counter(
            PREFIX + "requests_total",
            "Requests read from spamc, by spamd method (invalid for an unreadable request line).",
            ("method",),
        )
        for method in sorted(protocol.METHODS):
            self.requests.declare(method)
        self.requests.declare(INVALID_METHOD)
        self.passthrough = counter(
            PREFIX + "passthrough_total",
            "Requests forwarded to spamd unchanged, by reason.",
            ("reason",),
        )
        for reason in PASSTHROUGH_REASONS:
            self.passthrough.declare(reason)
        self.verdicts = counter(
            PREFIX + "verdicts_total", "Messages sent to spamd with an X-Spamflow verdict header."
        )
        self.forged_headers_removed = counter(
            PREFIX + "forged_headers_removed_total",
            "Messages from which the proxy removed X-Spamflow headers that the client sent.",
        )
        self.tap_queries = counter(
            PREFIX + "tap_queries_total", "Queries to the packet tap, by result.", ("result",)
        )
        for result in TAP_RESULTS:
            self.tap_queries.declare(result)
        self.spamd_errors = counter(
            PREFIX + "spamd_errors_total", "Failed exchanges with spamd, by reason.", ("reason",)
        )
        for reason in SPAMD_ERROR_REASONS:
            self.spamd_errors.declare(reason)
        self.scoring_dropped = counter(
            PREFIX + "scoring_dropped_total",
            "Scanned requests not recorded for learning because the scoring queue was full.",
        )
        self.observations_recorded = counter(
            PREFIX + "observations_recorded_total",
            "Scanned requests recorded for learning.",
        )
        gauge = self.registry.gauge
        gauge(PREFIX + "active_connections", "Open client connections.", active_connections)
        gauge(
            PREFIX + "scoring_queue_size",
            "Scanned requests waiting for background scoring.",
            scoring_queue_size,
        )
        gauge(
            PREFIX + "model_examples",
            "Training examples of the current flow model, 0 without a model.",
            model_examples,
        )


def method_label(request_line: bytes) -> str:
    """Return the spamd method of a request line, or INVALID_METHOD.

    Only the methods that spamd_protocol.METHODS lists become label values, so a client
    cannot add label values.
    """
    try:
        method, _ = protocol.parse_request_line(request_line)
    except protocol.SpamdProtocolError:
        return INVALID_METHOD
    return method
