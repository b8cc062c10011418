"""Imported once by a process pool's fork server (``ProcessExecutor(preload=...)``): loads torch, matplotlib,
every stage handler and every registered component, so each worker forks with them instead of importing them."""
from __future__ import annotations

import matplotlib
import torch  # noqa: F401

matplotlib.use("Agg")  # stages draw their figures off-screen, as the serial run does
import matplotlib.pyplot  # noqa: E402,F401

from safedl import registry
from safedl.run import stages  # noqa: F401

for kind in registry.KINDS:  # imports every component module, stage evaluators included
    registry.names(kind)
