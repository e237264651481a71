"""`edgemeta serve` against the in-process call, side by side (docs/benchmarks.md §12):

1. latency of one 64×64 image: HTTP POST /v1/predict (keep-alive, raw image/png body) vs
   `FewShotClassifier.predict` on the same bytes in this process — p50 / p99 and what HTTP adds;
2. throughput at 1, 4 and 16 concurrent clients (one process each, keep-alive) with dynamic
   batching off (--max-batch 1), on with the 2 ms window (the default on a GPU) and on without
   waiting (--batch-window-ms 0, the default on a CPU: requests queued while the backend is busy
   share the next call).

    python benchmarks/serve_latency.py [--checkpoint checkpoints/tinyimagenet-edgenet-pretrain.safetensors] [--seconds 3] [--rounds 3]

The server and the clients share this machine's cores, as they would on a device serving a local
camera page; the figures are for comparing the rows of one run, not absolute.
"""
from __future__ import annotations

import argparse
import http.client
import io
import multiprocessing as mp
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from common import ROOT, SHIPPED_DATA, machine
from PIL import Image

sys.path.insert(0, str(ROOT / "tests"))
from edgemeta.export import ExportOptions, export_checkpoint  # noqa: E402
from edgemeta.runtime import FewShotClassifier  # noqa: E402
from serve_helpers import Server  # noqa: E402


def drawings(n_chars: int = 10) -> dict[str, list[bytes]]:
    """Shipped Omniglot drawings (Tagalog), as 64×64 RGB PNGs: the bundle's input size, so the
    server's decode is the small one of a camera page's frames."""
    by: dict[str, list[bytes]] = {}
    with zipfile.ZipFile(SHIPPED_DATA[1]) as z:
        for name in sorted(z.namelist()):
            if "/Tagalog/" in name and name.endswith(".png"):
                image = Image.open(io.BytesIO(z.read(name))).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                by.setdefault(name.split("/")[-2], []).append(buf.getvalue())
    return {c: by[c] for c in sorted(by)[:n_chars]}


def post(conn: http.client.HTTPConnection, body: bytes) -> float:
    t0 = time.perf_counter()
    conn.request("POST", "/v1/predict", body=body, headers={"content-type": "image/png"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - t0


def client(port: int, images: list[bytes], seconds: float, start: float, out) -> None:
    """One client: requests back to back from `start` for `seconds`; puts (count, latencies)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    post(conn, images[0])
    while time.time() < start:
        time.sleep(0.001)
    latencies, i = [], 0
    while time.time() < start + seconds:
        latencies.append(post(conn, images[i % len(images)]))
        i += 1
    out.put((i, latencies))


def throughput(port: int, images: list[bytes], clients: int, seconds: float) -> tuple[float, float]:
    out: mp.Queue = mp.Queue()
    start = time.time() + 1.0
    procs = [mp.Process(target=client, args=(port, images[k::clients] or images, seconds, start, out)) for k in range(clients)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    count = sum(r[0] for r in results)
    p50 = float(np.median(np.concatenate([r[1] for r in results]))) * 1e3
    return count / seconds, p50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints/tinyimagenet-edgenet-pretrain.safetensors"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    export_checkpoint(args.checkpoint, tmp / "bundle", ExportOptions())
    by = drawings()
    with FewShotClassifier.load(tmp / "bundle", store=tmp / "store") as clf:
        clf.enroll_many({c: imgs[:5] for c, imgs in by.items()})
    queries = [img for imgs in by.values() for img in imgs[5:20]]
    print(f"# {machine()}; {Path(args.checkpoint).name}, 10 classes enrolled (5 shots), one 64×64 PNG per request")

    server = Server(tmp / "bundle", tmp / "store", "--max-batch", "32")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port)
        with FewShotClassifier.load(tmp / "bundle", store=tmp / "store") as clf:
            local, remote = [], []
            for i in range(50):  # warm-up, both
                clf.predict([queries[i % len(queries)]])
                post(conn, queries[i % len(queries)])
            for i in range(args.requests):  # interleaved, so noise hits both alike
                q = queries[i % len(queries)]
                t0 = time.perf_counter()
                clf.predict([q])
                local.append(time.perf_counter() - t0)
                remote.append(post(conn, q))
        lo, re_ = np.percentile(local, [50, 99]) * 1e3, np.percentile(remote, [50, 99]) * 1e3
        print(f"latency, {args.requests} requests: in-process predict p50 {lo[0]:.3f} ms, p99 {lo[1]:.3f} ms · "
              f"HTTP p50 {re_[0]:.3f} ms, p99 {re_[1]:.3f} ms · HTTP adds {re_[0] - lo[0]:.3f} ms at p50")
    finally:
        server.stop()

    configs = {"off": ("--max-batch", "1"), "on, 2 ms": ("--max-batch", "32", "--batch-window-ms", "2"),
               "on, no wait": ("--max-batch", "32", "--batch-window-ms", "0")}
    servers = {name: Server(tmp / "bundle", tmp / "store", *flags) for name, flags in configs.items()}
    rows: dict = {}
    try:
        for _ in range(args.rounds):  # interleaved rounds: off, on, off, on … so drift hits both alike
            for clients in (1, 4, 16):
                for name, server in servers.items():
                    rows.setdefault((name, clients), []).append(throughput(server.port, queries, clients, args.seconds))
    finally:
        for server in servers.values():
            server.stop()
    print(f"throughput, median of {args.rounds} interleaved rounds of {args.seconds:g} s (requests/s, client p50):")
    for clients in (1, 4, 16):
        med = {name: np.median(np.array(rows[name, clients]), axis=0) for name in configs}
        cells = " · ".join(f"{name} {m[0]:6.1f} req/s ({m[1]:.2f} ms)" for name, m in med.items())
        ratios = ", ".join(f"{name}/off {med[name][0] / med['off'][0]:.2f}×" for name in configs if name != "off")
        print(f"  {clients:2d} clients: {cells} · {ratios}")


if __name__ == "__main__":
    main()
