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
    page = (ws.report_dir / "features" / f"{ENCODER}__{VARIANT}__{CONFIG}" / "f00000.html").read_text()
    assert "structure=liver" in page
    thumbs = re.findall(r'<img src="([^"]+)"', page)
    assert thumbs and all((ws.report_dir / "features" / "x" / t).resolve().is_file() for t in thumbs)


def test_description_is_escaped(site):
    _, ws, _ = site
    page = (ws.report_dir / "features" / f"{ENCODER}__{VARIANT}__{CONFIG}" / "f00000.html").read_text()
    assert "<script>window.__pwned" not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt; &amp; co" in page


def test_report_stage_skips_when_up_to_date(report_ws, caplog):
    cfg, ws = report_ws
    run_report(cfg, ws)
    caplog.set_level("INFO")
    run_report(cfg, ws)
    assert "report: up to date" in caplog.text
