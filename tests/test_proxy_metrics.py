"""Tests of the proxy's Prometheus metrics: renderer, HTTP endpoint and proxy counters."""

from __future__ import annotations

import asyncio
import socket

import pytest
from test_proxy_server_unit import (
    KEY,
    FakeLearner,
    FakeModel,
    FakeSpamd,
    FakeTap,
    _message,
    _request,
    _send,
    _signed_message,
    spamd,  # noqa: F401  (fixture)
    tap,  # noqa: F401  (fixture)
)

from spamflow.cli import build_parser
from spamflow.config import ConfigError, ProxyConfig, apply_overrides, load_config
from spamflow.proxy import metrics
from spamflow.proxy.metrics import MetricsRegistry, MetricsServer
from spamflow.proxy.server import ProxyServer


async def _http(port: int, data: bytes) -> bytes:
    """Send data to 127.0.0.1:port, half-close, and return everything until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return response


def _split(response: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status_line, headers, body


def _samples(text: str) -> dict[str, float]:
    """Map each sample line's name with labels to its value."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# Renderer


def test_render_exact_text():
    registry = MetricsRegistry()
    requests = registry.counter("demo_requests_total", "Requests by method.", ("method",))
    requests.declare("PING")
    requests.inc("CHECK")
    requests.inc("CHECK")
    requests.inc('we"ird\\\n')
    registry.counter("demo_plain_total", "A counter\nwith \\ in help.").inc(amount=2.5)
    registry.gauge("demo_queue", "Queued jobs.", lambda: 7)

    expected = (
        "# HELP demo_requests_total Requests by method.\n"
        "# TYPE demo_requests_total counter\n"
        'demo_requests_total{method="CHECK"} 2\n'
        'demo_requests_total{method="PING"} 0\n'
        'demo_requests_total{method="we\\"ird\\\\\\n"} 1\n'
        "# HELP demo_plain_total A counter\\nwith \\\\ in help.\n"
        "# TYPE demo_plain_total counter\n"
        "demo_plain_total 2.5\n"
        "# HELP demo_queue Queued jobs.\n"
        "# TYPE demo_queue gauge\n"
        "demo_queue 7\n"
    )
    assert registry.render() == expected


def test_render_special_numbers():
    registry = MetricsRegistry()
    registry.gauge("demo_nan", "n", lambda: float("nan"))
    registry.gauge("demo_inf", "i", lambda: float("inf"))
    samples = registry.render().splitlines()
    assert "demo_nan NaN" in samples
    assert "demo_inf +Inf" in samples


def test_render_skips_failing_gauge(caplog):
    registry = MetricsRegistry()
    registry.gauge("demo_broken", "b", lambda: 1 / 0)
    registry.counter("demo_total", "t").inc()
    assert registry.render() == "# HELP demo_total t\n# TYPE demo_total counter\ndemo_total 1\n"
    assert "demo_broken" in caplog.text


def test_registry_rejects_duplicates_and_label_count():
    registry = MetricsRegistry()
    counter = registry.counter("demo_total", "t", ("method",))
    with pytest.raises(ValueError):
        registry.gauge("demo_total", "again", lambda: 0)
    with pytest.raises(ValueError):
        counter.inc()


# HTTP server


@pytest.fixture
async def metrics_server():
    registry = MetricsRegistry()
    registry.counter("demo_total", "Demo.").inc()
    server = MetricsServer(registry, "127.0.0.1", 0)
    await server.start()
    yield server
    await server.close()


