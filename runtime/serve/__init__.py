"""`edgemeta serve`: the device as a service — an HTTP API, a web page that enrolls from the
browser's camera, Prometheus metrics — over one FewShotClassifier loaded once.

FastAPI, uvicorn, python-multipart and prometheus-client are imported only in this package
(edgemeta's [serve] extra); like the rest of the runtime it never imports torch.

    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.serve import ServeSettings, run
    run(FewShotClassifier.load("bundle/", store="enrolled/"), ServeSettings(port=8050))
"""
from __future__ import annotations

import errno
import signal
import socket
import threading

from ..classifier import FewShotClassifier
from ..errors import ConfigError
from ..extras import load, require
from .settings import ServeSettings, read_api_key

__all__ = ["ServeSettings", "read_api_key", "run", "check_port_free"]


def check_port_free(host: str, port: int) -> None:
    """One clear error before loading anything when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except socket.gaierror:
            raise ConfigError(f"--host {host} is not an address of this machine") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use (another `edgemeta serve`?); pick another with --port") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def header_timeout_protocol(seconds: float):
    """uvicorn's HTTP protocol (httptools, else h11) that closes a connection which has not sent a
    request's headers within `seconds` of opening or of its last response: a client dripping its
    headers (slowloris) cannot hold a connection for ever. uvicorn itself times out only idle
    keep-alive connections."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover - without uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self.loop.call_later(seconds, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle_then) -> None:
            if self.cycle is cycle_then and not self.transport.is_closing():  # no new request began
                self.transport.close()

    return HeaderTimeoutProtocol


def run(clf: FewShotClassifier, settings: ServeSettings, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
        log_level: str = "info") -> None:
    """Serve until Ctrl-C or SIGTERM: uvicorn stops accepting, lets requests in flight finish, then
    the classifier is closed (every enrollment was saved atomically when it was made)."""
    require("fastapi", "uvicorn", "multipart", "prometheus_client", purpose="edgemeta serve")
    from ..malloc import return_freed_memory
    from .app import Service, create_app
    uvicorn = load("uvicorn", "edgemeta serve")
    return_freed_memory()  # a decoded photo's memory goes back to the OS, not to one of 40 threads' heaps
    app = create_app(Service(clf, settings))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler
    # it found; a no-op one here makes a requested stop exit with status 0, not a KeyboardInterrupt.
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, ssl_certfile=ssl_certfile,
                    ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=10, server_header=False,
                    limit_concurrency=settings.max_connections, http=header_timeout_protocol(settings.header_timeout_s))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
