"""A private spamd for tests and replays, separate from the system instance.

Each SpamdInstance gets its own site configuration directory, port, pid file and log, so
it never reads /etc/spamassassin/local.cf or touches the system spamd. The site
configuration turns off everything that makes scores depend on history or the network
(Bayes, auto-welcomelist, TxRep, DNS blocklists, Razor, Pyzor, DCC).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from spamflow import sa_rules
from spamflow.proxy import spamd_protocol as protocol

log = logging.getLogger(__name__)

SPAMD_PATH = "/usr/sbin/spamd"
SYSTEM_SITE_CONFIG = Path("/etc/spamassassin")
# spamd parses every rule file before it listens, which takes several seconds.
DEFAULT_START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 30

LOCAL_CF = """\
# Written by spamflow.replay.spamd for a private, deterministic spamd.
required_score 5.0
# Never rewrite the body, so the scanned message stays byte-comparable.
report_safe 0
# No learning state: a score depends only on the message and the rules.
use_bayes 0
bayes_auto_learn 0
ifplugin Mail::SpamAssassin::Plugin::AWL
use_auto_whitelist 0
endif
ifplugin Mail::SpamAssassin::Plugin::TxRep
use_txrep 0
endif
# No network tests, in addition to spamd -L.
skip_rbl_checks 1
dns_available no
ifplugin Mail::SpamAssassin::Plugin::Razor2
use_razor2 0
endif
ifplugin Mail::SpamAssassin::Plugin::Pyzor
use_pyzor 0
endif
ifplugin Mail::SpamAssassin::Plugin::DCC
use_dcc 0
endif
"""


class SpamdStartError(RuntimeError):
    """spamd exited or did not respond to PING before the start timeout."""


@dataclass
class SpamdReply:
    """One spamd response: status line, response headers and body."""

    status_line: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def spam(self) -> protocol.SpamResult:
        """Parse the ``Spam:`` header. Raises KeyError when the response has none."""
        return protocol.parse_spam_value(self.headers["Spam"].encode("ascii"))

    @property
    def is_spam(self) -> bool:
        """The ``Spam:`` header's verdict (True/False, or Yes/No for REPORT_IFSPAM)."""
        return self.spam().is_spam

    @property
    def score(self) -> float:
        """The score from ``Spam: True ; 1000.0 / 5.0``."""
        return self.spam().score

    @property
    def threshold(self) -> float:
        """The required score from ``Spam: True ; 1000.0 / 5.0``."""
        return self.spam().threshold

    @property
    def symbols(self) -> list[str]:
        """The rule names of a SYMBOLS response body."""
        text = self.body.decode("ascii", "replace").strip()
        return [name.strip() for name in text.split(",") if name.strip()]


