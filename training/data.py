"""Datasets behind `--data SPEC`: every loader returns uint8 (N, H, W, C) images and int64 labels.

Specs: `digits` (scikit-learn's bundled digits, the embedded default), `cifar10:PATH`, `cifar100:PATH`
(python-pickle folders or `train.npz`/`test.npz`; CIFAR-100 also as JPEG folders `train/<class>/`, `test/<class>/`
with `classes.json` and `groups.json`), `imagefolder:PATH` (one folder per class).
A seeded, stratified validation split is always carved from train; test is never used for choices.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steerprune.errors import UserError

__all__ = ["Split", "DataBundle", "load_data", "parse_spec", "stratified_split", "IMAGE_SUFFIXES", "SPLIT_METHODS"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# "sklearn": train_test_split(stratify=...); "legacy": the per-class permutation of runs recorded before it
SPLIT_METHODS = ("sklearn", "legacy")


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise UserError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise UserError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split(self.images[idx], self.labels[idx])


@dataclass
class DataBundle:
    spec: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    groups: dict[str, list[int]] = field(default_factory=dict)  # e.g. CIFAR-100 coarse classes
    hflip: bool = True  # natural images flip; digits do not

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std of the train split in [0, 1] units (saved with the run)."""
        px = self.train.images.reshape(-1, self.train.images.shape[-1])  # (pixels, C) uint8, a view
        step = 1 << 20  # two passes over chunks of a million pixels: no float copy of the whole split
        n = len(px)
        mean = sum(px[i:i + step].sum(0, dtype=np.float64) for i in range(0, n, step)) / n
        var = sum(((px[i:i + step] - mean) ** 2).sum(0) for i in range(0, n, step)) / n
        return (mean / 255.0).round(6).tolist(), np.maximum(np.sqrt(var) / 255.0, 1e-3).round(6).tolist()


def parse_spec(spec: str) -> tuple[str, Path | None]:
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits":
        if path:
            raise UserError("the 'digits' data spec takes no path")
        return kind, None
    if kind in ("cifar10", "cifar100", "imagefolder"):
        if not path:
            raise UserError(f"data spec '{kind}' needs a path: '{kind}:PATH'")
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"data path does not exist: {p}")
        return kind, p
    raise UserError(f"unknown data spec '{spec}': use digits, cifar10:PATH, cifar100:PATH or imagefolder:PATH")


def load_data(spec: str, val_fraction: float = 0.1, seed: int = 0, img_size: int | None = None,
              split: str = "sklearn") -> DataBundle:
    """Load a dataset and carve a seeded, stratified validation split from its train split (`split`: how, see
    `stratified_split`; a run's record says which)."""
    if not 0.0 < val_fraction < 0.5:
        raise UserError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    kind, path = parse_spec(spec)
    groups: dict[str, list[int]] = {}
    hflip = True
    if kind == "digits":
        train, test, names = _load_digits()
        hflip = False
    elif kind == "cifar10":
        train, test, names = _load_cifar10(path)
    elif kind == "cifar100":
        train, test, names, groups = _load_cifar100(path)
    else:
        train, test, names = _load_imagefolder(path, img_size)
    n_cls = len(names)
    for split_name, s in (("train", train), ("test", test)):
        if len(s) == 0:
            raise UserError(f"{spec}: the {split_name} split is empty")
        if s.labels.min() < 0 or s.labels.max() >= n_cls:
            raise UserError(f"{spec}: {split_name} labels outside 0..{n_cls - 1}")
    tr_idx, val_idx = stratified_split(train.labels, val_fraction, seed, split)
    return DataBundle(spec, names, train.subset(tr_idx), train.subset(val_idx), test, groups, hflip)


