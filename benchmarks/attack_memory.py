"""The service's memory and answers under the hostile probe's concurrent attacks (docs/reliability.md),
measured on a real `edgemeta serve` on 127.0.0.1: its peak resident memory (VmHWM) over each attack,
what the attacker's requests were answered, and whether a key holder is served meanwhile.

    python benchmarks/attack_memory.py BUNDLE [--python PYTHON_OR_COMMAND] [--json OUT]

--python runs the service with another edgemeta (e.g. a worktree of an earlier commit through a
small launcher), so before and after are measured with the same attacks on the same machine.
Attacks: (1) 8 concurrent .ico files whose entry points at a 9400×9400 PNG; (2) 256 sockets that send
nothing, then an authenticated request; (10) 64 concurrent 31 MB bodies.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Service:
    def __init__(self, python: list[str], bundle: str, store: Path, key: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*python, "serve", bundle, "--store", str(store), "--port", str(self.port),
                                      "--api-key-file", str(key)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import httpx
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not start")

    def child_pid(self) -> int:
        """The process that serves (a launcher may exec or fork: the deepest child, else itself)."""
        pid = self.proc.pid
        while True:
            children = Path(f"/proc/{pid}/task/{pid}/children")
            kids = children.read_text().split() if children.exists() else []
            if not kids:
                return pid
            pid = int(kids[0])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ico_bomb() -> bytes:
    from PIL import Image
    big = io.BytesIO()
    Image.new("RGBA", (9400, 9400), (10, 20, 30, 255)).save(big, "PNG")   # 88 MP, a few hundred kB
    png = big.getvalue()
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def concurrently(n: int, fn) -> list:
    out: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--python", default=f"{Path(sys.executable).with_name('edgemeta')}",
                    help="the command that runs edgemeta (default: this environment's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    import httpx
    python = shlex.split(args.python)
    results: dict = {"machine": machine(), "command": args.python, "attacks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        key.write_text("k" * 32)
        os.chmod(key, 0o600)
        headers = {"x-api-key": "k" * 32}
        from PIL import Image
        ok_png = io.BytesIO()
        Image.new("L", (16, 16), 90).save(ok_png, "PNG")

        s = Service(python, args.bundle, Path(tmp) / "s1", key)
        try:
            httpx.post(s.url + "/v1/classes/mug/images", files=[("images", ("m.png", ok_png.getvalue(), "image/png"))],
                       headers=headers, timeout=30)
            pid, before = s.child_pid(), None
            before = peak_rss_mb(pid)
            icon = ico_bomb()
            statuses = concurrently(8, lambda i: httpx.post(s.url + "/v1/predict", headers={**headers, "content-type": "application/octet-stream"},
                                                            content=icon, timeout=120).status_code)
            results["attacks"]["1 ico x8"] = {"statuses": sorted(set(statuses)), "peak_rss_mb_before": round(before),
                                              "peak_rss_mb_after": round(peak_rss_mb(pid))}
            idle = []
            for _ in range(256):
                idle.append(socket.create_connection(("127.0.0.1", s.port)))
            t0 = time.monotonic()
            r = httpx.get(s.url + "/v1/classes", headers=headers, timeout=30)
            results["attacks"]["2 idle sockets x256"] = {"key_holder_status": r.status_code,
                                                         "key_holder_seconds": round(time.monotonic() - t0, 3)}
            for sock in idle:
                sock.close()
            time.sleep(1)
            body = b"\xff" * (31 << 20)
            before = peak_rss_mb(pid)
            statuses = concurrently(64, lambda i: _post_body(s.url, body, headers))
            time.sleep(2)
            results["attacks"]["10 bodies 31 MB x64"] = {"statuses": sorted(set(statuses)),
                                                         "peak_rss_mb_before": round(before),
                                                         "peak_rss_mb_after": round(peak_rss_mb(pid)),
                                                         "rss_mb_after_2_s": round(rss_mb(pid))}
        finally:
            s.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _post_body(url: str, body: bytes, headers: dict):
    import httpx
    try:
        return httpx.post(url + "/v1/predict", headers={**headers, "content-type": "image/png"}, content=body,
                          timeout=120).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


if __name__ == "__main__":
    main()
