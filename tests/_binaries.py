"""A system binary a test needs: its path, a skip with the package to install when it is missing, or a failure
when CI is set (CI installs every such package: .ci/run)."""
from __future__ import annotations

import os
import shutil

import pytest


def required_binary(name: str, *, package: str) -> str:
    """The path of ``name``; skips (fails under CI) naming the Debian ``package`` that ships it."""
    tool = shutil.which(name)
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed but CI is set: install Debian's {package} package (.ci/run does)")
        pytest.skip(f"needs {name} (apt-get install -y {package}); CI=1 makes this a failure")
    return tool
