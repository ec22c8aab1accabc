"""Builders of the feature browser's volume profiles and map overlays (issue 17 items 5, 6)."""

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sail.artifacts import FeatureMapsFile, MapsFolder, read_maps
from sail.errors import SailError
from sail.maps.grounding import bilinear_matrix, upsample
from sail.report.overlays import (
    LEVELS,
    colour_bar_svg,
    method_note,
    palette,
    to_levels,
    write_overlay,
)
from sail.report.profiles import (
    HeatmapFeature,
    ProfileRow,
    cell_edges,
    heatmap_svg,
    strip_svg,
    volume_axes,
)


def test_volume_axes_orders_slices_along_the_normal_in_mm_else_by_index():
    slices = pd.DataFrame(
        {
            "plane": ["axial", "axial", "axial", "coronal", "coronal", "axial"],
            "slice_idx": [5, 1, 3, 2, 0, 7],
            "slice_position_mm": [10.0, -30.0, 50.0, np.nan, 4.0, 0.0],
        }
    )
    volume = np.array([0, 0, 0, 0, 0, 1])
    axes = volume_axes(slices, volume)
    assert axes.rows(0, "axial").tolist() == [1, 0, 2]  # by mm: -30, 10, 50 (not by index)
    assert axes.unit(0, "axial") == "mm"
    # a group with a missing position falls back to the slice index for all its slices
    assert axes.rows(0, "coronal").tolist() == [4, 3] and axes.unit(0, "coronal") == "slice"
    assert axes.rows(1, "axial").tolist() == [5]


def test_cell_edges_split_uneven_gaps_at_midpoints():
    assert cell_edges(np.array([0.0, 2.0, 8.0])).tolist() == [-1.0, 1.0, 5.0, 11.0]
    assert cell_edges(np.array([3.0])).tolist() == [2.5, 3.5]


def _rects(svg: str) -> list[dict]:
    return [dict(re.findall(r'([\w-]+)="([^"]*)"', m)) for m in re.findall(r"<rect ([^>]*)>", svg)]


def test_strip_draws_nonzero_slices_with_opacity_by_activation_and_marks_the_top_slice():
    row = ProfileRow(
        label="ct/s1 axial",
        href="../../volumes/k/ct__s1.html#axial",
        position=np.array([0.0, 10.0, 20.0, 30.0]),
        value=np.array([0.0, 1.0, 0.0, 4.0], np.float32),
        marked=3,
        unit="mm",
        slice_idx=np.array([0, 1, 2, 3]),
    )
    svg = strip_svg([row], vmax=4.0, width=400)
    rects = _rects(svg)
    filled = [r for r in rects if r.get("fill") == "#3b6ea8"]
    assert [float(r["fill-opacity"]) for r in filled] == [0.25, 1.0]  # value / vmax
    # cells from the midpoint edges: 4 cells of 10 mm over [-5, 35] mm -> 100 px each
    assert [float(r["x"]) - 150 for r in filled] == [100.0, 300.0]
    top = [r for r in rects if r.get("class") == "top-slice"]
    assert len(top) == 1 and float(top[0]["x"]) - 150 == 300.0
    assert 'href="../../volumes/k/ct__s1.html#axial"' in svg and "0.0 … 30.0 mm" in svg
    assert strip_svg([], 1.0) == ""


def test_volume_heatmap_orders_features_by_where_they_fire():
    position = np.array([0.0, 1.0, 2.0, 3.0])
    values_SF = np.array([[0, 0, 1], [0, 0, 1], [2, 0, 0], [2, 0, 0]], float)  # f0 low, f2 high
    feats = [HeatmapFeature(f, f"f{f}.html", "x") for f in (10, 11, 12)]
    svg, order = heatmap_svg(position, np.arange(4), values_SF, feats, np.array([2, 1, 1.0]), "mm")
    assert order.tolist() == [2, 0]  # feature 12 fires first along the axis; 11 never fires
    assert svg.index("#12") < svg.index("#10") and "#11" not in svg
    assert len([r for r in _rects(svg) if r.get("fill") == "#3b6ea8"]) == 4


def test_bilinear_upsampling_matches_torch_align_corners_false():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 4, 7)).astype(np.float32)
    ours = upsample(maps, (32, 20))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(maps)[:, None], size=(32, 20), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.allclose(bilinear_matrix(4, 128).sum(axis=1), 1)


def test_palette_is_diverging_centred_on_zero_and_transparent_there(tmp_path):
    rgb, alpha = palette()
    zero = to_levels(np.array([0.0]), 2.0)[0]
    assert zero == LEVELS // 2 and alpha[zero] == 0
    lo, hi = to_levels(np.array([-2.0, 5.0]), 2.0)  # clipped at the scale
    assert (lo, hi) == (0, LEVELS - 1) and alpha[lo] == alpha[hi] > 200
    assert rgb[lo][2] > rgb[lo][0] and rgb[hi][0] > rgb[hi][2]  # blue below 0, red above
    levels = to_levels(upsample(np.array([[[-1.0, 1.0]]]), (8, 16)), 1.0)[0]
    write_overlay(tmp_path / "o.png", levels)
    with Image.open(tmp_path / "o.png") as img:
        assert img.mode == "P" and img.size == (16, 8)
        assert np.array_equal(np.asarray(img), levels)
        rgba = np.asarray(img.convert("RGBA"))
    assert rgba[0, 0, 3] == alpha[levels[0, 0]] and rgba[0, 0, 2] > rgba[0, 0, 0]
    bar = colour_bar_svg(0.5)
    assert ">-0.5<" in bar and ">+0.5<" in bar and ">0<" in bar


def test_maps_lookup_skips_padding_and_missing_slices():
    maps = FeatureMapsFile(
        feature_K=np.array([7, 9]),
        slice_id_KT=np.array([["a", "b", ""], ["c", "", ""]]),
        maps_KThw=np.arange(2 * 3 * 2 * 2, dtype=np.float16).reshape(2, 3, 2, 2),
        pre_KT=np.array([[1.0, np.nan, np.nan], [1.0, np.nan, np.nan]], np.float32),
        provenance={"method": "approximate"},
    )
    found, got = maps.lookup(7, ["b", "a", "zz"])
    assert found.tolist() == [False, True, False]  # "b" is padding (NaN pre-activation)
    np.testing.assert_array_equal(got[0], maps.maps_KThw[0, 0])
    assert not maps.lookup(8, ["a"])[0].any()
    assert "approximate" in method_note(maps) and "do not add up" in method_note(maps)


def test_read_maps_names_the_missing_array_and_an_unreadable_file(tmp_path):
    folder = MapsFolder(tmp_path)
    assert read_maps(folder) is None
    np.savez(folder.arrays, feature_K=np.array([1]), slice_id_KT=np.array([["a"]]))
    with pytest.raises(SailError, match=r"maps\.npz: missing array\(s\) \['maps_KThw', 'pre_KT'\]"):
        read_maps(folder)
    folder.arrays.write_bytes(b"not an npz")
    with pytest.raises(SailError, match=r"maps\.npz: unreadable"):
        read_maps(folder)
