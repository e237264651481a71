"""The service's dynamic batcher on a recording backend: concurrent calls share backend calls up to
max_batch, each gets its own rows back, a lone call never waits for the window, errors reach every
caller of the failed batch, max_batch=1 runs calls one by one, close() drains."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from edgemeta.runtime.backends.base import Backend
from edgemeta.runtime.errors import ConfigError
from edgemeta.runtime.preprocess import InputSpec
from edgemeta.runtime.serve.batching import BatchingBackend

SPEC = InputSpec(4, 4, "L")


class Recording(Backend):
    """Embedding = the mean pixel of each image, repeated; records every batch size; optionally slow or failing."""

    name = "recording"

    def __init__(self, delay: float = 0.0, fail_when=lambda batch: False):
        super().__init__(SPEC, 3)
        self.sizes: list[int] = []
        self.batches: list[list[int]] = []  # the pixel value of each image of each call
        self.threads: set[str] = set()
        self.delay, self.fail_when, self.closed = delay, fail_when, False

    def _run(self, batch):
        self.sizes.append(len(batch))
        self.batches.append([int(v) for v in batch.mean(axis=(1, 2, 3))])
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_when(batch):
            raise RuntimeError("device lost")
        return np.repeat(batch.mean(axis=(1, 2, 3))[:, None], 3, axis=1).astype(np.float32)

    def close(self):
        self.closed = True


def images(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 4, 4, 1), value, np.uint8)


def test_concurrent_calls_share_a_batch_and_get_their_own_rows():
    inner = Recording(delay=0.01)
    batcher = BatchingBackend(inner, max_batch=16, window_s=0.05)
    barrier = threading.Barrier(12)

    def call(i: int) -> np.ndarray:
        with batcher.expect():
            barrier.wait()
            return batcher.embed_pixels(images(i, n=1 + i % 2))
    with ThreadPoolExecutor(12) as pool:
        out = list(pool.map(call, range(12)))
    for i, rows in enumerate(out):
        assert rows.shape == (1 + i % 2, 3) and np.all(rows == i)
    assert sum(inner.sizes) == sum(1 + i % 2 for i in range(12))
    assert len(inner.sizes) < 12 and max(inner.sizes) <= 16
    assert inner.threads == {"edgemeta-batcher"}  # one thread owns the backend
    batcher.close()
    assert inner.closed


def test_a_lone_call_does_not_wait_for_the_window():
    batcher = BatchingBackend(Recording(), max_batch=32, window_s=0.1)  # the longest window allowed
    with batcher.expect():
        batcher.embed_pixels(images(1))
    assert batcher.waits == 0          # no request was still decoding: the batch went at once
    with batcher.expect(), batcher.expect():   # a second request still decoding: the batch waits for it
        batcher.embed_pixels(images(1))
    assert batcher.waits >= 1
    batcher.close()


def test_max_batch_one_runs_calls_one_by_one():
    inner = Recording(delay=0.002)
    batcher = BatchingBackend(inner, max_batch=1, window_s=0.002)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: batcher.embed_pixels(images(i)), range(8)))
    assert inner.sizes == [1] * 8
    batcher.close()


def test_an_error_reaches_every_caller_of_the_batch_and_the_worker_goes_on():
    inner = Recording(delay=0.01, fail_when=lambda batch: (batch == 99).any())
    batcher = BatchingBackend(inner, max_batch=8, window_s=0.05)
    barrier = threading.Barrier(4)

    def call(v: int):
        with batcher.expect():
            barrier.wait()
            try:
                return batcher.embed_pixels(images(v))
            except RuntimeError as exc:
                return exc
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(call, [1, 2, 99, 3]))
    failed = {v for v, o in zip([1, 2, 99, 3], out) if isinstance(o, RuntimeError)}
    assert failed == set(next(b for b in inner.batches if 99 in b))  # exactly the callers of the failed call
    assert all(np.all(o == v) for v, o in zip([1, 2, 99, 3], out) if v not in failed)
    assert np.all(batcher.embed_pixels(images(5)) == 5)  # still serving
    batcher.close()


def test_close_drains_then_refuses():
    inner = Recording(delay=0.02)
    batcher = BatchingBackend(inner, max_batch=4, window_s=0.0)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.embed_pixels, images(i)) for i in range(3)]
        time.sleep(0.005)
        batcher.close()
        assert [float(f.result()[0, 0]) for f in futures] == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match="shutting down"):
        batcher.embed_pixels(images(1))


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_batch": 5000}, {"window_s": -1.0}, {"window_s": 1.0}])
def test_settings_are_checked(kwargs):
    with pytest.raises(ConfigError):
        BatchingBackend(Recording(), **kwargs)


@pytest.mark.parametrize("providers, window", [
    (["CPUExecutionProvider"], 0.0),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], 2.0),
    (["TensorrtExecutionProvider", "CPUExecutionProvider"], 2.0),
    ("tensorrt", 2.0),
])
def test_the_default_window_waits_only_on_a_gpu(providers, window):
    """Each backend says whether it is on a GPU (Backend.on_gpu); the service no longer guesses
    from its name."""
    import types

    pytest.importorskip("fastapi", reason="edgemeta[serve] is part of the dev install")
    from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgemeta.runtime.backends.tensorrt import TensorRTBackend
    from edgemeta.runtime.serve.app import default_window_ms
    if providers == "tensorrt":
        backend = TensorRTBackend.__new__(TensorRTBackend)
        backend.spec, backend.embedding_dim = SPEC, 4
    else:
        backend = OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)
        backend.session = types.SimpleNamespace(get_providers=lambda: providers)
        backend.spec, backend.embedding_dim = SPEC, 4
    assert default_window_ms(backend) == window
    assert BatchingBackend(backend, 4).on_gpu is (window > 0)
