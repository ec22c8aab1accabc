"""Elastic-net logistic regression by SAGA with closed-form lazy updates: O(nnz) per epoch.

The objective is sklearn's ``LogisticRegression(solver="saga", C=C, l1_ratio=r,
class_weight="balanced")``:

    (1/n) sum_i sw_i logloss_i + alpha/2 ||W||^2 + beta ||W||_1,
    alpha = (1-r)/(C n),  beta = r/(C n)

(sigmoid for two classes, softmax with one weight row per class otherwise; intercept unpenalised;
``sw`` the balanced class weights), and the stopping rule is sklearn's (an epoch moves the weights
by at most ``tol * max|W|``). The difference is speed on sparse codes: with an L1 term sklearn
replays every skipped step one at a time for each nonzero weight, so a sparse epoch costs
O(rows x features), as much as a dense one. Between two touches of feature j its update is the
fixed recurrence ``w <- soft(a w - d, c)`` (a = 1 - step alpha, d = step mean_grad_j,
c = step beta), which has a closed form in each sign phase, so catching up costs O(1)
(Defazio et al. 2014, "SAGA"; the just-in-time idea of the lightning package). The optimum is
unique (the L2 term makes it strongly convex), so both solvers reach the same model.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import scipy.sparse as sp


@numba.njit(cache=True, error_model="numpy", fastmath=True, inline="always")
def _soft(x: float, c: float) -> float:
    return math.copysign(max(abs(x) - c, 0.0), x)  # branch-free: the sign of x is data-dependent


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _geo(m: int, log_a: float, one_minus_a: float) -> float:
    """sum_{i<m} a^i."""
    if one_minus_a == 0.0:
        return float(m)
    return -math.expm1(m * log_a) / one_minus_a


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _catch_up(
    w: float,
    k: int,
    a: float,
    d: float,
    c: float,
    log_a: float,
    one_minus_a: float,
    a_k: float,
    geo_k: float,
) -> float:
    """k steps of w <- soft(a w - d, c), in closed form per sign phase (at most two phases).

    ``a_k = a^k`` and ``geo_k = sum_{i<k} a^i`` come from the caller's table (scalars only: array
    arguments would cost a reference-count round trip per call).
    """
    while k > 0:
        if w == 0.0:
            if abs(d) <= c:
                return 0.0
            w = _soft(-d, c)
            k -= 1
            a_k = math.exp(k * log_a)
            geo_k = _geo(k, log_a, one_minus_a)
            continue
        s = 1.0 if w > 0 else -1.0
        u = s * w  # > 0; while it stays positive, u <- a u - e
        e = s * d + c
        u_k = a_k * u - e * geo_k
        if u_k > 0.0:  # always so when e <= 0 (the phase moves away from zero)
            return s * u_k
        # u crosses zero within the k steps: m = last step count that keeps it positive
        if one_minus_a == 0.0:
            m = int(math.ceil(u / e)) - 1
        else:
            f = e / one_minus_a
            m = int(math.ceil(math.log(f / (u + f)) / log_a)) - 1
        m = max(0, min(m, k - 1))
        u_m = math.exp(m * log_a) * u - e * _geo(m, log_a, one_minus_a)
        while m > 0 and u_m <= 0.0:
            m -= 1
            u_m = math.exp(m * log_a) * u - e * _geo(m, log_a, one_minus_a)
        w = _soft(a * s * u_m - d, c)
        k -= m + 1
        a_k = math.exp(k * log_a)
        geo_k = _geo(k, log_a, one_minus_a)
    return w


@numba.njit(cache=True, error_model="numpy", fastmath=True, inline="always")
def _lagged(w, k, a, d, c, log_a, one_minus_a, pow_a, geo_a):
    if (
        w == 0.0 and abs(d) <= c
    ):  # a zero weight whose mean gradient is inside the L1 band stays zero
        return 0.0
    if k < pow_a.shape[0]:
        return _catch_up(w, k, a, d, c, log_a, one_minus_a, pow_a[k], geo_a[k])
    return _catch_up(
        w, k, a, d, c, log_a, one_minus_a, math.exp(k * log_a), _geo(k, log_a, one_minus_a)
    )


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _decay_tables(a, m_max):
    """a^m and the geometric sums 1 + a + ... + a^(m-1) for m <= m_max: the catch-up lookups."""
    pow_a = np.empty(m_max + 1)
    geo_a = np.empty(m_max + 1)
    pow_a[0], geo_a[0] = 1.0, 0.0
    for m in range(1, m_max + 1):
        pow_a[m] = pow_a[m - 1] * a
        geo_a[m] = geo_a[m - 1] + pow_a[m - 1]
    return pow_a, geo_a


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _binary_sample(
    i,
    lo,
    hi,
    t,
    indices,
    data,
    y,
    sw,
    W,
    b,
    g,
    mem,
    gbar,
    last,
    step,
    a,
    c,
    log_a,
    one_minus_a,
    pow_a,
    geo_a,
    inv_n,
):
    """One binary SAGA step on row i: scalar accumulation, catch-up fused with the dot product;
    leaves the row's new gradient in g[0]."""
    z0 = b[0]
    for p in range(lo, hi):
        j = indices[p]
        lag = t - last[j]
        if lag > 0:
            W[j, 0] = _lagged(
                W[j, 0], lag, a, step * gbar[j, 0], c, log_a, one_minus_a, pow_a, geo_a
            )
        z0 += W[j, 0] * data[p]
    pr = 1.0 / (1.0 + math.exp(-z0)) if z0 >= 0 else math.exp(z0) / (1.0 + math.exp(z0))
    g[0] = sw[i] * (pr - y[i])
    delta = g[0] - mem[i, 0]
    for p in range(lo, hi):
        j = indices[p]
        v = data[p]
        W[j, 0] = _soft(a * W[j, 0] - step * (delta * v + gbar[j, 0]), c)
        gbar[j, 0] += delta * v * inv_n
        last[j] = t + 1


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _multiclass_logits(
    lo, hi, t, indices, data, W, b, z, gbar, last, step, a, c, log_a, one_minus_a, pow_a, geo_a
):
    """Logits z of one row after bringing its features' lagged weights up to step t."""
    K = W.shape[1]
    for k in range(K):
        z[k] = b[k]
    for p in range(lo, hi):
        j = indices[p]
        v = data[p]
        lag = t - last[j]
        for k in range(K):
            if lag > 0:
                W[j, k] = _lagged(
                    W[j, k], lag, a, step * gbar[j, k], c, log_a, one_minus_a, pow_a, geo_a
                )
            z[k] += W[j, k] * v
        last[j] = t


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _softmax_gradient(z, g, sw_i, y_i):
    """Weighted softmax cross-entropy gradient w.r.t. the logits into g (z is overwritten)."""
    K = z.shape[0]
    zmax = z[0]
    for k in range(1, K):
        zmax = max(zmax, z[k])
    total = 0.0
    for k in range(K):
        z[k] = math.exp(z[k] - zmax)
        total += z[k]
    for k in range(K):
        g[k] = sw_i * (z[k] / total - (1.0 if y_i == k else 0.0))


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _multiclass_update(i, lo, hi, t, indices, data, W, g, mem, gbar, last, step, a, c, inv_n):
    """The SAGA weight update of one row's features from its new gradient g."""
    K = W.shape[1]
    for p in range(lo, hi):
        j = indices[p]
        v = data[p]
        for k in range(K):
            delta = g[k] - mem[i, k]
            W[j, k] = _soft(a * W[j, k] - step * (delta * v + gbar[j, k]), c)
            gbar[j, k] += delta * v * inv_n
        last[j] = t + 1


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _intercept_and_memory(i, g, mem, b, gbar_b, step, inv_n, fit_intercept):
    """Unpenalised intercept step, then remember row i's gradient for the SAGA average."""
    for k in range(g.shape[0]):
        delta = g[k] - mem[i, k]
        if fit_intercept:
            b[k] -= step * (delta + gbar_b[k])
        gbar_b[k] += delta * inv_n
        mem[i, k] = g[k]


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _catch_up_all(W, last, t, gbar, step, a, c, log_a, one_minus_a, pow_a, geo_a):
    """Bring every lagging weight up to step t (end of an epoch)."""
    F, K = W.shape
    for j in range(F):
        lag = t - last[j]
        if lag > 0:
            for k in range(K):
                W[j, k] = _lagged(
                    W[j, k], lag, a, step * gbar[j, k], c, log_a, one_minus_a, pow_a, geo_a
                )
            last[j] = t


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _settled(W, W_prev, tol):
    """sklearn's stopping rule: max |change| <= tol * max |W| (or nothing moved from zero);
    W_prev becomes W."""
    F, K = W.shape
    max_change = 0.0
    max_w = 0.0
    for j in range(F):
        for k in range(K):
            max_change = max(max_change, abs(W[j, k] - W_prev[j, k]))
            max_w = max(max_w, abs(W[j, k]))
            W_prev[j, k] = W[j, k]
    return (max_w > 0.0 and max_change <= tol * max_w) or (max_w == 0.0 and max_change == 0.0)


