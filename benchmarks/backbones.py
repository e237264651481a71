"""Backbone latency side by side: ONNX Runtime fp32 and INT8 vs PyTorch eager (and torch.compile
when it runs here), batch 1 and 32, each backbone; plus FLOPs and the fraction of this CPU's
measured matmul peak each backend reaches (the compute floor).

    python benchmarks/backbones.py [--threads 2] [--size 28] [--colour L]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHIPPED_DATA, fmt_ms, interleaved, machine


def conv_flops(model, x) -> float:
    """Multiply-adds ×2 of every Conv2d and Linear for one forward pass of x (batch 1)."""
    import torch
    total = [0.0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
            total[0] += 2.0 * out.numel() * k
        elif isinstance(m, torch.nn.Linear):
            total[0] += 2.0 * out.numel() * m.in_features
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


def matmul_peak_gflops(threads: int, size: int = 2048, trials: int = 5) -> float:
    """This CPU's measured float32 GEMM throughput through torch: the best of several trials of a
    large square matmul (a practical peak; the theoretical FMA peak is higher)."""
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 2 * size ** 3 * 5 / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--colour", default="L")
    ap.add_argument("--backbones", default="conv4,edgenet,resnet12")
    args = ap.parse_args()
    import torch
    from edgemeta.export.onnx_graph import export_onnx
    from edgemeta.export.quantize import quantize_int8
    from edgemeta.runtime import InputSpec, pixels_to_batch
    from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend

    from edgemeta.backbones import Embedder
    from edgemeta.data import load_dataset
    torch.set_num_threads(args.threads)
    spec = InputSpec(args.size, args.size, args.colour)
    data = load_dataset(SHIPPED_DATA, args.size, args.colour)
    real = pixels_to_batch(data.pixels[np.random.default_rng(0).choice(len(data), 256, replace=False)])
    peak = matmul_peak_gflops(args.threads)
    print(f"machine: {machine()}; threads {args.threads}; input {args.colour} {args.size}×{args.size}; "
          f"torch {torch.__version__}; matmul peak {peak:.1f} GFLOP/s")
    print(f"{'backbone':>9} {'batch':>5} | {'torch eager':>11} | {'compile':>9} | {'ORT fp32':>9} | {'ORT int8':>9} | "
          f"{'fp32/eager':>10} | {'int8/eager':>10} | {'MFLOP/img':>9} | % of peak (eager, fp32, int8-as-fp32-flops)")
    for name in args.backbones.split(","):
        model = Embedder(name, spec).eval()
        flops = conv_flops(model, torch.zeros(1, spec.channels, args.size, args.size))
        with tempfile.TemporaryDirectory() as tmp:
            fp32_path, int8_path = Path(tmp) / "m.onnx", Path(tmp) / "m.int8.onnx"
            export_onnx(model, spec, fp32_path)
            quantize_int8(fp32_path, int8_path, real[:128], "pixels")
            ort32 = OnnxRuntimeBackend(fp32_path, spec, model.embed_dim, "cpu", threads=args.threads)
            ort8 = OnnxRuntimeBackend(int8_path, spec, model.embed_dim, "cpu", threads=args.threads)
            try:
                compiled = torch.compile(model)
                with torch.no_grad():
                    compiled(torch.from_numpy(real[:1]))
            except Exception as exc:  # report, do not hide
                compiled = None
                print(f"  torch.compile does not run here for {name}: {type(exc).__name__}")
            for batch in (1, 32):
                x = real[:batch]
                xt = torch.from_numpy(x)

                def eager():
                    with torch.no_grad():
                        model(xt)
                fns = {"eager": eager, "fp32": lambda: ort32.embed(x), "int8": lambda: ort8.embed(x)}
                if compiled is not None:
                    def comp():
                        with torch.no_grad():
                            compiled(xt)
                    fns["compile"] = comp
                t = interleaved(fns, rounds=5, repeats=10 if name == "resnet12" else 30)
                pct = lambda s: 100 * flops * batch / s / 1e9 / peak  # noqa: E731
                print(f"{name:>9} {batch:>5} | {fmt_ms(t['eager']):>11} | {fmt_ms(t['compile']) if 'compile' in t else 'n/a':>9} | "
                      f"{fmt_ms(t['fp32']):>9} | {fmt_ms(t['int8']):>9} | {t['eager'] / t['fp32']:>9.2f}× | "
                      f"{t['eager'] / t['int8']:>9.2f}× | {flops / 1e6:>9.2f} | "
                      f"{pct(t['eager']):.1f}%, {pct(t['fp32']):.1f}%, {pct(t['int8']):.1f}%")


if __name__ == "__main__":
    main()
