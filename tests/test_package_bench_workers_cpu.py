"""bench/bench_workers.py's CPU accounting: the server's process tree and its utime + stime from /proc."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_workers = pytest.importorskip("bench_workers")

BUSY = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'while True: pass']); time.sleep(60)"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_cpu_of_the_tree_counts_a_busy_child():
    parent = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        deadline = time.monotonic() + 30
        while len(bench_workers.process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = bench_workers.process_tree(parent.pid)
        assert parent.pid in pids and len(pids) == 2
        before_parent, before = bench_workers.cpu_seconds([parent.pid]), bench_workers.cpu_seconds(pids)
        time.sleep(1.0)
        assert bench_workers.cpu_seconds(pids) - before >= 0.2  # the child spins (a share of one core at least)
        assert bench_workers.cpu_seconds([parent.pid]) - before_parent < 0.2  # the parent sleeps
    finally:
        for pid in bench_workers.process_tree(parent.pid)[1:]:
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait(10)


def test_cpu_of_an_exited_process_is_zero():
    assert bench_workers.cpu_seconds([2**22 + 12345]) == 0.0