def stratified_split(labels: np.ndarray, fraction: float, seed: int, method: str = "sklearn") -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (keep, held_out) with `fraction` of every class held out.

    'sklearn': scikit-learn's `train_test_split(stratify=labels)`. 'legacy': a seeded permutation per class, at least
    one held out where a class has 2+ images; runs recorded before the switch keep it, so their splits never move."""
    if method == "sklearn":
        from sklearn.model_selection import train_test_split

        # at least one held-out image per class, as sklearn needs (and as the legacy split did)
        n_held = max(int(round(len(labels) * fraction)), len(np.unique(labels)))
        try:
            keep, held = train_test_split(np.arange(len(labels)), test_size=n_held, random_state=seed, stratify=labels)
        except ValueError as e:  # e.g. a class with a single image
            raise UserError(f"cannot split {len(labels)} images stratified by class at {fraction}: {e}") from None
        return np.sort(keep), np.sort(held)
    if method != "legacy":
        raise UserError(f"unknown split method '{method}': use {', '.join(SPLIT_METHODS)}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(len(idx) * fraction))
        n_held = min(max(n_held, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _load_digits() -> tuple[Split, Split, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 intensities -> uint8 so digits travel through the same image pipeline as every other dataset
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    labels = d.target.astype(np.int64)
    tr, te = stratified_split(labels, 0.2, 1234, "legacy")  # the fixed test split: the same for every run, old or new
    return Split(images[tr], labels[tr]), Split(images[te], labels[te]), [str(i) for i in range(10)]


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python format is pickle: allow only the numpy and builtin types those files contain."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad data file
        raise UserError(f"cannot read CIFAR pickle {path}: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _pickle_images(d: dict, path: Path) -> np.ndarray:
    if "data" not in d:
        raise UserError(f"{path} has no 'data' entry")
    return np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _load_npz(path: Path, name: str, label_key: str = "labels") -> Split:
    f = path / name
    if not f.exists():
        raise UserError(f"missing {f}")
    try:
        with np.load(f, allow_pickle=False) as z:
            images, labels = z["images"], z[label_key].astype(np.int64)
    except KeyError as e:
        raise UserError(f"{f} lacks array {e}") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {f}: {e}") from None
    if images.ndim == 3:
        images = images[..., None]
    return Split(images.astype(np.uint8, copy=False), labels)


def _class_names_json(path: Path, n: int) -> list[str]:
    f = path / "classes.json"
    if f.exists():
        names = json.loads(f.read_text())
        if not (isinstance(names, list) and len(names) == n):
            raise UserError(f"{f} must be a list of {n} class names")
        return [str(x) for x in names]
    return [str(i) for i in range(n)]


def _load_cifar10(path: Path) -> tuple[Split, Split, list[str]]:
    if (path / "train.npz").exists():
        train, test = _load_npz(path, "train.npz"), _load_npz(path, "test.npz")
        n = int(max(train.labels.max(), test.labels.max())) + 1
        return train, test, _class_names_json(path, n)
    root = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    batches = [root / f"data_batch_{i}" for i in range(1, 6)]
    missing = [b.name for b in batches + [root / "test_batch"] if not b.exists()]
    if missing:
        raise UserError(f"{path} is neither a CIFAR-10 npz folder nor cifar-10-batches-py (missing {', '.join(missing)})")
    parts = [_unpickle(b) for b in batches]
    train = Split(np.concatenate([_pickle_images(d, b) for d, b in zip(parts, batches)]),
                  np.concatenate([np.asarray(d["labels"], np.int64) for d in parts]))
    t = _unpickle(root / "test_batch")
    test = Split(_pickle_images(t, root / "test_batch"), np.asarray(t["labels"], np.int64))
    meta = root / "batches.meta"
    names = [str(x) for x in _unpickle(meta)["label_names"]] if meta.exists() else [str(i) for i in range(10)]
    return train, test, names


def _load_cifar100(path: Path) -> tuple[Split, Split, list[str], dict[str, list[int]]]:
    if (path / "train").is_dir() and (path / "test").is_dir():
        return _load_cifar100_folder(path)
    if (path / "train.npz").exists():
        train, test = _load_npz(path, "train.npz"), _load_npz(path, "test.npz")
        names = _class_names_json(path, int(max(train.labels.max(), test.labels.max())) + 1)
        groups = {}
        with np.load(path / "train.npz", allow_pickle=False) as z:
            coarse = z["coarse_labels"].astype(np.int64) if "coarse_labels" in z.files else None
        if coarse is not None:
            groups = _groups_from(train.labels, coarse, None)
        return train, test, names, groups
    root = path / "cifar-100-python" if (path / "cifar-100-python").is_dir() else path
    missing = [n for n in ("train", "test") if not (root / n).exists()]
    if missing:
        raise UserError(f"{path} is neither a CIFAR-100 npz folder nor cifar-100-python (missing {', '.join(missing)})")
    tr, te = _unpickle(root / "train"), _unpickle(root / "test")
    for d, n in ((tr, "train"), (te, "test")):
        if "fine_labels" not in d:
            raise UserError(f"{root / n} has no 'fine_labels': not CIFAR-100")
    train = Split(_pickle_images(tr, root / "train"), np.asarray(tr["fine_labels"], np.int64))
    test = Split(_pickle_images(te, root / "test"), np.asarray(te["fine_labels"], np.int64))
    names, coarse_names = [str(i) for i in range(100)], None
    if (root / "meta").exists():
        meta = _unpickle(root / "meta")
        names = [str(x) for x in meta.get("fine_label_names", names)]
        coarse_names = [str(x) for x in meta.get("coarse_label_names", [])] or None
    groups = _groups_from(train.labels, np.asarray(tr.get("coarse_labels", []), np.int64), coarse_names)
    return train, test, names, groups


def _load_cifar100_folder(path: Path) -> tuple[Split, Split, list[str], dict[str, list[int]]]:
    """The JPEG image-folder layout: train/<fine>/*.jpg, test/<fine>/*.jpg, classes.json (fine names in index
    order), groups.json ({coarse: [its fine names]}), coarse_classes.json (coarse order). Decoded once, in
    parallel, then read from the cache (see `image_cache`)."""
    from .image_cache import load_class_folders

    folders = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
    if not folders:
        raise UserError(f"{path / 'train'} has no class folders")
    names = _class_names_json(path, len(folders)) if (path / "classes.json").exists() else folders
    if sorted(names) != folders:
        raise UserError(f"{path / 'classes.json'} does not name the class folders of {path / 'train'}")
    train = load_class_folders(path / "train", names, 32, "RGB")
    test = load_class_folders(path / "test", names, 32, "RGB")
    return Split(train.images, train.labels), Split(test.images, test.labels), names, _groups_json(path, names)


def _groups_json(path: Path, names: list[str]) -> dict[str, list[int]]:
    """{coarse: [fine indices]} from groups.json ({coarse: [fine names]}), in coarse_classes.json's order."""
    f = path / "groups.json"
    if not f.exists():
        return {}
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise UserError(f"{f} must map each group to a list of class names")
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({c for v in raw.values() for c in v} - set(index))
    if unknown:
        raise UserError(f"{f} names classes that are not in the data: {unknown[:5]}")
    order = list(raw)
    if (path / "coarse_classes.json").exists():
        coarse = json.loads((path / "coarse_classes.json").read_text())
        if sorted(coarse) != sorted(order):
            raise UserError(f"{path / 'coarse_classes.json'} and {f} name different groups")
        order = coarse
    return {g: sorted(index[c] for c in raw[g]) for g in order}


def _groups_from(fine: np.ndarray, coarse: np.ndarray, coarse_names: list[str] | None) -> dict[str, list[int]]:
    if len(coarse) != len(fine):
        return {}
    groups: dict[str, list[int]] = {}
    for c in np.unique(coarse):
        name = coarse_names[c] if coarse_names and c < len(coarse_names) else f"coarse{c}"
        groups[name] = sorted(int(f) for f in np.unique(fine[coarse == c]))
    return groups


def _load_imagefolder(path: Path, img_size: int | None) -> tuple[Split, Split, list[str]]:
    if (path / "train").is_dir():
        names = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
        train = _read_class_dirs(path / "train", names, img_size)
        if (path / "test").is_dir():
            test = _read_class_dirs(path / "test", names, img_size)
            return train, test, names
        full = train
    else:
        names = sorted(p.name for p in path.iterdir() if p.is_dir())
        full = _read_class_dirs(path, names, img_size)
    tr, te = stratified_split(full.labels, 0.2, 1234, "legacy")  # the fixed test split: the same for every run, old or new
    return full.subset(tr), full.subset(te), names


def _read_class_dirs(root: Path, names: list[str], img_size: int | None) -> Split:
    from PIL import Image, UnidentifiedImageError

    from .image_cache import _decode

    if not names:
        raise UserError(f"{root} has no class folders")
    per_class = []
    for name in names:
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if (root / name).is_dir() else []
        if not files:
            raise UserError(f"class folder {root / name} holds no images")
        per_class.append([str(f) for f in files])
    try:  # the first image decides: grayscale folders stay single-channel, everything else becomes RGB
        with Image.open(per_class[0][0]) as im:
            mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
            size = img_size or im.size[0]
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {per_class[0][0]}: {e}") from None
    images = np.concatenate([_decode(files, size, mode) for files in per_class])
    labels = np.concatenate([np.full(len(files), label, np.int64) for label, files in enumerate(per_class)])
    return Split(images, labels)
