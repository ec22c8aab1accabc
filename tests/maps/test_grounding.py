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
    cells = gr.peak_cells(peaked_maps(valid, 1))
    # null: the same peak cells read in label maps drawn from a pool of one group that puts the
    # structure somewhere else (the layout of the anatomy, not the map, decides the null)
    pool = np.zeros((20, H, W), np.uint16)
    pool[:, 20:30, 20:30] = 1
    presence = gr.cell_presence(np.concatenate([valid, pool]), (4, 4), 3)
    draws = 12 + gr.draw_null(np.zeros(12, int), -np.ones(12, int), np.zeros(20, int), 10, rng)
    hit, null_rate = gr.pointing(presence, np.arange(12), cells, draws, structure)
    assert hit == 1.0 and null_rate == 0.0


def test_the_null_from_the_same_layout_is_close_to_the_hit_rate():
    """Maps that point where a structure always is are not evidence of grounding: a shuffled
    pool with the same layout scores them as high."""
    rng = np.random.default_rng(0)
    valid = label_maps(12, rng)
    cells = gr.peak_cells(peaked_maps(valid, 2))  # the band never moves
    draws = gr.draw_null(np.zeros(12, int), np.arange(12), np.zeros(12, int), 5, rng)
    presence = gr.cell_presence(valid, (4, 4), 3)
    hit, null = gr.pointing(presence, np.arange(12), cells, draws, 2)
    assert hit == 1.0 and null == 1.0


def test_the_structure_is_chosen_on_train_not_on_valid():
    """Train maps point at structure 2, valid maps at 1: the reported structure is 2 and its
    valid hit rate is what it is (0), not a second pick of the better one."""
    rng = np.random.default_rng(0)
    train, valid = label_maps(8, rng), label_maps(8, rng)
    mass = gr.positive_mass(gr.upsample(peaked_maps(train, 2), (H, W)), train, 3)
    structure, _ = gr.choose_structure(mass)
    assert structure == 2
    cells = gr.peak_cells(peaked_maps(valid, 1))
    presence = gr.cell_presence(valid, (4, 4), 3)
    hit, _ = gr.pointing(presence, np.arange(8), cells, -np.ones((8, 2), int), structure)
    assert hit == 0.0


def test_mass_counts_positive_values_per_label_and_background_never_wins():
    labels = np.array([[[0, 1], [2, 2]]], np.uint16)
    up = np.array([[[5.0, 1.0], [-3.0, 2.0]]], np.float32)
    np.testing.assert_allclose(gr.positive_mass(up, labels, 3), [[5.0, 1.0, 2.0]])
    assert gr.choose_structure(np.array([[5.0, 1.0, 2.0]])) == (2, 0.25)
    assert gr.choose_structure(np.array([[5.0, 0.0, 0.0]]))[0] == 0


def test_peak_cell_and_its_footprint_hold_a_structure_smaller_than_the_cell():
    """The peak is the largest cell (a bilinear upsampling peaks at its centre, never finer), and
    a structure anywhere in that cell's image region counts: here a 3x3-pixel structure off the
    cell centre, which a point-in-mask test at the centre would miss."""
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 3] = 1.0  # top-right cell: pixels rows 0-7, columns 24-31 of a 32 x 32 image
    (cell,) = gr.peak_cells(maps)
    assert cell == 3
    labels = np.zeros((2, H, W), np.uint16)
    labels[0, 0:3, 24:27] = 1  # in the peak cell's footprint, away from its centre (4, 28)
    labels[1, 0:3, 20:23] = 1  # the neighbouring cell: not a hit
    presence = gr.cell_presence(labels, (4, 4), 2)
    assert presence[0, 3, 1] and not presence[1, 3, 1]
    hit, null = gr.pointing(presence, np.array([0]), np.array([cell]), np.array([[1]]), 1)
    assert (hit, null) == (1.0, 0.0)


