"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fds 3 and 4, JSON
messages ending in NUL), for the page tests that click: no websocket library, no port, nothing leaves loopback."""
from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any


def _high(fd: int) -> int:
    """``fd`` moved to a descriptor number of 10 or more (the original closed)."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium with one page; ``evaluate`` runs JavaScript in it, ``click`` clicks like a mouse."""

    def __init__(self, binary: str, profile: Path, *, width: int = 1280, height: int = 1400):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        to_chrome_r, from_chrome_w = (_high(fd) for fd in (to_chrome_r, from_chrome_w))  # never 3 or 4 themselves

        def fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes its answers
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--window-size={width},{height}", f"--user-data-dir={profile}", "--remote-debugging-pipe",
               "about:blank"]
        self.proc = subprocess.Popen(cmd, preexec_fn=fds, pass_fds=(3, 4),  # kept open after preexec_fn
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, *, timeout: float = 30.0, **params: Any) -> dict:
        """Send one command and wait for its answer (events in between are skipped)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self._r], [], [], max(left, 0))
                assert ready and left > 0, f"no answer from chromium to {method} within {timeout} s"
                chunk = os.read(self._r, 1 << 20)
                assert chunk, "chromium closed its debugging pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                assert "error" not in answer, (method, answer["error"])
                return answer.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 20.0) -> Any:
        """Poll ``expression`` until it is truthy (an exception, e.g. while the page loads, counts as false)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()")
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"{expression!r} stayed false for {timeout} s")

    def click(self, selector: str) -> None:
        """A left mouse click at the centre of the element ``selector`` names (scrolled into view)."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            "if (!e) return null; e.scrollIntoView({block: 'center'}); "
                            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        assert box is not None, f"no element {selector}"
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._w)
        os.close(self._r)
