"""Prometheus metrics of the service, in a registry of its own (one per app, so tests and several
apps in a process never share counters)."""
from __future__ import annotations

from ..extras import load

SECONDS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self) -> None:
        prom = load("prometheus_client", "edgemeta serve")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("edgemeta_http_requests", "HTTP requests by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.request_seconds = prom.Histogram("edgemeta_http_request_seconds", "Whole-request latency by route",
                                              ["route"], buckets=SECONDS, registry=r)
        self.stage_seconds = prom.Histogram("edgemeta_stage_seconds",
                                            "Prediction and enrollment time per stage: decode, embed (incl. waiting for a batch), head",
                                            ["stage"], buckets=SECONDS, registry=r)
        self.batch_images = prom.Histogram("edgemeta_embed_batch_images", "Images per backend call",
                                           buckets=BATCH_SIZES, registry=r)
        self.backend_seconds = prom.Histogram("edgemeta_backend_seconds", "Time of one backend call",
                                              buckets=SECONDS, registry=r)
        self.images = prom.Counter("edgemeta_images", "Images handled, by use (predict, enroll)", ["use"], registry=r)
        self.classes = prom.Gauge("edgemeta_enrolled_classes", "Classes enrolled in the store", registry=r)

    def record_batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.backend_seconds.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
