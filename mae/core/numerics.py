"""The numbers every part computes the same way: pooling of encoder tokens, unit length, row-wise cosine.

`mae embed` pools with these, `mae bench` and the export's verification compare pooled features with them, so a
"cosine 0.9995" means the same thing everywhere. numpy only.
"""

from __future__ import annotations

import numpy as np

from .errors import MAEError

POOLS = ("cls", "mean", "cls+mean", "tokens")


def pool_tokens(latent: np.ndarray, pool: str) -> np.ndarray:
    """latent [B, 1+L, D] -> [B, D] (cls, mean of the patch tokens), [B, 2D] (cls+mean) or [B, 1+L, D] (tokens)."""
    if pool == "cls":
        return latent[:, 0]
    if pool == "mean":
        return latent[:, 1:].mean(axis=1)
    if pool == "cls+mean":
        return np.concatenate([latent[:, 0], latent[:, 1:].mean(axis=1)], axis=-1)
    if pool == "tokens":
        return latent
    raise MAEError(f"Unknown pooling {pool!r}", hint=f"use one of: {', '.join(POOLS)}")


def pooled(latent: np.ndarray) -> dict[str, np.ndarray]:
    """latent [B, 1+K, D] -> {"cls": [B, D], "mean": [B, D]}: the two features engines are compared on."""
    return {"cls": pool_tokens(latent, "cls"), "mean": pool_tokens(latent, "mean")}


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Unit length along the last axis; an all-zero vector stays zero."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, eps)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, F] arrays, in float64 (0 where a row is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-30)
