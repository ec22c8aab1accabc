"""The O(nnz) SAGA kernel against step-by-step arithmetic and against sklearn's saga."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from sail.evaluate.saga import SagaLogistic, _catch_up


def _steps(w, k, a, d, c):
    for _ in range(k):
        x = a * w - d
        w = np.sign(x) * max(abs(x) - c, 0.0)
    return w


def test_closed_form_catch_up_equals_replaying_every_step():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        w = rng.normal() * rng.choice([0.0, 1.0])
        k = int(rng.integers(1, 400))
        a = 1 - 10 ** rng.uniform(-9, -1)
        d = rng.normal() * 10 ** rng.uniform(-4, 0)
        c = abs(rng.normal()) * 10 ** rng.uniform(-4, 0)
        got = _catch_up(w, k, a, d, c, np.log1p(-(1 - a)), 1 - a, a**k, sum(a**i for i in range(k)))
        assert got == pytest.approx(_steps(w, k, a, d, c), rel=1e-8, abs=1e-12), (w, k, a, d, c)


def _objective(X, y, coef, intercept, C=1.0, l1_ratio=0.5):
    n = X.shape[0]
    classes, yi = np.unique(y, return_inverse=True)
    sw = (n / (len(classes) * np.bincount(yi)))[yi]
    Z = np.asarray(X @ coef.T) + intercept
    if coef.shape[0] == 1:
        loss = np.logaddexp(0, Z[:, 0]) - yi * Z[:, 0]
    else:
        loss = np.logaddexp.reduce(Z, axis=1) - Z[np.arange(n), yi]
    return (
        C * (sw * loss).sum() + (1 - l1_ratio) / 2 * (coef**2).sum() + l1_ratio * np.abs(coef).sum()
    )


def _data(n_classes, seed=0, n=1500, f=60):
    rng = np.random.default_rng(seed)
    X = sp.random(
        n, f, density=0.15, random_state=seed, data_rvs=lambda k: rng.exponential(1.0, k)
    ).tocsr()
    W = np.zeros((n_classes, f))
    W[:, :8] = rng.normal(0, 2, (n_classes, 8))
    y = np.argmax(np.asarray(X @ W.T) + rng.gumbel(size=(n, n_classes)), axis=1)
    keep = np.ones(f)
    keep[-1] = 0.0  # a column that never fires keeps an exact zero weight
    X = (X @ sp.diags(keep)).tocsr()
    X.eliminate_zeros()
    return X, y


@pytest.mark.parametrize("n_classes", [2, 3])
def test_reaches_the_same_optimum_as_sklearn_saga(n_classes):
    X, y = _data(n_classes)
    ours = SagaLogistic(tol=1e-7, max_iter=20000, random_state=1).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # sklearn on dense input (no sparse intercept decay) converges tightly to the optimum
        ref = LogisticRegression(
            C=1.0,
            l1_ratio=0.5,
            solver="saga",
            class_weight="balanced",
            tol=1e-7,
            max_iter=20000,
            random_state=1,
        ).fit(X.toarray(), y)
    assert ours.converged_
    assert list(ours.classes_) == list(ref.classes_)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-4 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(
        ours.intercept_, ref.intercept_, atol=1e-3 * max(1, np.abs(ref.intercept_).max())
    )
    assert _objective(X, y, ours.coef_, ours.intercept_) == pytest.approx(
        _objective(X, y, ref.coef_, ref.intercept_), rel=1e-7
    )
    assert np.all(ours.coef_[:, -1] == 0)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X.toarray()), atol=1e-3)


def test_seeded_runs_are_identical_and_a_warm_start_at_the_optimum_stops_early():
    X, y = _data(2, seed=3)
    a = SagaLogistic(tol=1e-4, random_state=5).fit(X, y)
    b = SagaLogistic(tol=1e-4, random_state=5).fit(X, y)
    assert np.array_equal(a.coef_, b.coef_) and np.array_equal(a.intercept_, b.intercept_)
    cold = SagaLogistic(tol=1e-6, max_iter=5000, random_state=5).fit(X, y)
    warm = SagaLogistic(tol=1e-6, max_iter=5000, random_state=6, warm_start=True)
    warm.coef_, warm.intercept_ = cold.coef_.copy(), cold.intercept_.copy()
    warm.fit(X, y)
    assert warm.n_iter_[0] < cold.n_iter_[0]
    np.testing.assert_allclose(warm.coef_, cold.coef_, atol=1e-3 * np.abs(cold.coef_).max())


def test_single_class_is_a_clear_error():
    with pytest.raises(ValueError, match="two classes"):
        SagaLogistic().fit(sp.csr_matrix(np.eye(3)), np.zeros(3))


def test_non_finite_input_is_a_clear_error():
    X = sp.csr_matrix(np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN or infinity"):
        SagaLogistic().fit(X, np.array([0, 1, 0]))
