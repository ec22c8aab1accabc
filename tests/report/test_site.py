import re

import pytest

from sail.report.site import build_site, run_report

from .conftest import CONFIG, ENCODER, VARIANT


@pytest.fixture(scope="module")
def site(report_ws):
    cfg, ws = report_ws
    cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"max_features": 10})})
    index = build_site(cfg, ws)
    return cfg, ws, index


def test_index_and_pages_exist(site):
    _, ws, index = site
    html = index.read_text()
    key = f"{ENCODER}__{VARIANT}__{CONFIG}"
    assert f'href="configs/{key}.html"' in html
    config_page = ws.report_dir / "configs" / f"{key}.html"
    pages = sorted((ws.report_dir / "features" / key).glob("f*.html"))
    assert config_page.is_file() and 4 <= len(pages) <= 10
    assert "fetch(" not in html and "http://" not in html and "https://" not in html


def test_planted_feature_page_shows_its_concept(site):
    _, ws, _ = site
    page = (
        ws.report_dir / "features" / f"{ENCODER}__{VARIANT}__{CONFIG}" / "f00000.html"
    ).read_text()
    assert "structure=liver" in page
    thumbs = re.findall(r'<img src="([^"]+)"', page)
    assert thumbs and all(
        (ws.report_dir / "features" / "x" / t).resolve().is_file() for t in thumbs
    )


def test_description_is_escaped(site):
    _, ws, _ = site
    page = (
        ws.report_dir / "features" / f"{ENCODER}__{VARIANT}__{CONFIG}" / "f00000.html"
    ).read_text()
    assert "<script>window.__pwned" not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt; &amp; co" in page


def test_report_stage_skips_when_up_to_date(report_ws, caplog):
    cfg, ws = report_ws
    run_report(cfg, ws)
    caplog.set_level("INFO")
    run_report(cfg, ws)
    assert "report: up to date" in caplog.text


def test_single_feature_scoring_and_volume_level_p_are_labelled(tmp_path):
    """Issue 12 item 11: the report says when a number comes from the published one-feature rule
    (an inactive slice scores 1/(1+q)) and over how many volumes the fingerprint p-value runs."""
    import pandas as pd

    from sail.config import SailConfig
    from sail.interpret.fingerprint import summarise
    from sail.report.site import ConfigUnit, _env, _fingerprint_section, _language_section
    from sail.workspace import Workspace

    ws = Workspace(tmp_path / "w").ensure()
    unit = ConfigUnit(ENCODER, VARIANT, CONFIG)
    slices = pd.DataFrame(
        {"slice_id": [f"ct/s{i}/axial/0000" for i in range(4)], "png_path": "missing.png"}
    )
    fp = ws.interpret_dir / "fingerprint" / ENCODER / VARIANT / CONFIG
    lang = ws.interpret_dir / "language" / ENCODER / VARIANT / CONFIG
    fp.mkdir(parents=True)
    lang.mkdir(parents=True)
    per_ref = pd.DataFrame(
        {
            "method": "sparse",
            "k": 1,
            "reference": [f"ct/s{i}/axial/0000" for i in range(4)],
            "similarity_rule": "published_single_feature",
            "quality_mean": 0.9,
            "chance_quality": 0.5,
        }
    )
    for m in (
        "p_modality",
        "p_plane",
        "p_sex",
        "p_age_group",
        "jaccard_structures",
        "relative_to_dense_full",
        "relative_to_dense_fp",
    ):
        per_ref[m], per_ref[f"chance_{m}"] = 0.9, 0.5
    summarise(per_ref).to_csv(fp / "summary.csv", index=False)
    pd.DataFrame(
        {
            "method": "sparse",
            "k": 1,
            "reference": "ct/s0/axial/0000",
            "rank": [1, 2],
            "hit": ["ct/s1/axial/0000", "ct/s2/axial/0000"],
            "similarity": [0.9, 0.8],
            "similarity_rule": "published_single_feature",
        }
    ).to_csv(fp / "hits.csv", index=False)
    pd.DataFrame({"query": ["q"], "text": ["liver"]}).to_csv(lang / "queries.csv", index=False)
    pd.DataFrame(
        {
            "query": ["q"],
            "scoring": ["published_cosine"],
            "scoring_rule": ["published_single_feature"],
            "precision": [0.5],
            "chance": [0.1],
        }
    ).to_csv(lang / "metrics.csv", index=False)
    pd.DataFrame(
        {
            "query": "q",
            "scoring": "published_cosine",
            "rank": [1],
            "slice_id": ["ct/s3/axial/0000"],
            "score": [0.5],
            "meets_all": [True],
        }
    ).to_csv(lang / "hits.csv", index=False)
    rcfg = SailConfig(workspace=ws.root).report
    fsec = _fingerprint_section(ws, tmp_path / "out", unit, slices, rcfg)
    lsec = _language_section(ws, tmp_path / "out", unit, slices, rcfg)
    page = (
        _env()
        .get_template("config.html.j2")
        .render(
            unit=unit,
            cards=[],
            recovery=[],
            metrics={},
            n_features=0,
            fingerprint=fsec,
            language=lsec,
            dead=0,
            l0=0.0,
        )
    )
    assert page.count("1/(1+|a - a_ref|)") == 2  # the fingerprint example and the language query
    assert "over 4 reference volumes" in page


