"""A private Postfix instance that hands each message to spamc and stores it in a Maildir.

The instance has its own configuration, queue and data directories under one base
directory, logs to a file instead of syslog, needs no DNS, and relays one test domain to
a pipe transport. The pipe runs a /bin/sh script as ``nobody``, one recipient per
delivery, which filters the message through ``spamc`` (and so through the spamflow proxy)
and renames the result into ``Maildir/new/<local part>``. /etc/postfix is only read for
the Postfix program files that ``meta_directory`` names.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from spamflow.replay.netns import wait_for_port

log = logging.getLogger(__name__)

POSTFIX = "/usr/sbin/postfix"
SPAMC = "/usr/bin/spamc"
DEFAULT_DOMAIN = "spamflow.test"
# Postfix splits lines longer than line_length_limit (default 2048 bytes). A 1 MB limit
# keeps every line of a replayed message (200 kB at most) intact.
LINE_LENGTH_LIMIT = 1_000_000
START_TIMEOUT = 30.0
LOG_TAIL_LINES = 40

# (service, type, private, unprivileged, chroot, wakeup, maxproc, command): the standard
# Postfix 3.7 services this instance needs, all outside a chroot.
MASTER_SERVICES = [
    ("smtp", "inet", "n", "-", "n", "-", "-", "smtpd"),
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("local", "unix", "-", "n", "n", "-", "-", "local"),
    ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
    ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]

DELIVER_SCRIPT = """\
#!/bin/sh
# Filter one message (stdin) through spamc and store it as {maildir}/new/LOCAL_PART.
# Without the proxy, spamc outputs the message unchanged and exits 0 (its safe fallback).
# Exit status 75 (EX_TEMPFAIL) makes Postfix retry the delivery later.
umask 022
name=$1
case $name in
  ''|.*|*[!A-Za-z0-9._-]*) echo "invalid local part: $name" >&2; exit 65 ;;
esac
tmp={maildir}/tmp/$name.$$
if ! {spamc} -d {spamc_host} -p {spamc_port} -t {spamc_timeout} >"$tmp"; then
  rm -f "$tmp"
  exit 75
