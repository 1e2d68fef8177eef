"""The whole spamflow pipeline in network namespaces, ready to receive replayed mail.

The server namespace runs spamd, the packet tap (fed by NFQUEUE rules on port 25), the
policy service, the proxy and a private Postfix whose pipe transport calls spamc. Mail
arrives from the spam and ham sender namespaces, each with its own PathProfile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from spamflow.config import LearnConfig, parse_host_port
from spamflow.replay.daemons import Daemon, DaemonError, describe_exit
from spamflow.replay.netns import (DEFAULT_PREFIX, HAM_PROFILE, SPAM_PROFILE, PathProfile,
                                   Topology, netns_exec, run, stop_process, wait_for_port)
from spamflow.replay.postfix import DEFAULT_DOMAIN, PostfixInstance

log = logging.getLogger(__name__)

POLICY_LISTEN = "127.0.0.1:10040"
PROXY_LISTEN = "127.0.0.1:7830"
DAEMON_START_TIMEOUT = 30.0
# Seconds between liveness checks of the testbed's processes while sending and waiting.
ALIVE_CHECK_INTERVAL = 0.5
WORK_PARENT = "/var/tmp"


@dataclass
class TestbedOptions:
    """Settings of one testbed; run_dir receives the config, logs, store and results."""

    # Tells pytest that this class, despite its name, contains no tests.
    __test__ = False

    run_dir: Path
    prefix: str = DEFAULT_PREFIX
    learn: LearnConfig = field(default_factory=LearnConfig)
    spam_profile: PathProfile = SPAM_PROFILE
    ham_profile: PathProfile = HAM_PROFILE
    tap_queue: int = 3
    spamd_children: int = 2
    # Concurrent SMTP connections per sender namespace.
    concurrency: int = 4
    # Seconds between the starts of consecutive messages in the replay order.
    send_interval: float = 0.05
    seed: int = 1


@dataclass
class ReplayMessage:
    """One message to replay: id becomes the recipient's local part and Maildir file name."""

    id: str
    name: str
    label: str
    raw: bytes


def config_toml(options: TestbedOptions, spamd_address: str, tap_socket: Path,
                key_file: Path) -> str:
    """Return the TOML configuration that the tap, policy service and proxy read."""
    run_dir = options.run_dir.resolve()
    return (
        "# Written by spamflow.replay for one testbed run.\n"
        "[proxy]\n"
        f'listen = "{PROXY_LISTEN}"\n'
        f'spamd = "{spamd_address}"\n'
        f'tap_socket = "{tap_socket}"\n'
        'trusted_mta = ["127.0.0.1"]\n'
        f'flow_key_file = "{key_file}"\n'
        f'db = "{run_dir / "examples.sqlite"}"\n'
        f'model = "{run_dir / "model.joblib"}"\n'
        "\n[policy]\n"
        f'listen = "{POLICY_LISTEN}"\n'
        f'flow_key_file = "{key_file}"\n'
        "\n[tap]\n"
        f"queue = {options.tap_queue}\n"
        f'socket = "{tap_socket}"\n'
        "server_port = 25\n"
        "\n[learn]\n"
        + "".join(
            f"{item.name} = {json.dumps(getattr(options.learn, item.name))}\n"
            for item in dataclasses.fields(options.learn)
        )
    )


def interleave(messages: list[ReplayMessage], seed: int) -> list[ReplayMessage]:
    """Return the messages in a seeded random order (both labels mixed)."""
    ordered = list(messages)
    random.Random(seed).shuffle(ordered)
    return ordered


