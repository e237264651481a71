"""The optimised-graph cache of the CPU provider (runtime/backends/ort_graph_cache.py): the first
session saves the graph ONNX Runtime optimised, later ones load it; what they embed is the same to
the bit; a damaged copy is never run; a cache that cannot be written changes nothing but speed."""
import shutil

import numpy as np
import pytest
from conftest import TINY_BUNDLE, run_cli
from edgemeta.runtime import load_bundle
from edgemeta.runtime.backends import open_backend
from edgemeta.runtime.backends import ort_graph_cache as cache
from edgemeta.runtime.bundle import sha256_file
from PIL import Image


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMETA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / cache.FOLDER


def _embed(bundle, pixels, variant="fp32"):
    backend = open_backend(load_bundle(bundle), "onnxruntime:cpu", variant)
    return backend, backend.embed(pixels)


def test_the_second_session_loads_the_saved_graph_and_embeds_the_same(fresh_cache, tiny_bundle, omniglot):
    pixels = omniglot.pixels[:8].transpose(0, 3, 1, 2).astype(np.float32)
    for variant in ("fp32", "int8"):  # int8: the U8S8 graph the CPU provider runs
        first, a = _embed(tiny_bundle, pixels, variant)
        assert first.optimized_graph is None
        name = load_bundle(tiny_bundle).variant_file(variant, cpu=True)
        key = cache.graph_key(load_bundle(tiny_bundle).manifest["files"][name]["sha256"])
        saved = list(fresh_cache.glob(f"{key}-*.onnx"))
        assert len(saved) == 1 and saved[0].name == f"{key}-{sha256_file(saved[0])}.onnx"
        second, b = _embed(tiny_bundle, pixels, variant)
        assert second.optimized_graph == saved[0] and second.describe()["model"] == name
        assert second.describe()["optimized_graph"] == saved[0].name   # no host paths in what the service shows
        np.testing.assert_array_equal(a, b)
    assert not list(fresh_cache.glob("*.tmp"))  # no temporary file left behind


def test_a_damaged_saved_graph_is_removed_and_made_again(fresh_cache, tiny_bundle, omniglot):
    pixels = omniglot.pixels[:4].transpose(0, 3, 1, 2).astype(np.float32)
    _, before = _embed(tiny_bundle, pixels)
    (saved,) = fresh_cache.glob("*.onnx")
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF                       # a weight changed: the graph would still load
    saved.write_bytes(bytes(data))
    backend, after = _embed(tiny_bundle, pixels)
    assert backend.optimized_graph is None             # not run: made again from the bundle's graph
    np.testing.assert_array_equal(before, after)
    (remade,) = fresh_cache.glob("*.onnx")
    assert remade.name.endswith(f"-{sha256_file(remade)}.onnx")
    saved.write_bytes(b"not a graph at all")           # a copy ONNX Runtime refuses, named as if whole
    saved.rename(saved.with_name(saved.name.rpartition("-")[0] + f"-{sha256_file(saved)}.onnx"))
    _, again = _embed(tiny_bundle, pixels)
    np.testing.assert_array_equal(before, again)


def test_a_cache_that_cannot_be_written_costs_only_the_speed_up(tmp_path, monkeypatch, tiny_bundle, omniglot):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("EDGEMETA_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be made
    pixels = omniglot.pixels[:4].transpose(0, 3, 1, 2).astype(np.float32)
    backend, out = _embed(tiny_bundle, pixels)
    assert backend.optimized_graph is None and out.shape == (4, 64)


def test_the_key_changes_with_the_graph_the_runtime_and_the_cpu(monkeypatch):
    import edgemeta.runtime.device_info as device_info
    base = cache.graph_key("a" * 64)
    assert cache.graph_key("b" * 64) != base and cache.graph_key("a" * 64) == base
    monkeypatch.setattr(device_info, "cpu_features", lambda cpuinfo=None: "avx2 fma sse4_2")  # AVX-512 hidden
    assert cache.graph_key("a" * 64) != base
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    assert cache.graph_key("a" * 64) != base


def test_the_folder_keeps_the_most_recently_used_graphs_within_its_size(fresh_cache, tiny_bundle, omniglot, monkeypatch):
    """…and what a process killed while saving left there (a temporary file over an hour old)."""
    import os
    import time
    pixels = omniglot.pixels[:2].transpose(0, 3, 1, 2).astype(np.float32)
    _embed(tiny_bundle, pixels, "fp32")
    (fp32,) = fresh_cache.glob("*.onnx")
    os.utime(fp32, (1, 1))                                   # long unused
    stale, saving = fresh_cache / ".abc.1.dead.tmp", fresh_cache / ".abc.2.live.tmp"
    stale.write_bytes(b"torn")
    saving.write_bytes(b"being written")
    os.utime(stale, (time.time() - 7200,) * 2)
    monkeypatch.setattr(cache, "MAX_BYTES", fp32.stat().st_size + 1)
    _embed(tiny_bundle, pixels, "int8")                      # saving a second graph goes over the limit
    (kept,) = fresh_cache.glob("*.onnx")
    assert kept != fp32 and not fp32.exists()
    assert not stale.exists() and saving.exists()


def test_a_damaged_bundle_graph_is_refused_even_with_its_optimised_copy_saved(fresh_cache, tmp_path):
    """A damaged embed.onnx was never checked while its optimised copy sat in the cache: the copy ran."""
    from edgemeta.runtime import BundleError
    bundle = shutil.copytree(TINY_BUNDLE, tmp_path / "b")
    pixels = np.zeros((1, 1, 16, 16), np.float32)
    image = tmp_path / "x.png"
    Image.new("L", (16, 16), 90).save(image)
    assert run_cli("enroll", bundle, image, "--store", tmp_path / "s", "--label", "a").exit_code == 0
    _embed(bundle, pixels)                          # the optimised copy is saved
    assert list(fresh_cache.glob("*.onnx"))
    data = bytearray((bundle / "embed.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle / "embed.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        _embed(bundle, pixels)
    r = run_cli("predict", bundle, image, "--store", tmp_path / "s")
    assert r.exit_code == 2 and "embed.onnx does not match its sha256" in r.output
