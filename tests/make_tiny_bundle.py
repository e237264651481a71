"""Make tests/tiny_bundle/: a real edgemeta bundle small enough to check in, built without torch.

embed.onnx is a two-convolution network (16×16 greyscale → 16-d embedding, fixed random weights)
written with onnx.helper; the manifest and checksums are the runtime's own. The runtime, store,
service, gallery, watch and TensorRT-fake tests run on it in seconds, in the torch-free device
environment too; end-to-end tests keep using trained bundles. Re-run after a bundle format change:

    python tests/make_tiny_bundle.py      # then commit tests/tiny_bundle/
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "tiny_bundle"
SIZE, DIM = 16, 16


def build_model(seed: int = 0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (DIM, 8, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array([1 / 127.5], np.float32), "scale"),
             numpy_helper.from_array(np.array([-1.0], np.float32), "shift"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(DIM, np.float32), "b2")]
    nodes = [helper.make_node("Mul", ["input", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "shift"], ["normalized"]),
             helper.make_node("Conv", ["normalized", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgemeta")
    model.ir_version = 8  # what ONNX Runtime 1.17+ and TensorRT 10 read
    onnx.checker.check_model(model, full_check=True)
    return model


def write_tiny_bundle(out: Path, seed: int = 0) -> Path:
    """The tiny bundle (another seed: another model, for tests that need two) written to `out`."""
    from edgemeta.runtime.bundle import SCHEMA, SCHEMA_VERSION, register_file, write_manifest
    from edgemeta.runtime.heads import HeadConfig
    from edgemeta.runtime.preprocess import InputSpec
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    (out / "embed.onnx").write_bytes(build_model(seed).SerializeToString())
    spec = InputSpec(SIZE, SIZE, "L", (0.5,), (0.5,))
    manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "edgemeta_version": "tests",
                "created": "2026-12-03T00:00:00+00:00",
                "model": {"backbone": "tiny-test-network", "algorithm": None, "source": "tests/make_tiny_bundle.py",
                          "opset": 17, "parameters": 8 * 9 + 8 + DIM * 8 * 9 + DIM, "pretrained": {}},
                "input": {"name": "input", **spec.to_dict()},
                "output": {"name": "embedding", "dim": DIM, "l2_normalized": False},
                "head": HeadConfig(kind="prototype").to_dict(), "files": {}, "variants": {}, "engines": []}
    register_file(out, manifest, "embed.onnx", "fp32")
    manifest["variants"]["fp32"] = {"file": "embed.onnx"}
    write_manifest(out, manifest)
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(f"wrote {write_tiny_bundle(OUT)}")


if __name__ == "__main__":
    main()
