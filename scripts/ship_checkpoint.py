"""Make a run's best checkpoint into the one that ships in checkpoints/: deployable weights only,
CL2N's feature mean stored (computed on the training split, so `edgemeta export --center` needs no
training data), with --half float16 weights (half the size; BatchNorm statistics stay float32), and
with --center CL2N recorded as the checkpoint's deployment (`export`/`eval` centre by default).

    python scripts/ship_checkpoint.py runs/cifarfs-resnet12-pretrain/best.safetensors \
        checkpoints/cifarfs-resnet12-pretrain.safetensors --half --flip-shots
"""
from __future__ import annotations

import argparse
import sys

from edgemeta.runtime.errors import EdgemetaError

from edgemeta.checkpoint import ship_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--half", action="store_true", help="store float weights in float16")
    ap.add_argument("--flip-shots", action="store_true", help="the device head enrolls flipped shots")
    ap.add_argument("--center", action="store_true", help="export and eval use CL2N features unless told --no-center")
    args = ap.parse_args()
    try:
        path = ship_checkpoint(args.src, args.dst, half=args.half, flip_shots=args.flip_shots, center=args.center)
    except EdgemetaError as exc:  # a missing data root, a checkpoint that is not one: one line, nothing written
        sys.exit(f"error: {exc}")
    print(f"{path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
