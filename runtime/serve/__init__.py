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


FIRST_BYTE_S = 2.0   # a new connection that sends nothing for this long is closed


def guarded_protocol(header_timeout_s: float, max_connections: int):
    """uvicorn's HTTP protocol (httptools, else h11) with the connection rules a networked service
    needs. A connection that has not sent a byte within FIRST_BYTE_S of opening, or a request's
    headers within `header_timeout_s` of its first byte or of its last response, is closed
    (slowloris). At `max_connections` open connections, a new one closes the oldest connection that
    is idle — one that has sent nothing of a request — so sockets that send nothing cannot lock out
    clients that do (uvicorn's own limit_concurrency counted them and answered everyone 503).
    Requests being processed are bounded separately (the app's Guard)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover - without uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]
    from collections import OrderedDict
    idle: OrderedDict[int, object] = OrderedDict()   # connections with nothing of a request received, oldest first
    open_count = [0]

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            open_count[0] += 1
            while open_count[0] > max_connections and idle:
                _, oldest = idle.popitem(last=False)
                oldest.transport.close()  # type: ignore[attr-defined]
            self._counted = True
            self._idle(FIRST_BYTE_S)

        def connection_lost(self, exc) -> None:
            if getattr(self, "_counted", False):
                open_count[0] -= 1
                self._counted = False
            idle.pop(id(self), None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if idle.pop(id(self), None) is not None:  # a request begins: headers now have their deadline
                self._arm(header_timeout_s)
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle(header_timeout_s)

        def _idle(self, seconds: float) -> None:
            idle[id(self)] = self
            self._arm(seconds)

        def _arm(self, seconds: float) -> None:
            # each deadline is for the state it was set in: a later one replaces it (a keep-alive
            # connection goes idle, busy and idle again; an old timer must not close the new idle spell)
            self._deadline_token = token = getattr(self, "_deadline_token", 0) + 1
            self.loop.call_later(seconds, self._deadline, token, self.cycle, id(self) in idle)

        def _deadline(self, token: int, cycle_then, was_idle: bool) -> None:
            if token != self._deadline_token or self.transport.is_closing():
                return
            still_idle = was_idle and id(self) in idle            # nothing received since it was set
            headers_stuck = not was_idle and self.cycle is cycle_then  # a request's headers never completed
            if still_idle or headers_stuck:
                self.transport.close()

    return GuardedProtocol


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
                    http=guarded_protocol(settings.header_timeout_s, settings.max_connections))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
