"""Ground-truth benchmark: embeddings generated from a known sparse dictionary, and how well an
SAE recovers that dictionary.

Real concepts are not independent, equally frequent directions, so the generator plants the
structure that makes dictionary learning hard on real foundation-model embeddings:

- **Zipf-like frequencies**: feature i's firing probability is proportional to 1 / rank^s
  (capped at ``max_prob``), scaled so a row holds ``mean_active`` features on average.
- **A hierarchy**: ``n_parents`` parent features with 2-4 children each; a child fires only in rows
  where its parent fires (e.g. "liver lesion" only with "liver"). A parent is always at least as
  frequent as its children, and fires with a given child at most half the time
  (``max_conditional``): a child that always came with its parent would be indistinguishable from
  it, and no method could be asked to separate them.
- **Correlated features**: the firing decisions of the top-level features (parents and free
  features) come from a Gaussian copula with block correlation ``correlation`` in blocks of
  ``block_size``, so features co-occur beyond chance.
- **Noise and a shared offset**: i.i.d. Gaussian noise of std ``noise_std`` per dimension and one
  offset vector of norm ``offset_norm`` added to every row, like the mean direction every real
  embedding shares.

Dictionary directions are random unit vectors; magnitudes of active features are uniform in
[0.5, 1.5]. Everything is drawn from one seed.

Metrics (``score_sae``) compare an SAE's decoder rows with the true directions and its stored codes
with the true codes, on held-out rows:

- ``mcc``: the mean |cos| between each true feature and the decoder row the Hungarian assignment
  (scipy ``linear_sum_assignment`` on |cos|, one latent per feature) gives it; a feature left
  without a latent (dictionary smaller than the truth) counts as 0.
- ``recovered``: the share of true features whose Hungarian-matched decoder row has |cos| >= 0.9.
- ``fvu`` and ``l0``: fraction of variance unexplained (per-dimension variance) of the inference
  code's reconstruction of the L2-normalised rows, and the mean number of active latents per row.
- ``dead``: the share of latents that never fire on the held-out rows.
- ``recovered_parents`` / ``_children`` / ``_free`` / ``_rare_half``: the recovered share within
  each group (the rarer half: marginal probability below the median).
- ``absorption``: over all (row, parent) pairs where the parent and at least one of its children
  are active in the row (the only pairs where absorption can happen), the share where the parent's
  matched latent is silent while the matched latent of one of the active children fires: the child
  latent has absorbed the parent. Plain misses (the parent latent silent and no child latent firing)
  are not absorption and are reported separately as ``parent_miss``.
- ``parents_as_centroid``: among the parents not recovered, the share for which some decoder row
  has |cos| >= 0.9 with the family's conditional-mean direction P + sum_c P(c | P) c (what a
  latent that fires on every row of the family and reconstructs it alone converges to). Matryoshka's
  nested losses ask an early-level latent for exactly that direction when its children live in a
  later level (docs/ground_truth.md); a diagnostic, not a recovery credit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import ndtri

from sail.errors import SailError

RECOVERED_COS = 0.9


@dataclass(frozen=True)
class GroundTruthSettings:
    """The generator's knobs; the defaults are the pinned benchmark setting (docs/benchmarks.md)."""

    d: int = 256
    n_features: int = 512
    zipf_exponent: float = 1.0
    n_parents: int = 64
    children: tuple[int, int] = (2, 4)
    mean_active: float = 8.0
    noise_std: float = 0.05
    offset_norm: float = 1.0
    n_rows: int = 100_000
    max_prob: float = 0.5
    max_conditional: float = (
        0.5  # P(child | parent) cap: a child always seen with its parent is not identifiable
    )
    correlation: float = 0.3
    block_size: int = 4
    seed: int = 0


@dataclass
class GroundTruth:
    """Generated rows with the dictionary and codes that produced them."""

    settings: GroundTruthSettings
    x_ND: np.ndarray  # float32 (N, d) raw rows (offset + codes @ dictionary + noise)
    codes_NF: sp.csr_matrix  # float32 (N, F) true codes
    dictionary_FD: np.ndarray  # float32 (F, d) unit-norm true directions
    parent_F: np.ndarray  # int64 (F,): parent feature id, -1 for a top-level feature
    prob_F: np.ndarray  # float64 (F,): marginal firing probability
    offset_D: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))

    @property
    def parents(self) -> np.ndarray:
        return np.unique(self.parent_F[self.parent_F >= 0])


