"""Training data: find images, cut random crops once, cache them as one uint8 array."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

EXTS = {".png", ".jpg", ".jpeg"}


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every .png/.jpg under root, recursively, in a stable order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTS and p.is_file())


def split_holdout(files: list[Path], fraction: float = 0.02) -> tuple[list[Path], list[Path]]:
    """Deterministic split by file-name hash: (train, held out)."""
    train, held = [], []
    for f in files:
        h = int(hashlib.sha256(f.name.encode()).hexdigest()[:8], 16) / 2**32
        (held if h < fraction else train).append(f)
    return train, held


def _crops_of(path: Path, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if min(w, h) < size:
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
    a = np.asarray(img)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        y = rng.integers(0, h - size + 1)
        x = rng.integers(0, w - size + 1)
        out[i] = a[y : y + size, x : x + size]
    return out


def crop_cache(files: list[Path], size: int, per_image: int, seed: int, cache_dir: str | os.PathLike | None) -> np.ndarray:
    """(N, size, size, 3) uint8 crops; cached on disk keyed by the file list and parameters."""
    key = hashlib.sha256(
        repr(([str(f) for f in files], size, per_image, seed)).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"crops-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path, mmap_mode="r")
    rng = np.random.default_rng(seed)
    arr = np.concatenate([_crops_of(f, size, per_image, rng) for f in files], 0)
    if path is not None:
        save_atomic(path, arr)
    return arr


def save_atomic(path: Path, arr: np.ndarray) -> None:
    """np.save to path through a temporary file, so that a cache file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def batch_from(arr: np.ndarray, idx: np.ndarray, rng: np.random.Generator):
    """uint8 crops -> float tensor (B, 3, S, S) in [0, 1] with random flips."""
    import torch

    x = np.ascontiguousarray(arr[np.sort(idx)])
    flip = rng.random(len(idx)) < 0.5
    x[flip] = x[flip, :, ::-1]
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    return t
