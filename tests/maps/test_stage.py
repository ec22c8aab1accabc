"""The maps stage end to end on a tiny real workspace (issue 17, items 2 and 3)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sail.artifacts import read_maps, read_table
from sail.errors import SailError
from sail.evaluate.inputs import load_eval_data, load_sparse
from sail.evaluate.top_slices import top_per_volume
from sail.interpret.data import select_targets
from sail.maps.labels import LabelMaps
from sail.maps.stage import GROUNDING_COLUMNS, NullDraws, run_maps
from sail.report.selection import paged_features, report_rows, unit_key
from sail.report.site import build_site
from sail.workspace import Workspace, manifest_path, write_parquet_atomic


def test_stage_writes_maps_provenance_and_grounding_per_contract(maps_ws):
    cfg, ws = maps_ws
    run_maps(cfg, ws, force=True)
    targets = select_targets(cfg, ws)
    assert len(targets) == 2
    table = read_table(ws.eval.spatial_grounding)
    assert list(table.columns) == GROUNDING_COLUMNS
    data = load_eval_data(ws)
    for target in targets:
        n = check_config(cfg, ws, data, target)
        rows = table[(table.variant == target.variant) & (table.sae_config == target.sae_config)]
        assert len(rows) == n
        assert set(rows.structure) <= {"soft_tissue", "bright_body", ""}
        assert rows.structure.ne("").any()
        scored = rows[rows.structure != ""]
        assert scored.hit_rate.between(0, 1).all() and scored.null_hit_rate.between(0, 1).all()
        assert (rows.method == "exact").all() and (rows.n_slices <= cfg.report.top_slices).all()
        for p in ("", "enrichment_"):  # the pointing game on the slices that hold the structure
            named = rows[rows[f"{p}structure"].ne("")]
            assert named[f"{p}n_holding"].le(named.n_slices).all()
            held = named[named[f"{p}n_holding"] > 0]
            assert held[f"{p}located_rate"].between(0, 1).all()
            assert held[f"{p}located_null_rate"].between(0, 1).all()
            assert named.loc[named[f"{p}n_holding"] == 0, f"{p}located_rate"].isna().all()
            # every hit is on a slice that holds the structure
            hits = held[f"{p}hit_rate"] * held.n_slices
            np.testing.assert_allclose(hits, held[f"{p}located_rate"] * held[f"{p}n_holding"])


def test_the_holding_null_draws_other_slices_of_the_group_that_hold_the_structure(maps_ws):
    cfg, ws = maps_ws
    data = load_eval_data(ws)
    labels = LabelMaps.open(ws, data.slices)
    pool = report_rows(data)
    holds = data.slices.has_bright_body.to_numpy(dtype=bool)
    assert 0 < holds[pool].sum() < len(pool)
    rows_T = pool[: 2 * cfg.report.top_slices]
    holding_T, draws_TR = NullDraws(cfg, data, labels).draw_holding(rows_T, "bright_body")
    np.testing.assert_array_equal(holding_T, holds[rows_T])
    assert (draws_TR[~holding_T] == -1).all()
    drawn = draws_TR[holding_T]
    own = rows_T[holding_T][:, None]
    group = labels.groups(data.slices)
    real = drawn >= 0
    assert real.any() and holds[drawn[real]].all() and np.isin(drawn[real], pool).all()
    assert (group[drawn] == group[own])[real].all() and not (drawn == own).any()
    with pytest.raises(SailError, match="has_no_such_structure"):
        NullDraws(cfg, data, labels).draw_holding(rows_T, "no_such_structure")


def check_config(cfg, ws, data, target) -> int:
    """One config's maps.npz and maps.json per contract; returns its number of features."""
    folder = ws.maps(target.encoder, target.variant, target.sae_config)
    stored = read_maps(folder)
    assert stored is not None
    K, T = stored.slice_id_KT.shape
    assert cfg.report.top_slices == T and stored.maps_KThw.dtype == np.float16
    assert stored.maps_KThw.shape == (K, T, 2, 2)  # 64 px through EfficientNet-Lite0
    assert stored.feature_K.dtype == np.int64 and stored.pre_KT.dtype == np.float32

    # the features and slices are the report's: same selection, same tiles
    codes = load_sparse(ws, target.encoder, target.variant, target.sae_config, data)
    rows = report_rows(data)
    sub = codes[rows].tocsc()
    key = (target.encoder, target.variant, target.sae_config)
    chosen, _ = paged_features(ws, key, np.diff(sub.indptr), [], cfg.report.max_features)
    assert stored.feature_K.tolist() == chosen.tolist()
    ids = data.slices.slice_id.to_numpy()[rows]
    for k, f in enumerate(chosen):
        top, _ = top_per_volume(sp.csc_matrix(sub), int(f), data.volume[rows], T)
        expected = list(ids[top]) + [""] * (T - len(top))
        assert stored.slice_id_KT[k].tolist() == expected
        assert np.isnan(stored.pre_KT[k, len(top) :]).all()

    # exact maps average to the stored pre-activation; the codes are the stored codes
    prov = json.loads(folder.provenance.read_text())
    assert prov["method"] == "exact" and prov["approximate"] is False and prov["split"] == "valid"
    assert prov["grid"] == [2, 2] and prov["image_size"] == 64 and prov["encoder"] == target.encoder
    checks = prov["consistency"]
    print(target.variant, checks)
    assert checks["max_abs_map_mean_minus_pre"] <= 1e-5
    # the re-encoded pooled embedding is the stored one: same pre-activation, same codes
    assert checks["max_abs_pre_minus_stored_embedding_pre"] <= 1e-5
    assert checks["max_abs_code_minus_stored_code"] <= 1e-5
    ok = stored.slice_id_KT != ""
    means = stored.maps_KThw.astype(np.float32).mean(axis=(2, 3))
    assert np.abs(means[ok] - stored.pre_KT[ok]).max() < 2e-2  # float16 storage
    return K


