"""Loaders on real digits and on tiny generated CIFAR-pickle, npz and image-folder datasets."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from steerprune.errors import UserError
from steerprune.training.data import load_data, parse_spec, stratified_split


def test_digits_is_real_and_split_without_overlap():
    d = load_data("digits", val_fraction=0.1, seed=0)
    assert d.num_classes == 10 and d.image_shape == (8, 8, 1) and not d.hflip
    assert len(d.train) + len(d.val) + len(d.test) == 1797  # scikit-learn's bundled digits
    assert d.train.images.dtype == np.uint8 and d.train.images.max() == 255
    # every class is in every split, and the validation split is ~10% of train
    for s in (d.train, d.val, d.test):
        assert set(np.unique(s.labels)) == set(range(10))
    assert abs(len(d.val) / (len(d.train) + len(d.val)) - 0.1) < 0.01
    # test is fixed across seeds; validation is seeded
    d2 = load_data("digits", val_fraction=0.1, seed=1)
    assert np.array_equal(d.test.images, d2.test.images)
    assert not np.array_equal(d.val.images, d2.val.images)
    mean, std = d.channel_stats()
    assert len(mean) == 1 and 0 < mean[0] < 1 and 0 < std[0] < 1


def test_stratified_split_is_disjoint_and_complete():
    labels = np.repeat(np.arange(5), 20)
    keep, held = stratified_split(labels, 0.25, seed=3)
    assert len(np.intersect1d(keep, held)) == 0 and len(keep) + len(held) == 100
    assert np.all(np.bincount(labels[held]) == 5)


def _write_cifar10_pickles(root, n=20):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(x) for x in rng.integers(0, 10, n)]}, f)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(10)) * (n // 10)}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_pickle_folder(tmp_path):
    _write_cifar10_pickles(tmp_path / "cifar-10-batches-py")
    d = load_data(f"cifar10:{tmp_path}", val_fraction=0.2)
    assert d.image_shape == (32, 32, 3) and d.class_names[3] == "c3"
    assert len(d.train) + len(d.val) == 100 and len(d.test) == 20 and d.hflip


def test_cifar_pickle_with_foreign_objects_is_refused(tmp_path):
    _write_cifar10_pickles(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "c" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_data(f"cifar10:{tmp_path / 'c'}")


def test_cifar100_pickle_keeps_coarse_groups(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    fine = np.arange(200) % 100
    coarse = fine // 5
    for name in ("train", "test"):
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8),
                         b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}" for i in range(100)],
                     b"coarse_label_names": [f"g{i}" for i in range(20)]}, f)
    d = load_data(f"cifar100:{tmp_path}", val_fraction=0.2)
    assert d.num_classes == 100 and len(d.groups) == 20
    assert d.groups["g1"] == [5, 6, 7, 8, 9]


def test_npz_layout(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 10)):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 4)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    d = load_data(f"cifar10:{tmp_path}", val_fraction=0.25)
    assert d.class_names == ["a", "b", "c", "d"] and len(d.val) == 10 and len(d.test) == 10  # 25% of 40


def test_imagefolder_with_and_without_test_split(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "a" / split / cls).mkdir(parents=True)
            (tmp_path / "b" / cls).mkdir(parents=True, exist_ok=True)
            for i in range(6):
                img = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
                img.save(tmp_path / "a" / split / cls / f"{i}.png")
                img.save(tmp_path / "b" / cls / f"{split}{i}.jpg")
    d = load_data(f"imagefolder:{tmp_path / 'a'}", val_fraction=0.2, img_size=16)
    assert d.class_names == ["cat", "dog"] and d.image_shape == (16, 16, 3) and len(d.test) == 12
    d = load_data(f"imagefolder:{tmp_path / 'b'}", val_fraction=0.2, img_size=16)
    assert len(d.train) + len(d.val) + len(d.test) == 24


@pytest.mark.parametrize("spec, message", [
    ("mnist", "unknown data spec"),
    ("cifar10", "needs a path"),
    ("cifar10:/definitely/not/here", "does not exist"),
    ("digits:/tmp", "takes no path"),
])
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_spec(spec)


def test_folder_that_is_not_cifar(tmp_path):
    with pytest.raises(UserError, match="neither a CIFAR-10 npz folder"):
        load_data(f"cifar10:{tmp_path}")


@pytest.mark.cifar
def test_shared_cifar10(cifar10_path):
    d = load_data(f"cifar10:{cifar10_path}", val_fraction=0.1)
    assert d.class_names[0] == "airplane" and len(d.test) == 10000 and len(d.train) == 45000


# ---------------------------------------------------------------------------------------------- CIFAR-100 JPEG folders

CIFAR100 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar100"


def _write_cifar100_folder(root, per_class=(6, 2)):
    """The layout of ../shared/data/cifar100 in small: 4 fine classes in 2 groups, 32x32 RGB JPEGs."""
    fine, groups = ["apple", "bowl", "cup", "pear"], {"containers": ["bowl", "cup"], "fruit": ["apple", "pear"]}
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(fine):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                im = np.full((32, 32, 3), 40 + 50 * c, np.uint8) + rng.integers(0, 10, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(im).save(root / split / name / f"{name}_s_{i:06d}.jpg", quality=95)
    (root / "classes.json").write_text(json.dumps(fine))
    (root / "coarse_classes.json").write_text(json.dumps(["fruit", "containers"]))
    (root / "groups.json").write_text(json.dumps(groups))
    return fine


def test_cifar100_jpeg_folder_with_groups_and_cache(tmp_path, monkeypatch):
    from steerprune.training import image_cache

    monkeypatch.setenv("STEERPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    fine = _write_cifar100_folder(tmp_path / "c100")
    d = load_data(f"cifar100:{tmp_path / 'c100'}", val_fraction=0.25)
    assert d.class_names == fine and d.image_shape == (32, 32, 3) and d.hflip
    assert list(d.groups) == ["fruit", "containers"]  # coarse_classes.json's order
    assert d.groups == {"fruit": [0, 3], "containers": [1, 2]}
    assert len(d.train) + len(d.val) == 24 and len(d.test) == 8
    assert np.array_equal(np.bincount(d.test.labels), [2, 2, 2, 2])
    # decoded pixels are the JPEG's (class c was filled with 40 + 50 c)
    assert abs(float(d.test.images[d.test.labels == 3].mean()) - (40 + 150 + 4.5)) < 3
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # train and test cached

    def no_decode(*_a, **_k):
        raise AssertionError("decoded although the cache is current")

    monkeypatch.setattr(image_cache, "_decode", no_decode)
    warm = load_data(f"cifar100:{tmp_path / 'c100'}", val_fraction=0.25)
    assert np.array_equal(warm.train.images, d.train.images) and np.array_equal(warm.test.labels, d.test.labels)
    # a changed file (size / mtime) is decoded again
    monkeypatch.undo()
    monkeypatch.setenv("STEERPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "c100" / "test" / "cup" / "cup_s_000000.jpg"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    again = image_cache.load_class_folders(tmp_path / "c100" / "test", fine, 32)
    assert not again.from_cache and again.images[again.labels == 2][0].max() < 10


def test_cifar100_folder_with_a_group_naming_an_unknown_class_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    _write_cifar100_folder(tmp_path / "c100")
    (tmp_path / "c100" / "groups.json").write_text(json.dumps({"fruit": ["apple", "kiwi"], "containers": ["bowl"]}))
    (tmp_path / "c100" / "coarse_classes.json").unlink()
    with pytest.raises(UserError, match="kiwi"):
        load_data(f"cifar100:{tmp_path / 'c100'}")


@pytest.mark.cifar100
@pytest.mark.slow
def test_real_cifar100_folder():
    """Uses the default cache ($STEERPRUNE_CACHE_DIR or ~/.cache/steerprune), as `steerprune train` does: the first
    run on a machine decodes the 60,000 JPEGs, later ones read the cache."""
    if not (CIFAR100 / "groups.json").exists():
        pytest.skip(f"CIFAR-100 not found at {CIFAR100}")
    d = load_data(f"cifar100:{CIFAR100}", val_fraction=0.1)
    assert d.num_classes == 100 and len(d.train) + len(d.val) == 50000 and len(d.test) == 10000
    assert d.class_names[10] == "bowl" and len(d.groups) == 20
    assert all(len(v) == 5 for v in d.groups.values())
    assert d.groups["food_containers"] == sorted(d.class_names.index(n) for n in ("bottle", "bowl", "can", "cup", "plate"))
    assert np.array_equal(np.bincount(d.test.labels), np.full(100, 100))
    assert abs(d.channel_stats()[0][0] - 129.2 / 255) < 0.01  # SOURCE.md: train mean R 129.20