@numba.njit(cache=True, error_model="numpy", fastmath=True)
def _saga(
    indptr,
    indices,
    data,
    y,
    sw,
    W,
    b,
    n_classes_fit,
    step,
    alpha,
    beta,
    tol,
    max_epochs,
    fit_intercept,
    seed,
):
    """Run SAGA epochs in place on W (F, K) and b (K,); returns (epochs, converged)."""
    n = indptr.shape[0] - 1
    F, K = W.shape
    one_minus_a = step * alpha
    a = 1.0 - one_minus_a
    log_a = math.log1p(-one_minus_a)
    c = step * beta
    inv_n = 1.0 / n
    mem = np.zeros((n, K))
    gbar = np.zeros((F, K))
    gbar_b = np.zeros(K)
    last = np.zeros(F, dtype=np.int64)
    pow_a, geo_a = _decay_tables(a, 2 * n)
    W_prev = W.copy()
    z = np.zeros(K)
    g = np.zeros(K)
    np.random.seed(seed)
    t = 0
    for epoch in range(max_epochs):
        for _ in range(n):
            i = np.random.randint(0, n)
            lo, hi = indptr[i], indptr[i + 1]
            if K == 1:
                _binary_sample(
                    i,
                    lo,
                    hi,
                    t,
                    indices,
                    data,
                    y,
                    sw,
                    W,
                    b,
                    g,
                    mem,
                    gbar,
                    last,
                    step,
                    a,
                    c,
                    log_a,
                    one_minus_a,
                    pow_a,
                    geo_a,
                    inv_n,
                )
            else:
                _multiclass_logits(
                    lo,
                    hi,
                    t,
                    indices,
                    data,
                    W,
                    b,
                    z,
                    gbar,
                    last,
                    step,
                    a,
                    c,
                    log_a,
                    one_minus_a,
                    pow_a,
                    geo_a,
                )
                _softmax_gradient(z, g, sw[i], y[i])
                _multiclass_update(
                    i, lo, hi, t, indices, data, W, g, mem, gbar, last, step, a, c, inv_n
                )
            _intercept_and_memory(i, g, mem, b, gbar_b, step, inv_n, fit_intercept)
            t += 1
        _catch_up_all(W, last, t, gbar, step, a, c, log_a, one_minus_a, pow_a, geo_a)
        if _settled(W, W_prev, tol):
            return epoch + 1, True
    return max_epochs, False


