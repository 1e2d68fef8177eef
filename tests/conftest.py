"""Shared test helpers: where the public data beside the repository lives."""

from __future__ import annotations

import os
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def find_shared_data() -> Path:
    """Return the folder of public test data (SpamAssassin fixtures, SMTP captures).

    SPAMFLOW_SHARED_DATA wins. Otherwise the data is expected in ``shared/data`` beside
    the repository, where CI and the development machines keep it.
    """
    configured = os.environ.get("SPAMFLOW_SHARED_DATA")
    if configured:
        return Path(configured)
    return REPOSITORY.parent / "shared" / "data"


SHARED_DATA = find_shared_data()