fi
mv -f "$tmp" {maildir}/new/"$name"
"""


class PostfixError(RuntimeError):
    """The private Postfix instance failed to start or to stop."""


def main_cf(
    base: Path,
    *,
    domain: str = DEFAULT_DOMAIN,
    policy_service: str | None = "inet:127.0.0.1:10040",
    pipe_concurrency: int = 2,
) -> str:
    """Return main.cf for an instance whose state lives under base."""
    lines = {
        "compatibility_level": "3.6",
        "queue_directory": str(base / "spool"),
        "data_directory": str(base / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "maillog_file": str(base / "log" / "maillog"),
        "maillog_file_prefixes": str(base / "log"),
        "myhostname": f"mx.{domain}",
        "mydomain": domain,
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "inet_interfaces": "all",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "relay_domains": domain,
        "relay_recipient_maps": "",
        "transport_maps": f"inline:{{ {domain}=spamflow: }}",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_peername_lookup": "no",
        "smtp_dns_support_level": "disabled",
        "biff": "no",
        "append_dot_mydomain": "no",
        "line_length_limit": str(LINE_LENGTH_LIMIT),
        "message_size_limit": str(50 * 1024 * 1024),
        "spamflow_destination_recipient_limit": "1",
        "spamflow_destination_concurrency_limit": str(pipe_concurrency),
        "readme_directory": "no",
        "smtputf8_enable": "no",
    }
    if policy_service is not None:
        lines["smtpd_data_restrictions"] = f"check_policy_service {policy_service}"
        # An unreachable policy service must not stop mail: spamflow fails open.
        lines["smtpd_policy_service_default_action"] = "DUNNO"
    header = "# Written by spamflow.replay.postfix for a private test instance.\n"
    return header + "".join(f"{key} = {value}\n" for key, value in lines.items())


def master_cf(deliver_script: Path, *, pipe_concurrency: int = 2) -> str:
    """Return master.cf: the standard services plus the ``spamflow`` pipe transport."""
    rows = [" ".join(f"{column:<10}" for column in service).rstrip()
            for service in MASTER_SERVICES]
    rows.append(
        f"spamflow  unix  -  n  n  -  {pipe_concurrency}  pipe\n"
        f"  flags= user=nobody argv={deliver_script} ${{user}}"
    )
    return "# Written by spamflow.replay.postfix.\n" + "\n".join(rows) + "\n"


def deliver_script(
    maildir: Path, *, spamc_host: str = "127.0.0.1", spamc_port: int = 7830,
    spamc_timeout: int = 120,
) -> str:
    return DELIVER_SCRIPT.format(maildir=maildir, spamc=SPAMC, spamc_host=spamc_host,
                                 spamc_port=spamc_port, spamc_timeout=spamc_timeout)


class PostfixInstance:
    """A private Postfix, optionally inside a network namespace, as a context manager.

    base defaults to a new world-traversable directory under /var/tmp, because the pipe
    runs as ``nobody`` and cannot reach files under a mode-700 home directory.
    """

    def __init__(
        self,
        base: Path | None = None,
        *,
        netns: str | None = None,
        domain: str = DEFAULT_DOMAIN,
        policy_service: str | None = "inet:127.0.0.1:10040",
        spamc_port: int = 7830,
        pipe_concurrency: int = 2,
    ) -> None:
        self._own_base = base is None
        self.base = Path(base) if base is not None else Path(
            tempfile.mkdtemp(prefix="spamflow-postfix-", dir="/var/tmp"))
        self.netns = netns
        self.domain = domain
        self.policy_service = policy_service
        self.spamc_port = spamc_port
        self.pipe_concurrency = pipe_concurrency
        self.config_dir = self.base / "etc"
        self.maildir = self.base / "Maildir"
        self.maillog = self.base / "log" / "maillog"
        self.deliver_path = self.base / "deliver.sh"
        self.started = False

    def write_files(self) -> None:
        """Create the directories, main.cf, master.cf, the deliver script and the Maildir."""
        postfix_user = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam("nobody")
        os.chmod(self.base, 0o755)
        for sub in ("etc", "spool", "log"):
            (self.base / sub).mkdir(mode=0o755, exist_ok=True)
        data = self.base / "data"
        data.mkdir(mode=0o700, exist_ok=True)
        os.chown(data, postfix_user.pw_uid, postfix_user.pw_gid)
        for sub in ("", "tmp", "new", "cur"):
            path = self.maildir / sub
            path.mkdir(mode=0o755, exist_ok=True)
            os.chown(path, nobody.pw_uid, nobody.pw_gid)

        (self.config_dir / "main.cf").write_text(main_cf(
            self.base, domain=self.domain, policy_service=self.policy_service,
            pipe_concurrency=self.pipe_concurrency))
        (self.config_dir / "master.cf").write_text(
            master_cf(self.deliver_path, pipe_concurrency=self.pipe_concurrency))
        self.deliver_path.write_text(deliver_script(self.maildir, spamc_port=self.spamc_port))
        os.chmod(self.deliver_path, 0o755)

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [POSTFIX, "-c", str(self.config_dir), *args]
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    def start(self) -> PostfixInstance:
        self.write_files()
        result = self._postfix("start")
        if result.returncode != 0:
            raise PostfixError(
                f"postfix start failed with exit status {result.returncode}: "
                f"{result.stderr.strip()}\n{self.log_tail()}"
            )
        self.started = True
        if not wait_for_port(self.netns, "127.0.0.1", 25, START_TIMEOUT):
            raise PostfixError(
                f"Postfix in {self.netns or 'this namespace'} did not accept connections on "
                f"port 25 within {START_TIMEOUT:.0f} s\n{self.log_tail()}"
            )
        log.info("postfix started in %s with config %s", self.netns or "this namespace",
                 self.config_dir)
        return self

    def stop(self) -> None:
        """Stop the instance and kill any of its processes that outlive ``postfix stop``."""
        if not self.started:
            return
        result = self._postfix("stop")
        if result.returncode != 0:
            log.warning("postfix stop failed: %s", result.stderr.strip())
        pid_file = self.base / "spool" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and _pid_alive(pid_file) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_file.exists() and _pid_alive(pid_file):
            pid = int(pid_file.read_text().split()[0])
            log.warning("killing Postfix master %d after postfix stop", pid)
            os.kill(pid, 9)
        self.started = False
        log.info("postfix stopped (config %s)", self.config_dir)

    def running(self) -> bool:
        """Return True while the Postfix master process of this instance is alive."""
        return _pid_alive(self.base / "spool" / "pid" / "master.pid")

    def remove(self) -> None:
        """Delete the base directory if this instance created it."""
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def queue_is_empty(self) -> bool:
        """Return True when no message waits in the incoming, active or deferred queue."""
        spool = self.base / "spool"
        for queue in ("maildrop", "incoming", "active", "deferred", "hold"):
            directory = spool / queue
            if directory.is_dir() and any(p.is_file() for p in directory.rglob("*")):
                return False
        return True

    def delivered(self) -> dict[str, Path]:
        """Map each delivered local part to its Maildir file."""
        new = self.maildir / "new"
        return {path.name: path for path in new.iterdir()} if new.is_dir() else {}

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return "(no maillog written)"
        return "maillog tail:\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PostfixInstance:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True
