"""SQLite store of scanned messages, the source of the models' training examples.

One row per scanned message. A row becomes a training example once it has both a label
(1 spam, 0 ham) and the flow features measured by the tap.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spamflow.nfqueue_tap.schema import FEATURE_NAMES, MISSING, features_to_vector

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS observations (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    flow TEXT,
    message_id TEXT,
    method TEXT NOT NULL,
    score REAL NOT NULL,
    base_score REAL NOT NULL,
    threshold REAL NOT NULL,
    p REAL,
    model TEXT,
    label INTEGER CHECK (label IN (0, 1)),
    features TEXT
)
"""

_COLUMNS = (
    "ts, flow, message_id, method, score, base_score, threshold, p, model, label, features"
)


@dataclass
class Observation:
    """One scanned message as the proxy saw it.

    ts is Unix time in seconds. flow is the remote peer as ``IP:PORT``. score is spamd's
    score with the SPAMFLOW rules, base_score the same score without them, and threshold
    spamd's required score. p and model are the verdict inserted into the message, None
    when there was none. label is 1 for spam, 0 for ham and None when base_score was
    between the learning thresholds. features maps schema feature names to values.
    """

    ts: float
    flow: str | None
    message_id: str | None
    method: str
    score: float
    base_score: float
    threshold: float
    p: float | None = None
    model: str | None = None
    label: int | None = None
    features: Mapping[str, float] | None = None
    # Row id, set by ExampleStore.observations().
    id: int | None = None


class ExampleStore:
    """Observations in one SQLite file, shared by the proxy's threads and a training thread.

    A single connection serves every thread, and a lock serializes its use. The file is
    created with mode 0600 because message ids and peer addresses identify correspondents.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False)
        with self._lock:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute(_CREATE_TABLE)
            self._connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._connection.commit()
        log.debug("example store opened: %s", self.path)

    def record(self, observation: Observation) -> int:
        """Insert one observation and return its row id.

        Raises ValueError when label is not 0, 1 or None.
        """
        if observation.label not in (0, 1, None):
            raise ValueError(f"invalid label {observation.label!r}: expected 0, 1 or None")
        features = None
        if observation.features is not None:
            features = json.dumps(
                {name: float(value) for name, value in observation.features.items()},
                sort_keys=True,
            )
        values = (
            float(observation.ts),
            observation.flow,
            observation.message_id,
            observation.method,
            float(observation.score),
            float(observation.base_score),
            float(observation.threshold),
            None if observation.p is None else float(observation.p),
            observation.model,
            observation.label,
            features,
        )
        with self._lock:
            cursor = self._connection.execute(
                f"INSERT INTO observations ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", values
            )
            self._connection.commit()
        return int(cursor.lastrowid or 0)

    def training_data(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return feature matrix X and labels y of every labelled row with features.

        Columns follow FEATURE_NAMES. Absent and non-finite values become MISSING. With
        limit, only the newest limit rows are used. Rows are in insertion order.
        """
        query = (
            "SELECT label, features FROM observations "
            "WHERE label IS NOT NULL AND features IS NOT NULL ORDER BY id DESC"
        )
        parameters: tuple[Any, ...] = ()
        if limit is not None:
            query += " LIMIT ?"
            parameters = (limit,)
        with self._lock:
            rows = self._connection.execute(query, parameters).fetchall()
        rows.reverse()

        X = np.empty((len(rows), len(FEATURE_NAMES)), dtype=np.float64)
        y = np.empty(len(rows), dtype=np.int64)
        for index, (label, features_json) in enumerate(rows):
            vector = features_to_vector(json.loads(features_json))
            X[index] = [value if math.isfinite(value) else MISSING for value in vector]
            y[index] = label
        return X, y

    def count_examples(self) -> dict[int, int]:
        """Return the number of training examples (label and features present) per label."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT label, COUNT(*) FROM observations "
                "WHERE label IS NOT NULL AND features IS NOT NULL GROUP BY label"
            ).fetchall()
        counts = {0: 0, 1: 0}
        counts.update({int(label): int(count) for label, count in rows})
        return counts

    def observations(self) -> list[Observation]:
        """Return every stored observation in insertion order, with its row id."""
        with self._lock:
            rows = self._connection.execute(
                f"SELECT id, {_COLUMNS} FROM observations ORDER BY id"
            ).fetchall()
        return [_row_to_observation(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> ExampleStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _row_to_observation(row: tuple[Any, ...]) -> Observation:
    (row_id, ts, flow, message_id, method, score, base_score, threshold, p, model, label,
     features_json) = row
    return Observation(
        ts=ts,
        flow=flow,
        message_id=message_id,
        method=method,
        score=score,
        base_score=base_score,
        threshold=threshold,
        p=p,
        model=model,
        label=label,
        features=None if features_json is None else json.loads(features_json),
        id=row_id,
    )
