"""Spatial grounding on planted arrays: the structure is chosen on train, scored on valid, against
a null from label maps of other slices of the same modality x plane."""

from __future__ import annotations

import numpy as np

from sail.maps import grounding as gr

H = W = 32


def label_maps(n: int, rng: np.random.Generator) -> np.ndarray:
    """Structure 1 a square that wanders a little, structure 2 a band elsewhere; 0 background."""
    out = np.zeros((n, H, W), np.uint16)
    for i in range(n):
        y, x = rng.integers(4, 8, size=2)
        out[i, y : y + 10, x : x + 10] = 1
        out[i, 23:31, :] = 2
    return out


def peaked_maps(labels_NHW: np.ndarray, structure: int, grid: int = 4) -> np.ndarray:
    """Grid maps whose largest cell is the one holding most of ``structure``, small noise else."""
    N = len(labels_NHW)
    cells = (labels_NHW == structure).reshape(N, grid, H // grid, grid, W // grid).mean((2, 4))
    noise = np.random.default_rng(1).normal(0, 0.01, cells.shape)
    return (cells + noise).astype(np.float32)


def test_a_map_peaked_inside_a_structure_hits_it_and_the_null_is_lower():
    rng = np.random.default_rng(0)
    train, valid = label_maps(12, rng), label_maps(12, rng)
    up_train = gr.upsample(peaked_maps(train, 1), (H, W))
    structure, share = gr.choose_structure(gr.positive_mass(up_train, train, 3))
    assert structure == 1 and 0 < share <= 1
    maps = peaked_maps(valid, 1)
    peaks = gr.peak_pixels(maps, (H, W))
    peak_labels = gr.labels_at(valid, np.arange(12), peaks)
    # null: the same peaks read in label maps drawn from a pool of one group that puts the
    # structure somewhere else (the layout of the anatomy, not the map, decides the null)
    pool = np.zeros((20, H, W), np.uint16)
    pool[:, 20:30, 20:30] = 1
    draws = gr.draw_null(np.zeros(12, int), -np.ones(12, int), np.zeros(20, int), 10, rng)
    null = gr.labels_at(pool, draws, peaks[:, None])
    hit, null_rate = gr.pointing(peak_labels, null, structure)
    assert hit == 1.0 and null_rate == 0.0


def test_the_null_from_the_same_layout_is_close_to_the_hit_rate():
    """Maps that point where a structure always is are not evidence of grounding: a shuffled
    pool with the same layout scores them as high."""
    rng = np.random.default_rng(0)
    valid = label_maps(12, rng)
    peaks = gr.peak_pixels(peaked_maps(valid, 2), (H, W))  # the band never moves
    draws = gr.draw_null(np.zeros(12, int), np.arange(12), np.zeros(12, int), 5, rng)
    hit, null = gr.pointing(
        gr.labels_at(valid, np.arange(12), peaks), gr.labels_at(valid, draws, peaks[:, None]), 2
    )
    assert hit == 1.0 and null == 1.0


def test_the_structure_is_chosen_on_train_not_on_valid():
    """Train maps point at structure 2, valid maps at 1: the reported structure is 2 and its
    valid hit rate is what it is (0), not a second pick of the better one."""
    rng = np.random.default_rng(0)
    train, valid = label_maps(8, rng), label_maps(8, rng)
    mass = gr.positive_mass(gr.upsample(peaked_maps(train, 2), (H, W)), train, 3)
    structure, _ = gr.choose_structure(mass)
    assert structure == 2
    peaks = gr.peak_pixels(peaked_maps(valid, 1), (H, W))
    hit, _ = gr.pointing(gr.labels_at(valid, np.arange(8), peaks), -np.ones((8, 2), int), structure)
    assert hit == 0.0


def test_mass_counts_positive_values_per_label_and_background_never_wins():
    labels = np.array([[[0, 1], [2, 2]]], np.uint16)
    up = np.array([[[5.0, 1.0], [-3.0, 2.0]]], np.float32)
    np.testing.assert_allclose(gr.positive_mass(up, labels, 3), [[5.0, 1.0, 2.0]])
    assert gr.choose_structure(np.array([[5.0, 1.0, 2.0]])) == (2, 0.25)
    assert gr.choose_structure(np.array([[5.0, 0.0, 0.0]]))[0] == 0


def test_peak_is_the_centre_of_the_largest_cell_not_a_border_plateau():
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 3] = 1.0  # top-right cell: its upsampled plateau reaches the image border
    (peak,) = gr.peak_pixels(maps, (32, 32))
    assert divmod(int(peak), 32) == (4, 28)
    up = gr.upsample(maps, (32, 32))[0]
    # the largest cell's centre, up to half a pixel: the even cell has no pixel on its centre
    assert up.flat[peak] >= up.max() * (1 - 0.5 / 8)


def test_null_draws_stay_in_group_skip_the_slice_itself_and_are_seeded():
    groups = np.array([0, 0, 0, 1, 1, 2])
    pool_groups = groups.copy()
    self_rows = np.arange(6)
    a = gr.draw_null(groups, self_rows, pool_groups, 50, np.random.default_rng(3))
    b = gr.draw_null(groups, self_rows, pool_groups, 50, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    drawn = a[a >= 0]
    assert (pool_groups[a[:5]] == groups[:5, None]).all()
    assert not (a[:5] == self_rows[:5, None]).any()
    assert set(a[0]) == {1, 2} and set(a[3]) == {4}
    assert (a[5] == -1).all() and len(drawn) == 250  # group 2 holds no other slice
