"""Ground-truth benchmark: the generator's structure, the metrics on known answers, and a small
seeded run where matryoshka must recover the planted dictionary (benchmarks/ground_truth.py is the
full-size version)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sail.evaluate.ground_truth import (
    GroundTruthSettings,
    absorption,
    family_centroids,
    generate,
    match_features,
    parents_as_centroid,
    score_sae,
    train_models,
)
from sail.sae.model import SAESpec

SMALL = GroundTruthSettings(
    d=64,
    n_features=32,
    n_parents=4,
    children=(2, 3),
    mean_active=3,
    n_rows=6000,
    max_prob=0.4,
    seed=1,
)


def test_default_setting_is_the_pinned_one():
    s = GroundTruthSettings()
    assert (s.d, s.n_features, s.zipf_exponent, s.n_parents, s.children) == (
        256,
        512,
        1.0,
        64,
        (2, 4),
    )
    assert (s.mean_active, s.noise_std, s.offset_norm, s.n_rows) == (8.0, 0.05, 1.0, 100_000)


def test_generator_plants_hierarchy_frequencies_and_offset():
    g = generate(GroundTruthSettings(n_rows=12_000, seed=3))
    on = (g.codes_NF > 0).toarray()
    child = np.flatnonzero(g.parent_F >= 0)
    assert 64 * 2 <= child.size <= 64 * 4
    assert not (on[:, child] & ~on[:, g.parent_F[child]]).any()  # children only with their parent
    assert (
        g.prob_F[child] / g.prob_F[g.parent_F[child]]
    ).max() <= 0.5 + 1e-9  # identifiable children
    n_parent = on[:, g.parent_F[child]].sum(0)
    frequent = n_parent >= 500
    assert (on[:, child].sum(0)[frequent] / n_parent[frequent]).max() < 0.56
    assert on.sum(1).mean() == pytest.approx(8.0, rel=0.05)
    freq = np.sort(on.mean(0))[::-1]
    assert freq[:10].mean() > 20 * freq[-100:].mean()  # Zipf-like: a long tail of rare features
    assert np.allclose(np.linalg.norm(g.dictionary_FD, axis=1), 1, atol=1e-5)
    resid = g.x_ND - g.codes_NF @ g.dictionary_FD - g.offset_D
    assert resid.std() == pytest.approx(0.05, rel=0.05) and np.linalg.norm(
        g.offset_D
    ) == pytest.approx(1.0)
    block = np.flatnonzero(g.parent_F < 0)[:2]  # first two top-level features share a copula block
    r = np.corrcoef(on[:, block[0]], on[:, block[1]])[0, 1]
    assert r > 0.03
    assert (
        generate(GroundTruthSettings(n_rows=500, seed=3)).x_ND
        == generate(GroundTruthSettings(n_rows=500, seed=3)).x_ND
    ).all()


def test_match_features_is_one_to_one_and_sign_free():
    rng = np.random.default_rng(0)
    true = np.linalg.qr(rng.standard_normal((8, 8)))[0][:4]
    dec = np.concatenate([-true[[2, 0]], true[[1, 1, 3]] + 0.01])  # feature 1 twice: only one match
    latent, cos = match_features(dec, true)
    assert latent.tolist()[0] == 1 and latent[2] == 0 and cos[[0, 2, 3]].min() > 0.99
    assert latent[1] in (2, 3) and cos[1] > 0.99
    latent, cos = match_features(dec[:2], true)  # fewer latents than features: the rest score 0
    assert (latent >= 0).sum() == 2 and (cos == 0).sum() == 2


def test_absorption_counts_only_child_latents_that_take_the_parent():
    parent_F = np.array([-1, 0, 0, -1])
    latent_F = np.array([0, 1, 2, 3])
    true = sp.csr_matrix(
        np.array(
            [
                [1, 1, 0, 0],  # parent + child 1: parent latent silent, child fires -> absorbed
                [1, 0, 1, 0],  # parent + child 2: parent latent fires -> fine
                [1, 1, 0, 0],  # parent + child 1: neither fires -> a miss, not absorption
                [1, 0, 0, 1],
            ],
            np.float32,
        )
    )  # no child active: not counted
    codes = sp.csr_matrix(
        np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]], np.float32)
    )
    out = absorption(true, codes, parent_F, latent_F)
    assert out == {
        "absorption": pytest.approx(1 / 3),
        "parent_miss": pytest.approx(1 / 3),
        "absorption_pairs": 3,
    }


def test_family_centroid_is_the_conditional_mean_direction():
    g = generate(GroundTruthSettings(n_rows=200, seed=3))
    cent = family_centroids(g)
    p = int(g.parents[0])
    kids = np.flatnonzero(g.parent_F == p)
    cond = g.prob_F[kids, None] / g.prob_F[p]
    want = g.dictionary_FD[p] + (cond * g.dictionary_FD[kids]).sum(0)
    assert np.allclose(cent[0], want / np.linalg.norm(want), atol=1e-6)
    # a decoder holding the true dictionary recovers every parent: nothing to explain
    _, cos = match_features(g.dictionary_FD, g.dictionary_FD)
    assert np.isnan(parents_as_centroid(g.dictionary_FD, cos, g))
    # a decoder that holds the centroids instead of the parents: every missed parent is explained
    dec = g.dictionary_FD.astype(np.float64).copy()
    dec[g.parents] = cent
    _, cos = match_features(dec, g.dictionary_FD)
    assert (cos[g.parents] < 0.9).mean() > 0.5 and parents_as_centroid(dec, cos, g) == 1.0


def test_small_ground_truth_matryoshka_against_batchtopk(tmp_path, caplog):
    """The acceptance properties at a small size (full size: benchmarks/ground_truth.py).

    Matryoshka (global top-k) and a plain BatchTopK of the same size and L0, default recipe:
    matryoshka finds every free feature and absorbs parents far less than BatchTopK; the parents it
    misses are the family centroids its nested losses ask for (docs/ground_truth.md).
    """
    torch.manual_seed(0)
    g = generate(SMALL)
    x = torch.nn.functional.normalize(torch.from_numpy(g.x_ND), dim=1)
    tr, va, te = slice(0, 4800), slice(4800, 5400), slice(5400, 6000)
    specs = {
        "matryoshka": SAESpec("matryoshka", (8, 64), (3,), "global"),
        "batchtopk": SAESpec("matryoshka", (64,), (3,)),
    }
    m = {}
    for name, spec in specs.items():
        training = {"batch_size": 256, "epochs": 30, "seed": 0}
        r = train_models([spec], x[tr], x[va], training, tmp_path / name)
        m[name] = score_sae(r.model, x[te], g, np.arange(6000)[te])[0]
    assert "no held-out calibration rows" not in caplog.text  # valid rows calibrate
    mat, btk = m["matryoshka"], m["batchtopk"]
    # measured (seed 0): matryoshka recovered 0.75, mcc 0.905, absorption 0.003, free 1.0,
    # parents 0.0 (all as centroids); batchtopk recovered 0.75, absorption 0.276, parents 0.75
    assert mat["recovered"] >= 0.6 and mat["mcc"] >= 0.85 and mat["recovered_free"] >= 0.9, m
    assert mat["absorption"] <= 0.1 and btk["absorption"] - mat["absorption"] >= 0.1, m
    assert mat["parents_as_centroid"] >= 0.75, m
    assert mat["fvu"] < 0.2 and 2.5 <= mat["l0"] <= 3.5 and mat["dead"] < 0.6, m