def test_feature_page_enrichment_is_the_descriptions_own_split_and_slices(site):
    """Issue 13: the page's enrichment is computed by autointerp's code on the slices the
    description is built from (the concept split's top slices), with volume-level p-values."""
    from sail.config import AutointerpSettings
    from sail.interpret.autointerp import gather
    from sail.interpret.data import Target, load_split, read_slices
    from sail.interpret.enrichment import EnrichmentTable

    cfg, ws, _ = site
    split = cfg.interpret.autointerp.concept_split
    data = load_split(ws, Target(ENCODER, VARIANT, CONFIG), split, read_slices(ws))
    table = EnrichmentTable(data.meta, data.H_NS, data.structures)
    ev = gather(data, table, 0, AutointerpSettings()).enrichment
    page = (
        ws.report_dir / "features" / f"{ENCODER}__{VARIANT}__{CONFIG}" / "f00000.html"
    ).read_text()
    assert f"base rate ({split} split)" in page
    assert (
        f"The {ev.n_top} top-activating slices of the {split} split, from {ev.n_volumes} volumes"
        in page
    )
    liver = next(r for r in ev.structures if r[0] == "liver")
    row = re.search(r"<td>structure=liver</td>.*?</tr>", page, re.S).group(0)
    cells = re.findall(r'<td class="num">([^<]*)</td>', row)
    assert cells[:2] == [f"{liver[1]:.2f}", f"{liver[2]:.2f}"]
    assert cells[3] == f"{liver[4]:.2g}"


def test_hierarchy_and_stability_reach_feature_and_config_pages(report_ws, tmp_path):
    """eval/hierarchy.csv: a feature page names its parents and children, the config page draws
    the tree of its top features; eval/stability.csv: the config page shows the matched share."""
    import pandas as pd

    cfg, ws = report_ws
    ids = {"encoder": ENCODER, "variant": VARIANT, "sae_config": CONFIG}
    hierarchy = pd.DataFrame(
        [
            {**ids, "feature": 9, "level": 2, "n_active": 40, "parent_coact": 0,
             "coact_lift": 3.5, "p_parent_given_child": 0.95, "parent_rate": 0.2,
             "parent_decoder": 1, "decoder_cos": 0.41, "parents_agree": False},
            {**ids, "feature": 12, "level": 2, "n_active": 30, "parent_coact": 9,
             "coact_lift": 2.0, "p_parent_given_child": 0.7, "parent_rate": 0.3,
             "parent_decoder": 0, "decoder_cos": 0.2, "parents_agree": False},
        ]
    )  # fmt: skip
    stability = pd.DataFrame(
        [{**ids, "n_seeds": 3, "seeds": "42;1;2", "n_latents": 32, "matched_share": 0.75,
          "matched_share_all_seeds": 0.6, "mean_matched_cos": 0.91,
          "matched_share_by_level": "1.000;0.667"}]
    )  # fmt: skip
    ws.eval_dir.mkdir(parents=True, exist_ok=True)
    hierarchy.to_csv(ws.eval.table("hierarchy"), index=False)
    stability.to_csv(ws.eval.table("stability"), index=False)
    try:
        cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"max_features": 10})})
        build_site(cfg, ws)
        key = f"{ENCODER}__{VARIANT}__{CONFIG}"
        liver = (ws.report_dir / "features" / key / "f00000.html").read_text()
        children = liver.split("children by co-activation")[1].split("</tr>")[0]
        assert "#9" in children and "lift 3.5" in children
        config = (ws.report_dir / "configs" / f"{key}.html").read_text()
        assert 'id="stability">0.750<' in config and "1.000;0.667" in config
        tree = config.split('id="hierarchy-tree"')[1].split("</div>")[0]
        assert re.search(r"#0</a>.*<ul>\s*<li>.*#9", tree, re.S)  # feature 0 with child 9
        assert "#12" in tree  # and its grandchild
    finally:
        ws.eval.table("hierarchy").unlink()
        ws.eval.table("stability").unlink()


