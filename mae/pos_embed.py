"""Fixed 2-D sin-cos position embeddings (zero cls row) and their resizing, as the original MAE."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim]: sin on the first half of the channels, cos on the second."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)  # [M, dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """[1 + G*G, dim] float32 (row 0 is the zero cls row when cls_token), row-major over the patch grid.

    Half of the channels encode the column (x) coordinate and half the row (y), in that order, as the
    original `get_2d_sincos_pos_embed` (it meshgrids w first).
    """
    coords = np.arange(grid_size, dtype=np.float32)
    cols, rows = np.meshgrid(coords, coords)  # each [G, G]; cols varies along axis 1
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)  # [G*G, dim]
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """[1, extra + G*G, D] -> [1, extra + new_grid**2, D], bicubic over the grid, extra (cls) rows kept.

    Used when weights meet a different image size, as the original `interpolate_pos_embed`.
    """
    import torch
    import torch.nn.functional as F

    extra = pos_embed[:, :num_extra_tokens]
    grid_tokens = pos_embed[:, num_extra_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid == new_grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()  # [1, D, G, G]
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)
