"""Dynamic batching: embedding calls from concurrent requests run as one backend call.

`BatchingBackend` wraps any backend and is itself a `Backend`, so a `FewShotClassifier` uses it
without knowing. Every call, from any thread, goes to one worker thread that owns the inner
backend (so a TensorRT execution context is never used from two threads at once). The worker takes
the first waiting call, then gathers more for at most `window_s` — but only while requests that
announced themselves with `expect()` are still on their way (decoding), so a lone request never
waits for company. Results are sliced back per call; each is what the call would get alone, up to
the float rounding of a larger GEMM.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np

from ..backends.base import MAX_BATCH, Backend
from ..errors import ConfigError

MAX_WINDOW_S = 0.1


class _Call:
    __slots__ = ("batch", "future")

    def __init__(self, batch: np.ndarray):
        self.batch = batch
        self.future: Future[np.ndarray] = Future()


class BatchingBackend(Backend):
    """One worker thread runs every embedding; concurrent calls share a backend call of up to
    `max_batch` images (max_batch=1: calls run one at a time, as they come)."""

    def __init__(self, inner: Backend, max_batch: int = 32, window_s: float = 0.002,
                 on_batch: Callable[[int, float], None] = lambda images, seconds: None):
        if not 1 <= max_batch <= MAX_BATCH:
            raise ConfigError(f"--max-batch must be 1–{MAX_BATCH}, got {max_batch}")
        if not 0 <= window_s <= MAX_WINDOW_S:
            raise ConfigError(f"--batch-window-ms must be 0–{MAX_WINDOW_S * 1e3:.0f}, got {window_s * 1e3:g}")
        super().__init__(inner.spec, inner.embedding_dim)
        self.inner, self.max_batch, self.window_s, self.on_batch = inner, max_batch, window_s, on_batch
        self.waits = 0
        self.name = inner.name
        self._pending: list[_Call] = []
        self._expected = 0       # requests announced by expect() and not finished
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._serve, name="edgemeta-batcher", daemon=True)
        self._worker.start()

    @contextlib.contextmanager
    def expect(self) -> Iterator[None]:
        """Announce a request that will embed soon (it is decoding now): the worker may wait up to
        the window for it to join the batch being gathered."""
        with self._cond:
            self._expected += 1
        try:
            yield
        finally:
            with self._cond:
                self._expected -= 1
                self._cond.notify_all()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        call = _Call(batch)
        with self._cond:
            if self._closed:
                raise ConfigError("the service is shutting down")
            self._pending.append(call)
            self._cond.notify_all()
        return call.future.result()

    def _gather(self) -> list[_Call] | None:
        """Under the condition: the calls of the next batch, or None when closed and drained."""
        while not self._pending:
            if self._closed:
                return None
            self._cond.wait()
        deadline = time.perf_counter() + self.window_s
        while len(self._pending) < self._expected and self._images(self._pending) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self.waits += 1  # a batch waited for requests still decoding (counted for tests and metrics)
            self._cond.wait(left)
        calls: list[_Call] = []
        images = 0
        while self._pending and (not calls or images + len(self._pending[0].batch) <= self.max_batch):
            call = self._pending.pop(0)
            calls.append(call)
            images += len(call.batch)
        return calls

    @staticmethod
    def _images(calls: list[_Call]) -> int:
        return sum(len(c.batch) for c in calls)

    def _serve(self) -> None:
        while True:
            with self._cond:
                calls = self._gather()
            if calls is None:
                return
            try:
                t0 = time.perf_counter()
                out = self.inner.embed(calls[0].batch) if len(calls) == 1 else self.inner.embed(np.concatenate([c.batch for c in calls]))
                self.on_batch(len(out), time.perf_counter() - t0)
            except BaseException as exc:  # every waiting caller gets the error; the worker goes on
                for c in calls:
                    c.future.set_exception(exc)
                continue
            start = 0
            for c in calls:
                c.future.set_result(out[start:start + len(c.batch)])
                start += len(c.batch)

    def close(self) -> None:
        """Finish the calls already queued, stop the worker, close the inner backend."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join()
        self.inner.close()

    @property
    def on_gpu(self) -> bool:
        return self.inner.on_gpu

    def describe(self) -> dict:
        return {**self.inner.describe(), "max_batch": self.max_batch, "batch_window_ms": self.window_s * 1e3}