def test_index_opens_with_the_planted_concepts_panel(report_ws, tmp_path):
    """Label, linked best feature, its test AUROC beside the raw-dimension, random-init and null
    figures, a thumbnail strip, and a plain statement where the SAE falls below the raw dim."""
    import shutil

    import pandas as pd

    from sail.evaluate.concepts import CONCEPT_COLUMNS
    from sail.workspace import Workspace, write_csv_atomic

    cfg, ws = report_ws
    ws = Workspace(shutil.copytree(ws.root, tmp_path / "w"))
    cfg = cfg.model_copy(update={"workspace": ws.root})
    ranking = pd.DataFrame(
        {"encoder": [ENCODER], "variant": [VARIANT], "sae_config": [CONFIG], "final_rank": [1]}
    )
    write_csv_atomic(ws.eval_dir / "ranking.csv", ranking)
    rows = []
    for label, feature, sae, raw in (("has_liver", 0, 0.97, 0.93), ("plane=axial", 2, 0.88, 0.95)):
        row = dict.fromkeys(CONCEPT_COLUMNS)
        row |= dict(encoder=ENCODER, variant=VARIANT, sae_config=CONFIG, label=label,
                    best_feature=feature, test_roc_auc=sae, raw_test_roc_auc=raw, raw_dimension=5,
                    control_encoder=f"random-{ENCODER}", control_test_roc_auc=0.61,
                    null_test_roc_auc=0.52)  # fmt: skip
        rows.append(row)
    write_csv_atomic(ws.eval_dir / "concepts.csv", pd.DataFrame(rows, columns=CONCEPT_COLUMNS))
    html = build_site(cfg, ws).read_text()
    panel = html[html.index("Planted concepts") : html.index("SAE configurations")]
    key = f"{ENCODER}__{VARIANT}__{CONFIG}"
    assert f'href="features/{key}/f00000.html"' in panel and "0.970" in panel
    assert "0.930" in panel and "0.610" in panel and "0.520" in panel
    assert "1 of 2 labels reach 0.90" in panel
    assert re.search(r"falls below the best raw dimension on 1 label\(s\): plane=axial", panel)
    thumbs = re.findall(r'<img src="([^"]+)"', panel)
    assert thumbs and all((ws.report_dir / t).is_file() for t in thumbs)
    assert html.index("Planted concepts") < html.index("SAE configurations")


def _page(ws, feature: int) -> str:
    return (
        ws.report_dir / "features" / f"{ENCODER}__{VARIANT}__{CONFIG}" / f"f{feature:05d}.html"
    ).read_text()


def test_overlays_are_drawn_where_the_maps_have_the_tile(site):
    """Issue 17 item 6: a tile whose slice has a map gets an overlay PNG of the thumbnail's size,
    the map upsampled with its sign (peak red, opaque); the page shows the colour bar, its scale
    and the method; tiles and features without a map get none."""
    import numpy as np
    from PIL import Image

    _, ws, _ = site
    with np.load(ws.maps(ENCODER, VARIANT, CONFIG).arrays) as npz:
        mapped = {
            int(f): {s for s, p in zip(ids, pre, strict=True) if s and np.isfinite(p)}
            for f, ids, pre in zip(npz["feature_K"], npz["slice_id_KT"], npz["pre_KT"], strict=True)
        }
        scale0 = float(np.abs(npz["maps_KThw"][0].astype(np.float32)).max())
    feature_dir = ws.report_dir / "features" / f"{ENCODER}__{VARIANT}__{CONFIG}"
    n_overlays = 0
    for page_path in sorted(feature_dir.glob("f*.html")):
        f = int(page_path.stem[1:])
        page = page_path.read_text()
        tiles = re.findall(
            r'<div class="thumb"><img src="([^"]+)" alt="([^"]+)"[^>]*>(.*?)</div>', page
        )
        assert tiles
        for thumb, slice_id, rest in tiles:
            overlay = re.search(r'<img class="overlay" src="([^"]+)"', rest)
            assert bool(overlay) == (slice_id in mapped.get(f, set())), (f, slice_id)
            if overlay:
                n_overlays += 1
                with (
                    Image.open(feature_dir / overlay.group(1)) as o,
                    Image.open(feature_dir / thumb) as t,
                ):
                    assert o.size == t.size
                    rgba = np.asarray(o.convert("RGBA"))
                corner = (0, 0) if f == 0 else (-1, -1)  # the fixture's peak cell
                r, g, b, a = rgba[corner]
                assert r > 150 and b < 120 and a > 150
        assert ('id="overlay-toggle"' in page) == any(s in mapped.get(f, ()) for _, s, _ in tiles)
    assert n_overlays >= 3
    page0 = _page(ws, 0)
    assert f"scale &plusmn;{scale0:.3g}" in page0 and 'class="colour-bar"' in page0
    assert "<b>exact</b> maps: exact decomposition" in page0


