"""Running `ftune serve`: binding the socket, starting the engine and uvicorn, and shutting down on
a signal.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sys
import threading
from pathlib import Path

from finetune_cli import rundir
from finetune_cli.errors import FtuneError
from finetune_cli.serving.app import MAX_REQUEST_BYTES, create_app
from finetune_cli.serving.engine import Engine
from finetune_cli.serving.requestlog import check_folder
from finetune_cli.serving.served import load, open_targets

_ORIGIN = re.compile(r"https?://[^/\s?#]+")  # what a browser sends as Origin: scheme://host[:port], no path


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before models load (a port in use is an error at once) and listened on after."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise FtuneError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def run(
    specs: list[str],
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    debug: bool = False,
    log=None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    log_dir: Path | None = None,
    cors_origins: list[str] = (),
) -> int:
    """Serve until SIGTERM (exit 0) or Ctrl-C (130)."""
    open_targets(specs)  # a bad TARGET, log folder or origin fails before the port is opened
    for origin in cors_origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise FtuneError(f"--cors-origin {origin}: give an origin as a browser sends it, e.g. https://host:8443")
    if log_dir is None:
        return _run(specs, host, port, api_key, max_batch, max_queue, debug, log, max_request_bytes, None, cors_origins)
    check_folder(log_dir)
    with rundir.lock(log_dir, "--log-requests"):  # one server per log folder
        return _run(
            specs, host, port, api_key, max_batch, max_queue, debug, log, max_request_bytes, log_dir, cors_origins
        )


def _run(specs, host, port, api_key, max_batch, max_queue, debug, log, max_request_bytes, log_dir, cors_origins):
    import uvicorn

    log = log or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))
    sock = bind(host, port)
    try:
        served = load(specs, log=lambda msg: log(f"serve: {msg}"))
        engine = Engine(served, max_batch, max_queue, debug)
        app = create_app(engine, api_key, log, max_request_bytes, log_dir, cors_origins)
        sock.listen(2048)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        keyed = "API key required" if api_key else "no API key"
        log(f"serve: ready at http://{shown}:{bound_port}/v1 ({keyed}): {', '.join(served)}; Ctrl-C stops")
        log(f"serve: chat page at http://{shown}:{bound_port}/, metrics at /metrics")
        if log_dir is not None:
            log(f"serve: logging each request's messages and reply to {log_dir} (--log-requests)")
        if not api_key and bound_host not in ("127.0.0.1", "::1", "localhost"):
            log(f"serve: warning: anyone who can reach {shown}:{bound_port} can use these models (no --api-key)")
        config = uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="on"
        )
        server = _server(config, engine)
        server.run(sockets=[sock])
    finally:
        sock.close()
    log("serve: stopped")
    return 130 if server.stopped_by == signal.SIGINT else 0


def _server(config, engine: Engine):
    """uvicorn's Server, with SIGTERM/SIGINT also ending the running generations at once (so in-flight requests end
    within a step), and without re-raising the signal afterwards (the command exits 0 or 130 by itself)."""
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by = None

        def handle_exit(self, sig, frame):
            self.stopped_by = self.stopped_by or sig
            engine.close()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)
