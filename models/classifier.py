"""Flow classifiers: train one of four model kinds and return spam probabilities.

Kinds: ``nb`` (Gaussian naive Bayes), ``tree`` (C4.5-style decision tree), ``svm``
(RBF support vector machine with Platt-scaled probabilities) and ``xgb`` (gradient boosted
trees from XGBoost). All read the feature vector defined by nfqueue_tap.schema.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spamflow.nfqueue_tap.schema import FEATURE_NAMES, MISSING, features_to_vector

MODEL_KINDS: tuple[str, ...] = ("nb", "tree", "svm", "xgb")

# C4.5 prunes with a pessimistic error estimate, which scikit-learn lacks. A minimum leaf
# size and cost-complexity pruning keep the tree from growing one leaf per example.
TREE_MIN_SAMPLES_LEAF = 3
TREE_CCP_ALPHA = 0.005

# Small ensembles: training happens in the proxy's background thread on one core.
XGB_N_ESTIMATORS = 60
XGB_MAX_DEPTH = 3
XGB_LEARNING_RATE = 0.3

# Folds for the SVM's probability calibration, reduced when a class has fewer examples.
SVM_CALIBRATION_FOLDS = 5

# Fixed seeds make a retrain on the same examples produce the same model.
RANDOM_STATE = 0


class FeatureSchemaError(ValueError):
    """A model was trained on other feature names than the current schema."""


@dataclass
class FlowModel:
    """A fitted estimator with what is needed to use and identify it.

    ``estimator`` is a fitted scikit-learn compatible classifier over vectors ordered by
    ``feature_names``. ``trained_at`` is Unix time in seconds.
    """

    kind: str
    estimator: Any
    feature_names: tuple[str, ...]
    n_examples: int
    trained_at: float
    class_counts: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model's name in the verdict header, for example ``nb-120``."""
        return f"{self.kind}-{self.n_examples}"

    def check_schema(self) -> None:
        """Raise FeatureSchemaError when feature_names differ from the current schema."""
        if tuple(self.feature_names) != FEATURE_NAMES:
            missing = sorted(set(FEATURE_NAMES) - set(self.feature_names))
            extra = sorted(set(self.feature_names) - set(FEATURE_NAMES))
            raise FeatureSchemaError(
                f"model {self.name} was trained on other features than the current schema "
                f"(missing: {missing or 'none'}, extra: {extra or 'none'}, or another "
                f"order); retrain it with 'spamflow train'"
            )

    def predict_spam_probability(self, features: Mapping[str, float]) -> float:
        """Return the probability in [0, 1] that the flow delivered spam.

        Absent and non-finite features count as MISSING. Raises FeatureSchemaError when
        the model was trained on another schema.
        """
        self.check_schema()
        vector = np.array([to_model_vector(features)], dtype=np.float64)
        return self.predict_spam_probabilities(vector)[0]

    def predict_spam_probabilities(self, X: np.ndarray) -> list[float]:
        """Return the spam probability of each row of a feature matrix."""
        self.check_schema()
        probabilities = self.estimator.predict_proba(np.asarray(X, dtype=np.float64))
        spam_column = list(self.estimator.classes_).index(1)
        return [_clip_probability(row[spam_column]) for row in probabilities]


def to_model_vector(features: Mapping[str, float]) -> list[float]:
    """Order features as a model vector, with MISSING for absent or non-finite values."""
    return [value if math.isfinite(value) else MISSING for value in features_to_vector(features)]


