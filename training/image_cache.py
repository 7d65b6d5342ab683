"""Decoding an image-folder split once: in parallel, cached as an uncompressed npz keyed by the file list.

The key hashes every file's relative path, size and mtime (and the target size), so adding, removing or rewriting an
image decodes again; anything else reads the cache (a single file read instead of tens of thousands of decodes).
The cache lives in `$STEERPRUNE_CACHE_DIR`, else `~/.cache/steerprune`; an unwritable cache only costs the decode.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from steerprune.errors import UserError

__all__ = ["FolderImages", "cache_dir", "list_class_files", "load_class_folders"]

_VERSION = "1"  # bump when the decoded bytes would change (decoder settings)


class FolderImages(NamedTuple):
    images: np.ndarray  # (N, S, S, C) uint8, class folders in `names` order, files sorted by name
    labels: np.ndarray  # (N,) int64
    from_cache: bool


def cache_dir() -> Path:
    return Path(os.environ.get("STEERPRUNE_CACHE_DIR") or Path.home() / ".cache" / "steerprune").expanduser()


def list_class_files(root: Path, names: list[str], suffixes: set[str]) -> list[tuple[str, int, int, int]]:
    """(path, label, size, mtime_ns) for every image under root/<name>/, classes in `names` order, files sorted."""
    out = []
    for label, name in enumerate(names):
        d = os.path.join(root, name)
        if not os.path.isdir(d):
            raise UserError(f"missing class folder {d}")
        entries = sorted((e for e in os.scandir(d) if e.is_file() and os.path.splitext(e.name)[1].lower() in suffixes),
                         key=lambda e: e.name)
        if not entries:
            raise UserError(f"class folder {d} holds no images")
        for e in entries:
            st = e.stat()
            out.append((e.path, label, st.st_size, st.st_mtime_ns))
    return out


def _key(root: Path, files, size: int, mode: str) -> str:
    h = hashlib.sha256(f"{_VERSION}|{size}|{mode}|".encode())
    skip = len(str(root)) + 1  # paths relative to root: a moved dataset keeps its cache
    h.update("".join(f"{f[skip:]}|{label}|{n}|{t}\n" for f, label, n, t in files).encode())
    return h.hexdigest()[:24]


def _decode(paths: list[str], size: int, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), size, size, 1 if mode == "L" else 3), np.uint8)
    for i, f in enumerate(paths):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {f}: {e}") from None
        out[i] = a[..., None] if a.ndim == 2 else a
    return out


def load_class_folders(root: Path, names: list[str], size: int, mode: str = "RGB", suffixes: Optional[set[str]] = None,
                       workers: Optional[int] = None, use_cache: bool = True) -> FolderImages:
    """All images under root/<class>/ decoded to uint8 (size, size) in `mode`, from the cache when it is current.

    Decoding runs in `workers` threads (default: the CPU count; Pillow releases the GIL while it decodes)."""
    root = Path(root)
    files = list_class_files(root, names, suffixes or {".jpg", ".jpeg", ".png"})
    labels = np.fromiter((f[1] for f in files), np.int64, len(files))
    path = cache_dir() / f"{root.parent.name}-{root.name}-{_key(root, files, size, mode)}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                images, cached_labels = z["images"], z["labels"]
            if images.shape[0] == len(files) and np.array_equal(cached_labels, labels):
                return FolderImages(images, labels, True)
        except Exception:  # noqa: BLE001 - a damaged cache file is decoded again and replaced
            pass
    paths = [f[0] for f in files]
    chunk = 512
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(lambda i: _decode(paths[i:i + chunk], size, mode), range(0, len(paths), chunk)))
    images = np.concatenate(parts)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, images=images, labels=labels)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
        except OSError as e:
            warnings.warn(f"cannot write the image cache {path}: {e}", stacklevel=2)
    return FolderImages(images, labels, False)
