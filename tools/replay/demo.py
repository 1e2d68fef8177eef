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
from spamflow.replay.netns import DEFAULT_PREFIX
from spamflow.replay.plots import write_plots
from spamflow.replay.results import (build_results, format_table, result_to_dict,
                                     summarize)
from spamflow.replay.testbed import ReplayMessage, Testbed, TestbedOptions, interleave

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 200_000
# Seconds to wait for delivery: a fixed part plus a part per accepted message.
WAIT_BASE_S = 120.0
WAIT_PER_MESSAGE_S = 3.0


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

    Returns the summary (also written as summary.json and summary.txt).
    """
    started = time.monotonic()
    run_dir = (request.run_dir or default_run_dir()).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    messages = prepare_messages(request)
    options = TestbedOptions(run_dir=run_dir, prefix=request.prefix, learn=request.learn,
                             seed=request.seed)

    with Testbed(options) as testbed:
        setup_s = time.monotonic() - started
        sent = testbed.send(messages, progress=request.progress)
        accepted = [record["id"] for record in sent if record.get("accepted")]
        timeout = WAIT_BASE_S + WAIT_PER_MESSAGE_S * len(accepted)
        complete = testbed.wait_delivered(accepted, timeout, progress=request.progress)
        results = build_results(sent, testbed.delivered_files(), testbed.observations())
        if request.keep:
            print(f"testbed {request.prefix} is up; press Ctrl-C to remove it", flush=True)
            _wait_for_interrupt()

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


def _wait_for_interrupt() -> None:
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
