"""SpamAssassin rules that score the ``X-Spamflow`` verdict header.

The rules themselves live in the ``*.cf`` files of this package. This module locates them
and mirrors their probability bands so Python code can name the rule a given p fires.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

RULES_DIR = Path(__file__).resolve().parent

# (rule name, lowest p, highest p) in hundredths, as written in 72_spamflow.cf.
BANDS: tuple[tuple[str, int, int], ...] = (
    ("SPAMFLOW_P00_04", 0, 4),
    ("SPAMFLOW_P05_34", 5, 34),
    ("SPAMFLOW_P35_64", 35, 64),
    ("SPAMFLOW_P65_94", 65, 94),
    ("SPAMFLOW_P95_100", 95, 100),
)

RULE_NAMES: tuple[str, ...] = tuple(name for name, _, _ in BANDS)

_SCORE_LINE = re.compile(r"^\s*score\s+(SPAMFLOW_\w+)\s+(-?[0-9.]+)")


def rule_files() -> list[Path]:
    """Return the rule files shipped with spamflow, sorted as SpamAssassin loads them."""
    return sorted(RULES_DIR.glob("*.cf"))


def band_rule(p: float) -> str:
    """Return the name of the band rule that fires for the header value ``p=%.2f``.

    Raises ValueError when p is outside 0..1 or not a number.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"spam probability {p!r} is outside 0..1")
    hundredths = int(f"{p:.2f}".replace(".", ""))
    for name, low, high in BANDS:
        if low <= hundredths <= high:
            return name
    raise AssertionError(f"bands do not cover {hundredths}")


def read_scores(paths: Iterable[Path] | None = None) -> dict[str, float]:
    """Read the SPAMFLOW_* scores from rule and config files, later files winning.

    Pass the rule files followed by local.cf to see the scores spamd will use. Only the
    first value of a ``score`` line is read, which is the one SpamAssassin uses when
    Bayes and network tests are off.
    """
    scores: dict[str, float] = {}
    for path in rule_files() if paths is None else paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            match = _SCORE_LINE.match(line)
            if match:
                scores[match.group(1)] = float(match.group(2))
    return scores
