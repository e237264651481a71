#!/usr/bin/env bash
# Every check that needs TensorRT and a CUDA device, in one command, for whoever has one (a Jetson
# with JetPack ≥ 6.1, or an x86 GPU machine with `pip install -e '.[dev,tensorrt]'`). On the CPU CI
# machines these checks skip; nothing in the project is called "verified on TensorRT" until this
# script has passed on a device. Writes its outputs under OUT (default gpu-check/).
set -euo pipefail
OUT="${1:-gpu-check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
"$PY" - <<'PYEOF'
from edgemeta.runtime.device_info import device_identity
d = device_identity()
print("device:", d)
assert d["tensorrt_version"] and d["compute_capability"], "TensorRT and a CUDA device are needed: " + str(d.get("cuda_error"))
PYEOF
"$PY" -m pytest -q -m gpu tests/test_tensorrt_logic.py -rs | tee "$OUT/pytest-gpu.txt"
"$PY" -m pytest -q tests/test_tensorrt_fakes.py tests/test_tensorrt_logic.py | tee "$OUT/pytest-control-flow.txt"
edgemeta export checkpoints/omniglot-conv4-protonet.safetensors --out "$OUT/bundle" --int8 --fp16 --overwrite \
    --calib-data data/omniglot/images_background_small2.zip
for p in fp32 fp16 int8; do
  edgemeta build-engine "$OUT/bundle" --precision "$p" --batch 1:8:32 --timing-cache "$OUT/trt.cache"
  edgemeta bench "$OUT/bundle" --backend tensorrt --variant "$p" --json "$OUT/bench-$p.json" --plot "$OUT/bench-$p.png"
  edgemeta eval --bundle "$OUT/bundle" --variant "$p" --data data/omniglot/images_background_small2.zip \
      --split all --episodes 300 --json | tee "$OUT/eval-$p.json"
done
edgemeta inspect "$OUT/bundle" | tee "$OUT/inspect.txt"
echo "all GPU checks passed; outputs in $OUT"
