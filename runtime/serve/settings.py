"""What `edgemeta serve` runs with: the address, the key, the batching and the request limits."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
MAX_KEY_BYTES = 4096


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8050
    api_key: str | None = None          # x-api-key on every /v1 route and /metrics; None: no key
    insecure: bool = False              # allow a non-loopback address without a key
    max_batch: int = 32                 # images per backend call; 1 turns batching off
    batch_window_ms: float | None = None  # how long the batcher waits for requests still decoding; None: auto
                                          # (2 ms on a GPU backend, 0 on a CPU, where waiting measured slower)
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 64                # images per request
    cors_origins: tuple[str, ...] = ()  # none by default: the page is served from the same origin

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1–65535, got {self.port}")
        if not 1 <= self.max_images <= 1024:
            raise ConfigError(f"--max-images must be 1–1024, got {self.max_images}")
        if not 1024 <= self.max_body_bytes <= 1 << 32:
            raise ConfigError(f"--max-body-mb gives {self.max_body_bytes} bytes; allowed: 1 KiB – 4 GiB")
        if self.api_key is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(f"refusing to serve on {self.host} without an API key: anyone on the network could enroll "
                              "and forget classes. Give --api-key-file FILE (clients send it as x-api-key), "
                              "or --insecure to serve without one")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | os.PathLike) -> str:
    """The key is the file's first line; the file must not be readable by other users."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        data = p.read_bytes()[:MAX_KEY_BYTES + 1]
    except FileNotFoundError:
        raise ConfigError(f"--api-key-file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read --api-key-file {p}: {exc.strerror}") from None
    if mode & 0o077 and os.name == "posix":
        raise ConfigError(f"--api-key-file {p} is readable by other users (mode {mode & 0o777:o}); run chmod 600 {p}")
    lines = data.decode("utf-8", errors="replace").splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16 or len(data) > MAX_KEY_BYTES:
        raise ConfigError(f"--api-key-file {p} must hold a key of 16–{MAX_KEY_BYTES} characters on its first line "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > key`)")
    if any(not (32 < ord(ch) < 127) for ch in key):
        raise ConfigError(f"--api-key-file {p}: the key must be printable ASCII without spaces (it travels in an HTTP header)")
    return key
