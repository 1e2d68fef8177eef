"""Root tests of the namespace topology and the NFQUEUE delay stage."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spamflow.replay.netns import (PathProfile, Topology, list_namespaces, namespace_pids,
                                   netns_exec)
from spamflow.replay.runlock import PrefixLock, TestbedBusyError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.timeout(120),
]

PREFIX = f"sft-rp-{os.getpid()}"

LISTENER = textwrap.dedent("""
    import socket
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 2525))
    server.listen(64)
    print("listening", flush=True)
    while True:
        server.accept()[0].close()
""")

CONNECT_RTT = textwrap.dedent("""
    import socket, sys, time
    for _ in range(int(sys.argv[2])):
        client = socket.socket()
        started = time.monotonic()
        client.connect((sys.argv[1], 2525))
        print((time.monotonic() - started) * 1000)
        client.close()
""")


def _namespaces(prefix: str) -> list[str]:
    return [name for name in list_namespaces() if name.startswith(prefix + "-")]


def _connect_times_ms(topology: Topology, sender: str, count: int) -> list[float]:
    """Return TCP connect times (SYN to SYN-ACK) from a sender to the server, in ms."""
    listener = subprocess.Popen(
        netns_exec(topology.server_ns, sys.executable, "-c", LISTENER),
        stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        path = topology.paths[sender]
        output = subprocess.run(
            netns_exec(path.namespace, sys.executable, "-c", CONNECT_RTT, path.server_ip,
                       str(count)),
            capture_output=True, text=True, check=True, timeout=60).stdout
    finally:
        listener.kill()
        listener.wait()
    return [float(line) for line in output.split()]


def test_delay_stage_sets_connect_time():
    profiles = {"spam": PathProfile(delay_ms=80.0), "ham": PathProfile(delay_ms=10.0,
                                                                       jitter_ms=5.0)}
    with Topology(PREFIX, profiles) as topology:
        slow = _connect_times_ms(topology, "spam", 15)
        fast = _connect_times_ms(topology, "ham", 15)

    # Only the sender's outgoing packets are held, so a connect takes one delay. The stage
    # never releases a packet early, but a busy machine can release one late, so the upper
    # bounds apply to the median.
    assert 80.0 <= min(slow)
    assert statistics.median(slow) < 80.0 + 15.0
    assert 5.0 <= min(fast)
    assert statistics.median(fast) < 15.0 + 15.0


def test_profile_sysctls_applied():
    profiles = {"spam": PathProfile(ttl=128, tcp_timestamps=False, tcp_sack=False),
                "ham": PathProfile(ttl=64)}
    with Topology(PREFIX, profiles) as topology:
        spam = subprocess.run(
            netns_exec(topology.paths["spam"].namespace, "sysctl", "-n",
                       "net.ipv4.ip_default_ttl", "net.ipv4.tcp_timestamps",
                       "net.ipv4.tcp_sack"),
            capture_output=True, text=True, check=True).stdout.split()
        ham_ttl = subprocess.run(
            netns_exec(topology.paths["ham"].namespace, "sysctl", "-n",
                       "net.ipv4.ip_default_ttl"),
            capture_output=True, text=True, check=True).stdout.strip()
    assert spam == ["128", "0", "0"]
    assert ham_ttl == "64"


def test_loss_rule_installed():
    profiles = {"spam": PathProfile(loss=0.25), "ham": PathProfile()}
    with Topology(PREFIX, profiles) as topology:
        rules = subprocess.run(
            netns_exec(topology.paths["spam"].namespace, "iptables", "-S", "OUTPUT"),
            capture_output=True, text=True, check=True).stdout
        ham_rules = subprocess.run(
            netns_exec(topology.paths["ham"].namespace, "iptables", "-S", "OUTPUT"),
            capture_output=True, text=True, check=True).stdout
    assert "--probability 0.25" in rules
    assert "-j DROP" in rules
    assert "DROP" not in ham_rules


def test_leftovers_removed_at_start():
    leftover = f"{PREFIX}-srv"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    sleeper = subprocess.Popen(netns_exec(leftover, "sleep", "300"))
    try:
        with Topology(PREFIX, {"spam": PathProfile(), "ham": PathProfile()}):
            assert sorted(_namespaces(PREFIX)) == sorted(
                f"{PREFIX}-{name}" for name in ("srv", "spam", "ham"))
            assert sleeper.wait(timeout=10) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    assert _namespaces(PREFIX) == []


def _start_topology_process(prefix: str) -> subprocess.Popen:
    """Start a process that opens a Topology and keeps it open for up to 120 s."""
    script = textwrap.dedent(f"""
        import time
        from spamflow.replay.netns import Topology
        with Topology({prefix!r}):
            print("up", flush=True)
            time.sleep(120)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            text=True)


def test_sigterm_removes_namespaces():
    prefix = f"{PREFIX}-t"
    process = _start_topology_process(prefix)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "up"
        assert len(_namespaces(prefix)) == 3
        stage_pids = namespace_pids(f"{prefix}-spam") + namespace_pids(f"{prefix}-ham")
        assert len(stage_pids) == 2
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert _namespaces(prefix) == []
    for pid in stage_pids:
        assert not os.path.exists(f"/proc/{pid}"), f"delay stage {pid} outlived the topology"


def test_busy_prefix_leaves_live_topology():
    prefix = f"{PREFIX}-b"
    process = _start_topology_process(prefix)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "up"
        stage_pids = namespace_pids(f"{prefix}-spam") + namespace_pids(f"{prefix}-ham")
        assert len(stage_pids) == 2

        with pytest.raises(TestbedBusyError) as busy:
            with Topology(prefix):
                pass
        assert repr(prefix) in str(busy.value)
        assert f"pid {process.pid}" in str(busy.value)
        assert "--prefix" in str(busy.value)
        assert len(_namespaces(prefix)) == 3
        for pid in stage_pids:
            assert os.path.exists(f"/proc/{pid}"), f"delay stage {pid} was killed"
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert _namespaces(prefix) == []


def test_demo_busy_prefix_exits_early(tmp_path):
    prefix = f"{PREFIX}-c"
    run_dir = tmp_path / "run"
    lock = PrefixLock(prefix)
    lock.acquire()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "spamflow", "demo", "--spam", "1", "--ham", "1",
             "--prefix", prefix, "--run-dir", str(run_dir), "--no-progress"],
            capture_output=True, text=True, timeout=60)
    finally:
        lock.release()
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"testbed prefix {prefix!r} is in use" in result.stderr
    assert "--prefix" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()
    assert _namespaces(prefix) == []


def test_stale_lock_file_allows_new_run():
    prefix = f"{PREFIX}-s"
    lock_path = Path("/run/spamflow") / f"testbed-{prefix}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path.write_text("999999999\n")
    try:
        with Topology(prefix, {"spam": PathProfile(), "ham": PathProfile()}):
            assert len(_namespaces(prefix)) == 3
            assert lock_path.read_text().strip() == str(os.getpid())
    finally:
        lock_path.unlink(missing_ok=True)
    assert _namespaces(prefix) == []
