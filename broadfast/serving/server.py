"""Running the API: uvicorn in the foreground (``broadfast serve``) or in a thread (tests, benchmarks).

Any ASGI app; the scoring API is ``ServerThread(create_app(settings, model_dir))``, then
``httpx.post(server.url + "/v1/score", json={...})``:

>>> import httpx
>>> from fastapi import FastAPI
>>> app = FastAPI()
>>> _ = app.get("/ping")(lambda: "pong")
>>> with ServerThread(app) as server:
...     httpx.get(server.url + "/ping").json()
'pong'
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Self

log = logging.getLogger(__name__)


class NoQueryStrings(logging.Filter):
    """Drops the query string from uvicorn's access-log lines: a credential sent as ``?token=…``
    must never land in a log. (uvicorn's access record args: client, method, path with query, HTTP version, status.)

    >>> record = logging.LogRecord("uvicorn.access", 20, "", 0, '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5", "GET", "/admin/models?token=s3cret", "1.1", 401), None)
    >>> NoQueryStrings().filter(record), record.getMessage()
    (True, '127.0.0.1:5 - "GET /admin/models?… HTTP/1.1" 401')
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?…", *args[3:])
        return True


def hide_query_strings() -> None:
    """Install :class:`NoQueryStrings` on uvicorn's access logger (once)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, NoQueryStrings) for f in access.filters):
        access.addFilter(NoQueryStrings())


def run(app: Any, host: str, port: int, log_level: str = "info", keep_alive_s: float = 75.0) -> None:
    """Serve ``app`` until interrupted (the process's logging config is kept; access lines without query strings)."""
    import uvicorn

    hide_query_strings()
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), log_config=None, timeout_graceful_shutdown=10, timeout_keep_alive=int(keep_alive_s))


class ServerThread:
    """uvicorn on a free loopback port in a background thread; ``url`` once started."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", startup_timeout_s: float = 120.0, keep_alive_s: float = 75.0) -> None:
        import uvicorn

        hide_query_strings()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, log_config=None, lifespan="on", timeout_graceful_shutdown=10, timeout_keep_alive=int(keep_alive_s)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name=f"uvicorn-{self.port}", daemon=True)
        self.startup_timeout_s = startup_timeout_s

    def start(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the scoring server failed to start (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the scoring server did not start within {self.startup_timeout_s:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
