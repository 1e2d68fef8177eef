"""``spamflow demo`` and ``spamflow replay``: replay labelled mail through the testbed.

The corpus labels choose the sender path (spam or ham namespace) and score the results.
They never reach the proxy or the models, which learn only from SpamAssassin's scores.

NOTE: the two paths are synthetic and every spam message takes the spam path, so the flow
model can tell the classes apart by construction. The table shows that the pipeline works
end to end (learning, verdicts, SPAMFLOW rules), not how well flow features detect spam on
real traffic.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spamflow.config import LearnConfig
from spamflow.replay.corpus import load_messages
from spamflow.replay.daemons import DaemonError
from spamflow.replay.netns import DEFAULT_PREFIX
from spamflow.replay.plots import write_plots
from spamflow.replay.results import (build_results, format_table, result_to_dict,
                                     summarize)
from spamflow.replay.runlock import TestbedBusyError
from spamflow.replay.testbed import ReplayMessage, Testbed, TestbedOptions, interleave

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 200_000
# Seconds to wait for delivery: a fixed part plus a part per accepted message.
WAIT_BASE_S = 120.0
WAIT_PER_MESSAGE_S = 3.0


class ReplayStoppedError(RuntimeError):
    """The replay ended early and its testbed is removed; exit_status suits the command."""

    def __init__(self, message: str, run_dir: Path, exit_status: int) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.exit_status = exit_status


@dataclass
class ReplayRequest:
    """Replay parameters: corpus and message counts, run folder, namespaces, learning."""

    spam: int = 200
    ham: int = 200
    corpus: Path | None = None
    run_dir: Path | None = None
    prefix: str = DEFAULT_PREFIX
    seed: int = 1
    progress: bool = True
    keep: bool = False
    learn: LearnConfig = field(default_factory=LearnConfig)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def prepare_messages(request: ReplayRequest) -> list[ReplayMessage]:
    """Load, interleave and number the messages; ids are m00001, m00002, ... in send order."""
    loaded = load_messages(request.corpus, spam=request.spam, ham=request.ham,
                           seed=request.seed, max_bytes=MAX_MESSAGE_BYTES)
    messages = [ReplayMessage("", m.name, m.label, m.raw) for m in loaded]
    ordered = interleave(messages, request.seed)
    for number, message in enumerate(ordered, start=1):
        message.id = f"m{number:05d}"
    return ordered


def run_replay(request: ReplayRequest) -> dict[str, Any]:
    """Run the whole pipeline once and write results into the run folder.

    Returns the summary (also written as summary.json and summary.txt). Ctrl-C, SIGTERM
    (as SystemExit) and a testbed process that exits raise ReplayStoppedError once the
    testbed is removed. The results of the messages sent so far are then written with
    ``"complete": false`` and the reason in ``"stopped"``.
    """
    started = time.monotonic()
    run_dir = (request.run_dir or default_run_dir()).resolve()
    created = not run_dir.exists()
    messages = prepare_messages(request)
    run_dir.mkdir(parents=True, exist_ok=True)
    options = TestbedOptions(run_dir=run_dir, prefix=request.prefix, learn=request.learn,
                             seed=request.seed)

    partial: list[Any] | None = None
    try:
        with Testbed(options) as testbed:
            setup_s = time.monotonic() - started
            try:
                sent = testbed.send(messages, progress=request.progress)
                accepted = [record["id"] for record in sent if record.get("accepted")]
                timeout = WAIT_BASE_S + WAIT_PER_MESSAGE_S * len(accepted)
                complete = testbed.wait_delivered(accepted, timeout,
                                                  progress=request.progress)
                results = build_results(sent, testbed.delivered_files(),
                                        testbed.observations())
            except (KeyboardInterrupt, SystemExit, DaemonError):
                partial = _partial_results(testbed)
                raise
            if request.keep:
                print(f"testbed {request.prefix} is up; press Ctrl-C to remove it",
                      flush=True)
                _wait_for_interrupt()
    except TestbedBusyError:
        if created:
            _remove_if_empty(run_dir)
        raise
    except (KeyboardInterrupt, SystemExit, DaemonError) as error:
        stopped = _stop_reason(error)
        if partial is not None:
            _write_partial(run_dir, partial, stopped, started, request)
        raise ReplayStoppedError(_stopped_message(error, stopped, request.prefix, run_dir),
                                 run_dir, _exit_status(error)) from error

    summary = summarize(results)
    summary.update(
        elapsed_s=round(time.monotonic() - started, 1),
        setup_s=round(setup_s, 1),
        complete=complete,
        run_dir=str(run_dir),
        corpus=str(request.corpus) if request.corpus else "bundled sample",
        seed=request.seed,
    )
    _write_outputs(run_dir, results, summary)
    return summary


def _write_outputs(run_dir: Path, results: list[Any], summary: dict[str, Any]) -> None:
    with open(run_dir / "results.jsonl", "w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result_to_dict(result)) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.txt").write_text(format_table(summary) + "\n")
    write_plots(results, run_dir)


def _partial_results(testbed: Testbed) -> list[Any] | None:
    """Join the send records so far with what was delivered, before the testbed goes."""
    try:
        return build_results(testbed.sent_records, testbed.delivered_files(),
                             testbed.observations())
    except Exception as error:  # noqa: BLE001 - the replay is stopping anyway.
        log.warning("collecting partial results failed: %s", error)
        return None


def _write_partial(run_dir: Path, results: list[Any], stopped: str, started: float,
                   request: ReplayRequest) -> None:
    """Write results.jsonl, summary.json and summary.txt of a stopped run, no plots."""
    summary = summarize(results)
    summary.update(
        elapsed_s=round(time.monotonic() - started, 1),
        complete=False,
        stopped=stopped,
        run_dir=str(run_dir),
        corpus=str(request.corpus) if request.corpus else "bundled sample",
        seed=request.seed,
    )
    with open(run_dir / "results.jsonl", "w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result_to_dict(result)) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.txt").write_text(
        f"INCOMPLETE: the run was stopped ({stopped}) after {len(results)} messages\n"
        + format_table(summary) + "\n")


def _stop_reason(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, SystemExit):
        return "terminated"
    return "testbed process exited"


def _exit_status(error: BaseException) -> int:
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, SystemExit) and isinstance(error.code, int):
        return error.code
    return 1


def _stopped_message(error: BaseException, stopped: str, prefix: str, run_dir: Path) -> str:
    cause = "" if isinstance(error, (KeyboardInterrupt, SystemExit)) else f"{error}\n"
    return (f"{cause}{stopped}: removed testbed {prefix}; partial results and logs are "
            f"in {run_dir}")


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM, the normal end of a --keep run."""
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
