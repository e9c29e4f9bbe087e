"""The no-model baselines a masked reconstruction is held against (mae.core.baselines), on synthetic pictures."""

from __future__ import annotations

import numpy as np
import pytest

from mae.core.baselines import baseline_fills, baseline_psnrs, laplace_fill, masked_psnr, mean_colour_fill
from mae.core.visualize import mask_to_pixels

SIDE, PATCH = 16, 4  # a 4 x 4 grid of patches


def interior_mask() -> np.ndarray:
    """[1, 16]: the four centre patches of the 4 x 4 grid removed (each has visible patches all round)."""
    mask = np.zeros((1, 16), dtype=np.float32)
    mask[0, [5, 6, 9, 10]] = 1
    return mask


def ramp() -> np.ndarray:
    """[1, S, S, 3] in [0, 1]: a linear ramp, different per channel (harmonic: a Laplace fill reproduces it)."""
    rows, cols = np.indices((SIDE, SIDE)) / (SIDE - 1)
    channels = [0.2 + 0.5 * cols, 0.1 + 0.4 * rows + 0.3 * cols, 0.9 - 0.6 * rows]
    return np.stack(channels, axis=-1)[None]


def test_laplace_fill_reproduces_a_linear_ramp_in_interior_holes():
    removed = mask_to_pixels(interior_mask(), PATCH, SIDE)
    filled = laplace_fill(ramp(), removed)
    assert np.abs(filled - ramp()).max() < 1e-5
    assert masked_psnr(ramp(), filled, removed)[0] > 90


def test_fills_keep_the_visible_pixels_and_stay_in_range():
    rng = np.random.default_rng(0)
    original = rng.random((3, SIDE, SIDE, 3))
    mask = (rng.random((3, 16)) < 0.75).astype(np.float32)
    mask[:, 0] = 0  # at least one visible patch
    removed = mask_to_pixels(mask, PATCH, SIDE)
    for filled in baseline_fills(original, mask, PATCH).values():
        np.testing.assert_array_equal(filled * (1 - removed), original * (1 - removed))
        assert filled.min() >= 0.0 and filled.max() <= 1.0  # a harmonic fill never leaves its boundary's range


def test_a_constant_picture_is_filled_exactly_by_both():
    original = np.full((2, SIDE, SIDE, 3), 0.4)
    mask = np.ones((2, 16), dtype=np.float32)
    mask[:, [0, 15]] = 0  # holes touching the border too
    psnrs = baseline_psnrs(original, mask, PATCH)
    assert np.all(psnrs["mean_colour"] > 90) and np.all(psnrs["laplace"] > 90)  # exact up to float rounding


def test_mean_colour_fill_uses_the_visible_mean_per_channel():
    original = np.zeros((1, 2, 2, 3))
    original[0, 0, 0] = (0.2, 0.4, 0.6)  # visible
    original[0, 0, 1] = (0.4, 0.8, 0.2)  # visible
    mask = np.array([[0, 0, 1, 1]], dtype=np.float32)  # 1 px patches: the bottom row removed
    removed = mask_to_pixels(mask, 1, 2)
    filled = mean_colour_fill(original, removed)
    np.testing.assert_allclose(filled[0, 1, 0], (0.3, 0.6, 0.4))
    expected = 10 * np.log10(1 / np.mean(np.array([0.3, 0.6, 0.4]) ** 2))
    assert masked_psnr(original, filled, removed)[0] == pytest.approx(expected)


def test_laplace_beats_mean_colour_on_a_smooth_picture_and_psnr_only_counts_removed_pixels():
    original = ramp()
    mask = np.ones((1, 16), dtype=np.float32)
    mask[0, [0, 3, 12, 15, 5]] = 0
    psnrs = baseline_psnrs(original, mask, PATCH)
    assert psnrs["laplace"][0] > psnrs["mean_colour"][0] + 3
    removed = mask_to_pixels(mask, PATCH, SIDE)
    wrong_visible = original + (1 - removed) * 0.5  # errors on visible pixels are not counted
    assert masked_psnr(original, wrong_visible, removed)[0] == np.inf


def test_psnr_is_nan_where_nothing_was_removed_as_the_models_metric_is():
    """An exact fill is infinitely good; an image with no removed pixel has no measure at all (not 'perfect')."""
    original = ramp()
    nothing = np.zeros_like(original)
    assert np.isnan(masked_psnr(original, original * 0.5, nothing)[0])
