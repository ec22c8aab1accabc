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
