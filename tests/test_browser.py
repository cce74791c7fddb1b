"""The dashboard, the model card and the MLflow UI in a real browser, after a real search.

One slow test: a real tiny search (Ray, MLflow SQLite) and a promotion, then
``python -m calotune.dashboard`` and ``mlflow ui`` on free loopback ports, and headless
Chromium from Debian's packages (``chromium``, ``chromium-driver``; installed by
``.ci/services.sh``) driven by Selenium. Each page is waited for by its elements (never by
a sleep), its values are compared with what the store holds, every physics plot image
must have loaded, and the browser console must hold no SEVERE entry.

``CALOTUNE_SCREENSHOTS=DIR`` also saves a full-page PNG of each page there
(``dashboard-*.png``; ``dashboards/screenshots.py`` makes the README's from a larger search).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, free_port, require, short_tmpdir, stop_group, tail, tool_env, wait_for
from tests.helpers import mlflow_client, registered_name

REPO = Path(__file__).resolve().parent.parent
CHROMEDRIVER = Path(os.environ.get("CALOTUNE_CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM = Path(os.environ.get("CALOTUNE_CHROMIUM", "/usr/bin/chromium"))
# The MLflow UI asks its server who the user is; a server without authentication answers
# 404, which Chromium logs as a failed resource load. MLflow's own, and harmless.
MLFLOW_KNOWN_SEVERE = ("/ajax-api/2.0/mlflow/users/current",)

pytestmark = pytest.mark.slow


def _ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


def _serve(args: list[str], log: Path, url: str, what: str) -> subprocess.Popen:
    proc = subprocess.Popen(args, cwd=REPO, env=tool_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: _ok(url), 240, what, proc=proc, log=log)
    except BaseException:
        stop_group(proc)
        raise
    return proc


@pytest.fixture()
def browser() -> Iterator:
    require(CHROMEDRIVER.is_file() and CHROMIUM.is_file(),
            f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--enable-unsafe-swiftshader", "--window-size=1400,1000", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_text(driver, element_id: str, timeout: float = 120) -> str:
    """The text of element ``element_id`` once it is on the page and not empty."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        found = d.find_elements(By.ID, element_id)
        return found[0].text.strip() if found and found[0].text.strip() else False

    return WebDriverWait(driver, timeout).until(ready)


def _body_with(driver, needle: str) -> str | bool:
    """The page's text once it contains ``needle`` (False before: WebDriverWait polls again)."""
    from selenium.webdriver.common.by import By

    text = driver.find_element(By.TAG_NAME, "body").text
    return text if needle in text else False


def _severe(driver, known: tuple[str, ...] = ()) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(k in entry["message"] for k in known)]


