"""The masking contract in numpy, identical to `mae.model.masking_from_noise` and Hugging Face's `noise`.

L patches, K = int(L * (1 - mask_ratio)) kept; ids_shuffle = argsort(noise) ascending (smallest kept);
ids_restore = argsort(ids_shuffle); ids_keep = ids_shuffle[:, :K]; mask 1 = removed, 0 = kept.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import MAEError


class Masking(NamedTuple):
    ids_keep: np.ndarray  # [B, K] int64
    mask: np.ndarray  # [B, L] float32, 1 = removed
    ids_restore: np.ndarray  # [B, L] int64


def num_kept(length: int, mask_ratio: float) -> int:
    if not 0.0 <= mask_ratio < 1.0:
        raise MAEError(f"mask ratio {mask_ratio} must be in [0, 1)")
    return int(length * (1 - mask_ratio))


def masking_from_noise(noise: np.ndarray, mask_ratio: float) -> Masking:
    """noise [B, L] -> Masking; the K patches with the smallest noise are kept."""
    noise = np.asarray(noise, dtype=np.float32)
    if noise.ndim != 2:
        raise MAEError(f"noise must be 2-D [images, patches], got shape {noise.shape}")
    batch, length = noise.shape
    keep = num_kept(length, mask_ratio)
    ids_shuffle = np.argsort(noise, axis=1, kind="stable")
    ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable")
    ids_keep = ids_shuffle[:, :keep]
    mask = np.ones((batch, length), dtype=np.float32)
    mask[:, :keep] = 0
    mask = np.take_along_axis(mask, ids_restore, axis=1)
    return Masking(ids_keep.astype(np.int64), mask, ids_restore.astype(np.int64))


def random_noise(batch: int, length: int, seed: int | None = None) -> np.ndarray:
    """[B, L] uniform noise from a seed (numpy's PCG64; not the same stream as torch's)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise MAEError(f"seed {seed!r}: a masking seed is a whole number >= 0.", hint="e.g. --seed 0")
    return np.random.default_rng(seed).random((batch, length), dtype=np.float32)


def full_ids_keep(batch: int, length: int) -> np.ndarray:
    """ids_keep for unmasked features: arange(L) per image."""
    return np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
