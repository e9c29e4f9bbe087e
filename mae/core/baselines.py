"""What a masked reconstruction must beat: two ways to fill removed patches that know nothing about images.

- **mean colour**: every removed pixel takes the mean colour of the image's visible pixels. A model that only learnt
  "images are about this bright" reaches it.
- **Laplace (harmonic) fill**: the removed pixels are the solution of Laplace's equation with the visible pixels as
  fixed boundary values (each removed pixel is the mean of its 4 neighbours; at the image border the missing
  neighbour is the pixel itself, a zero-gradient boundary). It is the smoothest surface through the visible pixels:
  gradients and ramps continue into the holes, edges blur. A model that only learnt "neighbouring pixels look
  alike" reaches it; beating it needs knowledge of what the images look like (strokes, shapes).

The fill is solved by red-black successive over-relaxation (numpy only, all images and channels at once), started
from the mean-colour fill, until the largest change of a sweep is below `tolerance`. Every array is a picture in
[0, 1], [N, S, S, C]; `removed` is [N, S, S, 1] (1 = removed), as `mae.core.visualize.mask_to_pixels` gives it.
"""

from __future__ import annotations

import numpy as np

from .visualize import mask_to_pixels

SOR_OMEGA = 1.8  # over-relaxation: near the optimum 2 / (1 + sin(pi / n)) for 16-64 px images
MAX_SWEEPS = 2000  # a 64 px image converges in a few hundred
TOLERANCE = 1e-6  # largest change of one sweep, in [0, 1] pixel units


def mean_colour_fill(original: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Removed pixels set to the mean colour of the visible ones, per image: [N, S, S, C] -> [N, S, S, C]."""
    original = np.asarray(original, dtype=np.float64)
    visible = 1.0 - removed
    mean_colour = (original * visible).sum(axis=(1, 2)) / np.maximum(visible.sum(axis=(1, 2)), 1.0)  # [N, C]
    return original * visible + mean_colour[:, None, None, :] * removed


def _neighbour_mean(image: np.ndarray) -> np.ndarray:
    """Mean of the 4 neighbours of every pixel, [N, S, S, C]; an edge pixel's missing neighbour is itself."""
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return 0.25 * (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:])


def laplace_fill(
    original: np.ndarray, removed: np.ndarray, tolerance: float = TOLERANCE, max_sweeps: int = MAX_SWEEPS
) -> np.ndarray:
    """Removed pixels filled harmonically from the visible ones (see the module docstring): -> [N, S, S, C].

    Visible pixels are returned unchanged; a linear ramp is filled exactly wherever the holes do not touch the border.
    """
    filled = mean_colour_fill(original, removed)  # float64: the sweeps converge below float32 noise
    rows, cols = np.indices(filled.shape[1:3])
    unknown = np.broadcast_to(removed.astype(bool), filled.shape)
    colours = [unknown & (((rows + cols) % 2 == parity)[None, :, :, None]) for parity in (0, 1)]
    for _ in range(max_sweeps):
        change = 0.0
        for colour in colours:  # a red pixel's neighbours are black: each half updates from the other's latest
            step = SOR_OMEGA * (_neighbour_mean(filled) - filled)
            filled[colour] += step[colour]
            change = max(change, float(np.abs(step[colour]).max(initial=0.0)))
        if change < tolerance:
            break
    return filled


def masked_psnr(original: np.ndarray, filled: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """PSNR in dB over removed pixels only, per image: [N]; infinite where the fill is exact, NaN where nothing was
    removed (as `mae.core.visualize.masked_metrics` gives the model: no pixels, no measure)."""
    squared = (np.clip(filled, 0.0, 1.0) - np.asarray(original, dtype=np.float64)) ** 2 * removed
    counted = removed.sum(axis=(1, 2, 3))
    mse = squared.sum(axis=(1, 2, 3)) / np.maximum(counted * original.shape[-1], 1.0)
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)
    return np.where(counted > 0, psnr, np.nan)


def baseline_fills(original: np.ndarray, mask: np.ndarray, patch_size: int) -> dict[str, np.ndarray]:
    """Both baselines' pictures for the model's masking: {"mean_colour": [N, S, S, C], "laplace": [N, S, S, C]}.

    original [N, S, S, C] in [0, 1] (the picture the model saw); mask [N, L] (1 = removed).
    """
    removed = mask_to_pixels(mask, patch_size, original.shape[1]).astype(np.float64)  # [N, S, S, 1]
    return {"mean_colour": mean_colour_fill(original, removed), "laplace": laplace_fill(original, removed)}


def baseline_psnrs(original: np.ndarray, mask: np.ndarray, patch_size: int) -> dict[str, np.ndarray]:
    """Per-image PSNR on removed patches of both baselines, {"mean_colour": [N], "laplace": [N]} (dB): the numbers a
    model's `masked_metrics` PSNR is held against."""
    removed = mask_to_pixels(mask, patch_size, original.shape[1]).astype(np.float64)
    fills = baseline_fills(original, mask, patch_size)
    return {name: masked_psnr(original, fill, removed) for name, fill in fills.items()}
