"""The HTTP service: one `FewShotClassifier`, loaded once, behind FastAPI.

Routes (JSON; errors are `{"error": "…"}` with the status that says what went wrong):

    GET    /                               the web page (camera, live predictions, enrollment)
    GET    /v1/classes                     enrolled classes and their shot counts
    POST   /v1/classes/{label}/images      enroll images (multipart), ?mode=new|add|replace
    DELETE /v1/classes/{label}             forget a class
    POST   /v1/predict                     classify images (multipart, or one image/jpeg|png body)
    GET    /v1/model                       the bundle, head, variant, backend and device
    GET    /v2/health/live, /v2/health/ready
    GET    /metrics                        Prometheus

Import this module only after `extras.require` has checked the [serve] extra (`serve.run` does).
CPU work (decoding, embedding, enrollment) runs in the server's thread pool; every embedding goes
through one `BatchingBackend`, so concurrent predictions share backend calls.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..classifier import FewShotClassifier, check_label, parse_unknown
from ..errors import BusyError, ClassExistsError, ConfigError, DataError, EdgemetaError, ImageTooLargeError, LabelError, StorageError, StoreError, UnknownClassError
from ..preprocess import DecodeBudget, load_images
from . import models
from .batching import BatchingBackend
from .metrics import ServiceMetrics
from .settings import ServeSettings, cross_origin_refusal, host_allowed

STATIC = Path(__file__).parent / "static"
# The first matching type gives the status of an error a client caused.
STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (ImageTooLargeError, 413), (StorageError, 507), (LabelError, 400), (UnknownClassError, 404), (ClassExistsError, 409),
    (DataError, 400), (ConfigError, 400), (StoreError, 409), (BusyError, 503), (EdgemetaError, 400))
IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "application/octet-stream"}


class TooLarge(Exception):
    """The request is over a limit (body bytes, images per request): 413."""


class TooSlow(Exception):
    """The request body arrives too slowly (a body dripped a byte at a time): 408."""


BODY_SECONDS, BODY_MIN_RATE = 15.0, 50_000   # a body must arrive within 15 s + 1 s per 50 kB


def url_is_utf8(raw_path: bytes) -> bool:
    """Whether the path's percent-escapes decode as UTF-8 (Starlette would turn bad bytes into
    U+FFFD, and two different labels into one)."""
    from urllib.parse import unquote_to_bytes
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class BodiesBusy(Exception):
    """The request bodies in flight across all requests are over the service's bound: 503."""


