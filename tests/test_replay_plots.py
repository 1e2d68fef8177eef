"""Plots of replay results, from literal results."""

from __future__ import annotations

import pytest

from spamflow.replay.plots import (running_accuracy, sa_only_correct, with_spamflow_correct,
                                   write_plots)
from spamflow.replay.results import MessageResult


def make_result(number: int, label: str, base_score: float | None, sa_spam: bool | None,
                p: float | None) -> MessageResult:
    return MessageResult(id=f"m{number:05d}", name=f"n{number}", label=label,
                         flow=f"198.18.1.2:{40000 + number}", accepted=True, delivered=True,
                         base_score=base_score, threshold=5.0, sa_spam=sa_spam, p=p)


def test_running_accuracy_window():
    values = running_accuracy([True, False, None, True, True], window=2)
    assert values == [1.0, 0.5, 0.0, 1.0, 1.0]


def test_running_accuracy_all_missing():
    assert running_accuracy([None, None], window=3) == [None, None]


def test_correctness_judges():
    spam_caught = make_result(1, "spam", 7.0, True, 0.99)
    ham_flagged = make_result(2, "ham", 6.0, True, 0.80)
    unscored = make_result(3, "spam", None, None, None)

    assert sa_only_correct(spam_caught) is True
    assert with_spamflow_correct(spam_caught) is True
    assert sa_only_correct(ham_flagged) is False
    assert with_spamflow_correct(ham_flagged) is False
    assert sa_only_correct(unscored) is None
    assert with_spamflow_correct(unscored) is None


def test_write_plots_png(tmp_path):
    pytest.importorskip("matplotlib")
    results = []
    for number in range(1, 61):
        is_spam = number % 2 == 1
        p = None
        if number > 10:
            p = 0.9 if is_spam else 0.1
        label = "spam" if is_spam else "ham"
        base_score = 6.0 if is_spam else 1.0
        results.append(make_result(number, label, base_score, is_spam, p))

    paths = write_plots(results, tmp_path)

    assert paths == [tmp_path / "verdicts.png"]
    data = paths[0].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000
