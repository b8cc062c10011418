"""A tiny ASGI app served by uvicorn on 127.0.0.1 under a lowered RLIMIT_NOFILE, for test_serve_protocol's
descriptor-exhaustion test: ``python _protocol_server.py --nofile 256 [--plain]``. Prints ``PORT <port> MAX <n>``
on stdout once listening; logs go to stderr (the test counts the lines)."""
from __future__ import annotations

import argparse
import resource
import socket
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nofile", type=int, required=True)
    parser.add_argument("--plain", action="store_true", help="uvicorn's own h11 protocol, no defenses")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))  # soft and hard: harden can't lift it

    import logging
    import threading

    import uvicorn

    from safedl.serve.protocol import ConnectionLimits, guarded_protocol, harden_process

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    if args.plain:
        http, max_connections = "h11", 1024
    else:
        max_connections = harden_process(max_connections=1024)
        limits = ConnectionLimits(header_timeout_s=1.0, linger_s=0.5, max_connections=max_connections,
                                  max_connections_per_client=100_000)
        http = guarded_protocol(limits=limits)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=http, log_config=None,
                                           lifespan="off", access_log=False))
    thread = threading.Thread(target=_announce, args=(server, port, max_connections), daemon=True)
    thread.start()
    server.run()


def _announce(server, port: int, max_connections: int) -> None:
    import time

    for _ in range(400):  # at most 20 s
        if server.started:
            print(f"PORT {port} MAX {max_connections}", flush=True)
            return
        time.sleep(0.05)


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


if __name__ == "__main__":
    main()