class Service:
    """What the routes share: the classifier (its backend wrapped for batching), metrics, readiness."""

    def __init__(self, clf: FewShotClassifier, settings: ServeSettings):
        self.clf, self.settings = clf, settings
        self.metrics = ServiceMetrics()
        window_ms = settings.batch_window_ms if settings.batch_window_ms is not None else default_window_ms(clf.backend)
        self.batcher = clf.wrap_backend(lambda inner: BatchingBackend(inner, settings.max_batch, window_ms / 1e3,
                                                                      on_batch=self.metrics.record_batch))
        clf.decode_budget = self.decode_budget = DecodeBudget(settings.decode_budget_pixels)
        self.ready = False
        self.started = time.time()
        self._device: dict | None = None

    def warm_up(self) -> None:
        """Run the largest and smallest batch once (allocations, kernels chosen), then report ready."""
        spec = self.clf.bundle.spec
        for n in sorted({1, self.settings.max_batch}):
            self.batcher.embed_pixels(np.zeros((n, spec.height, spec.width, spec.channels), np.uint8))
        self.metrics.classes.set(len(self.clf.classes))
        self.ready = True

    def close(self) -> None:
        self.ready = False
        self.clf.close()

    def classes(self) -> dict:
        self.clf.refresh()
        self.metrics.classes.set(len(self.clf.classes))
        return {"classes": [{"label": lab, "shots": n} for lab, n in self.clf.shots().items()],
                "head": self.clf.head.kind}

    def predict(self, images: list[tuple[str, bytes]], top_k: int, reject: Any) -> dict:
        t0 = time.perf_counter()
        with self.batcher.expect():  # the batcher may wait (≤ the window) for this request while it decodes
            self.clf.refresh()
            if not self.clf.classes:
                raise StoreError("no classes are enrolled; enroll some first (POST /v1/classes/{label}/images)")
            pixels = load_images([data for _, data in images], self.clf.bundle.spec, self.decode_budget)
            t1 = time.perf_counter()
            query = self.clf.embed(pixels)
        t2 = time.perf_counter()
        prediction = self.clf.classify_embeddings(query, top_k=top_k, reject=reject)
        t3 = time.perf_counter()
        for stage, seconds in (("decode", t1 - t0), ("embed", t2 - t1), ("head", t3 - t2)):
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.images.labels("predict").inc(len(images))
        results = prediction.to_list()
        for (name, _), item in zip(images, results):
            item["image"] = name
        return {"predictions": results,
                "ms": {"decode": round((t1 - t0) * 1e3, 3), "embed": round((t2 - t1) * 1e3, 3),
                       "head": round((t3 - t2) * 1e3, 3), "total": round((t3 - t0) * 1e3, 3)}}

    def enroll(self, label: str, images: list[tuple[str, bytes]], mode: str) -> dict:
        t0 = time.perf_counter()
        shots = self.clf.enroll(label, [data for _, data in images], mode=mode)
        seconds = time.perf_counter() - t0
        self.metrics.stage_seconds.labels("enroll").observe(seconds)
        self.metrics.images.labels("enroll").inc(len(images))
        self.metrics.classes.set(len(self.clf.classes))
        return {"label": label.strip(), "shots": shots, "classes": len(self.clf.classes),
                "ms": {"enroll": round(seconds * 1e3, 3)}, "feedback": self.clf.review(label)}

    def set_limit(self, label: str, value: str) -> dict:
        parsed = parse_unknown(value, "unknown")
        self.clf.set_limit(label, None if parsed == "auto" else parsed)  # type: ignore[arg-type]
        return {"limits": self.clf.limits()}

    def limits(self) -> dict:
        self.clf.refresh()
        return {"limits": self.clf.limits()}

    def redact(self, message: str) -> str:
        """An error for a client names the store by its folder name, not by its path on this host."""
        store = self.clf.store
        if store is None:
            return message
        for form in {str(store.path), str(store.path.resolve())}:
            message = message.replace(form, store.path.name or "the store")
        return message

    def review(self) -> dict:
        self.clf.refresh()
        if not self.clf.classes:
            raise StoreError("no classes are enrolled; enroll some first (POST /v1/classes/{label}/images)")
        return self.clf.review()

    def correct(self, images: list[tuple[str, bytes]], is_label: str | None, not_label: str | None, none: bool) -> dict:
        self.clf.refresh()
        result = self.clf.correct([data for _, data in images], is_label=is_label, not_label=not_label, none=none)
        self.metrics.images.labels("correct").inc(len(images))
        self.metrics.classes.set(len(self.clf.classes))
        return result

    def negatives(self) -> dict:
        self.clf.refresh()
        return {"negatives": self.clf.negatives()}

    def remove_negative(self, negative_id: str) -> dict:
        self.clf.remove_negatives([negative_id])
        return {"negatives": self.clf.negatives()}

    def forget(self, label: str) -> dict:
        self.clf.forget(label)
        self.metrics.classes.set(len(self.clf.classes))
        return {"forgotten": check_label(label), "classes": len(self.clf.classes)}

    def device(self) -> dict:
        if self._device is None:  # probing CUDA and /proc takes milliseconds: once per process
            self._device = _device()
        return self._device

    def model(self) -> dict:
        b = self.clf.bundle
        m = b.manifest.get("model") or {}
        return {"name": Path(b.path).name, "backbone": m.get("backbone"), "algorithm": m.get("algorithm"),
                "pretrained": m.get("pretrained") or {}, "model_sha256": b.model_sha256,
                "input": b.spec.to_dict(), "embedding_dim": b.embedding_dim, "l2_normalized": b.l2_normalized,
                "head": self.clf.head.to_dict(), "variant": self.clf.variant, "backend": self.batcher.describe(),
                "device": self.device(), "edgemeta": _version(), "classes": len(self.clf.classes),
                "uptime_s": round(time.time() - self.started, 1), "unknown_auto": self.clf.describe_auto()}


GPU_WINDOW_MS = 2.0


