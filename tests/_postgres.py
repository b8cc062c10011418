"""A throwaway PostgreSQL cluster for the store tests: Debian's binaries (never installed here), ``initdb`` into a
temporary folder (as the ``postgres`` user when the tests run as root: initdb refuses root), listening on
127.0.0.1 and a free port only, trust authentication, fsync off; one fresh database per test; removed at the end."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def pg_bindir() -> Path:
    """The folder of initdb/pg_ctl; without one the test is skipped, or fails when ``CI`` is set."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    on_path = shutil.which("pg_ctl")
    binary = found[-1] if found else on_path
    if binary is None or not os.access(Path(binary).with_name("initdb"), os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed but CI is set: install Debian's postgresql package (.ci/run does)")
        pytest.skip("needs PostgreSQL's server binaries (apt-get install -y postgresql); CI=1 makes this a failure")
    return Path(binary).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """``start()`` a cluster; ``database()`` -> the URL of a new empty database; ``stop()`` / ``restart()``."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="safedl-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres").pw_name
            except KeyError:
                pytest.fail("running as root, PostgreSQL needs its 'postgres' user (the postgresql package adds it)")
            os.chown(self.dir, pwd.getpwnam(self.user).pw_uid, -1)
        os.chmod(self.dir, 0o700)

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout[-1500:]} {res.stderr[-1500:]}")

    def start(self) -> "Cluster":
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--locale=C", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