def _screenshot(driver, name: str) -> None:
    folder = os.environ.get("CALOTUNE_SCREENSHOTS")
    if not folder:
        return
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(int(height), 800), 4000))
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    from PIL import Image  # 256 colours: a page of text and line plots stays sharp at a third of the size

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def test_dashboard_model_card_and_mlflow_ui_in_chromium(browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    work = short_tmpdir("calotune-browser-")
    home = work / "home"
    procs: list[subprocess.Popen] = []
    try:
        search = subprocess.run([sys.executable, "-m", "calotune.search", "zdc_swiglu_tiny", "--trials", "3",
                                 "--home", str(home)], cwd=REPO, env=tool_env(), capture_output=True, text=True,
                                timeout=900)
        assert search.returncode == 0, search.stderr[-4000:]
        model = registered_name("zdc_swiglu_tiny")
        promote = subprocess.run([sys.executable, "-m", "calotune.promote", model, "--home", str(home)], cwd=REPO,
                                 env=tool_env(), capture_output=True, text=True, timeout=600)
        assert promote.returncode == 0, promote.stderr[-4000:]

        # What the store says, to compare the pages with.
        client = mlflow_client(home)
        version = client.get_model_version_by_alias(model, "production")
        winner, search_name = version.tags["trial"], version.tags["search"]
        runs = client.search_runs([client.get_experiment_by_name("zdc_swiglu_tiny").experiment_id])
        trials = [r for r in runs if r.data.tags.get("calotune.kind") == "trial"]
        winner_run = next(r for r in trials if r.data.tags["calotune.trial_id"] == winner)
        states = sorted(r.data.tags["calotune.state"] for r in trials)
        assert len(trials) == 3

        port, ui_port = free_port(), free_port()
        dash_url, ui_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}"
        procs.append(_serve([sys.executable, "-m", "calotune.dashboard", "--home", str(home), "--port", str(port),
                             "--refresh", "2"], work / "dashboard.log", f"{dash_url}/", "calotune.dashboard"))
        procs.append(_serve([str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(ui_port), "--workers", "1"],
                            work / "mlflow-ui.log", f"{ui_url}/health", "mlflow ui"))

        # The searches page: the search just run is the latest.
        browser.get(f"{dash_url}/")
        assert _wait_text(browser, "latest-search") == search_name
        _screenshot(browser, "searches")
        assert _severe(browser) == []

        # The search page: who won, the trial states, the physics plots.
        browser.get(f"{dash_url}/search/{search_name}")
        assert _wait_text(browser, "winner-trial") == winner
        assert _wait_text(browser, "search-name") == search_name
        why = _wait_text(browser, "why")
        assert f"{float(winner_run.data.metrics['test_mean_separation']):.5g}" in why
        rows = browser.find_elements(By.CSS_SELECTOR, "#trials tbody tr")
        assert sorted(r.find_elements(By.TAG_NAME, "td")[1].text for r in rows) == states
        counts = _wait_text(browser, "state-counts")
        assert f"{states.count('complete')} complete" in counts
        images = WebDriverWait(browser, 120).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, f"#plots-{winner} img.physics-plot"))
        assert len(images) >= 4
        WebDriverWait(browser, 120).until(lambda d: all(d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", img) for img in images))
        for graph in ("history", "curves", "parcoords", "importances"):  # plotly drew each figure
            WebDriverWait(browser, 120).until(
                lambda d, g=graph: d.find_elements(By.CSS_SELECTOR, f"#{g} .main-svg"))
        _screenshot(browser, "search")
        assert _severe(browser) == []

        # The model page: aliases and the promotion with both scores.
        browser.get(f"{dash_url}/model/{model}")
        assert f"production -> v{version.version}" in _wait_text(browser, "aliases")
        promotions = _wait_text(browser, "promotions")
        assert version.tags["candidate_score"] in promotions and version.tags["production_score"] in promotions
        _screenshot(browser, "model")
        assert _severe(browser) == []

        # The model card, where promote writes one (calotune.modelcard, tag calotune.model_card).
        card = version.tags.get("calotune.model_card")
        if card:
            link = WebDriverWait(browser, 60).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#versions a.model-card"))
            browser.get(link[0].get_attribute("href"))
            WebDriverWait(browser, 120).until(lambda d: winner in d.find_element(By.TAG_NAME, "body").text)
            _screenshot(browser, "model_card")
            assert _severe(browser) == []

        # The MLflow UI on the same store: the winner's run with its calotune tags.
        experiment_id = winner_run.info.experiment_id
        browser.get(f"{ui_url}/#/experiments/{experiment_id}/runs/{winner_run.info.run_id}")
        WebDriverWait(browser, 300).until(lambda d: _body_with(d, winner))
        body = WebDriverWait(browser, 60).until(lambda d: _body_with(d, "calotune.trial_id"))
        assert "calotune.state" in body, body[-3000:]
        _screenshot(browser, "mlflow_run")
        assert _severe(browser, MLFLOW_KNOWN_SEVERE) == []
    except BaseException:
        for log in sorted(work.glob("*.log")):
            print(tail(log), file=sys.stderr)
        raise
    finally:
        for proc in procs:
            stop_group(proc)
        shutil.rmtree(work, ignore_errors=True)