def test_cell_footprints_tile_an_image_the_grid_does_not_divide():
    labels = np.arange(10 * 10, dtype=np.uint16).reshape(1, 10, 10)
    presence = gr.cell_presence(labels, (3, 3), 100)
    assert presence.sum() == 100  # every pixel in exactly one cell
    assert presence[0, 0, 0] and presence[0, 8, 99]


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


def test_a_structure_held_in_parts_hits_on_any_part(tmp_path):
    """``has_lung_right`` is MRI's lung_right or CT's right lobes: on a CT label map the pointing
    game reads the lobes."""
    import pandas as pd

    from sail.maps.labels import LabelMaps
    from sail.workspace import Workspace

    ids = pd.DataFrame(
        {
            "modality": ["ct", "ct", "mri"],
            "structure_id": [1, 2, 1],
            "structure": ["lung_upper_lobe_right", "liver", "lung_right"],
        }
    )
    slices = pd.DataFrame({"modality": ["ct"], "label_path": ["x.labels.png"]})
    maps = LabelMaps(Workspace(tmp_path), slices, ids)
    lobe, lung = maps.names.index("lung_upper_lobe_right"), maps.names.index("lung_right")
    assert sorted(maps.indices("lung_right")) == sorted([lung, lobe])
    assert len(maps.indices("")) == 0 and len(maps.indices("kidney_left")) == 0
    labels = np.zeros((1, H, W), np.uint16)
    labels[0, :8, :8] = lobe
    presence = gr.cell_presence(labels, (4, 4), len(maps.names))
    cells, none = np.array([0]), -np.ones((1, 1), int)
    assert gr.pointing(presence, np.array([0]), cells, none, maps.indices("lung_right"))[0] == 1.0
    assert gr.pointing(presence, np.array([0]), cells, none, np.array([lung]))[0] == 0.0


def moving_structure(n: int, rng: np.random.Generator) -> np.ndarray:
    """Structure 1, an 8 x 8 square filling one cell of a 4 x 4 grid on every slice: its usual
    cell (the first) on half of them, a random one on the others."""
    out = np.zeros((n, H, W), np.uint16)
    for i, (y, x) in enumerate(rng.integers(0, 4, size=(n, 2))):
        y, x = (0, 0) if i % 2 else (y, x)
        out[i, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = 1
    return out


def test_located_separates_a_map_that_finds_the_structure_from_one_that_marks_its_slices():
    """The hit rate over the layout null counts presence too: a feature that fires on the slices
    holding a structure, whatever its map, beats a null of slices that mostly do not. On the
    slices that hold it, against other slices holding it, only a map that finds it stands out."""
    rng = np.random.default_rng(0)
    top = moving_structure(12, rng)  # the feature's top slices: all hold the structure
    others = np.concatenate([moving_structure(10, rng), np.zeros((30, H, W), np.uint16)])
    presence = gr.cell_presence(np.concatenate([top, others]), (4, 4), 2)
    holds_P = presence[12:, :, 1].any(axis=1)
    one_group = np.zeros(40, int)
    layout = 12 + gr.draw_null(np.zeros(12, int), -np.ones(12, int), one_group, 20, rng)
    holding = 12 + gr.draw_null(
        np.zeros(12, int), -np.ones(12, int), np.where(holds_P, 0, -1), 20, rng
    )
    finds = gr.peak_cells(peaked_maps(top, 1))
    marks = np.zeros(12, np.int64)  # always the usual cell, wherever the structure is
    for cells, finds_it in ((finds, True), (marks, False)):
        hit, null = gr.pointing(presence, np.arange(12), cells, layout, np.array([1]))
        located, located_null = gr.pointing(presence, np.arange(12), cells, holding, np.array([1]))
        assert hit >= 3 * null  # both pass the layout null: three quarters of its slices lack it
        if finds_it:
            assert hit == located == 1.0 and located >= 1.5 * located_null
        else:  # presence alone: the holding null scores it as high
            assert located <= 1.2 * located_null
