"""Network-namespace testbed: a mail server namespace and two sender namespaces.

``<prefix>-srv`` contains the mail server side. ``<prefix>-spam`` and ``<prefix>-ham`` are
senders, each joined to the server by its own veth pair on its own /24 inside
198.18.0.0/15 (the benchmarking range of RFC 2544). Each sender applies a PathProfile to
its outgoing packets: TTL and TCP option sysctls, random loss, and delay with jitter
through a userspace NFQUEUE delay stage (spamflow.replay.delay).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from spamflow.replay.runlock import PrefixLock

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "sfdemo"
# Letters, digits, '-' and '_', starting with a letter or digit. The prefix names the
# namespaces, the lock file and the /var/tmp work folder, so it must be a safe file name.
# No interface name contains it (veth ends are to-spam, to-ham and eth0), so the 15-byte
# interface name limit does not apply, and 24 characters leave room for a test's pid.
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,23}")
# `ip netns list` prints "NAME" or "NAME (id: N)" on each line.
NETNS_LINE = re.compile(r"^(?P<name>.*?)(?: \(id: \d+\))?$")
SENDERS = ("spam", "ham")
# Third octet of each sender's /24 in 198.18.0.0/15. The server is .1, the sender .2.
SUBNETS = {"spam": 1, "ham": 2}
# NFQUEUE queue numbers are per namespace, so both senders may use the same one.
DELAY_QUEUE = 7
# Seconds a delay stage may take to bind its queue.
DELAY_START_TIMEOUT = 15.0


class TopologyError(RuntimeError):
    """A namespace, link, rule or helper process of the testbed could not be set up."""


def check_prefix(prefix: str) -> str:
    """Return prefix unchanged, or raise ValueError saying which names are allowed."""
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(
            f"invalid testbed prefix {prefix!r}: use 1 to 24 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return prefix


@dataclass(frozen=True)
class PathProfile:
    """Network behaviour of one sender, applied to the packets it sends."""

    ttl: int = 64
    tcp_timestamps: bool = True
    tcp_sack: bool = True
    tcp_window_scaling: bool = True
    # Probability of dropping each outgoing packet.
    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0

    def sysctls(self) -> dict[str, str]:
        return {
            "net.ipv4.ip_default_ttl": str(self.ttl),
            "net.ipv4.tcp_timestamps": str(int(self.tcp_timestamps)),
            "net.ipv4.tcp_sack": str(int(self.tcp_sack)),
            "net.ipv4.tcp_window_scaling": str(int(self.tcp_window_scaling)),
        }


# Spam path: a distant, lossy sender with Windows-like stack defaults (TTL 128, no TCP
# timestamps). Ham path: a nearby, clean sender with Linux defaults.
SPAM_PROFILE = PathProfile(ttl=128, tcp_timestamps=False, tcp_sack=True,
                           tcp_window_scaling=True, loss=0.02, delay_ms=120.0, jitter_ms=40.0)
HAM_PROFILE = PathProfile(ttl=64, loss=0.0, delay_ms=15.0, jitter_ms=3.0)


def netns_exec(namespace: str, *command: str) -> list[str]:
    """Return the argv that runs command inside a network namespace."""
    return ["ip", "netns", "exec", namespace, *command]


def run(command: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a setup command, raising TopologyError with its stderr when it fails."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise TopologyError(
            f"command failed with exit status {result.returncode}: {' '.join(command)}: "
            f"{result.stderr.strip()}"
        )
    return result


def list_namespaces() -> list[str]:
    return parse_netns_list(run(["ip", "netns", "list"]).stdout)


def parse_netns_list(output: str) -> list[str]:
    """Return the namespace names in `ip netns list` output, spaces in names included."""
    names = []
    for line in output.splitlines():
        match = NETNS_LINE.match(line)
        if line.strip() and match is not None:
            names.append(match.group("name"))
    return names


def namespace_pids(namespace: str) -> list[int]:
    output = run(["ip", "netns", "pids", namespace], check=False).stdout
    return [int(word) for word in output.split() if word.isdigit()]


def kill_namespace_processes(namespace: str, grace_s: float = 3.0) -> None:
    """Send SIGTERM to every process in a namespace, then SIGKILL to those left."""
    pids = namespace_pids(namespace)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = namespace_pids(namespace)
    for pid in pids:
        log.warning("killing process %d left in namespace %s", pid, namespace)
        _signal(pid, signal.SIGKILL)


def stop_process(process: subprocess.Popen, name: str, timeout: float = 10.0) -> None:
    """Send SIGTERM, wait up to timeout seconds, then SIGKILL, and reap the process."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not stop within %.0f s, killing it",
                    name, process.pid, timeout)
        process.kill()
        process.wait()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def remove_namespaces(prefix: str) -> list[str]:
    """Kill the processes in and delete every testbed namespace of prefix."""
    removed = []
    names = {f"{prefix}-srv", *(f"{prefix}-{sender}" for sender in SENDERS)}
    for namespace in list_namespaces():
        if namespace in names:
            kill_namespace_processes(namespace)
            run(["ip", "netns", "del", namespace], check=False)
            removed.append(namespace)
    return removed


@dataclass
class SenderPath:
    """One sender namespace, its profile and its addresses."""

    name: str
    namespace: str
    profile: PathProfile
    sender_ip: str
    server_ip: str
    delay_process: subprocess.Popen[str] | None = field(default=None, repr=False)


