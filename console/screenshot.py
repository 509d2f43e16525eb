"""A screenshot of the console page, for docs and demos: headless Chromium through selenium (the dev extra).

    from vigil.console.screenshot import capture
    capture("http://127.0.0.1:8765/?token=...", "docs/figures/console.png")

or `python -m vigil.console.screenshot URL PATH [--wait 3] [--width 1400 --height 1600]`. The page is given
`wait_s` to receive its snapshot and a few updates before the picture is taken.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(paths: tuple[str, ...], name: str) -> str | None:
    return next((p for p in paths if os.path.exists(p)), None) or shutil.which(name)


def browser(width: int = 1400, height: int = 1600):
    """A headless Chromium driven by selenium (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", f"--window-size={width},{height}"):
        options.add_argument(arg)
    binary = _first(CHROMIUM, "chromium")
    if binary:
        options.binary_location = binary
    driver_path = _first(CHROMEDRIVER, "chromedriver")
    service = Service(driver_path) if driver_path else Service()
    return webdriver.Chrome(options=options, service=service)


def capture(url: str, path: str | os.PathLike, wait_s: float = 3.0, width: int = 1400, height: int = 1600) -> Path:
    """Open `url` (with its ?token= to show the actions as enabled), wait `wait_s`, save a PNG at `path`."""
    driver = browser(width, height)
    try:
        driver.get(url)
        time.sleep(wait_s)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(out)):
            raise RuntimeError(f"chromium could not save a screenshot to {out}")
        return out
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description="Save a screenshot of a vigil console page (headless Chromium).")
    p.add_argument("url")
    p.add_argument("path")
    p.add_argument("--wait", type=float, default=3.0, help="seconds to let the page fill before the picture")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1600)
    a = p.parse_args()
    print(capture(a.url, a.path, a.wait, a.width, a.height))


if __name__ == "__main__":
    main()
