"""`edgemeta serve`: the bundle behind an HTTP API and a web page, as one long-running process."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgemeta.cli.common import command, err_console
from edgemeta.cli.options import BackendOption, HeadOption, VariantOption


@command()
def serve(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    store: Path = typer.Option(..., help="Enrollment store folder (created at the first enrollment)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Any other than localhost needs --api-key-file or --insecure."),
    port: int = typer.Option(8050, help="TCP port."),
    head: HeadOption = None,
    backend: BackendOption = "auto",
    variant: VariantOption = "fp32",
    api_key_file: Optional[Path] = typer.Option(None, help="File whose first line is the key clients send as x-api-key (mode 600)."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve on a non-localhost address without a key."),
    max_batch: int = typer.Option(32, help="Images per backend call when requests arrive together; 1 turns batching off."),
    batch_window_ms: Optional[float] = typer.Option(None, help="How long a batch waits for requests still decoding (ms); default 2 on a GPU backend, 0 on a CPU."),
    max_body_mb: float = typer.Option(32.0, help="Largest request body (MiB)."),
    max_images: int = typer.Option(64, help="Most images in one request."),
    cors_origin: Optional[list[str]] = typer.Option(None, help="Allow pages from this origin to call the API (repeatable; none by default)."),
    allowed_host: Optional[list[str]] = typer.Option(None, help="A host name it answers to besides IP addresses and localhost (repeatable; e.g. jetson.local)."),
    decode_budget_mp: float = typer.Option(40.0, help="Megapixels decoded at once across all requests; more wait (503 after 30 s)."),
    max_connections: int = typer.Option(256, help="Open connections; more are answered 503."),
    header_timeout: float = typer.Option(10.0, help="Seconds a connection has to send a request's headers."),
    ssl_certfile: Optional[Path] = typer.Option(None, help="Serve HTTPS with this certificate (browsers give the camera only to https:// or localhost)."),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="The certificate's private key."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: ONNX Runtime's)."),
):
    """Serve the bundle: HTTP API (/v1/…, OpenAPI at /docs), a web page that enrolls from the camera (/),
    health (/v2/health/…) and Prometheus metrics (/metrics). Ctrl-C stops it cleanly.

    Example: edgemeta serve bundle --store enrolled   (then open http://127.0.0.1:8050)
    """
    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.errors import ConfigError
    from edgemeta.runtime.extras import require
    from edgemeta.runtime.serve import ServeSettings, check_port_free, read_api_key, run
    require("fastapi", "uvicorn", "multipart", "prometheus_client", purpose="edgemeta serve")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ConfigError("give both --ssl-certfile and --ssl-keyfile, or neither")
    for option, path in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{option} {path} is not a file")
    import math
    for option, value in (("--max-body-mb", max_body_mb), ("--decode-budget-mp", decode_budget_mp)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{option} must be a finite number > 0, got {value}")
    ServeSettings(host=host, port=port, insecure=True, max_batch=max_batch, batch_window_ms=batch_window_ms)  # address first
    settings = ServeSettings(host=host, port=port, api_key=read_api_key(api_key_file) if api_key_file else None,
                             insecure=insecure, max_batch=max_batch, batch_window_ms=batch_window_ms,
                             max_body_bytes=int(max_body_mb * 1024 * 1024), max_images=max_images,
                             cors_origins=tuple(cors_origin or ()), allowed_hosts=tuple(allowed_host or ()),
                             decode_budget_pixels=int(decode_budget_mp * 1e6), max_connections=max_connections,
                             header_timeout_s=header_timeout)
    check_port_free(host, port)
    clf = FewShotClassifier.load(bundle, store=store, head=head, backend=backend, variant=variant, threads=threads)
    scheme = "https" if ssl_certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    err_console.print(f"edgemeta serve: {bundle} ({len(clf.classes)} class(es) in {store}) on {scheme}://{shown}:{port}/ "
                      f"— the page at /, the API's OpenAPI document at /openapi.json{'' if settings.api_key is None else ', key required'}", markup=False)
    run(clf, settings, ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)
