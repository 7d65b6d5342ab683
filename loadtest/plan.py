"""The request plan: hint mix, test images, and a seeded stream of (image, hint kind, hint) requests."""
from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from steerprune.errors import UserError

__all__ = ["KINDS", "DEFAULT_MIX", "Planned", "parse_mix", "load_images", "encode_png", "plan_requests"]

KINDS = ("right", "wrong", "none")
DEFAULT_MIX = "right=0.6,wrong=0.2,none=0.2"
"""The load test's default hint mix (the CLI, `LoadTestConfig` and locustfile.py read it from here)."""


class Planned(NamedTuple):
    image: int  # index into the test images
    kind: str  # right | wrong | none
    hint: Optional[str]


def parse_mix(mix: str) -> dict[str, float]:
    """'right=0.6,wrong=0.2,none=0.2' -> normalised shares of every kind (missing kinds get 0)."""
    out = {k: 0.0 for k in KINDS}
    try:
        for part in filter(None, (p.strip() for p in mix.split(","))):
            k, v = part.split("=")
            if k.strip() not in KINDS:
                raise ValueError(k)
            out[k.strip()] = float(v)
    except ValueError:
        raise UserError(f"mix must look like {DEFAULT_MIX} (kinds: {', '.join(KINDS)}), got {mix!r}") from None
    total = sum(out.values())
    if total <= 0 or min(out.values()) < 0:
        raise UserError(f"mix shares must be >= 0 and not all zero, got {mix!r}")
    return {k: v / total for k, v in out.items()}


def load_images(spec: Optional[str], data_spec: Optional[str], classes: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images (N, H, W, C), labels (N,), source description) from an .npz, a folder of class folders, or
    (with no spec and a digits bundle) the digits test split."""
    if spec:
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "images" not in z.files or "labels" not in z.files:
                    raise UserError(f"{p} must hold 'images' (uint8 N,H,W,C) and 'labels'")
                images, labels = z["images"], z["labels"].astype(np.int64)
            if images.dtype != np.uint8 or images.ndim not in (3, 4):
                raise UserError(f"{p}: images must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
            return (images[..., None] if images.ndim == 3 else images), labels, str(p)
        if p.is_dir():
            return (*_read_folder(p, classes), str(p))
        raise UserError(f"--images {spec}: expected an .npz file or a folder of class folders")
    if data_spec == "digits":
        try:
            from steerprune.training.data import load_data
            test = load_data("digits").test
        except ModuleNotFoundError as e:
            raise UserError(f"the digits test split needs {e.name} (pip install scikit-learn), or pass --images") from None
        return test.images, test.labels, "digits test split"
    raise UserError("pass --images (an .npz with images/labels or a folder of class folders): the bundle was not "
                    f"trained on digits (data spec {data_spec!r})")


def _read_folder(root: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        d = root / name
        for f in sorted(d.iterdir()) if d.is_dir() else []:
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert("RGB")))
                    labels.append(label)
    if not images:
        raise UserError(f"{root} has no images in folders named after the classes ({', '.join(classes[:5])}, ...)")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"{root}: images differ in size {sorted(shapes)[:3]}; use an .npz of equal-size images")
    return np.stack(images), np.asarray(labels, np.int64)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C 1 or 3 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def plan_requests(n: int, labels: np.ndarray, routes: dict[str, list[int]], mix: dict[str, float],
                  seed: int, sweep: bool = False) -> list[Planned]:
    """A seeded request stream: images drawn uniformly (or, with sweep, each image once in a shuffled order, at most
    n), hints by `mix` (a 'right' hint is a route holding the label, a 'wrong' one a route lacking it)."""
    rng = np.random.default_rng(seed)
    if sweep:
        n = min(n, len(labels))
    names = sorted(routes)
    holds = {c: [r for r in names if c in routes[r]] for c in set(labels.tolist())}
    lacks = {c: [r for r in names if c not in routes[r]] for c in set(labels.tolist())}
    kinds = rng.choice(len(KINDS), size=n, p=[mix[k] for k in KINDS])
    idx = rng.permutation(len(labels))[:n] if sweep else rng.integers(0, len(labels), size=n)
    plan = []
    for i, k in zip(idx, kinds):
        kind, c = KINDS[k], int(labels[i])
        pool = holds[c] if kind == "right" else lacks[c] if kind == "wrong" else []
        if kind != "none" and not pool:
            kind = "none"  # no route holds (or lacks) this class: send it unhinted
        plan.append(Planned(int(i), kind, pool[rng.integers(len(pool))] if pool else None))
    return plan