class SagaLogistic:
    """The subset of sklearn's LogisticRegression API the probes use, fitted by ``_saga``."""

    def __init__(
        self,
        C: float = 1.0,
        l1_ratio: float = 0.5,
        tol: float = 1e-4,
        max_iter: int = 1000,
        random_state: int = 0,
        warm_start: bool = False,
        fit_intercept: bool = True,
    ):
        self.C, self.l1_ratio, self.tol, self.max_iter = C, l1_ratio, tol, max_iter
        self.random_state, self.warm_start, self.fit_intercept = (
            random_state,
            warm_start,
            fit_intercept,
        )

    def fit(self, X, y) -> SagaLogistic:
        X = sp.csr_matrix(X, dtype=np.float64)
        X.sort_indices()
        if not np.isfinite(
            X.data
        ).all():  # sklearn refuses these too; SAGA would spread NaN silently
            raise ValueError(
                f"input contains NaN or infinity ({int((~np.isfinite(X.data)).sum())} entries)"
            )
        y = np.asarray(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(f"need at least two classes to fit, got {list(self.classes_)}")
        n, F = X.shape
        counts = np.bincount(y_idx, minlength=n_classes)
        sw = (n / (n_classes * counts))[y_idx].astype(np.float64)  # class_weight="balanced"
        K = 1 if n_classes == 2 else n_classes
        W = np.zeros((F, K))
        b = np.zeros(K)
        if (
            self.warm_start
            and getattr(self, "coef_", None) is not None
            and self.coef_.shape == (K, F)
        ):
            W[:] = self.coef_.T
            b[:] = self.intercept_
        alpha = (1.0 - self.l1_ratio) / (self.C * n)
        beta = self.l1_ratio / (self.C * n)
        max_sq = float(X.multiply(X).sum(axis=1).max()) if X.nnz else 0.0
        lipschitz = (
            0.25 * (max_sq + int(self.fit_intercept)) + alpha
        )  # sklearn's (per-sample weights not included)
        step = 1.0 / (
            2 * lipschitz + min(2 * n * alpha, lipschitz)
        )  # SAGA's 1/(2(L + mu n)), as sklearn
        epochs, converged = _saga(
            X.indptr.astype(np.int64),
            X.indices.astype(np.int64),
            X.data,
            y_idx.astype(np.int64),
            sw,
            W,
            b,
            n_classes,
            step,
            alpha,
            beta,
            float(self.tol),
            int(self.max_iter),
            bool(self.fit_intercept),
            int(self.random_state) % (2**32),
        )
        self.coef_ = np.ascontiguousarray(W.T)
        self.intercept_ = b
        self.n_iter_ = np.array([epochs])
        self.converged_ = bool(converged)
        return self

    def decision_function(self, X) -> np.ndarray:
        s = np.asarray(X @ self.coef_.T) + self.intercept_
        return s[:, 0] if s.shape[1] == 1 else s

    def predict_proba(self, X) -> np.ndarray:
        s = self.decision_function(X)
        if s.ndim == 1:
            p = 1.0 / (1.0 + np.exp(-s))
            return np.column_stack([1 - p, p])
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
