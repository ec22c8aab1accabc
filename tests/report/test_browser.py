"""The report in a real headless Chromium from file://: no console errors, images load, links
navigate, and model-written text with <script> is shown as text."""

import shutil

import pytest

from sail.report.site import build_site

from .conftest import CONFIG, ENCODER, MAPPED, VARIANT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium + chromium-driver not installed (.ci/run installs them)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={tmp_path_factory.mktemp('chrome')}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _images_ok(driver) -> tuple[int, int]:
    return tuple(
        driver.execute_script(
            "const im = Array.from(document.images);"
            "return [im.length, im.filter(i => i.complete && i.naturalWidth > 0).length];"
        )
    )


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_report_in_headless_chromium(report_ws, browser):
    cfg, ws = report_ws
    index = build_site(
        cfg.model_copy(update={"report": cfg.report.model_copy(update={"max_features": 6})}), ws
    )
    browser.get(index.resolve().as_uri())
    assert browser.title == "SAIL report"
    assert _severe(browser) == []
    from selenium.webdriver.common.by import By

    browser.find_element(By.LINK_TEXT, CONFIG).click()
    assert browser.current_url.endswith(f"configs/{ENCODER}__{VARIANT}__{CONFIG}.html")
    total, loaded = _images_ok(browser)
    assert total > 0 and loaded == total
    feature = ws.report_dir / "features" / f"{ENCODER}__{VARIANT}__{CONFIG}" / "f00000.html"
    browser.get(feature.resolve().as_uri())
    browser.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager');")
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight);")
    total, loaded = _images_ok(browser)
    assert total > 0 and loaded == total
    text = browser.find_element(By.ID, "description").text
    assert text == "liver <script>window.__pwned = 1</script> & co"
    assert browser.execute_script("return window.__pwned === undefined;")
    assert browser.find_elements(By.CSS_SELECTOR, "#description script") == []
    assert _severe(browser) == []
    browser.find_element(By.LINK_TEXT, "report").click()
    assert browser.current_url.endswith("report/index.html")


KEY = f"{ENCODER}__{VARIANT}__{CONFIG}"


@pytest.fixture(scope="module")
def site10(report_ws, tmp_path_factory):
    """The report of a copy of the workspace with a monosemanticity score per feature (unrelated
    to the activation rate, so each sort key gives its own order)."""
    import numpy as np
    import pandas as pd

    from sail.workspace import Workspace

    cfg, ws = report_ws
    ws = Workspace(shutil.copytree(ws.root, tmp_path_factory.mktemp("browser") / "w"))
    score = np.random.default_rng(5).uniform(0, 0.5, 32)
    score[list(MAPPED)] += 0.5  # the mapped features among the pages, so hit rates vary
    mono = pd.DataFrame(
        {"encoder": ENCODER, "variant": VARIANT, "sae_config": CONFIG, "feature": range(32),
         "top_n": 10, "monosemanticity": score}
    )  # fmt: skip
    mono.to_csv(ws.eval.table("monosemanticity_features"), index=False)
    report = cfg.report.model_copy(update={"max_features": 10})
    build_site(cfg.model_copy(update={"workspace": ws.root, "report": report}), ws)
    return ws.report_dir


def _visible_cards(driver) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#feature-cards .card'))"
        ".filter(c => !c.hidden && c.offsetParent !== null).map(c => +c.dataset.feature);"
    )


def _index_data(driver) -> dict[int, dict]:
    data = driver.execute_script(
        "return JSON.parse(document.getElementById('feature-data').textContent);"
    )
    return {d["feature"]: d for d in data}


