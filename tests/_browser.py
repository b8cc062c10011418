"""Helper of the tests that check pages in real headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it)."""
from __future__ import annotations

import os
import shutil

import pytest


def chromium_or_skip() -> str:
    """The browser's path; without one the test is skipped, or fails when ``CI`` is set."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set: install Debian's chromium (.ci/run does)")
        pytest.skip("headless check needs Debian's chromium (apt-get install -y chromium); CI=1 makes this a failure")
    return browser