async def test_http_get_metrics(metrics_server):
    response = await _http(metrics_server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = _split(response)
    assert status == b"HTTP/1.0 200 OK"
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert headers[b"content-length"] == str(len(body)).encode()
    assert body == b"# HELP demo_total Demo.\n# TYPE demo_total counter\ndemo_total 1\n"


async def test_http_query_string_ignored(metrics_server):
    response = await _http(metrics_server.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert _split(response)[0] == b"HTTP/1.0 200 OK"


async def test_http_other_path_404(metrics_server):
    response = await _http(metrics_server.port, b"GET /other HTTP/1.0\r\n\r\n")
    assert _split(response)[0] == b"HTTP/1.0 404 Not Found"


async def test_http_other_method_405(metrics_server):
    response = await _http(metrics_server.port, b"POST /metrics HTTP/1.0\r\n\r\n")
    status, headers, _ = _split(response)
    assert status == b"HTTP/1.0 405 Method Not Allowed"
    assert headers[b"allow"] == b"GET"


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\xff\xfe garbage\r\n\r\n", b"GET\r\n\r\n", b"GET /metrics\r\n\r\n", b"\r\n"],
)
async def test_http_garbage_400(metrics_server, garbage):
    response = await _http(metrics_server.port, garbage)
    assert _split(response)[0] == b"HTTP/1.0 400 Bad Request"
    after = await _http(metrics_server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert _split(after)[0] == b"HTTP/1.0 200 OK"


async def test_http_oversized_head_431(metrics_server):
    request = b"GET /metrics HTTP/1.0\r\nX-Long: " + b"a" * (2 * metrics.MAX_REQUEST_BYTES)
    response = await _http(metrics_server.port, request + b"\r\n\r\n")
    assert _split(response)[0] == b"HTTP/1.0 431 Request Header Fields Too Large"


async def test_http_many_short_lines_431(metrics_server):
    request = b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * metrics.MAX_REQUEST_BYTES
    response = await _http(metrics_server.port, request + b"\r\n")
    assert _split(response)[0] == b"HTTP/1.0 431 Request Header Fields Too Large"


async def test_http_read_timeout_closes(metrics_server, monkeypatch):
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", metrics_server.port)
    writer.write(b"GET /metr")
    await writer.drain()
    started = asyncio.get_running_loop().time()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert response == b""
    assert asyncio.get_running_loop().time() - started < 3


async def test_http_client_reset_survives(metrics_server):
    with socket.create_connection(("127.0.0.1", metrics_server.port)) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.sendall(b"GET /metrics HTTP/1.0\r\n")
    response = await _http(metrics_server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert _split(response)[0] == b"HTTP/1.0 200 OK"


# Configuration and command line


def test_metrics_listen_default_off():
    assert ProxyConfig().metrics_listen is None


def test_metrics_listen_invalid_rejected():
    with pytest.raises(ConfigError, match="proxy.metrics_listen"):
        apply_overrides(ProxyConfig(), {"metrics_listen": "localhost"})


def test_metrics_listen_wrong_type_in_file(tmp_path):
    path = tmp_path / "spamflow.toml"
    path.write_text("[proxy]\nmetrics_listen = 9100\n")
    with pytest.raises(ConfigError, match="proxy.metrics_listen"):
        load_config(path)


def test_metrics_listen_from_file(tmp_path):
    path = tmp_path / "spamflow.toml"
    path.write_text('[proxy]\nmetrics_listen = "127.0.0.1:9100"\n')
    assert load_config(path).proxy.metrics_listen == "127.0.0.1:9100"


def test_metrics_listen_option():
    args = build_parser().parse_args(["proxy", "--metrics-listen", "127.0.0.1:9100"])
    assert args.metrics_listen == "127.0.0.1:9100"


def test_metrics_listen_option_help():
    parser = build_parser()
    proxy_parser = parser._subparsers._group_actions[0].choices["proxy"]
    help_text = proxy_parser.format_help()
    assert "--metrics-listen" in help_text
    assert "proxy.metrics_listen" in help_text


# Proxy counters


def _config(spamd: FakeSpamd, tap: FakeTap, metrics_listen: str | None) -> ProxyConfig:
    return ProxyConfig(
        listen="127.0.0.1:0",
        spamd=f"127.0.0.1:{spamd.port}",
        tap_socket=tap.path,
        tap_timeout=0.5,
        trusted_mta=["127.0.0.1"],
        client_timeout=5.0,
        spamd_timeout=5.0,
        metrics_listen=metrics_listen,
    )


async def test_proxy_counters_after_sequence(spamd, tap):
    model = FakeModel()
    model.n_examples = 120
    learner = FakeLearner(model)
    server = ProxyServer(
        _config(spamd, tap, "127.0.0.1:0"), learner, KEY, observation_factory=dict
    )
    await server.start()
    try:
        await _send(server.listen_port, b"PING SPAMC/1.5\r\n\r\n")
        await _send(server.listen_port, _request("CHECK", _signed_message()))
        await _send(server.listen_port, _request("CHECK", _signed_message()))
        await _send(server.listen_port, _request("CHECK", _message(None, forged=True)))
        await _send(server.listen_port, b"GARBAGE\r\n\r\n")
        await server.wait_idle(10)

        response = await _http(server.metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n")
    finally:
        await server.shutdown(timeout=5)
    status, _, body = _split(response)
    assert status == b"HTTP/1.0 200 OK"
    samples = _samples(body.decode())
    prefix = "spamflow_proxy_"

    assert samples[prefix + 'requests_total{method="PING"}'] == 1
    assert samples[prefix + 'requests_total{method="CHECK"}'] == 3
    assert samples[prefix + 'requests_total{method="invalid"}'] == 1
    assert samples[prefix + 'requests_total{method="PROCESS"}'] == 0
    assert samples[prefix + 'passthrough_total{reason="unscored_method"}'] == 1
    assert samples[prefix + 'passthrough_total{reason="invalid_request"}'] == 1
    assert samples[prefix + 'passthrough_total{reason="empty"}'] == 0
    assert samples[prefix + "verdicts_total"] == 2
    assert samples[prefix + "forged_headers_removed_total"] == 1
    assert samples[prefix + 'tap_queries_total{result="ok"}'] == 2
    assert samples[prefix + 'tap_queries_total{result="error"}'] == 0
    assert samples[prefix + 'spamd_errors_total{reason="unreachable"}'] == 0
    assert samples[prefix + 'spamd_errors_total{reason="closed"}'] == 0
    assert samples[prefix + "scoring_dropped_total"] == 0
    assert samples[prefix + "observations_recorded_total"] == 3
    assert len(learner.observations) == 3
    assert samples[prefix + "active_connections"] == 0
    assert samples[prefix + "scoring_queue_size"] == 0
    assert samples[prefix + "model_examples"] == 120


async def test_proxy_counts_tap_error(spamd, tmp_path):
    tap = FakeTap(str(tmp_path / "absent.sock"))
    server = ProxyServer(
        _config(spamd, tap, None), FakeLearner(None), KEY, observation_factory=dict
    )
    await server.start()
    try:
        await _send(server.listen_port, _request("CHECK", _signed_message()))
        await _send(server.listen_port, b"")
        await server.wait_idle(10)
    finally:
        await server.shutdown(timeout=5)
    assert server.metrics_port is None
    assert server.metrics.tap_queries.value("error") == 1
    assert server.metrics.passthrough.value("empty") == 1
    assert server.metrics.verdicts.value() == 0
    assert server.metrics.registry.render().endswith("spamflow_proxy_model_examples 0\n")


async def test_proxy_counts_spamd_unreachable(tap):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    spamd = FakeSpamd(port=port)
    server = ProxyServer(_config(spamd, tap, None), None, KEY, observation_factory=dict)
    await server.start()
    try:
        await _send(server.listen_port, b"PING SPAMC/1.5\r\n\r\n")
        await server.wait_idle(10)
    finally:
        await server.shutdown(timeout=5)
    assert server.metrics.spamd_errors.value("unreachable") == 1


async def test_proxy_metrics_port_busy_closes_proxy(spamd, tap):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        server = ProxyServer(_config(spamd, tap, f"127.0.0.1:{busy_port}"), None, KEY)
        with pytest.raises(OSError):
            await server.start()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.listen_port)


async def test_proxy_shutdown_closes_metrics(spamd, tap):
    server = ProxyServer(_config(spamd, tap, "127.0.0.1:0"), None, KEY)
    await server.start()
    port = server.metrics_port
    await server.shutdown(timeout=5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
