"""Images as model inputs: uint8 (N, H, W, C) batches to normalised float tensors, training augmentation, and the
index batches every loop streams over (a split is converted one batch at a time, never whole)."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .device import to_device
from .model import BackboneConfig

__all__ = ["to_tensor", "ImageTensors", "augment", "rand_augment", "apply_to_images", "index_batches", "image_batches",
           "progress"]


def to_tensor(images: np.ndarray, cfg: BackboneConfig, device: Optional[torch.device] = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float32 (N, C, S, S) at the model's size (bilinear, as the server does).

    The uint8 batch is moved first (4x fewer bytes than float32) and converted on `device` (default: the CPU)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if device is not None:
        x = to_device(x, device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != cfg.img_size or x.shape[-2] != cfg.img_size:
        x = F.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(cfg.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class ImageTensors:
    """uint8 images (N, H, W, C) that read like the float tensor (N, C, S, S) `to_tensor` would make of them, but
    convert only what is indexed: `x[i:j]`, `x[int_indices]`, `x[bool_mask]` give float tensors of those images.
    `len(x)` and `x.shape` need no conversion; `x.numpy()` converts everything (use it only where a caller needs
    the whole array)."""

    def __init__(self, images: np.ndarray, cfg: BackboneConfig):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C), got {images.shape}")
        self.images, self.cfg = images, cfg

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.images), self.images.shape[-1], self.cfg.img_size, self.cfg.img_size))

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)):
            return to_tensor(self.images[[key]], self.cfg)[0]
        return to_tensor(self.images[key], self.cfg)

    def numpy(self) -> np.ndarray:
        chunks = [to_tensor(self.images[i:i + 1024], self.cfg).numpy() for i in range(0, len(self), 1024)]
        return np.concatenate(chunks) if chunks else np.zeros(tuple(self.shape), np.float32)


def augment(x: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding and optional horizontal flip, per image. `gen` is a CPU generator, so
    the draws (and the augmented images) are the same on every device."""
    B, _, H, W = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen).tolist()
        dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen).tolist()
        x = torch.stack([xp[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    if hflip:
        flip = (torch.rand(B, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def rand_augment(policy: str, img_size: int, mean) -> Callable:
    """timm's RandAugment for `policy` (e.g. 'rand-m9-mstd0.5') on PIL images of about `img_size` pixels, filling
    with the data's mean colour. It draws from Python's `random` and NumPy's global generator, which the caller
    seeds."""
    from steerprune.errors import UserError
    from timm.data import rand_augment_transform

    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(int(round(255 * m)) for m in mean))
    try:
        return rand_augment_transform(policy, hparams)
    except Exception as e:  # noqa: BLE001  (timm raises assertions and KeyErrors on a bad string)
        why = f" ({e})" if str(e) else ""
        raise UserError(f"randaugment {policy!r} is not a timm RandAugment policy such as 'rand-m9-mstd0.5'{why}") \
            from None


def apply_to_images(images: np.ndarray, transform: Callable) -> np.ndarray:
    """A PIL-image transform applied to each uint8 image of (N, H, W, C), C = 1 or 3; same shape out."""
    from PIL import Image

    gray = images.shape[-1] == 1
    out = [np.asarray(transform(Image.fromarray(im[..., 0] if gray else im))) for im in images]
    out = np.stack(out)
    return out[..., None] if gray else out


def index_batches(n: int, batch_size: int, gen: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Index batches over range(n): shuffled by `gen`, in order without it."""
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def image_batches(images: np.ndarray, cfg: BackboneConfig, batch_size: int, gen: Optional[torch.Generator] = None,
                  device: Optional[torch.device] = None,
                  transform: Optional[Callable] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices, float batch (B, C, S, S)) over uint8 images, each batch converted when it is used; `transform`
    (a PIL-image transform) is applied to each uint8 image first."""
    for idx in index_batches(len(images), batch_size, gen):
        batch = images[idx.numpy()]
        if transform is not None:
            batch = apply_to_images(batch, transform)
        yield idx, to_tensor(batch, cfg, device)


def progress(iterable, desc: str, total: Optional[int] = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)
