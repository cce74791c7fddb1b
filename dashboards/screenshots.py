"""Screenshots of the dashboard's pages after a search, for the README (docs/screenshots/).

    .venv/bin/python -m calotune.search zdc_swiglu_tiny --trials 10 --seed 3 --home /tmp/docs
    .venv/bin/python -m calotune.promote MODEL --home /tmp/docs
    .venv/bin/python dashboards/screenshots.py --home /tmp/docs --out docs/screenshots

Serves ``python -m calotune.dashboard`` on a free loopback port, opens the searches page,
the latest search and its registered model in headless Chromium (Debian's
``chromium`` and ``chromium-driver``), and saves each full page as ``dashboard-*.png``, a 256-colour PNG (a page
of text and line plots stays sharp at about a third of the size).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the dashboard exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the dashboard did not answer at {url} within {timeout:.0f} s")


def save(driver: webdriver.Chrome, path: Path, width: int = 1400) -> None:
    """The whole page (window grown to its height, at most 4000 px) as a 256-colour PNG."""
    from PIL import Image

    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, min(max(height, 800), 4000))
    driver.save_screenshot(str(path))
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "calotune.dashboard", "--home", str(args.home),
                             "--port", str(port)], stdout=subprocess.DEVNULL, start_new_session=True)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--enable-unsafe-swiftshader", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    wait = WebDriverWait(driver, 180)
    try:
        _ready(f"{base}/", proc)
        driver.get(f"{base}/")
        link = wait.until(lambda d: d.find_elements(By.ID, "latest-search"))[0]
        search = link.text
        save(driver, args.out / "dashboard-searches.png")
        driver.get(f"{base}/search/{quote(search)}")
        wait.until(lambda d: d.find_elements(By.ID, "winner-trial"))
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                  img) for img in d.find_elements(By.TAG_NAME, "img")))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) >= 4)
        registered = driver.find_elements(By.ID, "registered")
        save(driver, args.out / "dashboard-search.png")
        if registered:
            driver.get(registered[0].get_attribute("href"))
            wait.until(lambda d: d.find_elements(By.ID, "versions"))
            save(driver, args.out / "dashboard-model.png")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
