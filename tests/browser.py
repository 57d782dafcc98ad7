"""Headless Chromium for the tests, driven by selenium through the Debian packages' chromedriver.

``make browser`` (a prerequisite of ``make test``) installs ``chromium`` and ``chromium-driver``
when they are missing. A test that needs the browser calls :func:`chromium`: when the browser,
the driver or selenium is missing it is skipped with the reason, except in CI (the environment
variable ``CI`` set and not "0"/"false", as CI services and ``.ci/run`` set it), where that is a
failure: CI must run the browser tests, not skip them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile

import pytest

BROWSERS = ("chromium", "chromium-browser")  # Debian's name, then Ubuntu's
DRIVER = "chromedriver"
# Flags for a headless run on a machine without a display, GPU or network, as root.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900")
INSTALL = "apt-get install chromium chromium-driver, and pip install selenium (the [test] extra); `make browser`"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing() -> list[str]:
    missing = []
    if not any(shutil.which(b) for b in BROWSERS):
        missing.append("chromium")
    if not shutil.which(DRIVER):
        missing.append("chromedriver (package chromium-driver)")
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium")
    return missing


def require_browser() -> None:
    """Skip (outside CI) or fail (in CI) when headless Chromium cannot be driven."""
    missing = _missing()
    if not missing:
        return
    why = f"headless Chromium is not usable: {', '.join(missing)} missing ({INSTALL})"
    if in_ci():
        pytest.fail(f"{why}. CI must run the browser tests.")
    pytest.skip(why)


@contextlib.contextmanager
def chromium(timeout_s: float = 20):
    """A selenium Chrome driver on headless Chromium with a fresh profile; quit (and the profile
    removed) on exit. ``timeout_s``: page-load timeout."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which(DRIVER)), options=options)  # no selenium-manager download
    driver.set_page_load_timeout(timeout_s)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
