#!/usr/bin/env bash
# The workstation half of the GPU check (needs the training extra): export the shipped Omniglot
# checkpoint with INT8 and FP16 variants, freeze a classifier from a small store, and embed reference
# images with ONNX Runtime (fp32, CPU) for the device to compare its engines with. Copy OUT to the
# device and run scripts/gpu_check_device.sh OUT there.
set -euo pipefail
OUT="${1:-gpu-check}"
PY="${PYTHON:-python}"
DATA=data/omniglot/images_background_small2.zip
mkdir -p "$OUT"
cp "$DATA" "$OUT/omniglot-eval.zip"   # MIT-licensed drawings (data/omniglot/LICENSE): episodes for the device's eval
edgemeta export checkpoints/omniglot-conv4-protonet.safetensors --out "$OUT/bundle" --int8 --fp16 --overwrite --calib-data "$DATA"
"$PY" - "$OUT" "$DATA" <<'PYEOF'
import sys, zipfile
from pathlib import Path
import numpy as np
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.preprocess import load_images
out, data = Path(sys.argv[1]), sys.argv[2]
with zipfile.ZipFile(data) as z:
    names = sorted(n for n in z.namelist() if "/Tagalog/" in n and n.endswith(".png"))
    images = [z.read(n) for n in names[:64]]
clf = FewShotClassifier.load(out / "bundle", store=out / "store", backend="onnxruntime")
by_class = {}
for n, img in zip(names, images):
    by_class.setdefault(n.split("/")[-2], []).append(img)
for c in sorted(by_class)[:3]:
    if c not in clf.classes:
        clf.enroll(c, by_class[c][:3])
pixels = load_images(images, clf.bundle.spec)
np.savez(out / "reference.npz", pixels=pixels, embeddings=clf.backend.embed_pixels(pixels))
print(f"reference: {len(pixels)} images embedded with ONNX Runtime fp32")
PYEOF
edgemeta freeze "$OUT/bundle" --store "$OUT/store" --out "$OUT/frozen" --overwrite
echo "workstation half done: copy $OUT to the device and run scripts/gpu_check_device.sh $OUT"
