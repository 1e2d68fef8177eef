"""ExampleStore: observations round trip and training data extraction."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from spamflow.models.store import ExampleStore, Observation
from spamflow.nfqueue_tap.schema import FEATURE_NAMES, MISSING


def make_observation(
    label: int | None, features: dict[str, float] | None, **fields: object
) -> Observation:
    values = dict(
        ts=1733327000.5,
        flow="10.77.1.2:40211",
        message_id="<m1@example.com>",
        method="CHECK",
        score=7.5,
        base_score=7.5,
        threshold=5.0,
        p=0.97,
        model="nb-120",
        label=label,
        features=features,
    )
    values.update(fields)
    return Observation(**values)


@pytest.fixture
def store(tmp_path: Path):
    with ExampleStore(tmp_path / "db" / "examples.sqlite") as example_store:
        yield example_store


def test_file_created_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "examples.sqlite"
    ExampleStore(path).close()
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_wal_journal_mode(store: ExampleStore) -> None:
    mode = store._connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_observation_round_trip(store: ExampleStore) -> None:
    original = make_observation(1, {"syn_ttl": 52.0, "handshake_rtt_ms": 83.25})
    row_id = store.record(original)
    stored = store.observations()
    assert len(stored) == 1
    assert stored[0].id == row_id
    assert stored[0].ts == original.ts
    assert stored[0].flow == "10.77.1.2:40211"
    assert stored[0].message_id == "<m1@example.com>"
    assert stored[0].method == "CHECK"
    assert stored[0].score == 7.5
    assert stored[0].base_score == 7.5
    assert stored[0].threshold == 5.0
    assert stored[0].p == 0.97
    assert stored[0].model == "nb-120"
    assert stored[0].label == 1
    assert stored[0].features == {"syn_ttl": 52.0, "handshake_rtt_ms": 83.25}


def test_nullable_fields_round_trip(store: ExampleStore) -> None:
    store.record(make_observation(None, None, flow=None, message_id=None, p=None, model=None))
    stored = store.observations()[0]
    assert stored.flow is None
    assert stored.message_id is None
    assert stored.p is None
    assert stored.model is None
    assert stored.label is None
    assert stored.features is None


def test_invalid_label_rejected(store: ExampleStore) -> None:
    with pytest.raises(ValueError, match="invalid label 2"):
        store.record(make_observation(2, None))


def test_training_data_selects_examples(store: ExampleStore) -> None:
    store.record(make_observation(1, {"syn_ttl": 50.0}))
    store.record(make_observation(None, {"syn_ttl": 60.0}))
    store.record(make_observation(0, None))
    store.record(make_observation(0, {"syn_ttl": 120.0, "rst_in": float("nan")}))
    X, y = store.training_data()
    ttl_column = FEATURE_NAMES.index("syn_ttl")
    rst_column = FEATURE_NAMES.index("rst_in")
    rtt_column = FEATURE_NAMES.index("handshake_rtt_ms")
    assert X.shape == (2, len(FEATURE_NAMES))
    assert y.tolist() == [1, 0]
    assert X[:, ttl_column].tolist() == [50.0, 120.0]
    assert X[1, rst_column] == MISSING
    assert X[0, rtt_column] == MISSING


def test_training_data_limit_keeps_newest(store: ExampleStore) -> None:
    for ttl in (10.0, 20.0, 30.0):
        store.record(make_observation(1, {"syn_ttl": ttl}))
    X, _ = store.training_data(limit=2)
    assert X[:, FEATURE_NAMES.index("syn_ttl")].tolist() == [20.0, 30.0]


def test_training_data_empty(store: ExampleStore) -> None:
    X, y = store.training_data()
    assert X.shape == (0, len(FEATURE_NAMES))
    assert y.shape == (0,)


def test_count_examples(store: ExampleStore) -> None:
    assert store.count_examples() == {0: 0, 1: 0}
    store.record(make_observation(1, {"syn_ttl": 50.0}))
    store.record(make_observation(1, {"syn_ttl": 51.0}))
    store.record(make_observation(0, {"syn_ttl": 64.0}))
    store.record(make_observation(0, None))
    store.record(make_observation(None, {"syn_ttl": 64.0}))
    assert store.count_examples() == {0: 1, 1: 2}


def test_reopen_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "examples.sqlite"
    with ExampleStore(path) as first:
        first.record(make_observation(0, {"syn_ttl": 64.0}))
    with ExampleStore(path) as second:
        assert second.count_examples() == {0: 1, 1: 0}


def test_concurrent_writers_and_reader(store: ExampleStore) -> None:
    errors: list[BaseException] = []

    def write(label: int) -> None:
        try:
            for index in range(200):
                store.record(make_observation(label, {"syn_ttl": float(index)}))
        except BaseException as error:  # collected for the assert below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(label,)) for label in (0, 1)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        X, y = store.training_data()
        assert len(X) == len(y)
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.count_examples() == {0: 200, 1: 200}
    assert np.sum(store.training_data()[1]) == 200
