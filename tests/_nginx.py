"""nginx for the deployment tests: Debian's binary (never installed here), the shipped deploy/nginx/safedl.conf
included by its own path (no copy), a temporary prefix with only the two files it includes (listen and upstream
lines), and the process in the foreground (``daemon off``) on 127.0.0.1."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NGINX_DIR = ROOT / "deploy" / "nginx"
SHIPPED = NGINX_DIR / "safedl.conf"
_TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str:
    """The nginx binary; without one the test is skipped, or fails when ``CI`` is set."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed but CI is set: install Debian's nginx package (.ci/run does)")
        pytest.skip("needs Debian's nginx (apt-get install -y nginx); CI=1 makes this a failure")
    return found


def directives(text: str) -> dict[tuple[str, str], list[str]]:
    """The simple directives of an nginx file by (enclosing block, name): ``("server", "client_max_body_size")``
    -> ``["8m"]`` (comments dropped; a block is named by its first word; a repeated directive: the last one)."""
    out: dict[tuple[str, str], list[str]] = {}
    blocks: list[str] = []
    for stmt in re.findall(r"[^;{}]*[;{}]", re.sub(r"#[^\n]*", "", text)):
        words = stmt[:-1].split()
        if stmt.endswith("{"):
            blocks.append(words[0] if words else "")
        elif stmt.endswith("}"):
            blocks.pop()
        elif words:
            out[(blocks[-1] if blocks else "", words[0])] = words[1:]
    return out


def upstream_params() -> list[str]:
    """The parameters of the first ``server`` line of the shipped safedl.d/upstreams.conf (``fail_timeout=5s`` ...)."""
    line = next(ln for ln in (NGINX_DIR / "safedl.d" / "upstreams.conf").read_text().splitlines()
                if ln.strip().startswith("server "))
    return line.split(";")[0].split()[2:]


def _main_conf(prefix: Path) -> str:
    """The harness around the shipped file: what /etc/nginx/nginx.conf is on a host, with every path in ``prefix``."""
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must reach the temp dirs under pytest's tmp
    temps = "".join(f"    {t}_temp_path {prefix / 'temp' / t};\n" for t in _TEMPS)
    return (f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
            f"error_log {prefix / 'logs' / 'error.log'} info;\n"
            "events { worker_connections 512; }\n"
            f"http {{\n    access_log {prefix / 'logs' / 'access.log'};\n{temps}"
            f"    include {SHIPPED};\n}}\n")


def write_prefix(prefix: Path, *, listen: str | None = None, upstreams: list[int] | None = None) -> Path:
    """An nginx prefix whose conf/nginx.conf includes the shipped safedl.conf; its includes (safedl.d/) are the
    shipped ones, or a ``listen`` line and one ``server`` line per upstream port when given. Returns the conf path."""
    conf = prefix / "conf"
    shutil.copytree(NGINX_DIR / "safedl.d", conf / "safedl.d")
    if listen is not None:
        (conf / "safedl.d" / "listen.conf").write_text(f"listen {listen};\n")
    if upstreams is not None:  # the shipped server lines' parameters (max_fails=... fail_timeout=...), other ports
        params = " ".join(upstream_params())
        (conf / "safedl.d" / "upstreams.conf").write_text(
            "".join(f"server 127.0.0.1:{p} {params};\n" for p in upstreams))
    for d in ("logs", *(f"temp/{t}" for t in _TEMPS)):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    (conf / "nginx.conf").write_text(_main_conf(prefix))
    return conf / "nginx.conf"


def check_config(nginx: str, conf: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` of ``conf`` (relative includes resolve in its folder, as in /etc/nginx)."""
    prefix = conf.parent.parent
    return subprocess.run([nginx, "-t", "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)


class NginxProcess:
    """nginx in the foreground on ``port`` (127.0.0.1), in front of the given upstream ports; stopped on exit."""

    def __init__(self, nginx: str, prefix: Path, port: int, upstreams: list[int]):
        self.port, self.prefix = port, prefix
        self.url = f"http://127.0.0.1:{port}"
        conf = write_prefix(prefix, listen=f"127.0.0.1:{port}", upstreams=upstreams)
        checked = check_config(nginx, conf)
        assert checked.returncode == 0, checked.stderr
        self.proc = subprocess.Popen([nginx, "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"), "-c",
                                      str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def error_log(self) -> str:
        return (self.prefix / "logs" / "error.log").read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> "NginxProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.error_log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown of the master and its worker
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "NginxProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
