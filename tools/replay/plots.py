"""Plots of a replay's results, written into the run folder as PNG files.

matplotlib is an optional dependency (the ``plot`` extra). Without it the replay still
writes its tables and logs, and ``write_plots`` returns no paths.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from spamflow.replay.results import MessageResult

log = logging.getLogger(__name__)

# Number of most recent messages that each point of the running-accuracy curves covers.
ACCURACY_WINDOW = 50


def running_accuracy(correct: Sequence[bool | None], window: int) -> list[float | None]:
    """Return, for each position, the share of correct verdicts among the last `window`.

    None entries (messages without a verdict) are skipped. A position whose window
    contains no verdict gets None.
    """
    values: list[float | None] = []
    for end in range(1, len(correct) + 1):
        recent = [value for value in correct[max(0, end - window):end] if value is not None]
        values.append(sum(recent) / len(recent) if recent else None)
    return values


def sa_only_correct(result: MessageResult) -> bool | None:
    """Return whether SpamAssassin without SPAMFLOW rules classified the message right."""
    if result.base_score is None or result.threshold is None:
        return None
    return (result.base_score >= result.threshold) == (result.label == "spam")


def with_spamflow_correct(result: MessageResult) -> bool | None:
    """Return whether the delivered verdict, SPAMFLOW rules included, was right."""
    if result.sa_spam is None:
        return None
    return result.sa_spam == (result.label == "spam")


def write_plots(results: Sequence[MessageResult], run_dir: Path) -> list[Path]:
    """Write verdicts.png: p per corpus label, and running accuracy in send order."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        log.warning("matplotlib is not installed, so no plots were written to %s", run_dir)
        return []

    ordered = sorted(results, key=lambda result: result.id)
    figure, (histogram, curves) = pyplot.subplots(1, 2, figsize=(12, 4.5))

    bins = [index / 20 for index in range(21)]
    for label, colour in (("ham", "tab:blue"), ("spam", "tab:red")):
        values = [r.p for r in ordered if r.label == label and r.p is not None]
        histogram.hist(values, bins=bins, alpha=0.6, color=colour,
                       label=f"{label} ({len(values)})")
    histogram.set_xlabel("p in X-Spamflow (flow model's spam probability)")
    histogram.set_ylabel("messages")
    histogram.set_title("Flow verdicts by corpus label")
    histogram.legend()

    positions = list(range(1, len(ordered) + 1))
    for name, judge, colour in (
        ("SpamAssassin without SPAMFLOW", sa_only_correct, "tab:gray"),
        ("with SPAMFLOW rules", with_spamflow_correct, "tab:green"),
    ):
        accuracy = running_accuracy([judge(r) for r in ordered], ACCURACY_WINDOW)
        curves.plot(positions, [float("nan") if a is None else a for a in accuracy],
                    color=colour, label=name)
    first_verdict = next((n for n, r in zip(positions, ordered) if r.p is not None), None)
    if first_verdict is not None:
        curves.axvline(first_verdict, color="black", linestyle=":",
                       label=f"first verdict (message {first_verdict})")
    curves.set_xlabel("message, in send order")
    curves.set_ylabel(f"accuracy over the last {ACCURACY_WINDOW} messages")
    curves.set_ylim(0, 1.02)
    curves.set_title("Accuracy while the model learns")
    curves.legend(loc="lower right")

    figure.tight_layout()
    path = run_dir / "verdicts.png"
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return [path]