def build_site_config(
    directory: Path,
    extra_rule_files: Iterable[Path] | None = None,
    extra_config: Sequence[str] = (),
) -> Path:
    """Create a site configuration directory for a private spamd and return its path.

    The directory gets the system's ``*.pre`` files (they load the plugins), our local.cf
    and the rule files: by default the SPAMFLOW rules, none when extra_rule_files is
    empty. extra_config lines are appended to local.cf, for example score overrides.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    for pre_file in sorted(SYSTEM_SITE_CONFIG.glob("*.pre")):
        shutil.copyfile(pre_file, directory / pre_file.name)

    rule_paths = sa_rules.rule_files() if extra_rule_files is None else extra_rule_files
    for rule_file in rule_paths:
        rule_file = Path(rule_file)
        if rule_file.name == "local.cf":
            raise ValueError(f"rule file {rule_file} would replace the generated local.cf")
        shutil.copyfile(rule_file, directory / rule_file.name)

    text = LOCAL_CF + "".join(f"{line}\n" for line in extra_config)
    (directory / "local.cf").write_text(text, encoding="utf-8")
    return directory


def pick_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on host right now.

    NOTE: another process may take the port between this call and spamd's bind. The
    caller sees that as a start failure with "Address already in use" in the log.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def send_request(
    host: str,
    port: int,
    method: str,
    message: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> SpamdReply:
    """Send one spamd protocol request (SPAMC/1.5) and return the parsed response.

    The request carries a Content-length header when message is given. Raises OSError on
    connection failures and ValueError on a malformed response.
    """
    lines = [f"{method} SPAMC/1.5"]
    if message is not None:
        lines.append(f"Content-length: {len(message)}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (message or b"")

    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(request)
        connection.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return parse_reply(b"".join(chunks))


def parse_reply(data: bytes) -> SpamdReply:
    """Split raw spamd response bytes into status line, headers and body.

    Raises SpamdProtocolError, a ValueError, when the status line or a header is malformed.
    """
    head = protocol.parse_response_head(data)
    status_line = data.partition(protocol.CRLF)[0].decode("ascii", "replace")
    headers = {
        header.name.decode("ascii"): header.value.decode("ascii", "replace").strip()
        for header in head.headers
    }
    # A PONG or an error has only the status line and no body.
    body = data.partition(protocol.HEAD_END)[2]
    return SpamdReply(status_line=status_line, headers=headers, body=body)


def ping(host: str, port: int, timeout: float = 2.0) -> bool:
    """Return True when a spamd on host:port answers PING with PONG."""
    try:
        reply = send_request(host, port, "PING", timeout=timeout)
    except (OSError, ValueError):
        return False
    return reply.status_line.endswith("PONG")


class SpamdInstance:
    """A private spamd process, started on enter and stopped on exit.

    Files in workdir: ``site/`` (site configuration), ``spamd.log`` (its log) and
    ``spamd.pid``. When spamd runs as root and the user nobody cannot read workdir, the
    site configuration and pid file go to a temporary directory that stop() removes, so
    read them through ``site_config`` and ``pid_path``. With netns set, spamd runs under
    ``ip netns exec NS`` and the readiness PING is sent from inside that namespace.
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_children: int = 2,
        netns: str | None = None,
        extra_args: Sequence[str] = (),
        site_config: Path | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port
        self.max_children = max_children
        self.netns = netns
        self.extra_args = tuple(extra_args)
        self.site_config = site_config
        self.start_timeout = start_timeout
        self.log_path = self.workdir / "spamd.log"
        self.pid_path = self.workdir / "spamd.pid"
        self._process: subprocess.Popen[bytes] | None = None
        self._runtime_dir: Path | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT`` in the form ProxyConfig.spamd expects."""
        return f"{self.host}:{self.port}"

    def _site_config_parent(self) -> Path:
        """Return workdir, or a new world-readable directory when spamd could not read it.

        spamd started as root switches its effective user to the user nobody before it reads the
        site configuration and writes the pid file, so a workdir below a 0700 directory
        (pytest's tmp_path is one) is out of its reach.
        """
        if os.geteuid() != 0 or _readable_by_others(self.workdir):
            return self.workdir
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="spamflow-spamd-"))
        self._runtime_dir.chmod(0o755)
        self.pid_path = self._runtime_dir / "spamd.pid"
        log.info("spamd site config in %s because user nobody cannot read %s",
                 self._runtime_dir, self.workdir)
        return self._runtime_dir

    def command(self) -> list[str]:
        """Build the spamd command line, including the netns prefix."""
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        command = [
            SPAMD_PATH,
            "-L",
            f"--listen={listen}",
            f"--siteconfigpath={self.site_config}",
            "--nouser-config",
            f"--pidfile={self.pid_path}",
            f"--max-children={self.max_children}",
            "--syslog=stderr",
        ]
        if os.geteuid() == 0:
            # Run as root without -u, spamd logs an error and falls back to nobody itself.
            command.append("--username=nobody")
        command.extend(self.extra_args)
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]
        return command

    def start(self) -> SpamdInstance:
        """Start spamd and wait until it answers PING. Raises SpamdStartError."""
        if self._process is not None:
            raise RuntimeError("spamd instance is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.site_config is None:
            self.site_config = build_site_config(self._site_config_parent() / "site")
        if self.port is None:
            self.port = pick_free_port("127.0.0.1" if self.netns else self.host)

        # The log file belongs to this process, so spamd needs no write access to workdir.
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("spamd starting: pid %d on %s", self._process.pid, self.address)

        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("spamd ready: pid %d on %s", self._process.pid, self.address)
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            returncode = self._process.poll()
            if returncode is not None:
                raise SpamdStartError(
                    f"spamd exited with status {returncode} before answering PING on "
                    f"{self.address}; log {self.log_path}:\n{self.log_tail()}"
                )
            if self._ping():
                return
            time.sleep(0.25)
        raise SpamdStartError(
            f"spamd did not respond to PING on {self.address} within {self.start_timeout:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def _ping(self) -> bool:
        if self.netns is None:
            return ping(self.host, int(self.port or 0))
        code = (
            "import sys\n"
            "from spamflow.replay.spamd import ping\n"
            f"sys.exit(0 if ping({self.host!r}, {self.port}) else 1)\n"
        )
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=15,
            check=False,
        )
        return result.returncode == 0

    def running(self) -> bool:
        """Return True while the spamd parent process started by start() is alive."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of the spamd log, or a note when there is none."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            return f"(no log: {error.strerror})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop spamd and its children: SIGTERM to the process group, then SIGKILL."""
        process = self._process
        self._process = None
        if process is not None:
            self._stop_process(process)
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

    def _stop_process(self, process: subprocess.Popen[bytes]) -> None:
        # start_new_session made spamd a group leader, and its children share the group.
        group = process.pid
        _signal_group(group, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("spamd pid %d ignored SIGTERM for %.0f s, killing it", group, STOP_TIMEOUT)
        _signal_group(group, signal.SIGKILL)
        process.wait()
        _wait_group_gone(group)
        log.info("spamd stopped: pid %d on %s", group, self.address)

    def __enter__(self) -> SpamdInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _readable_by_others(directory: Path) -> bool:
    """Return True when users other than the owner can list directory and its ancestors."""
    directory = directory.resolve()
    if not directory.stat().st_mode & stat.S_IROTH:
        return False
    return all(part.stat().st_mode & stat.S_IXOTH for part in (directory, *directory.parents))


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def _wait_group_gone(group: int, timeout: float = STOP_TIMEOUT) -> None:
    """Wait until no process of the group is left, sending SIGKILL again if needed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        # Children that outlive spamd are reparented, and their new parent reaps them.
        _signal_group(group, signal.SIGKILL)
        time.sleep(0.05)
    log.error("processes of spamd group %d are still alive after SIGKILL", group)
