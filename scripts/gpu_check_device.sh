#!/usr/bin/env bash
# The device half of the GPU check, with the device install alone (docs/jetson.md: the wheel,
# cuda-python, JetPack's TensorRT; no torch, no onnx). OUT comes from scripts/gpu_check_workstation.sh.
# Nothing in edgemeta is called "verified on TensorRT" until this has passed on a device.
set -euo pipefail
OUT="${1:-gpu-check}"
PY="${PYTHON:-python}"
# 1. cuda-python first: a mismatched build fails here with cudaErrorInsufficientDriver (35)
"$PY" -c "from cuda.bindings import runtime as rt; e, v = rt.cudaRuntimeGetVersion(); assert int(e) == 0, e; e2, d = rt.cudaDriverGetVersion(); assert int(e2) == 0, e2; print('cuda-python OK: runtime', v, 'driver', d)"
"$PY" -c "from edgemeta.runtime.device_info import device_identity as d; i = d(); print('device:', i); assert i['tensorrt_version'] and i['compute_capability'], i"
for p in fp32 fp16 int8; do
  edgemeta build-engine "$OUT/bundle" --precision "$p" --batch 1:8:64 --timing-cache "$OUT/trt.cache"
  edgemeta bench "$OUT/bundle" --backend tensorrt --variant "$p" --json "$OUT/bench-$p.json" --plot "$OUT/bench-$p.png"
  edgemeta eval --bundle "$OUT/bundle" --variant "$p" --data "$OUT/omniglot-eval.zip" --split all --episodes 300 --json \
      | tee "$OUT/eval-$p.json"
  # 2. each engine against the workstation's ONNX Runtime fp32 embeddings of the same pixels
  "$PY" - "$OUT" "$p" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from edgemeta.runtime.backends import open_backend
from edgemeta.runtime.bundle import load_bundle
out, variant = Path(sys.argv[1]), sys.argv[2]
ref = np.load(out / "reference.npz")
backend = open_backend(load_bundle(out / "bundle"), "tensorrt", variant=variant)
got = backend.embed_pixels(ref["pixels"])
rel = float(np.abs(got - ref["embeddings"]).max() / np.abs(ref["embeddings"]).max())
limit = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}[variant]
print(f"{variant}: TensorRT vs ONNX Runtime fp32, max relative difference {rel:.2e} (limit {limit:g})")
assert rel < limit
PYEOF
done
edgemeta build-engine "$OUT/frozen" --precision fp32 --batch 1:8:64
edgemeta bench "$OUT/frozen" --backend tensorrt --json "$OUT/bench-frozen.json"
edgemeta inspect "$OUT/bundle" | tee "$OUT/inspect.txt"
echo "all device checks passed; outputs in $OUT"