def _hierarchy(s: GroundTruthSettings, rng: np.random.Generator) -> np.ndarray:
    """parent_F: features [0, n_parents) are parents, their children follow, the rest are free."""
    lo, hi = s.children
    n_children = rng.integers(lo, hi + 1, size=s.n_parents)
    if s.n_parents + n_children.sum() > s.n_features:
        raise SailError(
            f"ground truth: {s.n_parents} parents with {lo}-{hi} children exceed "
            f"{s.n_features} features"
        )
    parent_F = np.full(s.n_features, -1, dtype=np.int64)
    parent_F[s.n_parents : s.n_parents + n_children.sum()] = np.repeat(
        np.arange(s.n_parents), n_children
    )
    return parent_F


def _marginals(
    s: GroundTruthSettings, parent_F: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Zipf weights on a random rank order, each parent given the largest weight of its group,
    scaled (by bisection) so the capped probabilities sum to ``mean_active``."""
    w = 1.0 / np.arange(1, s.n_features + 1) ** s.zipf_exponent
    w = w[rng.permutation(s.n_features)]
    for p in range(s.n_parents):
        group = np.concatenate([[p], np.flatnonzero(parent_F == p)])
        top = group[np.argmax(w[group])]
        w[[p, top]] = w[[top, p]]
    if s.mean_active >= s.max_prob * s.n_features:
        raise SailError(
            f"ground truth: mean_active {s.mean_active} is unreachable with max_prob {s.max_prob}"
        )
    child = np.flatnonzero(parent_F >= 0)

    def probs(scale: float) -> np.ndarray:
        p = np.minimum(scale * w, s.max_prob)
        p[child] = np.minimum(p[child], s.max_conditional * p[parent_F[child]])
        return p

    lo, hi = 0.0, s.mean_active / w.min()
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if probs(mid).sum() < s.mean_active else (lo, mid)
    return probs(hi)


def _fires(
    s: GroundTruthSettings,
    prob_F: np.ndarray,
    parent_F: np.ndarray,
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean (n, F) firing: a copula for top-level features, conditional draws for children."""
    top = np.flatnonzero(parent_F < 0)
    n_blocks = -(-top.size // s.block_size)
    shared = rng.standard_normal((n, n_blocks), dtype=np.float32)
    own = rng.standard_normal((n, top.size), dtype=np.float32)
    block = np.arange(top.size) // s.block_size
    z = np.sqrt(s.correlation) * shared[:, block] + np.sqrt(1 - s.correlation) * own
    fires = np.zeros((n, s.n_features), dtype=bool)
    fires[:, top] = z < ndtri(prob_F[top]).astype(np.float32)
    child = np.flatnonzero(parent_F >= 0)
    cond = prob_F[child] / prob_F[parent_F[child]]
    fires[:, child] = fires[:, parent_F[child]] & (
        rng.random((n, child.size), dtype=np.float32) < cond
    )
    return fires


def generate(settings: GroundTruthSettings | None = None) -> GroundTruth:
    """Draw the dictionary, the hierarchy, the codes and the rows (all from ``settings.seed``)."""
    s = settings or GroundTruthSettings()
    rng = np.random.default_rng(s.seed)
    dictionary = rng.standard_normal((s.n_features, s.d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    offset = rng.standard_normal(s.d)
    offset *= s.offset_norm / np.linalg.norm(offset)
    parent_F = _hierarchy(s, rng)
    prob_F = _marginals(s, parent_F, rng)
    x = np.empty((s.n_rows, s.d), dtype=np.float32)
    parts = []
    chunk = 20_000  # bounds the dense (chunk, F) firing matrix
    for start in range(0, s.n_rows, chunk):
        n = min(chunk, s.n_rows - start)
        fires = _fires(s, prob_F, parent_F, n, rng)
        mags = rng.uniform(0.5, 1.5, size=fires.shape).astype(np.float32) * fires
        x[start : start + n] = mags @ dictionary.astype(np.float32) + offset.astype(np.float32)
        x[start : start + n] += rng.normal(0.0, s.noise_std, size=(n, s.d)).astype(np.float32)
        parts.append(sp.csr_matrix(mags))
    return GroundTruth(
        s,
        x,
        sp.vstack(parts, format="csr"),
        dictionary.astype(np.float32),
        parent_F,
        prob_F,
        offset.astype(np.float32),
    )


# ----- scoring ---------------------------------------------------------------------------------
def match_features(
    decoder_LD: np.ndarray, dictionary_FD: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian match of true features to decoder rows on |cos|: (latent per feature or -1,
    its |cos|)."""
    dec = decoder_LD / np.maximum(np.linalg.norm(decoder_LD, axis=1, keepdims=True), 1e-12)
    cos_FL = np.abs(dictionary_FD.astype(np.float64) @ dec.T.astype(np.float64))
    feats, lats = linear_sum_assignment(cos_FL, maximize=True)
    latent_F = np.full(dictionary_FD.shape[0], -1, dtype=np.int64)
    cos_F = np.zeros(dictionary_FD.shape[0])
    latent_F[feats] = lats
    cos_F[feats] = cos_FL[feats, lats]
    return latent_F, cos_F


def absorption(
    true_NF: sp.csr_matrix, codes_NL: sp.csr_matrix, parent_F: np.ndarray, latent_F: np.ndarray
) -> dict[str, float]:
    """Absorption and plain-miss rates over (row, parent) pairs with the parent and a child on."""
    true_on = (true_NF > 0).astype(np.float32).tocsc()
    fired = (codes_NL > 0).astype(np.float32).tocsc()
    children = np.flatnonzero(
        (parent_F >= 0) & (latent_F[np.maximum(parent_F, 0)] >= 0) & (latent_F >= 0)
    )
    # (N, P) counts of active children per parent, and of active children whose latent fires
    parents = np.unique(parent_F[children])
    col = np.searchsorted(parents, parent_F[children])
    to_parent = sp.csr_matrix(
        (np.ones(children.size, np.float32), (np.arange(children.size), col)),
        shape=(children.size, parents.size),
    )
    child_on = true_on[:, children]
    active_children = (child_on @ to_parent).toarray() > 0
    absorbing = (child_on.multiply(fired[:, latent_F[children]]) @ to_parent).toarray() > 0
    parent_on = true_on[:, parents].toarray() > 0
    parent_silent = fired[:, latent_F[parents]].toarray() == 0
    pairs = parent_on & active_children
    n = int(pairs.sum())
    if n == 0:
        return {"absorption": float("nan"), "parent_miss": float("nan"), "absorption_pairs": 0}
    return {
        "absorption": float((pairs & parent_silent & absorbing).sum() / n),
        "parent_miss": float((pairs & parent_silent & ~absorbing).sum() / n),
        "absorption_pairs": n,
    }


def family_centroids(truth: GroundTruth) -> np.ndarray:
    """(P, d) unit conditional-mean direction of each parent's family, E[x | parent active] minus
    the offset: P + sum_c P(c | P) c (magnitudes share one distribution, so their mean cancels)."""
    parents = truth.parents
    cond = np.zeros_like(truth.prob_F)
    child = truth.parent_F >= 0
    cond[child] = truth.prob_F[child] / truth.prob_F[truth.parent_F[child]]
    to_parent = (truth.parent_F[None, :] == parents[:, None]) * cond[None, :]
    cent = truth.dictionary_FD[parents].astype(np.float64) + to_parent @ truth.dictionary_FD
    return cent / np.linalg.norm(cent, axis=1, keepdims=True)


def parents_as_centroid(decoder_LD: np.ndarray, cos_F: np.ndarray, truth: GroundTruth) -> float:
    """Among parents not recovered, the share whose family centroid some decoder row matches."""
    parents = truth.parents
    missed = cos_F[parents] < RECOVERED_COS
    if parents.size == 0 or not missed.any():
        return float("nan")
    dec = decoder_LD / np.maximum(np.linalg.norm(decoder_LD, axis=1, keepdims=True), 1e-12)
    best = np.abs(family_centroids(truth) @ dec.T.astype(np.float64)).max(1)
    return float((best[missed] >= RECOVERED_COS).mean())


def recovered_by_role(cos_F: np.ndarray, truth: GroundTruth) -> dict[str, float]:
    """Recovered share among parents, children and free features, and among the rarer half."""
    is_parent = np.isin(np.arange(cos_F.size), truth.parents)
    groups = {
        "parents": is_parent,
        "children": truth.parent_F >= 0,
        "free": (truth.parent_F < 0) & ~is_parent,
        "rare_half": truth.prob_F < np.median(truth.prob_F),
    }
    return {
        f"recovered_{name}": float((cos_F[mask] >= RECOVERED_COS).mean())
        if mask.any()
        else float("nan")
        for name, mask in groups.items()
    }


@torch.no_grad()
def inference_codes(model: Any, x_ND: torch.Tensor, batch_size: int = 8192) -> list[sp.csr_matrix]:
    """Stored (inference) codes of every stacked model as CSR, from L2-normalised rows."""
    out: list[list[sp.csr_matrix]] = [[] for _ in range(model.n_models)]
    for start in range(0, x_ND.shape[0], batch_size):
        codes = model.inference_codes(x_ND[start : start + batch_size]).float().cpu().numpy()
        for m in range(model.n_models):
            out[m].append(sp.csr_matrix(codes[m]))
    return [sp.vstack(parts, format="csr") for parts in out]


def decoder_rows(model: Any) -> torch.Tensor:
    """(M, F, D) decoder rows (the variant's own: the tied W for ``sail``, W_dec for
    ``matryoshka``)."""
    return model.W_decoder.detach()


def score_sae(
    model: Any, x_ND: torch.Tensor, truth: GroundTruth, rows: np.ndarray
) -> list[dict[str, float]]:
    """Metrics of every stacked model on L2-normalised held-out rows ``x_ND`` (truth ``rows``)."""
    codes = inference_codes(model, x_ND)
    W = decoder_rows(model).float().cpu()
    b_dec = model.b_dec.detach().float().cpu()
    x = x_ND.detach().float().cpu().double()
    var = (x - x.mean(0)).pow(2).sum().item()
    true_codes = truth.codes_NF[rows]
    out = []
    for m, c in enumerate(codes):
        recon = torch.from_numpy((c @ W[m].numpy()).astype(np.float32)).double() + b_dec[m].double()
        latent_F, cos_F = match_features(W[m].numpy(), truth.dictionary_FD)
        fired_L = np.asarray((c > 0).sum(0)).ravel() > 0
        out.append(
            {
                "mcc": float(cos_F.mean()),
                "recovered": float((cos_F >= RECOVERED_COS).mean()),
                "fvu": float((x - recon).pow(2).sum().item() / max(var, 1e-30)),
                "l0": float(c.nnz / max(c.shape[0], 1)),
                "dead": float(1 - fired_L.mean()),
                **recovered_by_role(cos_F, truth),
                "parents_as_centroid": parents_as_centroid(W[m].numpy(), cos_F, truth),
                **absorption(true_codes, c, truth.parent_F, latent_F),
            }
        )
    return out


# ----- training --------------------------------------------------------------------------------
def train_models(
    specs: list[Any],
    x_train: torch.Tensor,
    x_valid: torch.Tensor,
    training: dict[str, Any],
    workdir: Any,
) -> Any:
    """Train one family of SAEs with the real trainer (``train_family``); returns the trained stack.

    The single call site into the trainer, so the benchmark and its test follow trainer changes.
    ``training`` holds explicit training settings (keys of ``TrainingSettings``); the rest comes
    from the recipe. ``x_valid`` is held out from training and calibrates the thresholds.
    """
    from pathlib import Path

    from sail.config import TrainingSettings
    from sail.sae.grid import GridEntry
    from sail.sae.train import Runtime, train_family

    settings = TrainingSettings.model_validate(training)
    entries = [GridEntry(spec, settings) for spec in specs]
    dirs = [Path(workdir) / f"{e.spec.variant}-{e.name}" for e in entries]
    rt = Runtime(
        device=x_train.device,
        checkpoint_every=10**9,
        show_progress=False,
    )
    # The valid rows, held out from training as in `sail train`, calibrate the inference
    # thresholds; every metric is read on the test rows.
    return train_family(entries, x_train, x_valid, dirs, rt, x_calib=x_valid)
