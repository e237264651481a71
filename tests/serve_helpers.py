"""Start and stop a real `edgemeta serve` process on 127.0.0.1 for the HTTP and browser tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

EDGEMETA = Path(sys.executable).with_name("edgemeta")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edgemeta serve BUNDLE --store STORE …` as a child process; `url` once it reports ready."""

    def __init__(self, bundle: Path, store: Path, *args: str, env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        scheme = "https" if "--ssl-certfile" in args else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.store = store
        self.log = log or store.with_name(store.name + f"-serve-{self.port}.log")
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen([str(EDGEMETA), "serve", str(bundle), "--store", str(store), "--port", str(self.port), *args],
                                     stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgemeta serve exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1.0, verify=False).status_code == 200:  # readiness only
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"edgemeta serve was not ready after {timeout} s: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode
