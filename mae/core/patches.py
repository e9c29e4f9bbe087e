"""patchify / unpatchify in numpy, (row, col, channel) order inside each patch, as `mae.model`."""

from __future__ import annotations

import numpy as np


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
    """[B, C, H, W] -> [B, L, p*p*C]."""
    batch, chans, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, chans, height // p, p, width // p, p)
    x = x.transpose(0, 2, 4, 3, 5, 1)  # n h w p q c
    return x.reshape(batch, (height // p) * (width // p), p * p * chans)


def unpatchify(patches: np.ndarray, patch_size: int, chans: int = 3) -> np.ndarray:
    """[B, L, p*p*C] -> [B, C, H, W]."""
    batch, length, _ = patches.shape
    grid = int(round(length**0.5))
    p = patch_size
    x = patches.reshape(batch, grid, grid, p, p, chans).transpose(0, 5, 1, 3, 2, 4)  # n c h p w q
    return x.reshape(batch, chans, grid * p, grid * p)


def normalize_patches(patches: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch (mean, std) of norm_pix_loss (unbiased variance, eps 1e-6): returns normalized, mean, std."""
    mean = patches.mean(axis=-1, keepdims=True)
    std = np.sqrt(patches.var(axis=-1, ddof=1, keepdims=True) + eps)
    return (patches - mean) / std, mean, std