def make_estimator(kind: str) -> Any:
    """Return an unfitted estimator of the given kind.

    Raises ValueError listing MODEL_KINDS for an unknown kind.
    """
    if kind == "nb":
        from sklearn.naive_bayes import GaussianNB

        return GaussianNB()
    if kind == "tree":
        from sklearn.tree import DecisionTreeClassifier

        return DecisionTreeClassifier(
            criterion="entropy",
            min_samples_leaf=TREE_MIN_SAMPLES_LEAF,
            ccp_alpha=TREE_CCP_ALPHA,
            random_state=RANDOM_STATE,
        )
    if kind == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        # Platt scaling on cross-validated decision values. scikit-learn 1.9 deprecates
        # SVC(probability=True) and names this wrapper as its replacement.
        calibrated = CalibratedClassifierCV(
            SVC(kernel="rbf", random_state=RANDOM_STATE),
            method="sigmoid",
            cv=SVM_CALIBRATION_FOLDS,
            ensemble=False,
        )
        return make_pipeline(StandardScaler(), calibrated)
    if kind == "xgb":
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=XGB_N_ESTIMATORS,
            max_depth=XGB_MAX_DEPTH,
            learning_rate=XGB_LEARNING_RATE,
            n_jobs=1,
            tree_method="hist",
            eval_metric="logloss",
            random_state=RANDOM_STATE,
        )
    raise ValueError(f"unknown model kind {kind!r}; allowed kinds: {', '.join(MODEL_KINDS)}")


def validate_training_data(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return X and y as arrays after checking their shapes and labels.

    Raises ValueError on a wrong column count, mismatched lengths, labels other than 0
    and 1, or a missing class.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or X.shape[1] != len(FEATURE_NAMES):
        raise ValueError(
            f"feature matrix has shape {X.shape}, expected (n, {len(FEATURE_NAMES)})"
        )
    if len(y) != len(X):
        raise ValueError(f"{len(X)} feature rows but {len(y)} labels")
    unexpected = sorted(set(np.unique(y).tolist()) - {0, 1})
    if unexpected:
        raise ValueError(f"invalid labels {unexpected}: expected 0 (ham) and 1 (spam)")
    for label, label_name in ((0, "ham"), (1, "spam")):
        if not np.any(y == label):
            raise ValueError(
                f"no {label_name} examples among {len(y)}: training needs both classes"
            )
    return X, y


def train_model(X: np.ndarray, y: np.ndarray, kind: str) -> FlowModel:
    """Fit a model of the given kind on X (columns in FEATURE_NAMES order) and y (1 spam).

    Raises ValueError for an unknown kind (listing the allowed kinds), for a missing
    class and for malformed X or y.
    """
    estimator = make_estimator(kind)
    X, y = validate_training_data(X, y)
    smaller_class = min(int(np.sum(y == 0)), int(np.sum(y == 1)))
    if kind == "svm":
        if smaller_class < 2:
            raise ValueError(
                "an svm model needs at least 2 examples per class for probability calibration"
            )
        calibration_folds = min(SVM_CALIBRATION_FOLDS, smaller_class)
        estimator.set_params(calibratedclassifiercv__cv=calibration_folds)
    estimator.fit(X, y)
    return FlowModel(
        kind=kind,
        estimator=estimator,
        feature_names=FEATURE_NAMES,
        n_examples=len(y),
        trained_at=time.time(),
        class_counts={0: int(np.sum(y == 0)), 1: int(np.sum(y == 1))},
    )


def training_accuracy(model: FlowModel, X: np.ndarray, y: np.ndarray) -> float:
    """Return the share of rows of X whose prediction (spam when p >= 0.5) matches y."""
    probabilities = np.array(model.predict_spam_probabilities(X))
    return float(np.mean((probabilities >= 0.5).astype(np.int64) == np.asarray(y)))


def cross_validated_accuracy(
    X: np.ndarray, y: np.ndarray, kind: str, folds: int = 5
) -> float | None:
    """Return the mean accuracy (p >= 0.5 counts as spam) of stratified k-fold validation.

    Returns None when the smaller class has fewer than ``folds`` examples, because
    stratified folds would then lack that class.
    """
    from sklearn.model_selection import StratifiedKFold

    X, y = validate_training_data(X, y)
    if min(int(np.sum(y == 0)), int(np.sum(y == 1))) < folds:
        return None
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=RANDOM_STATE)
    accuracies = []
    for train_rows, test_rows in splitter.split(X, y):
        model = train_model(X[train_rows], y[train_rows], kind)
        accuracies.append(training_accuracy(model, X[test_rows], y[test_rows]))
    return float(np.mean(accuracies))


def _clip_probability(value: float) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError("estimator returned NaN as spam probability")
    return min(1.0, max(0.0, value))
