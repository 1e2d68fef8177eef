"""Flow classifiers: each kind separates clear spam from clear ham."""

from __future__ import annotations

import numpy as np
import pytest

from spamflow.models.classifier import (
    MODEL_KINDS,
    FeatureSchemaError,
    FlowModel,
    cross_validated_accuracy,
    train_model,
)
from spamflow.nfqueue_tap.schema import FEATURE_NAMES, MISSING

# Ham flows: low RTT, no retransmissions, SYN TTL 60 (initial TTL 64). Spam flows: high
# RTT, retransmissions, SYN TTL 110 (initial TTL 128).
HAM_CENTER = {"handshake_rtt_ms": 20.0, "retransmissions_in": 0.0, "syn_ttl": 60.0}
SPAM_CENTER = {"handshake_rtt_ms": 400.0, "retransmissions_in": 6.0, "syn_ttl": 110.0}
SPREAD = {"handshake_rtt_ms": 10.0, "retransmissions_in": 0.5, "syn_ttl": 3.0}


def flow_features(center: dict[str, float], rng: np.random.Generator | None) -> dict[str, float]:
    features = {name: 1.0 for name in FEATURE_NAMES}
    for name, value in center.items():
        noise = 0.0 if rng is None else rng.normal(0.0, SPREAD[name])
        features[name] = value + noise
    return features


def separable_data(per_class: int = 40, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [
        [flow_features(center, rng)[name] for name in FEATURE_NAMES]
        for center in [HAM_CENTER] * per_class + [SPAM_CENTER] * per_class
    ]
    labels = [0] * per_class + [1] * per_class
    return np.array(rows), np.array(labels)


@pytest.fixture(scope="module")
def trained() -> dict[str, FlowModel]:
    X, y = separable_data()
    return {kind: train_model(X, y, kind) for kind in MODEL_KINDS}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_clear_spam_high(trained: dict[str, FlowModel], kind: str) -> None:
    p = trained[kind].predict_spam_probability(flow_features(SPAM_CENTER, None))
    assert p > 0.9


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_clear_ham_low(trained: dict[str, FlowModel], kind: str) -> None:
    p = trained[kind].predict_spam_probability(flow_features(HAM_CENTER, None))
    assert p < 0.1


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_metadata(trained: dict[str, FlowModel], kind: str) -> None:
    model = trained[kind]
    assert model.kind == kind
    assert model.name == f"{kind}-80"
    assert model.n_examples == 80
    assert model.feature_names == FEATURE_NAMES
    assert model.class_counts == {0: 40, 1: 40}
    assert model.trained_at > 1.7e9


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_probability_in_unit_interval(trained: dict[str, FlowModel], kind: str) -> None:
    extreme = {name: 1e9 for name in FEATURE_NAMES}
    p = trained[kind].predict_spam_probability(extreme)
    assert 0.0 <= p <= 1.0


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_nan_feature_counts_missing(trained: dict[str, FlowModel], kind: str) -> None:
    with_nan = dict(flow_features(SPAM_CENTER, None), syn_ttl=float("nan"))
    with_missing = dict(flow_features(SPAM_CENTER, None), syn_ttl=MISSING)
    absent = flow_features(SPAM_CENTER, None)
    del absent["syn_ttl"]
    expected = trained[kind].predict_spam_probability(with_missing)
    assert trained[kind].predict_spam_probability(with_nan) == expected
    assert trained[kind].predict_spam_probability(absent) == expected


def test_unknown_kind_lists_allowed() -> None:
    X, y = separable_data(per_class=5)
    with pytest.raises(ValueError, match="allowed kinds: nb, tree, svm, xgb"):
        train_model(X, y, "forest")


def test_missing_class_rejected() -> None:
    X, y = separable_data(per_class=5)
    with pytest.raises(ValueError, match="no spam examples"):
        train_model(X[y == 0], y[y == 0], "nb")


def test_wrong_column_count_rejected() -> None:
    X, y = separable_data(per_class=5)
    with pytest.raises(ValueError, match=f"expected \\(n, {len(FEATURE_NAMES)}\\)"):
        train_model(X[:, :3], y, "nb")


def test_invalid_labels_rejected() -> None:
    X, y = separable_data(per_class=5)
    y = y.copy()
    y[0] = 2
    with pytest.raises(ValueError, match="invalid labels \\[2\\]"):
        train_model(X, y, "nb")


def test_svm_with_few_examples() -> None:
    X, y = separable_data(per_class=3)
    model = train_model(X, y, "svm")
    assert model.name == "svm-6"


def test_schema_change_detected(trained: dict[str, FlowModel]) -> None:
    model = trained["tree"]
    changed = FlowModel(
        kind=model.kind,
        estimator=model.estimator,
        feature_names=model.feature_names[:-1] + ("new_feature",),
        n_examples=model.n_examples,
        trained_at=model.trained_at,
    )
    with pytest.raises(FeatureSchemaError, match="extra: \\['new_feature'\\]"):
        changed.predict_spam_probability(flow_features(HAM_CENTER, None))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_cross_validated_accuracy(kind: str) -> None:
    X, y = separable_data(per_class=20)
    accuracy = cross_validated_accuracy(X, y, kind, folds=5)
    assert accuracy is not None
    assert accuracy >= 0.9


def test_cross_validation_skipped_small() -> None:
    X, y = separable_data(per_class=4)
    assert cross_validated_accuracy(X, y, "nb", folds=5) is None
