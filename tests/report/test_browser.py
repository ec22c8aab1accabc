"""The report in a real headless Chromium from file://: no console errors, images load, links
navigate, and model-written text with <script> is shown as text."""

import shutil

import pytest

from sail.report.site import build_site

from .conftest import CONFIG, ENCODER, VARIANT

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