class Testbed:
    """Topology, spamd, tap, policy service, proxy and Postfix as one context manager."""

    __test__ = False

    def __init__(self, options: TestbedOptions) -> None:
        self.options = options
        self.run_dir = options.run_dir.resolve()
        self.log_dir = self.run_dir / "logs"
        self.db_path = self.run_dir / "examples.sqlite"
        self.model_path = self.run_dir / "model.joblib"
        self.work: Path | None = None
        self.topology: Topology | None = None
        self.spamd: Any = None
        self.postfix: PostfixInstance | None = None
        self.daemons: dict[str, Daemon] = {}
        self._stack = contextlib.ExitStack()
        self._sent_count = 0
        # Send records of the current or last send() call, in arrival order.
        self.sent_records: list[dict[str, Any]] = []

    # -- setup ---------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _setup(self) -> None:
        from spamflow.replay.spamd import SpamdInstance

        options = self.options
        # The Topology takes the prefix's lock first, so a busy prefix leaves no files.
        self.topology = self._stack.enter_context(Topology(
            options.prefix,
            {"spam": options.spam_profile, "ham": options.ham_profile},
            log_dir=self.log_dir, seed=options.seed,
        ))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        server_ns = self.topology.server_ns

        # The user nobody runs the Postfix pipe, so its files sit under a world-traversable
        # folder. Folders of an earlier run with this prefix are leftovers of a crash,
        # because the Topology above has taken the prefix's lock and ended every
        # process of that run.
        work_prefix = f"spamflow-run-{options.prefix}-"
        for leftover in Path(WORK_PARENT).glob(work_prefix + "*"):
            log.warning("removing %s left by an earlier run", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        self.work = Path(tempfile.mkdtemp(prefix=work_prefix, dir=WORK_PARENT))
        os.chmod(self.work, 0o755)
        self._stack.callback(self._collect_and_remove_work)

        key_file = self.run_dir / "flow.key"
        key_file.write_bytes(os.urandom(32))
        os.chmod(key_file, 0o600)
        tap_socket = self.work / "tap.sock"

        self.spamd = self._stack.enter_context(SpamdInstance(
            self.run_dir / "spamd", netns=server_ns, max_children=options.spamd_children))
        spamd_address = f"127.0.0.1:{self.spamd.port}"

        self.config_path = self.run_dir / "spamflow.toml"
        self.config_path.write_text(config_toml(options, spamd_address, tap_socket, key_file))

        for rule in (["INPUT", "-p", "tcp", "--dport", "25"],
                     ["OUTPUT", "-p", "tcp", "--sport", "25"]):
            run(netns_exec(server_ns, "iptables", "-A", *rule, "-j", "NFQUEUE",
                           "--queue-num", str(options.tap_queue), "--queue-bypass"))

        tap = self._start_daemon("tap", ["tap", "--queue", str(options.tap_queue),
                                         "--socket", str(tap_socket), "--server-port", "25"])
        tap.wait_until(tap_socket.exists, DAEMON_START_TIMEOUT, "create its socket")

        policy = self._start_daemon("policy", ["policy", "--listen", POLICY_LISTEN,
                                               "--flow-key-file", str(key_file)])
        self._wait_port(policy, POLICY_LISTEN)

        proxy = self._start_daemon("proxy", [
            "proxy", "--listen", PROXY_LISTEN, "--spamd", spamd_address,
            "--tap-socket", str(tap_socket), "--trusted-mta", "127.0.0.1",
            "--flow-key-file", str(key_file), "--db", str(self.db_path),
            "--model", str(self.model_path),
        ])
        self._wait_port(proxy, PROXY_LISTEN)

        self.postfix = PostfixInstance(self.work / "postfix", netns=server_ns,
                                       spamc_port=parse_host_port(PROXY_LISTEN)[1],
                                       pipe_concurrency=options.spamd_children)
        (self.work / "postfix").mkdir(mode=0o755)
        self._stack.enter_context(self.postfix)
        log.info("testbed %s ready, run folder %s", options.prefix, self.run_dir)

    def _start_daemon(self, name: str, args: list[str]) -> Daemon:
        assert self.topology is not None
        daemon = Daemon(name, self.topology.server_ns, args, self.log_dir / f"{name}.log",
                        config=self.config_path)
        self.daemons[name] = daemon
        self._stack.callback(daemon.stop)
        return daemon.start()

    def _wait_port(self, daemon: Daemon, address: str) -> None:
        assert self.topology is not None
        host, port = parse_host_port(address)
        if not wait_for_port(self.topology.server_ns, host, port, DAEMON_START_TIMEOUT):
            daemon.check_running()
            raise DaemonError(f"{daemon.name} did not listen on {address} within "
                               f"{DAEMON_START_TIMEOUT:.0f} s\n{daemon.log_tail()}")
        daemon.check_running()

    def _collect_and_remove_work(self) -> None:
        """Copy the maillog, Postfix config and Maildir into the run folder, then clean up."""
        if self.work is None:
            return
        postfix_base = self.work / "postfix"
        for source, target in ((postfix_base / "log" / "maillog", self.log_dir / "maillog"),
                               (postfix_base / "etc", self.run_dir / "postfix-etc"),
                               (postfix_base / "Maildir", self.run_dir / "Maildir")):
            try:
                if source.is_dir():
                    shutil.copytree(source, target, dirs_exist_ok=True)
                elif source.exists():
                    shutil.copy2(source, target)
            except OSError as error:
                log.warning("copying %s into the run folder failed: %s", source, error)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work = None

    # -- liveness ------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise DaemonError naming the first testbed process that has exited, and its log.

        Checks the tap, policy service and proxy (except those ended by Daemon.kill()),
        spamd, the Postfix master and the delay stages.
        """
        for daemon in self.daemons.values():
            daemon.check_running()
        if self.spamd is not None and not self.spamd.running():
            raise DaemonError(f"spamd exited, log {self.spamd.log_path}\n"
                              f"{self.spamd.log_tail()}")
        if self.postfix is not None and self.postfix.started and not self.postfix.running():
            raise DaemonError(f"Postfix master exited, log {self.postfix.maillog}\n"
                              f"{self.postfix.log_tail()}")
        if self.topology is not None:
            for path in self.topology.paths.values():
                process = path.delay_process
                if process is not None and process.poll() is not None:
                    raise DaemonError(
                        f"delay stage of the {path.name} path (pid {process.pid}) "
                        f"{describe_exit(process.returncode)}, log "
                        f"{self.topology.delay_log_path(path.name)}"
                    )

    # -- replay --------------------------------------------------------------------------

    def send(self, messages: list[ReplayMessage], progress: bool = True,
             offset_s: float = 0.0) -> list[dict[str, Any]]:
        """Send messages in list order, spam over the spam path and ham over the ham path.

        Returns one send record per message (the sender's JSON plus name), in list order.
        Raises DaemonError, after stopping the senders, when a testbed process exits.
        """
        assert self.topology is not None and self.work is not None
        self.check_alive()
        self.sent_records = []
        message_dir = self.work / "messages"
        message_dir.mkdir(exist_ok=True)
        jobs: dict[str, list[dict[str, Any]]] = {"spam": [], "ham": []}
        names = {}
        for index, message in enumerate(messages):
            path = message_dir / f"{message.id}.eml"
            path.write_bytes(message.raw)
            names[message.id] = message.name
            sender = self.topology.paths[message.label]
            jobs[message.label].append({
                "id": message.id, "label": message.label, "file": str(path),
                "server": sender.server_ip, "rcpt": f"{message.id}@{DEFAULT_DOMAIN}",
                "at": offset_s + index * self.options.send_interval,
            })

        results: queue.Queue[dict[str, Any] | None] = queue.Queue()
        processes = []
        for label, label_jobs in jobs.items():
            if not label_jobs:
                continue
            namespace = self.topology.paths[label].namespace
            stderr = open(self.log_dir / f"sender-{label}.log", "ab")
            process = subprocess.Popen(
                netns_exec(namespace, sys.executable, "-m", "spamflow.replay.sender",
                           "--concurrency", str(self.options.concurrency)),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
            stderr.close()
            processes.append(process)
            threading.Thread(target=_feed_and_read, args=(process, label_jobs, results),
                             daemon=True).start()

        records: dict[str, dict[str, Any]] = {}
        finished = 0
        next_check = time.monotonic() + ALIVE_CHECK_INTERVAL
        try:
            with _progress(len(messages), "sending", progress) as bar:
                while finished < len(processes):
                    if time.monotonic() >= next_check:
                        self.check_alive()
                        next_check = time.monotonic() + ALIVE_CHECK_INTERVAL
                    try:
                        item = results.get(timeout=ALIVE_CHECK_INTERVAL)
                    except queue.Empty:
                        continue
                    if item is None:
                        finished += 1
                        continue
                    item["name"] = names.get(item["id"], "")
                    records[item["id"]] = item
                    self.sent_records.append(item)
                    bar.update(1)
        except BaseException:
            for process in processes:
                stop_process(process, "sender", timeout=5)
            raise
        for process in processes:
            process.wait()
        return [records.get(m.id, {"id": m.id, "name": m.name, "label": m.label,
                                   "accepted": False, "error": "no result from sender"})
                for m in messages]

    def wait_delivered(self, ids: list[str], timeout: float, progress: bool = True,
                       require_observations: bool = True) -> bool:
        """Wait until every id has a Maildir file and, optionally, a proxy record.

        Returns False when the timeout ran out first. Raises DaemonError when a testbed
        process exits.
        """
        assert self.postfix is not None
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        with _progress(len(wanted), "delivering", progress) as bar:
            done = 0
            while True:
                self.check_alive()
                delivered = wanted & set(self.postfix.delivered())
                count = len(delivered)
                if require_observations:
                    count = min(count, self.observation_count())
                bar.update(max(0, count - done))
                done = max(done, count)
                if len(delivered) == len(wanted) and done >= len(wanted):
                    return True
                if time.monotonic() > deadline:
                    log.warning("timed out after %.0f s: %d of %d messages delivered",
                                timeout, len(delivered), len(wanted))
                    return False
                time.sleep(ALIVE_CHECK_INTERVAL)

    def delivered_files(self) -> dict[str, bytes]:
        assert self.postfix is not None
        return {name: path.read_bytes() for name, path in self.postfix.delivered().items()}

    def observations(self) -> list[Any]:
        from spamflow.models.store import ExampleStore

        if not self.db_path.exists():
            return []
        store = ExampleStore(self.db_path)
        try:
            return list(store.observations())
        finally:
            close = getattr(store, "close", None)
            if close is not None:
                close()

    def observation_count(self) -> int:
        return len(self.observations())


def _feed_and_read(process: subprocess.Popen[str], jobs: list[dict[str, Any]],
                   results: queue.Queue[dict[str, Any] | None]) -> None:
    assert process.stdin is not None and process.stdout is not None
    try:
        for job in jobs:
            process.stdin.write(json.dumps(job) + "\n")
        process.stdin.close()
        for line in process.stdout:
            if line.strip():
                results.put(json.loads(line))
    finally:
        results.put(None)


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="msg", disable=not enabled,
               file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
