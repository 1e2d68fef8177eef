"""Per-message results and the summary table of a replay.

Joins what the sender sent, what Postfix delivered and what the proxy recorded. Corpus
labels are only compared with the verdicts here; nothing here feeds the models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from spamflow.proxy.message import body_offset, find_header, find_headers

_TESTS = re.compile(r"tests=([^\s]*)")
_SCORE = re.compile(r"score=(-?[0-9.]+)")
_P = re.compile(r"\bp=([0-9.]+)")
_MODEL = re.compile(r"\bmodel=([^;\s]+)")


@dataclass
class DeliveredHeaders:
    """The spam headers of one delivered message."""

    spam_status: str | None
    is_spam: bool | None
    score: float | None
    tests: list[str]
    spamflow: str | None
    p: float | None
    model: str | None
    spamflow_count: int = 0


@dataclass
class MessageResult:
    """One line of results.jsonl."""

    id: str
    name: str
    label: str
    flow: str | None
    accepted: bool
    delivered: bool
    score: float | None = None
    base_score: float | None = None
    threshold: float | None = None
    p: float | None = None
    model: str | None = None
    sa_spam: bool | None = None
    spamflow_rules: list[str] = field(default_factory=list)
    learned_label: int | None = None
    observed: bool = False


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """Split a message after its first empty line into header block and body."""
    offset = body_offset(data)
    return data[:offset], data[offset:]


def smtp_canonical(raw: bytes) -> bytes:
    """Return raw as a Maildir file stores it after SMTP: LF line ends, final newline."""
    text = raw.replace(b"\r\n", b"\n")
    return text if text.endswith(b"\n") or not text else text + b"\n"


def parse_delivered(data: bytes) -> DeliveredHeaders:
    """Read X-Spam-Status and X-Spamflow from a delivered message's header block."""
    status = find_header(data, "X-Spam-Status")
    status_text = None
    if status is not None:
        # spamd folds long test lists after a comma, so drop the whitespace of the fold.
        status_text = re.sub(r",\s+", ",", " ".join(status.split()))
    tests: list[str] = []
    score = None
    is_spam = None
    if status_text is not None:
        is_spam = status_text.lower().startswith("yes")
        match = _TESTS.search(status_text)
        if match:
            tests = [test for test in match.group(1).split(",") if test and test != "none"]
        match = _SCORE.search(status_text)
        score = float(match.group(1)) if match else None

    verdicts = find_headers(data, "X-Spamflow")
    verdict = " ".join(verdicts[0].split()) if verdicts else None
    p = model = None
    if verdict is not None:
        match = _P.search(verdict)
        p = float(match.group(1)) if match else None
        match = _MODEL.search(verdict)
        model = match.group(1) if match else None
    return DeliveredHeaders(status_text, is_spam, score, tests, verdict, p, model,
                            len(verdicts))


def build_results(
    sent: Iterable[Mapping[str, Any]],
    delivered: Mapping[str, bytes],
    observations: Iterable[Any],
) -> list[MessageResult]:
    """Join send records (id, name, label, flow, accepted), delivered files by id and
    proxy observations by flow into one result per sent message."""
    by_flow: dict[str, Any] = {}
    for observation in observations:
        if observation.flow:
            by_flow[observation.flow] = observation

    results = []
    for record in sent:
        data = delivered.get(record["id"])
        result = MessageResult(
            id=record["id"], name=record.get("name", ""), label=record["label"],
            flow=record.get("flow"), accepted=bool(record.get("accepted")),
            delivered=data is not None,
        )
        if data is not None:
            headers = parse_delivered(data)
            result.score = headers.score
            result.sa_spam = headers.is_spam
            result.p = headers.p
            result.model = headers.model
            result.spamflow_rules = [t for t in headers.tests if t.startswith("SPAMFLOW_")]
        observation = by_flow.get(result.flow or "")
        if observation is not None:
            result.observed = True
            result.base_score = observation.base_score
            result.threshold = observation.threshold
            result.learned_label = observation.label
            if result.score is None:
                result.score = observation.score
        results.append(result)
    return results


def _accuracy(pairs: list[tuple[bool, bool]]) -> float | None:
    if not pairs:
        return None
    return sum(predicted == actual for predicted, actual in pairs) / len(pairs)


def summarize(results: list[MessageResult]) -> dict[str, Any]:
    """Compute the demo table from per-message results.

    sa_only_accuracy compares base_score >= threshold (SpamAssassin without SPAMFLOW
    rules, from the proxy's record) with the corpus label; with_spamflow_accuracy compares
    the delivered X-Spam-Status verdict. Each is over the messages that have the value.
    """
    delivered = [r for r in results if r.delivered]
    base_pairs = [
        (r.base_score >= r.threshold, r.label == "spam")
        for r in results
        if r.base_score is not None and r.threshold is not None
    ]
    final_pairs = [(r.sa_spam, r.label == "spam") for r in delivered if r.sa_spam is not None]
    return {
        "sent": len(results),
        "sent_spam": sum(r.label == "spam" for r in results),
        "sent_ham": sum(r.label == "ham" for r in results),
        "accepted": sum(r.accepted for r in results),
        "delivered": len(delivered),
        "observed": sum(r.observed for r in results),
        "auto_learned": sum(r.learned_label is not None for r in results),
        "auto_learned_spam": sum(r.learned_label == 1 for r in results),
        "auto_learned_ham": sum(r.learned_label == 0 for r in results),
        "sa_only_accuracy": _accuracy(base_pairs),
        "sa_only_scored": len(base_pairs),
        "with_spamflow_accuracy": _accuracy(final_pairs),
        "with_spamflow_scored": len(final_pairs),
        "with_verdict": sum(r.p is not None for r in delivered),
        "with_spamflow_rule": sum(bool(r.spamflow_rules) for r in delivered),
    }


def format_table(summary: Mapping[str, Any]) -> str:
    """Render the summary as an aligned two-column text table."""

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    rows = [
        ("messages sent", f"{summary['sent']} ({summary['sent_spam']} spam, "
                          f"{summary['sent_ham']} ham)"),
        ("accepted by Postfix", str(summary["accepted"])),
        ("delivered", str(summary["delivered"])),
        ("recorded by the proxy", str(summary["observed"])),
        ("auto-learned examples", f"{summary['auto_learned']} ({summary['auto_learned_spam']} "
                                  f"spam, {summary['auto_learned_ham']} ham)"),
        ("SA-only accuracy", f"{percent(summary['sa_only_accuracy'])} "
                             f"of {summary['sa_only_scored']}"),
        ("accuracy with SPAMFLOW", f"{percent(summary['with_spamflow_accuracy'])} "
                                   f"of {summary['with_spamflow_scored']}"),
        ("messages with X-Spamflow", str(summary["with_verdict"])),
        ("messages hitting a SPAMFLOW rule", str(summary["with_spamflow_rule"])),
    ]
    if "elapsed_s" in summary:
        rows.append(("wall time", f"{summary['elapsed_s']:.0f} s"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def result_to_dict(result: MessageResult) -> dict[str, Any]:
    return asdict(result)
