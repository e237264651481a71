import zipfile

import numpy as np
import pytest
from edgemeta.runtime import DataError, InputSpec, load_image
from PIL import Image

from edgemeta.data import load_dataset, select_split, split_groups
from edgemeta.data.splits import OMNIGLOT_TEST_ALPHABETS, OMNIGLOT_VAL_ALPHABETS


def test_shipped_omniglot_loads_all_eight_alphabets_deduplicated(omniglot):
    assert omniglot.pixels.shape == (242 * 20, 28, 28, 1)
    assert omniglot.pixels.dtype == np.uint8
    assert omniglot.n_classes == 242
    assert len(set(omniglot.groups)) == 8
    assert np.bincount(omniglot.labels).tolist() == [20] * 242
    # binary drawings resized with LANCZOS: mostly white background with grey edges
    assert 0.85 < omniglot.pixels.mean() / 255 < 0.97


def test_zip_and_extracted_folder_give_identical_arrays(tmp_path, omniglot_paths):
    with zipfile.ZipFile(omniglot_paths[0]) as z:
        z.extractall(tmp_path)
    from_zip = load_dataset(omniglot_paths[0], 28, cache_dir=False)
    from_dir = load_dataset(tmp_path, 28, cache_dir=False)
    assert from_zip.classes == from_dir.classes
    np.testing.assert_array_equal(from_zip.pixels, from_dir.pixels)
    np.testing.assert_array_equal(from_zip.labels, from_dir.labels)