def test_stage_skips_when_up_to_date_and_reruns_when_its_settings_change(maps_ws, caplog):
    cfg, ws = maps_ws
    run_maps(cfg, ws)
    target = select_targets(cfg, ws)[0]
    npz = ws.maps(target.encoder, target.variant, target.sae_config).arrays
    before = manifest_path(npz).read_text()
    caplog.clear()
    with caplog.at_level("INFO"):
        run_maps(cfg, ws)
    assert "up to date" in caplog.text
    other = cfg.model_copy(deep=True)
    other.maps.null_permutations = 3
    run_maps(other, ws)
    assert manifest_path(npz).read_text() != before
    run_maps(cfg, ws)  # back to the fixture's settings for other tests


def test_a_config_that_encodes_otherwise_than_the_stored_embeddings_is_refused(maps_ws):
    """Maps from another input size would not be the maps of the stored embeddings (a 128 px
    demo mapped with a 224 px config gives 7x7 maps of other numbers): the stage says so and
    names the table instead of writing them."""
    cfg, ws = maps_ws
    other = cfg.model_copy(deep=True)
    other.encode.encoders[0].image_size = 96
    with pytest.raises(SailError, match=r"embeddings/efficientnet-lite0: .* at 96 px"):
        run_maps(other, ws, force=True)


def test_without_label_maps_maps_are_written_and_grounding_is_skipped(maps_ws, tmp_path, caplog):
    cfg, ws = maps_ws
    copy = tmp_path / "w"
    shutil.copytree(ws.root, copy)
    ws2 = Workspace(copy)
    slices = pd.read_parquet(ws2.slices_table).drop(columns=["label_path"])
    write_parquet_atomic(ws2.slices_table, slices)
    manifest_path(ws2.slices_table).unlink(missing_ok=True)
    cfg2 = cfg.model_copy(update={"workspace": copy})
    with caplog.at_level("INFO"):
        run_maps(cfg2, ws2, force=True)
    assert "spatial grounding is skipped" in caplog.text
    for target in select_targets(cfg2, ws2):
        assert read_maps(ws2.maps(target.encoder, target.variant, target.sae_config)) is not None
    table = pd.read_csv(ws2.eval.spatial_grounding)
    assert list(table.columns) == GROUNDING_COLUMNS and table.empty


def test_the_report_pages_exactly_the_mapped_features(maps_ws):
    cfg, ws = maps_ws
    run_maps(cfg, ws)
    build_site(cfg, ws)
    for target in select_targets(cfg, ws):
        stored = read_maps(ws.maps(target.encoder, target.variant, target.sae_config))
        key = unit_key(target.encoder, target.variant, target.sae_config)
        pages = sorted(int(p.stem[1:]) for p in (ws.report_dir / "features" / key).glob("f*.html"))
        assert pages == sorted(stored.feature_K.tolist())


@pytest.mark.slow
def test_occlusion_maps_through_the_stage_are_labelled_approximate(maps_ws, tmp_path):
    cfg, ws = maps_ws
    copy = tmp_path / "w"
    shutil.copytree(ws.root, copy)
    ws2 = Workspace(copy)
    cfg2 = cfg.model_copy(update={"workspace": copy}, deep=True)
    cfg2.maps.method = "occlusion"
    cfg2.maps.occlusion_grid = 2
    run_maps(cfg2, ws2)
    table = read_table(ws2.eval.spatial_grounding)
    assert len(table) and (table.method == "occlusion").all()
    for target in select_targets(cfg2, ws2):
        folder = ws2.maps(target.encoder, target.variant, target.sae_config)
        prov = json.loads(folder.provenance.read_text())
        assert prov["method"] == "occlusion" and prov["approximate"] is True
        assert prov["grid"] == [2, 2] and prov["occlusion_grid"] == 2
        # the codes are still the stored ones: the unoccluded image is encoded as encode does
        assert prov["consistency"]["max_abs_code_minus_stored_code"] <= 1e-5