def test_spatial_grounding_sits_beside_the_enrichment(site):
    _, ws, _ = site
    page = _page(ws, 0)
    table = page.split('id="grounding">')[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    located = ["4", "0.90", "0.40"]  # on the slices that hold it, against slices holding it
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", rows[1])
    assert cells == ["liver", "0.62", "0.90", "0.10", *located]
    assert re.findall(r"<td[^>]*>([^<]*)</td>", rows[2]) == ["liver", "", "0.90", "0.10", *located]
    assert page.index("Enrichment against the base rate") < page.index("Spatial grounding")
    assert "pointing game on 4 top validation slices" in page


def test_volume_profiles_link_tiles_strips_and_volume_pages(site):
    """Issue 17 item 5: each tile links to its volume's page (its plane's section); a strip per
    top-tile volume (at most three) marks the tile's slice; the volume page lists the config's
    features along its slices and links back to their pages."""
    from html import unescape

    _, ws, _ = site
    key = f"{ENCODER}__{VARIANT}__{CONFIG}"
    feature_dir = ws.report_dir / "features" / key
    page = _page(ws, 0)
    links = re.findall(r'<a href="([^"]+)">volume</a>', page)
    assert links
    for link in links:
        target, plane = unescape(link).split("#")
        volume_page = (feature_dir / target).resolve()
        html = volume_page.read_text()
        assert f'<h2 id="{plane}">' in html
        hrefs = re.findall(r'<a href="(\.\./\.\./features/[^"]+)">#\d+</a>', html)
        assert hrefs and all((volume_page.parent / h).resolve().is_file() for h in hrefs)
        assert 'href="../../features/' + key + '/f00000.html"' in html
    strip = page.split('id="profiles">')[1].split("</svg>")[0]
    assert strip.count('class="top-slice"') == min(3, len(links))
    assert (ws.report_dir / "volumes" / key).is_dir()


def test_config_page_embeds_the_feature_index(site):
    """The index's search and sort data: per card (in the config's order) its sort keys and
    searchable text, as JSON that no description can break out of."""
    import json

    _, ws, _ = site
    html = (ws.report_dir / "configs" / f"{ENCODER}__{VARIANT}__{CONFIG}.html").read_text()
    blob = html.split('<script type="application/json" id="feature-data">')[1].split("</script>")[0]
    assert "<" not in blob
    data = json.loads(blob)
    cards = [int(f) for f in re.findall(r'id="card-(\d+)"', html)]
    assert [d["feature"] for d in data] == cards and [d["order"] for d in data] == list(
        range(len(cards))
    )
    f0 = next(d for d in data if d["feature"] == 0)
    assert f0["hit_rate"] == 0.9 and "liver" in f0["text"] and "<script>" in f0["text"]
    assert all(d["hit_rate"] is None for d in data if d["feature"] in (2, 4, 6))
    assert all(0 < d["frac_active"] <= 1 for d in data)


def test_approximate_maps_are_labelled(report_ws, tmp_path):
    import shutil

    from sail.workspace import Workspace

    from .conftest import write_contract_maps

    cfg, ws = report_ws
    ws = Workspace(shutil.copytree(ws.root, tmp_path / "w"))
    cfg = cfg.model_copy(update={"workspace": ws.root})
    write_contract_maps(ws, method="approximate")
    build_site(
        cfg.model_copy(update={"report": cfg.report.model_copy(update={"max_features": 2})}), ws
    )
    page = _page(ws, 0)
    assert (
        "<b>approximate</b> maps: approximate:" in page
        and "Spatial grounding (approximate maps)" in page
    )