def test_index_search_filters_the_cards(site10, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get((site10 / "configs" / f"{KEY}.html").resolve().as_uri())
    data = _index_data(browser)
    assert sorted(_visible_cards(browser)) == sorted(data)
    ActionChains(browser).send_keys("/").perform()  # "/" focuses the search box
    box = browser.find_element(By.ID, "feature-search")
    assert browser.switch_to.active_element == box
    ActionChains(browser).send_keys("liver").perform()
    shown = _visible_cards(browser)
    assert 0 in shown and len(shown) < len(data)
    assert (
        browser.find_element(By.ID, "feature-count").text == f"{len(shown)} of {len(data)} features"
    )
    # concept labels, grounding structures, description words; several words must all match
    for query in ("liver", "kidney_left", "axial", "region= liver", "pwned", "no-such-thing", ""):
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        if query:
            box.send_keys(query)
        words = query.lower().split()
        expected = [f for f, d in data.items() if all(w in d["text"].lower() for w in words)]
        assert sorted(_visible_cards(browser)) == sorted(expected), query
    assert sorted(_visible_cards(browser)) == sorted(data)
    assert _severe(browser) == []


@pytest.mark.parametrize("key", ["monosemanticity", "frac_active", "hit_rate", "feature", "order"])
def test_index_sort_orders_the_cards_by_the_key(site10, browser, key):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get((site10 / "configs" / f"{KEY}.html").resolve().as_uri())
    data = _index_data(browser)
    Select(browser.find_element(By.ID, "feature-sort")).select_by_value(key)
    order = _visible_cards(browser)
    assert sorted(order) == sorted(data)
    values = [data[f][key] for f in order]
    known = [v for v in values if v is not None]
    assert values[: len(known)] == known  # missing values last
    ascending = key in ("feature", "order")
    assert known == sorted(known, reverse=not ascending)
    if key == "hit_rate":
        assert order[0] == 0 and len(known) >= 3  # feature 0: hit rate 0.9, the fixture's best
    if key in ("frac_active", "hit_rate", "feature"):  # differs from the selection order
        assert order != sorted(data, key=lambda f: data[f]["order"])
    assert _severe(browser) == []


def test_overlay_toggle_hides_and_shows_every_overlay(site10, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get((site10 / "features" / KEY / "f00000.html").resolve().as_uri())
    browser.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager');")
    overlays = browser.find_elements(By.CSS_SELECTOR, "img.overlay")
    assert overlays
    total, loaded = _images_ok(browser)
    assert loaded == total
    button = browser.find_element(By.ID, "overlay-toggle")
    if not overlays[0].is_displayed():  # a remembered "off" from an earlier page
        button.click()
    assert (
        all(o.is_displayed() for o in overlays) and button.get_attribute("aria-pressed") == "true"
    )
    button.click()
    assert not any(o.is_displayed() for o in overlays)
    assert button.get_attribute("aria-pressed") == "false"
    assert browser.find_element(By.CSS_SELECTOR, ".tile .thumb img:not(.overlay)").is_displayed()
    ActionChains(browser).send_keys("o").perform()  # the keyboard shortcut
    assert all(o.is_displayed() for o in overlays)
    assert _severe(browser) == []


def test_keyboard_moves_between_feature_pages_in_the_config_order(site10, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.get((site10 / "configs" / f"{KEY}.html").resolve().as_uri())
    order = [d["feature"] for d in sorted(_index_data(browser).values(), key=lambda d: d["order"])]
    browser.get((site10 / "features" / KEY / f"f{order[0]:05d}.html").resolve().as_uri())
    ActionChains(browser).send_keys("j").perform()
    assert browser.current_url.endswith(f"features/{KEY}/f{order[1]:05d}.html")
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    assert browser.current_url.endswith(f"features/{KEY}/f{order[2]:05d}.html")
    ActionChains(browser).send_keys("k").perform()
    assert browser.current_url.endswith(f"features/{KEY}/f{order[1]:05d}.html")
    ActionChains(browser).send_keys("u").perform()
    assert browser.current_url.endswith(f"configs/{KEY}.html")
    assert _severe(browser) == []


def test_volume_page_from_a_tile(site10, browser):
    from selenium.webdriver.common.by import By

    browser.get((site10 / "features" / KEY / "f00000.html").resolve().as_uri())
    browser.find_element(By.LINK_TEXT, "volume").click()
    assert "/volumes/" + KEY + "/" in browser.current_url
    assert browser.find_elements(By.CSS_SELECTOR, "svg.volume-heatmap")
    browser.find_element(By.LINK_TEXT, "#0").click()
    assert browser.current_url.endswith(f"features/{KEY}/f00000.html")
    assert _severe(browser) == []