class Topology:
    """Create the testbed namespaces on entry and remove all of them on exit.

    Entry takes the prefix's PrefixLock, raising TestbedBusyError while a live process
    holds it, and then removes leftovers of a dead run with the same prefix. Exit, an
    exception, Ctrl-C and SIGTERM (turned into SystemExit while the topology is open in
    the main thread) all end the processes in its namespaces, delete them and release
    the lock.
    """

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        profiles: dict[str, PathProfile] | None = None,
        log_dir: Path | None = None,
        seed: int = 0,
    ) -> None:
        self.prefix = check_prefix(prefix)
        self.profiles = profiles or {"spam": SPAM_PROFILE, "ham": HAM_PROFILE}
        self.log_dir = log_dir
        self.seed = seed
        self.server_ns = f"{prefix}-srv"
        self.paths: dict[str, SenderPath] = {}
        for name in SENDERS:
            octet = SUBNETS[name]
            self.paths[name] = SenderPath(
                name=name,
                namespace=f"{prefix}-{name}",
                profile=self.profiles[name],
                sender_ip=f"198.18.{octet}.2",
                server_ip=f"198.18.{octet}.1",
            )
        self._previous_sigterm: object = None
        self._logs: list[IO[str]] = []
        self.lock = PrefixLock(self.prefix)

    def __enter__(self) -> Topology:
        # A busy prefix raises here, before anything of the other run is touched.
        self.lock.acquire()
        self._install_sigterm_handler()
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.teardown()

    def setup(self) -> None:
        leftovers = remove_namespaces(self.prefix)
        if leftovers:
            log.warning("removed namespaces left by an earlier run: %s", ", ".join(leftovers))

        run(["ip", "netns", "add", self.server_ns])
        run(netns_exec(self.server_ns, "ip", "link", "set", "lo", "up"))
        for path in self.paths.values():
            self._add_sender(path)
        log.info("topology %s is up: %s", self.prefix, ", ".join(
            f"{path.name} {path.sender_ip} -> {path.server_ip}" for path in self.paths.values()
        ))

    def _add_sender(self, path: SenderPath) -> None:
        namespace = path.namespace
        server_if = f"to-{path.name}"
        run(["ip", "netns", "add", namespace])
        run(netns_exec(namespace, "ip", "link", "set", "lo", "up"))
        run(["ip", "-n", self.server_ns, "link", "add", server_if, "type", "veth",
             "peer", "name", "eth0", "netns", namespace])
        run(["ip", "-n", self.server_ns, "addr", "add", f"{path.server_ip}/24", "dev", server_if])
        run(["ip", "-n", self.server_ns, "link", "set", server_if, "up"])
        run(["ip", "-n", namespace, "addr", "add", f"{path.sender_ip}/24", "dev", "eth0"])
        run(["ip", "-n", namespace, "link", "set", "eth0", "up"])

        profile = path.profile
        for key, value in profile.sysctls().items():
            run(netns_exec(namespace, "sysctl", "-q", "-w", f"{key}={value}"))
        if profile.loss > 0:
            run(netns_exec(namespace, "iptables", "-A", "OUTPUT", "-o", "eth0", "-m",
                           "statistic", "--mode", "random", "--probability",
                           f"{profile.loss:.4f}", "-j", "DROP"))
        if profile.delay_ms > 0 or profile.jitter_ms > 0:
            path.delay_process = self._start_delay(path)
            run(netns_exec(namespace, "iptables", "-A", "OUTPUT", "-o", "eth0", "-j",
                           "NFQUEUE", "--queue-num", str(DELAY_QUEUE), "--queue-bypass"))

    def delay_log_path(self, sender: str) -> Path | None:
        """Return the log file of a sender's delay stage, or None without a log folder."""
        return None if self.log_dir is None else self.log_dir / f"delay-{sender}.log"

    def _start_delay(self, path: SenderPath) -> subprocess.Popen[str]:
        stderr: IO[str] | int = subprocess.DEVNULL
        log_path = self.delay_log_path(path.name)
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "a", encoding="utf-8")
            self._logs.append(handle)
            stderr = handle
        command = netns_exec(
            path.namespace, sys.executable, "-m", "spamflow.replay.delay",
            "--queue", str(DELAY_QUEUE), "--delay-ms", str(path.profile.delay_ms),
            "--jitter-ms", str(path.profile.jitter_ms),
            "--seed", str(self.seed + SUBNETS[path.name]),
        )
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        if not _wait_for_line(process, "ready", DELAY_START_TIMEOUT):
            process.kill()
            process.wait()
            raise TopologyError(
                f"delay stage in {path.namespace} did not bind queue {DELAY_QUEUE} "
                f"within {DELAY_START_TIMEOUT:.0f} s (exit status {process.poll()})"
            )
        return process

    def teardown(self) -> None:
        for path in self.paths.values():
            if path.delay_process is not None:
                stop_process(path.delay_process, f"delay stage in {path.namespace}", timeout=5)
            path.delay_process = None
        remove_namespaces(self.prefix)
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        self._restore_sigterm_handler()
        self.lock.release()
        log.info("topology %s removed", self.prefix)

    def exec_argv(self, namespace: str, *command: str) -> list[str]:
        return netns_exec(namespace, *command)

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)  # type: ignore[arg-type]
            self._previous_sigterm = None


def _wait_for_line(process: subprocess.Popen[str], expected: str, timeout: float) -> bool:
    """Read process stdout until a line equals expected, in a thread bounded by timeout."""
    found = threading.Event()

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == expected:
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    found.wait(timeout)
    return found.is_set()


def wait_for_port(netns: str | None, host: str, port: int, timeout: float) -> bool:
    """Return True once a TCP connect to host:port succeeds (inside netns, if given)."""
    code = (
        "import socket, sys, time\n"
        f"deadline = time.monotonic() + {timeout}\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        socket.create_connection(({host!r}, {port}), timeout=1).close()\n"
        "        sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "sys.exit(1)\n"
    )
    command = [sys.executable, "-c", code]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    return subprocess.run(command, check=False, timeout=timeout + 10).returncode == 0