def default_window_ms(backend) -> float:
    """How long a batch waits for company by default: 2 ms on a GPU (TensorRT, or ONNX Runtime's CUDA or
    TensorRT provider), where one call of 16 costs little more than one of 1; 0 on a CPU, where ONNX
    Runtime's cost per image is flat in the batch size and waiting measured slower (docs/benchmarks.md
    §12). With 0, requests that queue while the backend is busy still share the next call."""
    return GPU_WINDOW_MS if backend.on_gpu else 0.0


def _version() -> str:
    """The installed edgemeta's version (the runtime imports nothing of ours outside itself)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("edgemeta")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


def _device() -> dict:
    from ..device_info import cpu_model, device_identity
    return {"cpu": cpu_model(), **{k: v for k, v in device_identity().items() if v is not None}}


def status_of(exc: Exception) -> int:
    return next((status for kind, status in STATUS_OF if isinstance(exc, kind)), 500)


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
NO_FRAMING = ((b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"))


class Guard:
    """ASGI middleware: requests for another Host (DNS rebinding) and state-changing requests from
    another site's page are refused (403); the body-size limit (from Content-Length, and counted as
    it arrives); the request count and latency per route template (`/v1/classes/{label:path}`) for
    /metrics."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.in_flight = 0           # requests being processed (idle connections are not counted)
        self.body_bytes = 0          # request-body bytes received by requests still in flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.service.settings
        limit = settings.max_body_bytes
        t0, status = time.perf_counter(), [500]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = dict(scope["headers"]).get(b"content-length")
        received = [0]
        refusal = None
        if not host_allowed(headers.get("host"), settings):
            refusal = (f"Host {headers.get('host')!r} is not a name this service answers to (DNS rebinding?); "
                       "give it with --allowed-host if it is yours")
        elif scope["method"] not in SAFE_METHODS:
            refusal = cross_origin_refusal(headers, settings)
        if refusal is None and not url_is_utf8(scope.get("raw_path", b"")):
            self.service.metrics.requests.labels("refused", scope["method"], "400").inc()
            return await JSONResponse({"error": "the URL's percent-escapes are not valid UTF-8 (a label must be text)"},
                                      status_code=400)(scope, receive, send)
        if refusal is not None:
            self.service.metrics.requests.labels("refused", scope["method"], "403").inc()
            return await JSONResponse({"error": refusal}, status_code=403)(scope, receive, send)
        if self.in_flight >= settings.max_connections:
            self.service.metrics.requests.labels("busy", scope["method"], "503").inc()
            return await JSONResponse({"error": f"busy: {self.in_flight} requests in flight (--max-connections); "
                                                f"try again"}, status_code=503)(scope, receive, send)
        bodies_limit = settings.max_bodies_bytes

        body_deadline = time.monotonic() + BODY_SECONDS + (int(length) / BODY_MIN_RATE if length and length.isdigit() else 0)

        async def limited_receive():
            if length is not None and length.isdigit() and int(length) > limit:
                raise TooLarge(f"the request body is {int(length):,} bytes; the limit is {limit:,} (--max-body-mb)")
            try:
                message = await asyncio.wait_for(receive(), max(body_deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise TooSlow(f"the request body did not arrive in time ({BODY_SECONDS:.0f} s + 1 s per "
                              f"{BODY_MIN_RATE // 1000} kB)") from None
            size = len(message.get("body", b""))
            received[0] += size
            self.body_bytes += size
            if received[0] > limit:
                raise TooLarge(f"the request body is over the limit of {limit:,} bytes (--max-body-mb)")
            if self.body_bytes > bodies_limit:
                raise BodiesBusy(f"busy: {self.body_bytes / 2**20:.0f} MB of request bodies are in flight (limit "
                                 f"{bodies_limit / 2**20:.0f} MB, 4 × --max-body-mb); try again")
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                # no other site may frame the page (a framed "forget" click would pass the Origin check)
                message = {**message, "headers": [*message.get("headers", []), *NO_FRAMING]}
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, limited_receive, recording_send)
        finally:
            self.in_flight -= 1
            self.body_bytes -= received[0]
            if received[0] > 1 << 20 and self.body_bytes == 0:  # the last large body is gone: give its pages back
                from ..malloc import trim_freed_memory
                trim_freed_memory()
            route = getattr(scope.get("route"), "path", "unmatched")  # the router records the route it chose
            if route != "/metrics":
                m = self.service.metrics
                m.requests.labels(route, scope["method"], str(status[0])).inc()
                m.request_seconds.labels(route).observe(time.perf_counter() - t0)


def get_service(request: Request) -> Service:
    """The dependency every route takes: the one Service the app was created over."""
    return request.app.state.service


def check_key(request: Request, service: Service = Depends(get_service)) -> None:
    """x-api-key on every /v1 route and /metrics, when the service has a key (constant-time compare)."""
    key = service.settings.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPException(401, "wrong API key" if given else "missing API key: send it in the x-api-key header")


async def read_images(request: Request, service: Service = Depends(get_service)) -> list[tuple[str, bytes]]:
    """The request's images: multipart parts (limits counted as they arrive) or one raw image body.
    Read by hand rather than with UploadFile parameters so the image-count limit applies while the
    form is parsed; the OpenAPI document describes the body (models.IMAGES_BODY)."""
    settings = service.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images + 1, max_fields=32)
        except HTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise TooLarge(f"more than {settings.max_images} images in one request (--max-images)") from None
            raise
        try:
            images = [(getattr(v, "filename", None) or f"image-{i}", await v.read())
                      for i, (_, v) in enumerate(form.multi_items()) if not isinstance(v, str)]
        finally:
            await form.close()
    elif ctype in IMAGE_TYPES:
        images = [("body", await request.body())]
    else:
        raise DataError("send images as multipart/form-data (field `images`), or one image as an image/jpeg or "
                        f"image/png body; got content type {ctype or 'none'!r}")
    if not images:
        raise DataError("the request holds no images")
    if len(images) > settings.max_images:
        raise TooLarge(f"{len(images)} images in one request; the limit is {settings.max_images} (--max-images)")
    return images


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
probes = APIRouter()


