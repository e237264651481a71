#!/usr/bin/env bash
# `make demo`: the whole path on the data that ships with the repository, on a fresh machine.
#   1. a short meta-training run + evaluation
#   2. the shipped checkpoint evaluated on alphabets it never saw
#   3. export to a bundle (ONNX, parity-checked, + INT8)
#   4. the device side: enroll characters from a folder of images, classify held-out drawings
#   5. latency on this machine
# PHOTOS=DIR (your own photos, one subfolder per class) enrolls those with the RGB checkpoint in step 4.
set -euo pipefail
OUT="${1:-demo-out}"
DATA=(--data data/omniglot/images_background_small1.zip --data data/omniglot/images_background_small2.zip)
CKPT=checkpoints/omniglot-conv4-protonet.safetensors
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. a short ProtoNet run on the shipped Omniglot slice (alphabets split by seed)"
edgemeta train "${DATA[@]}" --split-mode seeded --way 20 --episodes 100 --val-every 50 --val-episodes 100 \
  --out "$OUT/run"
edgemeta eval "$OUT/run/best.safetensors" "${DATA[@]}" --split-mode seeded --episodes 300

step "2. the shipped checkpoint (trained on the full background set) on its 6 unseen test alphabets"
edgemeta eval "$CKPT" "${DATA[@]}" --episodes 300 --shot 1
edgemeta eval "$CKPT" "${DATA[@]}" --episodes 300 --shot 5 --way 20

step "3. export: parity-checked ONNX + INT8 bundle"
edgemeta export "$CKPT" --out "$OUT/bundle" --int8 --calib-data data/omniglot/images_background_small2.zip --overwrite
edgemeta inspect "$OUT/bundle"

step "4. on the device: enroll classes from a folder, then classify held-out images"
rm -rf "$OUT/store"
if [ -n "${PHOTOS:-}" ]; then
  # your photos: the ImageNet-pretrained, fine-tuned EfficientNet-Lite0 (160×160, CL2N), calibrated on your own images
  edgemeta export checkpoints/tinyimagenet-efficientnet-lite0-finetune.safetensors --out "$OUT/rgb-bundle" --calib-data "$PHOTOS" --overwrite
  edgemeta enroll "$OUT/rgb-bundle" --store "$OUT/store" --from-folder "$PHOTOS"
  edgemeta classes --store "$OUT/store"
else
  python scripts/demo_photos.py data/omniglot/images_background_small2.zip "$OUT/photos" "$OUT/queries"
  edgemeta enroll "$OUT/bundle" --store "$OUT/store" --from-folder "$OUT/photos"
  edgemeta predict "$OUT/bundle" --store "$OUT/store" "$OUT"/queries/*.png --json > "$OUT/predictions.json"
  python scripts/demo_photos.py --score "$OUT/predictions.json"
  edgemeta predict "$OUT/bundle" --store "$OUT/store" "$OUT"/queries/character03__0.png --top-k 3
fi

step "5. latency on this machine (edgemeta bench)"
edgemeta bench "$OUT/bundle" --images data/omniglot/images_background_small2.zip --repeat 20 \
  --json "$OUT/bench.json" --plot "$OUT/bench.png"
