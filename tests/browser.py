"""Headless Chromium through chromedriver (Debian's ``chromium`` + ``chromium-driver``), for the report tests
and the README screenshot. The flags keep it from reaching the network, which a closed CI machine refuses."""

from __future__ import annotations

import os

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def missing() -> str | None:
    """Why no browser can be started here, or None."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    return f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install -y chromium chromium-driver"


def headless_chromium(profile_dir: str, width: int = 1280, height: int = 1000):
    """A WebDriver on a fresh profile that keeps the console log (``driver.get_log('browser')``)."""
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