@v1.get("/classes", summary="Enrolled classes and their shot counts", response_model=models.ClassesResponse,
        responses=models.ERRORS)
async def list_classes(service: Service = Depends(get_service)):
    return await run_in_threadpool(service.classes)


@v1.post("/classes/{label:path}/images", summary="Enroll images as a class", status_code=201,
         response_model=models.EnrollResponse, responses={200: {"model": models.EnrollResponse,
                                                                "description": "mode=add or replace"}, **models.ERRORS},
         openapi_extra=models.IMAGES_BODY)
async def enroll(label: str, images: list = Depends(read_images), service: Service = Depends(get_service),
                 mode: str = Query("new", description="new: refuse a label already enrolled · add · replace")):
    result = await run_in_threadpool(service.enroll, label, images, mode)  # the mode is checked by the enrollment
    return JSONResponse(result, status_code=201 if mode == "new" else 200)


@v1.delete("/classes/{label:path}", summary="Forget a class", response_model=models.ForgetResponse,
           responses=models.ERRORS)
async def forget(label: str, service: Service = Depends(get_service)):
    return await run_in_threadpool(service.forget, label)


@v1.post("/predict", summary="Classify images", response_model=models.PredictResponse, responses=models.ERRORS,
         openapi_extra=models.IMAGES_BODY)
async def predict(service: Service = Depends(get_service),
                  top_k: int = Query(1, ge=1, le=100, description="classes per image"),
                  unknown: str | None = Query(None, description="'auto' or a distance: farther images are 'unknown'"),
                  images: list = Depends(read_images)):
    reject = parse_unknown(unknown, "unknown")
    return await run_in_threadpool(service.predict, images, top_k, reject)


@v1.get("/limits", summary="Each class's unknown distance under unknown=auto, and where it comes from",
        response_model=models.LimitsResponse, responses=models.ERRORS)
async def list_limits(service: Service = Depends(get_service)):
    return await run_in_threadpool(service.limits)


@v1.put("/classes/{label:path}/limit", summary="Set one class's own unknown distance (or 'auto' for the rule's)",
        response_model=models.LimitsResponse, responses=models.ERRORS)
async def set_limit(label: str, service: Service = Depends(get_service),
                    unknown: str = Query(..., max_length=64, description="a distance ≥ 0, or 'auto'")):
    return await run_in_threadpool(service.set_limit, label, unknown)


