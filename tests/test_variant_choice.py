"""`--variant auto`: measured once per machine, recorded beside the bundle, never slower than fp32,
never an INT8 graph whose recorded accuracy cost is over a point. Torch-free tiny bundle."""
from __future__ import annotations

import json

import numpy as np
from edgemeta.runtime import FewShotClassifier, load_bundle
from edgemeta.runtime.variant_choice import RECORD, choose_variant


def with_int8(bundle_dir, cost_points: float):
    """The tiny bundle with an 'int8' variant entry (its fp32 graph stands in for it) of a given cost."""
    from edgemeta.runtime.bundle import read_manifest, write_manifest
    m = read_manifest(bundle_dir)
    m["variants"]["int8"] = {"file": "embed.onnx", "accuracy_delta_points": cost_points}
    write_manifest(bundle_dir, m)
    return load_bundle(bundle_dir)


def test_the_choice_follows_the_measurement_and_is_recorded(device_bundle):
    cpu = ["CPUExecutionProvider"]
    timings = iter([2.0, 1.0])          # fp32 2 ms, int8 1 ms
    b = with_int8(device_bundle, -0.3)
    assert choose_variant(b, cpu, measure=lambda path: next(timings)) == "int8"
    record = json.loads((device_bundle / RECORD).read_text())
    (entry,) = record.values()
    assert entry["choice"] == "int8" and entry["ms_batch1"] == {"fp32": 2.0, "int8": 1.0}
    # later runs read the record: no measurement
    assert choose_variant(b, cpu, measure=lambda path: 1 / 0) == "int8"


def test_never_slower_than_fp32_nor_over_a_point_of_accuracy(device_bundle, tmp_path):
    cpu = ["CPUExecutionProvider"]
    b = with_int8(device_bundle, -0.3)
    slow = iter([1.0, 1.6])             # INT8 slower than fp32 on this CPU (the S8S8 case): fp32
    assert choose_variant(b, cpu, measure=lambda path: next(slow)) == "fp32"
    (device_bundle / RECORD).unlink()
    costly = with_int8(device_bundle, -2.5)
    measured = []
    assert choose_variant(costly, cpu, measure=lambda path: measured.append(path) or 0.5) == "fp32"
    assert len(measured) == 1           # the 2.5-point INT8 graph is not even a candidate


def test_a_classifier_opened_with_auto_runs_and_records_its_graph(device_bundle, tmp_path):
    clf = FewShotClassifier.load(device_bundle, store=tmp_path / "s", variant="auto")
    assert clf.variant == "fp32"        # the tiny bundle has fp32 only
    clf.enroll("a", np.zeros((1, 16, 16, 1), np.uint8))
    assert (device_bundle / RECORD).exists()
