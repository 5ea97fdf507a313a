"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium) for the page tests."""

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def browser():
    """A headless Chromium WebDriver; fails (does not skip) when the browser is missing: ``make install``
    puts it in place (``apt-get install chromium chromium-driver``)."""
    if not (CHROMIUM and DRIVER):
        pytest.fail("the page tests need Debian's chromium and chromium-driver: `make install` installs them "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600",
              "--disable-gpu"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def screenshot(driver, name: str) -> str:
    """Save a screenshot under ``reports/screenshots/`` (not committed); returns its path."""
    os.makedirs("reports/screenshots", exist_ok=True)
    path = os.path.join("reports", "screenshots", name)
    driver.save_screenshot(path)
    return path
