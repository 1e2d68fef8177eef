"""AutoLearner: labels by threshold, retrains in the background and reloads model files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spamflow.config import LearnConfig
from spamflow.models.autolearn import AutoLearner
from spamflow.models.classifier import train_model
from spamflow.models.persist import save_model
from spamflow.models.store import ExampleStore, Observation
from spamflow.nfqueue_tap.schema import FEATURE_NAMES

SPAM_FEATURES = {"handshake_rtt_ms": 400.0, "retransmissions_in": 6.0, "syn_ttl": 110.0}
HAM_FEATURES = {"handshake_rtt_ms": 20.0, "retransmissions_in": 0.0, "syn_ttl": 60.0}


def observation(base_score: float, index: int, with_features: bool = True,
                label: int | None = None) -> Observation:
    features = None
    if with_features:
        template = SPAM_FEATURES if base_score >= 6.0 else HAM_FEATURES
        # Small per-message variation keeps the classes' variances above zero.
        features = {name: value + (index % 5) * 0.5 for name, value in template.items()}
    return Observation(
        ts=1733327000.0 + index,
        flow=f"10.77.1.2:{40000 + index}",
        message_id=f"<m{index}@example.com>",
        method="CHECK",
        score=base_score,
        base_score=base_score,
        threshold=5.0,
        label=label,
        features=features,
    )


def alternating(count: int, start: int = 0) -> list[Observation]:
    """Return count labelled-by-score observations, alternating ham and spam."""
    return [
        observation(10.0 if index % 2 else -1.0, index) for index in range(start, start + count)
    ]


@pytest.fixture
def store(tmp_path: Path):
    with ExampleStore(tmp_path / "examples.sqlite") as example_store:
        yield example_store


def make_learner(store: ExampleStore, tmp_path: Path, **options) -> AutoLearner:
    settings = dict(spam_threshold=6.0, ham_threshold=0.0, model_kind="nb",
                    retrain_every=10, min_examples_per_class=5)
    settings.update(options)
    return AutoLearner(store, tmp_path / "model" / "model.joblib", LearnConfig(**settings))


@pytest.mark.parametrize(
    ("base_score", "expected"),
    [(6.0, 1), (6.01, 1), (25.0, 1), (5.99, None), (3.0, None), (0.01, None), (0.0, 0),
     (-0.01, 0), (-5.0, 0)],
)
def test_label_boundaries(store: ExampleStore, tmp_path: Path, base_score: float,
                          expected: int | None) -> None:
    learner = make_learner(store, tmp_path)
    assert learner.label_for(base_score) == expected


def test_observe_records_label(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path)
    learner.observe(observation(7.0, 1))
    learner.observe(observation(2.0, 2))
    learner.observe(observation(-1.0, 3))
    assert [row.label for row in store.observations()] == [1, None, 0]


def test_observe_keeps_given_label(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path)
    learner.observe(observation(2.0, 1, label=1))
    assert store.observations()[0].label == 1


def test_one_retrain_after_retrain_every(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path)
    for item in alternating(9):
        learner.observe(item)
    assert learner.wait_idle(30)
    assert learner.training_count == 0
    assert learner.model is None

    learner.observe(alternating(1, start=9)[0])
    assert learner.wait_idle(30)
    assert learner.training_count == 1
    assert learner.model is not None
    assert learner.model.name == "nb-10"
    assert (tmp_path / "model" / "model.joblib").is_file()

    for item in alternating(9, start=10):
        learner.observe(item)
    assert learner.wait_idle(30)
    assert learner.training_count == 1


def test_retrain_swaps_model(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path)
    for item in alternating(10):
        learner.observe(item)
    assert learner.wait_idle(30)
    first = learner.model
    for item in alternating(10, start=10):
        learner.observe(item)
    assert learner.wait_idle(30)
    assert learner.training_count == 2
    assert learner.model is not first
    assert learner.model is not None
    assert learner.model.name == "nb-20"
    spam_probability = learner.model.predict_spam_probability(SPAM_FEATURES)
    ham_probability = learner.model.predict_spam_probability(HAM_FEATURES)
    assert spam_probability > 0.9
    assert ham_probability < 0.1


def test_unlabelled_not_counted(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path)
    for index in range(30):
        learner.observe(observation(3.0, index))
    for index in range(30, 60):
        learner.observe(observation(10.0 if index % 2 else -1.0, index, with_features=False))
    assert learner.wait_idle(30)
    assert learner.training_count == 0
    assert len(store.observations()) == 60


def test_retrain_waits_for_both_classes(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path)
    for index in range(12):
        learner.observe(observation(10.0, index))
    assert learner.wait_idle(30)
    assert learner.training_count == 0

    for index in range(12, 16):
        learner.observe(observation(-1.0, index))
    assert learner.wait_idle(30)
    assert learner.training_count == 0

    learner.observe(observation(-1.0, 16))
    assert learner.wait_idle(30)
    assert learner.training_count == 1
    assert learner.model is not None
    assert learner.model.class_counts == {0: 5, 1: 12}


def test_concurrent_observers_train_once(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path, retrain_every=40, min_examples_per_class=5)
    started = threading.Barrier(4)

    def feed(offset: int) -> None:
        started.wait()
        for item in alternating(10, start=offset):
            learner.observe(item)

    threads = [threading.Thread(target=feed, args=(offset,)) for offset in (0, 10, 20, 30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert learner.wait_idle(30)
    assert learner.training_count == 1


def test_retrain_now(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path, retrain_every=1000)
    assert learner.retrain_now() is None
    for item in alternating(12):
        learner.observe(item)
    model = learner.retrain_now()
    assert model is not None
    assert model.name == "nb-12"
    assert learner.model is model


def test_loads_existing_model(store: ExampleStore, tmp_path: Path) -> None:
    first = make_learner(store, tmp_path)
    for item in alternating(10):
        first.observe(item)
    assert first.wait_idle(30)
    second = make_learner(store, tmp_path)
    assert second.model is not None
    assert second.model.name == "nb-10"


def test_unsafe_model_left_unloaded(store: ExampleStore, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    learner = make_learner(store, tmp_path)
    for item in alternating(10):
        learner.observe(item)
    assert learner.wait_idle(30)
    os.chmod(learner.model_path, 0o666)
    with caplog.at_level(logging.ERROR, logger="spamflow.models.autolearn"):
        second = make_learner(store, tmp_path)
    assert second.model is None
    assert "writable by group or others" in caplog.text


def test_damaged_model_left_unloaded(store: ExampleStore, tmp_path: Path) -> None:
    path = tmp_path / "model" / "model.joblib"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"garbage")
    path.chmod(0o600)
    learner = make_learner(store, tmp_path)
    assert learner.model is None


def test_reload_after_spamflow_train(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path, retrain_every=1000)
    for item in alternating(20):
        learner.observe(item)
    assert learner.model is None
    assert learner.reload_if_changed() is False

    # train creates no directories for an explicit --model.
    learner.model_path.parent.mkdir(mode=0o700, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "spamflow", "train", "--db", str(store.path),
         "--model", str(learner.model_path), "--kind", "tree", "--min-examples", "5"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert learner.reload_if_changed() is True
    assert learner.model is not None
    assert learner.model.name == "tree-20"
    assert learner.reload_if_changed() is False


def test_reload_after_replace(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path, retrain_every=1000)
    for item in alternating(20):
        learner.observe(item)
    assert learner.retrain_now() is not None
    X, y = store.training_data()
    save_model(train_model(X[:12], y[:12], "xgb"), learner.model_path)
    assert learner.reload_if_changed() is True
    assert learner.model is not None
    assert learner.model.name == "xgb-12"


def test_reload_waits_for_training(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path, retrain_every=1000)
    for item in alternating(20):
        learner.observe(item)
    trained = learner.retrain_now()
    assert trained is not None
    X, y = store.training_data()
    save_model(train_model(X[:12], y[:12], "xgb"), learner.model_path)

    # A file written before a running training finishes is older than that training's
    # result, so reload_if_changed leaves it alone until the training is done.
    with learner._training_lock:
        assert learner.reload_if_changed() is False
        assert learner.model is trained
    assert learner.reload_if_changed() is True
    assert learner.model is not None
    assert learner.model.name == "xgb-12"


def test_invalid_config_rejected(store: ExampleStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed kinds: nb, tree, svm, xgb"):
        make_learner(store, tmp_path, model_kind="forest")
    with pytest.raises(ValueError, match="must be below"):
        make_learner(store, tmp_path, ham_threshold=6.0)


def test_features_use_schema(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path)
    for item in alternating(10):
        learner.observe(item)
    assert learner.wait_idle(30)
    assert learner.model is not None
    assert learner.model.feature_names == FEATURE_NAMES


def test_trains_on_newest_examples(store: ExampleStore, tmp_path: Path) -> None:
    learner = make_learner(store, tmp_path, retrain_every=1000, max_training_examples=12)
    for item in alternating(20):
        learner.observe(item)
    model = learner.retrain_now()
    assert model is not None
    assert model.name == "nb-12"
    assert model.class_counts == {0: 6, 1: 6}