@v1.get("/review", summary="What will be confused, flagged shots, advice per class", response_model=models.Review,
        responses=models.ERRORS)
async def review(service: Service = Depends(get_service)):
    return await run_in_threadpool(service.review)


@v1.post("/corrections", summary="Correct a prediction: the image is Y, is not X, or is none of the classes",
         response_model=models.CorrectionResponse, responses=models.ERRORS, openapi_extra=models.IMAGES_BODY)
async def correct(service: Service = Depends(get_service),
                  is_label: str | None = Query(None, alias="is", max_length=256, description="the image shows this class"),
                  not_label: str | None = Query(None, alias="not", max_length=256,
                                                description="the image does not show this class: keep it as a negative"),
                  none: bool = Query(False, description="the image shows none of the classes: keep it as a negative"),
                  images: list = Depends(read_images)):
    return await run_in_threadpool(service.correct, images, is_label, not_label, none)


@v1.get("/negatives", summary="Negative examples kept from corrections", response_model=models.NegativesResponse,
        responses=models.ERRORS)
async def list_negatives(service: Service = Depends(get_service)):
    return await run_in_threadpool(service.negatives)


@v1.delete("/negatives/{negative_id}", summary="Remove a negative example", response_model=models.NegativesResponse,
           responses=models.ERRORS)
async def remove_negative(negative_id: str, service: Service = Depends(get_service)):
    return await run_in_threadpool(service.remove_negative, negative_id)


@v1.get("/model", summary="The bundle, head, variant, backend and device", response_model=models.ModelResponse,
        responses=models.ERRORS)
async def model(service: Service = Depends(get_service)):
    return service.model()


@probes.get("/v2/health/live", summary="The process is up", response_model=models.Live)
async def live():
    return {"live": True}


@probes.get("/v2/health/ready", summary="The model is loaded and warmed up", response_model=models.Ready,
            responses={503: {"model": models.Ready, "description": "still loading"}})
async def ready(service: Service = Depends(get_service)):
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@probes.get("/metrics", dependencies=[Depends(check_key)], summary="Prometheus metrics")
async def metrics(service: Service = Depends(get_service)):
    body, ctype = service.metrics.exposition()
    return Response(body, media_type=ctype)


@probes.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


def create_app(service: Service):
    """The FastAPI app over a loaded service (the CLI loads the classifier first, so a bad bundle
    or store is one error line before anything listens): the routers above, the service in
    app.state for their dependencies, the error handlers, the Guard middleware."""
    settings = service.settings

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(service.warm_up)
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    # /docs and /redoc would load their JavaScript from a CDN into the origin whose writes are trusted:
    # off. The OpenAPI document itself stays at /openapi.json.
    app = FastAPI(title="edgemeta", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Few-shot classification on the device: enroll classes from a few images, then predict.")
    app.state.service = service
    app.include_router(v1)
    app.include_router(probes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def error(status: int, message: str, headers=None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(EdgemetaError)
    async def on_edgemeta_error(request, exc: EdgemetaError):
        return error(status_of(exc), service.redact(str(exc)))

    @app.exception_handler(TooSlow)
    async def on_too_slow(request, exc: TooSlow):
        return error(408, str(exc), {"connection": "close"})

    @app.exception_handler(BodiesBusy)
    async def on_bodies_busy(request, exc: BodiesBusy):
        return error(503, str(exc), {"retry-after": "1"})

    @app.exception_handler(TooLarge)
    async def on_too_large(request, exc: TooLarge):
        return error(413, str(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(request, exc: HTTPException):
        path = request.scope.get("path", "")  # decoded, as routed (request.url drops newlines)
        if exc.status_code == 404 and path.startswith("/v1/classes/") and any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
            # no route matches a path with a newline in it: say why rather than "Not Found"
            return error(400, "class labels cannot hold control characters (newline, tab, NUL…); use printable text")
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'query')}: {e['msg']}" for e in exc.errors())
        return error(400, problems or "invalid request")

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(request, exc: ClientDisconnect):
        return error(400, "the client disconnected before the request body arrived")  # nobody reads it

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}")

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["x-api-key", "content-type"])
    app.add_middleware(Guard, service=service)
    return app