def test_second_load_comes_from_the_disk_cache(tmp_path, omniglot_paths, monkeypatch):
    import edgemeta.data.loading as loading
    first = load_dataset(omniglot_paths[0], 20, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load decoded the images instead of reading the cache")
    monkeypatch.setattr(loading, "_decode", no_decoding)
    second = load_dataset(omniglot_paths[0], 20, cache_dir=tmp_path)
    monkeypatch.undo()
    np.testing.assert_array_equal(first.pixels, second.pixels)
    assert second.classes == first.classes and second.groups == first.groups
    # a different size is a different cache entry
    load_dataset(omniglot_paths[0], 24, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_the_cache_keeps_the_most_recently_used_decodes_within_its_limit(tmp_path, omniglot_paths, monkeypatch):
    """Each image size is its own decode (3.5 GB for Tiny ImageNet at 160 px): beyond the limit the
    least recently used ones go, never the one in use; other files in the folder are left alone."""
    import os

    from edgemeta.runtime.errors import DataError
    (tmp_path / "notes.npz").write_bytes(b"not a decode")
    (tmp_path / "ort-graphs").mkdir()
    sizes = ((16, 36), (36, 16), (24, 24), (18, 32), (32, 18))  # one pixel count: decodes of one size on disk
    for s in sizes[:3]:
        load_dataset(omniglot_paths[0], s, cache_dir=tmp_path)
    decodes = sorted((p for p in tmp_path.glob("*.npz") if p.name != "notes.npz"), key=lambda p: p.stat().st_mtime)
    assert len(decodes) == 3
    for age, p in enumerate(decodes):  # make the order of use unambiguous: the first oldest
        os.utime(p, (1_000_000 + age * 1000,) * 2)
    load_dataset(omniglot_paths[0], sizes[0], cache_dir=tmp_path)  # reading the first makes it the most recent
    one = decodes[0].stat().st_size
    assert all(p.stat().st_size == one for p in decodes)
    monkeypatch.setenv("EDGEMETA_DATA_CACHE_GB", str(3.5 * one / 1e9))  # room for three decodes
    load_dataset(omniglot_paths[0], sizes[3], cache_dir=tmp_path)  # a fourth: the least recently used (the second) goes
    left = {p.name for p in tmp_path.glob("*.npz")}
    assert decodes[1].name not in left and {decodes[0].name, decodes[2].name} <= left and "notes.npz" in left
    assert len(left) == 3 + 1 and (tmp_path / "ort-graphs").is_dir()
    monkeypatch.setenv("EDGEMETA_DATA_CACHE_GB", "0")  # nothing kept but the decode just made
    load_dataset(omniglot_paths[0], sizes[4], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    monkeypatch.setenv("EDGEMETA_DATA_CACHE_GB", "lots")
    with pytest.raises(DataError, match="EDGEMETA_DATA_CACHE_GB must be a size in GB"):
        load_dataset(omniglot_paths[0], 14, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # refused before decoding: nothing written


def test_corrupt_cache_file_is_rebuilt(tmp_path, omniglot_paths):
    first = load_dataset(omniglot_paths[0], 20, cache_dir=tmp_path)
    cache = next(tmp_path.glob("*.npz"))
    cache.write_bytes(b"garbage")
    again = load_dataset(omniglot_paths[0], 20, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.pixels, again.pixels)


def test_training_path_and_runtime_path_preprocess_identically(omniglot_paths, omniglot):
    with zipfile.ZipFile(omniglot_paths[0]) as z:
        name = sorted(n for n in z.namelist() if n.endswith(".png"))[0]
        raw = z.read(name)
    alphabet, character = name.split("/")[-3:-1]
    label = omniglot.classes.index(f"{alphabet}/{character}")
    first_of_class = omniglot.pixels[omniglot.labels == label][0]
    np.testing.assert_array_equal(load_image(raw, InputSpec(28, 28, "L")), first_of_class)


def _write_folder(root, classes, size=(40, 30), mode="RGB", n=4):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_mixes_grey_and_rgb(tmp_path):
    _write_folder(tmp_path, ["cat", "dog"], mode="RGB")
    _write_folder(tmp_path, ["owl"], mode="L")
    ds = load_dataset(tmp_path, 16, "RGB", cache_dir=False)
    assert ds.classes == ["cat", "dog", "owl"] and ds.groups == ds.classes
    assert ds.pixels.shape == (12, 16, 16, 3)
    owl = ds.pixels[ds.labels == 2]
    np.testing.assert_array_equal(owl[..., 0], owl[..., 1])  # grey replicated to RGB
    grey = load_dataset(tmp_path, 16, "L", cache_dir=False)
    assert grey.pixels.shape == (12, 16, 16, 1)


def test_a_file_that_will_not_decode_is_named(tmp_path):
    _write_folder(tmp_path, ["a", "b"])
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="b/broken.png"):
        load_dataset(tmp_path, 16, "RGB", cache_dir=False)


def test_missing_path_and_empty_source_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope", 28)
    with pytest.raises(DataError, match="no images"):
        load_dataset(tmp_path, 28, cache_dir=False)


def test_fixed_alphabet_split_keeps_test_alphabets_unseen(omniglot):
    parts = split_groups(omniglot.groups, "auto")
    assert parts["test"] == sorted(OMNIGLOT_TEST_ALPHABETS)
    assert parts["val"] == sorted(OMNIGLOT_VAL_ALPHABETS)
    assert parts["train"] == []  # the shipped slice is exactly validation + test alphabets
    test = select_split(omniglot, "test")
    assert set(test.groups) == set(OMNIGLOT_TEST_ALPHABETS) and test.n_classes == 196 - 4
    with pytest.raises(DataError, match="seeded"):
        select_split(omniglot, "train")


def test_seeded_split_is_disjoint_by_group_and_reproducible(omniglot):
    a = split_groups(omniglot.groups, "seeded", seed=3)
    b = split_groups(omniglot.groups, "seeded", seed=3)
    c = split_groups(omniglot.groups, "seeded", seed=4)
    assert a == b and a != c
    groups = [set(a[k]) for k in ("train", "val", "test")]
    assert all(not (x & y) for i, x in enumerate(groups) for y in groups[i + 1:])
    assert set.union(*groups) == set(omniglot.groups)
    train = select_split(omniglot, "train", "seeded", 3)
    test = select_split(omniglot, "test", "seeded", 3)
    assert not set(train.classes) & set(test.classes)


def test_rotations_make_four_classes_per_character(omniglot):
    small = omniglot.select_classes([0, 1])
    rot = small.with_rotations()
    assert rot.n_classes == 8 and len(rot) == 4 * len(small)
    np.testing.assert_array_equal(rot.pixels[rot.labels == 2][0], np.rot90(small.pixels[small.labels == 0][0], 1))
    assert rot.classes[2].endswith("@rot90")


def test_channel_stats_are_per_channel_on_unit_scale(tmp_path):
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (10, 10), colour).save(tmp_path / name / "0.png")
    mean, std = load_dataset(tmp_path, 8, "RGB", cache_dir=False).channel_stats()
    assert mean == (0.5, 0.0, 0.5)
    assert std == (0.5, 0.001, 0.5)  # a constant channel gets the floor, never a division by zero


def test_cifar_fs_split_and_its_archive_layout(tmp_path):
    """CIFAR-FS: the shipped split names the published 64 train, 16 validation and 20 test classes, disjoint;
    the loader reads the archive as it is (<root>/<split>/<class>/NNN.png, with a class named
    `train`) — here a small archive of the same layout, since CIFAR images are never shipped."""
    import json

    from conftest import ROOT
    split = json.loads((ROOT / "data/splits/cifar-fs.json").read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert len(set(split["train"]) | set(split["val"]) | set(split["test"])) == 100 and "train" in split["train"]
    rng = np.random.default_rng(0)
    archive = tmp_path / "cifar-fs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for part, names in (("train", ["train", split["train"][1], split["train"][2]]), ("val", split["val"][:3])):
            for name in names:
                for i in range(4):
                    buf = __import__("io").BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                    z.writestr(f"cifar-fs/{part}/{name}/{i:03d}.png", buf.getvalue())
    data = load_dataset(archive, 32, "RGB", "folder", cache_dir=False)
    assert data.n_classes == 6 and "train" in data.classes
    train = select_split(data, "train", split_file=str(ROOT / "data/splits/cifar-fs.json"))
    val = select_split(data, "val", split_file=str(ROOT / "data/splits/cifar-fs.json"))
    assert sorted(train.classes) == sorted(["train", split["train"][1], split["train"][2]])
    assert sorted(val.classes) == sorted(split["val"][:3]) and len(train) == len(val) == 12


def test_an_index_decodes_only_the_rows_asked_for_and_matches_the_full_load(omniglot_paths, omniglot, monkeypatch):
    from edgemeta.data import loading
    index = loading.index_images(omniglot_paths)
    assert len(index) == len(omniglot) and index.classes == omniglot.classes and index.groups == omniglot.groups
    np.testing.assert_array_equal(index.labels, omniglot.labels)
    decoded = []
    real_decode = loading._decode_one
    monkeypatch.setattr(loading, "_decode_one", lambda parts, read, spec: decoded.append(parts) or real_decode(parts, read, spec))
    rows = np.array([0, 5, 999, len(omniglot) - 1])
    part = index.decode(rows, InputSpec(28, 28, "L"))
    assert len(decoded) == 4  # nothing else was read
    np.testing.assert_array_equal(part.pixels, omniglot.pixels[rows])
    np.testing.assert_array_equal(part.labels, omniglot.labels[rows])
    assert part.classes == omniglot.classes


def test_split_classes_names_the_classes_select_split_keeps(omniglot):
    from edgemeta.data.splits import split_classes
    for mode, split in (("auto", "val"), ("auto", "test"), ("seeded", "train"), ("seeded", "test")):
        ids = split_classes(omniglot.groups, split, mode)
        assert select_split(omniglot, split, mode).classes == [omniglot.classes[c] for c in ids] != []
    with pytest.raises(DataError, match="the val split of this data is empty"):
        split_classes(["a", "b", "c"], "val", "alphabets")
