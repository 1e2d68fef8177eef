"""Measure the latency the spamflow proxy adds to a spamd scan, as ratios to direct spamd.

Run: /work/main/.venv/bin/python benchmarks/proxy_overhead.py [--help for the options]

One process starts a private spamd on loopback, two ``spamflow proxy`` processes in front
of it and a fake tap on a Unix socket. The real spamc binary sends the same messages
(PROCESS and CHECK) directly to spamd and through each proxy, one request at a time,
with the three paths interleaved per message. Set-up "no tap" has no tap socket, so the
proxy forwards every message without a verdict. In set-up "verdict" the proxy queries the
fake tap for the flow's features and a naive Bayes model for p, and its background worker
sends a second CHECK of the message without the verdict. After each proxied request the
script waits until the proxy's example database has the request's row, so background
work never overlaps the next timed request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from machine import cpu_model
from spamflow.models.classifier import train_model
from spamflow.models.persist import save_model
from spamflow.nfqueue_tap.protocol import (
    ProtocolError,
    format_flow,
    format_response,
    parse_request,
)
from spamflow.nfqueue_tap.schema import features_to_vector
from spamflow.proxy.flowid import FLOW_HEADER, make_flow_header_value
from spamflow.proxy.message import find_header, prepend_header
from spamflow.replay.spamd import SPAMD_PATH, SpamdInstance, pick_free_port, ping

REPOSITORY = Path(__file__).resolve().parents[1]
LOCAL_MESSAGES = REPOSITORY / "tests" / "data" / "spamassassin"
# Documentation address (RFC 5737) of the SMTP client named in the flow headers. It
# appears only in header text and tap requests, and no packet is sent to it.
CLIENT_IP = "198.51.100.7"
FIRST_CLIENT_PORT = 40000
FLOW_KEY = b"proxy-overhead-benchmark-key"
METHODS = {"PROCESS": [], "CHECK": ["-c"]}
SETUPS = ("no tap", "verdict")
PATHS = ("direct", *SETUPS)
# Seconds to wait for one spamc call, for a proxy to return PONG, and for a database row.
SPAMC_TIMEOUT = 120.0
PROXY_START_TIMEOUT = 60.0
ROW_TIMEOUT = 60.0
ROW_POLL_INTERVAL = 0.002
# The proxy waits up to 30 s for queued scoring on SIGTERM, so it gets a little more.
PROXY_STOP_TIMEOUT = 40.0
WARMUP_MESSAGES = 4
CHECK_OUTPUT = re.compile(rb"-?\d+(\.\d+)?/\d+(\.\d+)?\n?")


class BenchmarkError(RuntimeError):
    """A path returned a wrong result, so its timings would not measure a real scan."""


@dataclass
class Message:
    name: str
    is_spam: bool
    data: bytes
    flow_port: int


@dataclass
class Sample:
    """One timed spamc request."""

    path: str
    method: str
    round_index: int
    slot: int
    seconds: float


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    # Seconds from the end of a proxied request until its database row was visible.
    row_delay: dict[str, list[float]] = field(default_factory=dict)


def find_shared_data() -> Path:
    """Return the public test data folder, found as tests/conftest.py finds it."""
    configured = os.environ.get("SPAMFLOW_SHARED_DATA")
    if configured:
        return Path(configured)
    return REPOSITORY.parent / "shared" / "data"


def load_messages(limit: int | None) -> list[Message]:
    """Read the test messages and prepend a valid X-Spamflow-Flow header to each.

    Raises SystemExit when the shared fixture folder is missing.
    """
    fixtures = find_shared_data() / "spamassassin-fixtures" / "messages"
    if not fixtures.is_dir():
        raise SystemExit(
            f"message folder {fixtures} not found; set SPAMFLOW_SHARED_DATA to the folder "
            "that contains spamassassin-fixtures"
        )
    paths = sorted(LOCAL_MESSAGES.glob("*.eml"))
    paths += sorted((fixtures / "nice").glob("0*"))
    paths += sorted((fixtures / "spam").glob("0*"))
    if limit is not None:
        paths = paths[:limit]

    messages = []
    for index, path in enumerate(paths):
        port = FIRST_CLIENT_PORT + index
        header = make_flow_header_value(CLIENT_IP, port, FLOW_KEY)
        data = prepend_header(path.read_bytes(), FLOW_HEADER, header)
        is_spam = path.name.startswith("spam") or path.parent.name == "spam"
        name = f"{path.parent.name}/{path.name}"
        messages.append(Message(name, is_spam, data, port))
    return messages


def synthetic_features(is_spam: bool, rng: np.random.Generator) -> dict[str, float]:
    """Return plausible TCP features: a nearby Linux MTA for ham, a distant bot for spam."""
    if is_spam:
        initial_ttl, hops, window = 128.0, float(rng.integers(12, 25)), 8192.0
        rtt, retransmissions, timestamps = float(rng.normal(180, 40)), float(rng.poisson(2)), 0.0
    else:
        initial_ttl, hops, window = 64.0, float(rng.integers(3, 12)), 64240.0
        rtt, retransmissions, timestamps = float(rng.normal(25, 8)), 0.0, 1.0
    packets_in = float(rng.integers(12, 40))
    return {
        "syn_ttl": initial_ttl - hops,
        "initial_ttl": initial_ttl,
        "hop_count": hops,
        "syn_window": window,
        "syn_mss": 1460.0,
        "syn_wscale": 8.0 if is_spam else 7.0,
        "syn_sack_permitted": 1.0,
        "syn_timestamps": timestamps,
        "handshake_rtt_ms": max(rtt, 1.0),
        "packets_in": packets_in,
        "packets_out": packets_in - 2,
        "bytes_in": packets_in * 900,
        "bytes_out": 400.0,
        "retransmissions_in": retransmissions,
        "retransmissions_out": 0.0,
        "rst_in": 1.0 if is_spam and rng.random() < 0.3 else 0.0,
        "rst_out": 0.0,
        "fin_in": 1.0,
        "fin_out": 1.0,
        "duration_s": float(rng.uniform(0.5, 4.0)),
    }


def write_model(path: Path, rng: np.random.Generator) -> str:
    """Train a naive Bayes model on 200 synthetic flows per class, save it, return its name."""
    labels = [0] * 200 + [1] * 200
    rows = [features_to_vector(synthetic_features(bool(label), rng)) for label in labels]
    model = train_model(np.array(rows), np.array(labels), "nb")
    save_model(model, path)
    return model.name


class FakeTap:
    """A tap socket server on an event loop in a thread, with features for a fixed set of flows.

    It speaks nfqueue_tap/protocol.py: one ``FLOW IP PORT`` line in, one JSON line out.
    """

    def __init__(self, path: Path, flows: dict[tuple[str, int], dict[str, float]]) -> None:
        self.path = path
        self.flows = flows
        self.queries = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start_server(), self._loop)
        self._server = future.result(10)

    async def _start_server(self) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self._serve, str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            self.queries += 1
            try:
                ip, port = parse_request(line)
            except ProtocolError as error:
                response = {"status": "error", "message": str(error)}
            else:
                features = self.flows.get((ip, port))
                if features is None:
                    response = {"status": "not-found", "flow": format_flow(ip, port)}
                else:
                    response = {
                        "status": "ok",
                        "flow": format_flow(ip, port),
                        "state": "closed",
                        "features": features,
                    }
            writer.write(format_response(response))
            await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


class ProxyProcess:
    """A ``python -m spamflow proxy`` subprocess on loopback with its own example database."""

    def __init__(self, name: str, workdir: Path, spamd_address: str, tap_socket: Path,
                 model: Path, key_file: Path, config_file: Path) -> None:
        self.name = name
        self.port = pick_free_port("127.0.0.1")
        self.db = workdir / f"examples-{name.replace(' ', '-')}.sqlite"
        self.log_path = workdir / f"proxy-{name.replace(' ', '-')}.log"
        self.command = [
            sys.executable, "-m", "spamflow", "-c", str(config_file), "proxy",
            "--listen", f"127.0.0.1:{self.port}",
            "--spamd", spamd_address,
            "--tap-socket", str(tap_socket),
            "--trusted-mta", "127.0.0.1",
            "--flow-key-file", str(key_file),
            "--db", str(self.db),
            "--model", str(model),
        ]
        self.expected_rows = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._db: sqlite3.Connection | None = None

    def start(self) -> None:
        """Start the proxy and wait until it relays a PING to spamd."""
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        while not ping("127.0.0.1", self.port):
            returncode = self._process.poll()
            if returncode is not None:
                raise BenchmarkError(
                    f"proxy {self.name!r} exited with status {returncode} before returning "
                    f"PONG on port {self.port}; log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"proxy {self.name!r} did not return PONG on port {self.port} within "
                    f"{PROXY_START_TIMEOUT:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        self._db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)

    def row_count(self) -> int:
        assert self._db is not None
        return int(self._db.execute("SELECT COUNT(*) FROM observations").fetchone()[0])

    def wait_for_rows(self) -> float:
        """Wait until the database has expected_rows rows and return the seconds waited."""
        started = time.perf_counter()
        deadline = started + ROW_TIMEOUT
        while self.row_count() < self.expected_rows:
            if time.perf_counter() > deadline:
                raise BenchmarkError(
                    f"proxy {self.name!r} recorded {self.row_count()} of {self.expected_rows} "
                    f"requests within {ROW_TIMEOUT:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(ROW_POLL_INTERVAL)
        return time.perf_counter() - started

    def verdict_counts(self) -> tuple[int, int]:
        """Return (rows, rows with a verdict p) of the example database."""
        assert self._db is not None
        rows, with_p = self._db.execute("SELECT COUNT(*), COUNT(p) FROM observations").fetchone()
        return int(rows), int(with_p)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            return f"(no log: {error.strerror})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Send SIGTERM, and SIGKILL when the proxy has not exited after its drain time."""
        if self._db is not None:
            self._db.close()
            self._db = None
        process = self._process
        self._process = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(PROXY_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_spamc(port: int, method: str, data: bytes) -> tuple[float, bytes]:
    """Send one request with spamc and return (seconds, output).

    -x turns off spamc's fallback of returning the message unscanned, so a failed
    request raises BenchmarkError instead of being timed as a fast one.
    """
    command = ["spamc", "-x", "-d", "127.0.0.1", "-p", str(port), "-t", "60", *METHODS[method]]
    started = time.perf_counter()
    result = subprocess.run(
        command, input=data, capture_output=True, timeout=SPAMC_TIMEOUT, check=False
    )
    seconds = time.perf_counter() - started
    # CHECK exits with 1 for spam. spamc's errors are 64 and above.
    if result.returncode not in (0, 1) or (method == "PROCESS" and result.returncode != 0):
        raise BenchmarkError(
            f"spamc {method} on port {port} exited with {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return seconds, result.stdout


def check_output(path: str, method: str, output: bytes, name: str) -> None:
    """Raise BenchmarkError unless output is a scan result with the path's verdict header."""
    if method == "CHECK":
        if not CHECK_OUTPUT.fullmatch(output):
            raise BenchmarkError(f"{path} CHECK of {name} returned {output[:80]!r}")
        return
    if find_header(output, "X-Spam-Status") is None:
        raise BenchmarkError(f"{path} PROCESS of {name} returned no X-Spam-Status header")
    has_verdict = find_header(output, "X-Spamflow") is not None
    if has_verdict != (path == "verdict"):
        raise BenchmarkError(
            f"{path} PROCESS of {name}: X-Spamflow header "
            f"{'present' if has_verdict else 'missing'}"
        )


def send(path: str, method: str, message: Message, spamd_port: int,
         proxies: dict[str, ProxyProcess], results: Results | None) -> float:
    """Send one request on one path, wait for its database row, and return its seconds."""
    proxy = proxies.get(path)
    port = spamd_port if proxy is None else proxy.port
    seconds, output = run_spamc(port, method, message.data)
    check_output(path, method, output, message.name)
    if proxy is not None:
        proxy.expected_rows += 1
        delay = proxy.wait_for_rows()
        if results is not None:
            results.row_delay.setdefault(path, []).append(delay)
    return seconds


def measure(messages: list[Message], rounds: int, repeat: int, spamd_port: int,
            proxies: dict[str, ProxyProcess]) -> Results:
    """Time every message and method on every path, rotating the path order per request."""
    for message in messages[:WARMUP_MESSAGES]:
        for method in METHODS:
            for path in PATHS:
                send(path, method, message, spamd_port, proxies, None)

    results = Results()
    slot = 0
    for round_index in range(rounds):
        for message in messages:
            for method in METHODS:
                for _ in range(repeat):
                    shift = slot % len(PATHS)
                    for path in PATHS[shift:] + PATHS[:shift]:
                        seconds = send(path, method, message, spamd_port, proxies, results)
                        results.samples.append(
                            Sample(path, method, round_index, slot, seconds)
                        )
                    slot += 1
    return results


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def times(results: Results, path: str, method: str | None = None,
          round_index: int | None = None) -> list[float]:
    return [
        sample.seconds
        for sample in results.samples
        if sample.path == path
        and (method is None or sample.method == method)
        and (round_index is None or sample.round_index == round_index)
    ]


def paired_samples(results: Results, path: str, method: str | None) -> list[tuple[float, float]]:
    """Return (direct, proxied) seconds of the requests sent in the same slot."""
    direct = {s.slot: s.seconds for s in results.samples if s.path == "direct"}
    return [
        (direct[sample.slot], sample.seconds)
        for sample in results.samples
        if sample.path == path and (method is None or sample.method == method)
    ]


def print_report(results: Results, rounds: int) -> None:
    groups: list[str | None] = [*METHODS, None]
    print()
    print("ms per request      " + "".join(f"{(g or 'all'):>18}" for g in groups))
    print("                    " + "".join(f"{'median':>10}{'p90':>8}" for _ in groups))
    for path in PATHS:
        cells = []
        for group in groups:
            values = times(results, path, group)
            cells.append(f"{statistics.median(values) * 1000:10.1f}{p90(values) * 1000:8.1f}")
        print(f"{path:<20}" + "".join(cells))

    print()
    print("proxy / direct: ratio of medians (its range over rounds), median of paired "
          "ratios,")
    print("and median of paired differences (proxied - direct request in the same slot)")
    for path in SETUPS:
        for group in groups:
            ratio = statistics.median(times(results, path, group)) / statistics.median(
                times(results, "direct", group)
            )
            per_round = [
                statistics.median(times(results, path, group, r))
                / statistics.median(times(results, "direct", group, r))
                for r in range(rounds)
            ]
            pairs = paired_samples(results, path, group)
            paired_ratio = statistics.median(proxied / direct for direct, proxied in pairs)
            added_ms = statistics.median((proxied - direct) * 1000 for direct, proxied in pairs)
            print(f"  {path:<8} {group or 'all':<8} {ratio:6.3f} "
                  f"({min(per_round):.3f}-{max(per_round):.3f})  paired {paired_ratio:6.3f}  "
                  f"{added_ms:+6.1f} ms")

    print()
    print("background scoring: ms from spamc's exit until the request's row was in the database")
    for path in SETUPS:
        delays = results.row_delay[path]
        print(f"  {path:<8} median {statistics.median(delays) * 1000:7.1f}  "
              f"p90 {p90(delays) * 1000:7.1f}  ({len(delays)} requests)")


def first_line(command: list[str]) -> str:
    try:
        output = subprocess.run(command, capture_output=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    return output.decode(errors="replace").strip().splitlines()[0]


def load_text() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


@contextlib.contextmanager
def private_directory() -> Iterator[Path]:
    """Create a 0700 directory for keys, models, sockets and logs, and remove it after."""
    path = Path(tempfile.mkdtemp(prefix="spamflow-bench-proxy-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    messages = load_messages(args.messages)
    rng = np.random.default_rng(20261204)
    print(f"python {platform.python_version()}; {first_line([SPAMD_PATH, '--version'])}; "
          f"{first_line(['spamc', '-V'])}")
    print(f"CPU: {os.cpu_count()} x {cpu_model()}; load average at start {load_text()}")
    spam_count = sum(message.is_spam for message in messages)
    print(f"messages: {len(messages)} ({len(messages) - spam_count} ham, {spam_count} spam), "
          f"methods {' and '.join(METHODS)}, --rounds {args.rounds} --repeat {args.repeat}")
    started = time.monotonic()

    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(private_directory())
        key_file = workdir / "flow.key"
        key_file.write_bytes(FLOW_KEY)
        key_file.chmod(0o600)
        model_path = workdir / "model.joblib"
        model_name = write_model(model_path, rng)
        # A retrain during the run would load the CPU, so none becomes due.
        config_file = workdir / "spamflow.toml"
        config_file.write_text("[learn]\nretrain_every = 1000000\n", encoding="utf-8")

        spamd = stack.enter_context(SpamdInstance(workdir / "spamd", max_children=2))
        flows = {
            (CLIENT_IP, message.flow_port): synthetic_features(message.is_spam, rng)
            for message in messages
        }
        tap = FakeTap(workdir / "tap.sock", flows)
        tap.start()
        stack.callback(tap.stop)

        proxies = {}
        for name in SETUPS:
            tap_socket = tap.path if name == "verdict" else workdir / "no-tap.sock"
            proxy = ProxyProcess(name, workdir, spamd.address, tap_socket, model_path,
                                 key_file, config_file)
            stack.callback(proxy.stop)
            proxy.start()
            proxies[name] = proxy

        results = measure(messages, args.rounds, args.repeat, int(spamd.port or 0), proxies)

        requests = len(messages) * len(METHODS) * args.repeat * args.rounds
        print(f"requests per path: {requests} timed, after "
              f"{min(WARMUP_MESSAGES, len(messages)) * len(METHODS)} untimed warm-up requests")
        print(f"model {model_name}; fake tap queries: {tap.queries}")
        for name, proxy in proxies.items():
            rows, with_verdict = proxy.verdict_counts()
            print(f"proxy {name!r}: {rows} database rows, {with_verdict} with a verdict")
            if name == "verdict" and with_verdict != rows:
                raise BenchmarkError(
                    f"{rows - with_verdict} of {rows} requests through the verdict proxy "
                    "got no X-Spamflow header"
                )
        print_report(results, args.rounds)

    print()
    print(f"total {time.monotonic() - started:.0f} s; load average at end {load_text()}")


def stop_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"benchmark stopped by signal {signum}")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=4,
                        help="passes over all messages; ratios are also given per round "
                        "(default 4)")
    parser.add_argument("--messages", type=positive_int, default=None,
                        help="use only the first N messages (default: all, 37 with the "
                        "shared fixtures)")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="requests per message, method and path within a round (default 1)")
    args = parser.parse_args()
    # SIGTERM then unwinds like Ctrl-C, so the finally blocks stop spamd and the proxies.
    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        run(args)
    except BenchmarkError as error:
        raise SystemExit(f"benchmark failed: {error}") from None


if __name__ == "__main__":
    main()
