"""SMTP sender for replays, run inside a sender namespace.

    ip netns exec NS python -m spamflow.replay.sender --concurrency 4 < jobs.jsonl

reads one JSON job a line from stdin: id, label, file, server, rcpt and ``at`` (the
second after start at which to send it). Each message goes over its own SMTP
connection, with at most ``--concurrency`` connections at once. As each send finishes,
one JSON result line goes to stdout: id, label, local_ip, local_port, flow, code,
message, accepted, attempts, sent_at, duration_s and error.
"""

from __future__ import annotations

import argparse
import json
import logging
import smtplib
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Named explicitly because `python -m` runs this module as __main__.
log = logging.getLogger("spamflow.replay.sender")

ENVELOPE_SENDER = "replay@sender.test"
HELO_NAME = "client.sender.test"
SMTP_TIMEOUT = 60.0
# Connection attempts per message; a lost SYN or a reset on a lossy path gets a retry.
MAX_ATTEMPTS = 3


def to_crlf(raw: bytes) -> bytes:
    """Return raw with every line ending as CRLF, the line ending SMTP DATA requires.

    smtplib sends bytes unchanged, and Postfix turns CRLF back into LF when it delivers,
    so a message with LF endings arrives byte-identical.
    """
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def send_one(job: dict[str, Any], local_hostname: str = HELO_NAME) -> dict[str, Any]:
    """Send one job's message and return its result record.

    SMTP and socket errors end up in the record's code, message and error fields.
    """
    data = to_crlf(Path(job["file"]).read_bytes())
    result: dict[str, Any] = {
        "id": job["id"], "label": job.get("label"), "server": job["server"],
        "local_ip": None, "local_port": None, "flow": None, "code": None, "message": None,
        "accepted": False, "attempts": 0, "error": None,
    }
    started = time.time()
    result["sent_at"] = started
    for attempt in range(1, MAX_ATTEMPTS + 1):
        result["attempts"] = attempt
        try:
            _deliver(job, data, local_hostname, result)
            result["error"] = None
            break
        except smtplib.SMTPResponseException as error:
            result["code"] = error.smtp_code
            result["message"] = _text(error.smtp_error)
            result["error"] = f"{type(error).__name__}: {error.smtp_code}"
            break
        except smtplib.SMTPRecipientsRefused as error:
            code, message = next(iter(error.recipients.values()))
            result["code"] = code
            result["message"] = _text(message)
            result["error"] = f"recipient rejected: {code}"
            break
        except (OSError, smtplib.SMTPException) as error:
            result["error"] = f"{type(error).__name__}: {error}"
            log.warning("%s: attempt %d failed: %s", job["id"], attempt, result["error"])
    result["duration_s"] = round(time.time() - started, 4)
    return result


def _deliver(job: dict[str, Any], data: bytes, local_hostname: str,
             result: dict[str, Any]) -> None:
    with smtplib.SMTP(timeout=SMTP_TIMEOUT, local_hostname=local_hostname) as client:
        client.connect(job["server"], int(job.get("port", 25)))
        local_ip, local_port = client.sock.getsockname()[:2]
        result.update(local_ip=local_ip, local_port=local_port, flow=f"{local_ip}:{local_port}")
        client.ehlo()
        refused = client.sendmail(job.get("mail_from", ENVELOPE_SENDER), [job["rcpt"]], data)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)
        # sendmail raises unless DATA ended in 250, so the message is queued here.
        result.update(code=250, message="queued", accepted=True)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def run_jobs(jobs: list[dict[str, Any]], concurrency: int, out: Any) -> int:
    """Send jobs at their ``at`` offsets with bounded concurrency; write results to out."""
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(concurrency)
    accepted = 0

    def work(job: dict[str, Any]) -> None:
        nonlocal accepted
        try:
            result = send_one(job)
        finally:
            slots.release()
        with lock:
            accepted += int(result["accepted"])
            out.write(json.dumps(result) + "\n")
            out.flush()

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for job in jobs:
            delay = start + float(job.get("at", 0.0)) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            slots.acquire()
            pool.submit(work, job)
    return accepted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send replay jobs (JSON lines on stdin).")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="maximum SMTP connections at once (default: 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    socket.setdefaulttimeout(SMTP_TIMEOUT)
    jobs = [json.loads(line) for line in sys.stdin if line.strip()]
    accepted = run_jobs(jobs, max(1, args.concurrency), sys.stdout)
    log.info("sent %d jobs, %d accepted", len(jobs), accepted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
