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
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides IP addresses and localhost names
    decode_budget_pixels: int = 40_000_000  # pixels decoded at once across all requests (one 40 MP photo)
    max_connections: int = 256          # open connections (at the limit a new one closes the oldest idle one),
                                        # and requests in flight (more get 503)
    header_timeout_s: float = 10.0      # a connection must send a request's headers within this (slowloris)

    @property
    def max_bodies_bytes(self) -> int:
        """Request-body bytes held across all requests in flight: 4 bodies of the largest size."""
        return 4 * self.max_body_bytes

    def __post_init__(self) -> None:
        if not is_address(self.host):
            raise ConfigError(f"--host {self.host!r} is not an IP address or a host name")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1–65535, got {self.port}")
        from ..backends.base import MAX_BATCH
        from .batching import MAX_WINDOW_S
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ConfigError(f"--max-batch must be 1–{MAX_BATCH} (the largest batch a TensorRT profile is built for), "
                              f"got {self.max_batch}")
        if self.batch_window_ms is not None and not 0 <= self.batch_window_ms <= MAX_WINDOW_S * 1e3:
            raise ConfigError(f"--batch-window-ms must be 0–{MAX_WINDOW_S * 1e3:.0f}, got {self.batch_window_ms}")
        if not 1_000_000 <= self.decode_budget_pixels <= 1 << 34:
            raise ConfigError(f"--decode-budget-mp gives {self.decode_budget_pixels:,} pixels; allowed: 1 – 17,000 MP")
        if not 1 <= self.max_connections <= 65536:
            raise ConfigError(f"--max-connections must be 1–65536, got {self.max_connections}")
        if not 0.1 <= self.header_timeout_s <= 600:
            raise ConfigError(f"--header-timeout must be 0.1–600 s, got {self.header_timeout_s}")
        for origin in self.cors_origins:
            if not is_origin(origin):
                raise ConfigError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] (http or https, "
                                  "no path, no trailing slash, no wildcard; 'null' would let every sandboxed page write)")
        for name in self.allowed_hosts:
            if not is_address(name):
                raise ConfigError(f"--allowed-host {name!r} is not a host name")
        if not 1 <= self.max_images <= 1024:
            raise ConfigError(f"--max-images must be 1–1024, got {self.max_images}")
        if not 1024 <= self.max_body_bytes <= 1 << 32:
            raise ConfigError(f"--max-body-mb gives {self.max_body_bytes} bytes; allowed: 1 KiB – 4 GiB")
        if self.api_key is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(f"refusing to serve on {self.host} without an API key: anyone on the network could enroll "
                              "and forget classes. Give --api-key-file FILE (clients send it as x-api-key), "
                              "or --insecure to serve without one")


def is_origin(origin: str) -> bool:
    """scheme://host[:port], http or https, exactly as a browser sends it in Origin."""
    import re
    m = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[^/:?#\s*\[\]]+)(?::(\d{1,5}))?", origin)
    if m is None:
        return False
    return is_address(m.group(2).strip("[]")) and (m.group(3) is None or 0 < int(m.group(3)) < 65536)


def is_address(host: str) -> bool:
    """An IP address or a DNS name (letters, digits, hyphens, dots)."""
    import re
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?",
                                 host))


def host_allowed(host_header: str | None, settings: ServeSettings) -> bool:
    """Whether a request's Host names this service: an IP address (what DNS rebinding cannot
    forge: the browser sends the attacker's name), a localhost name, the bound name, or a name
    given with --allowed-host. No Host header (HTTP/1.0 clients) is let through."""
    if host_header is None:
        return True
    name = host_header.strip().lower()
    if name.startswith("["):                       # [::1]:8050
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:                     # name:port
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in LOOPBACK_NAMES or name == settings.host.lower() or name in {h.lower().rstrip(".") for h in settings.allowed_hosts}


def cross_origin_refusal(headers: dict[str, str], settings: ServeSettings) -> str | None:
    """Why a state-changing request must be refused as cross-site, or None. A browser names the
    page that sent it (Origin; Sec-Fetch-Site): a page of another origin — any site the user has
    open — may not enroll, replace or forget unless --cors-origin allows it. Requests without
    either header (curl, scripts) are not from a browser page and are let through."""
    origin = headers.get("origin")
    if origin is not None:
        if origin in settings.cors_origins:
            return None
        host = headers.get("host", "")
        own = {f"http://{host}", f"https://{host}"}
        if origin.lower() in {o.lower() for o in own}:
            return None
        return f"cross-origin request from {origin} refused (the page's own origin, or --cors-origin, may write)"
    site = headers.get("sec-fetch-site")
    if site in ("cross-site", "same-site"):
        return f"{site} request refused (the page's own origin, or --cors-origin, may write)"
    return None


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
    import stat
    try:
        if not stat.S_ISREG(p.stat().st_mode):  # a FIFO would block the start until someone writes to it
            raise ConfigError(f"--api-key-file {p} is not a regular file")
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
