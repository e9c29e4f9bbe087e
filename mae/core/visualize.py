"""Reconstruction pictures and metrics in numpy + Pillow: original | masked | reconstruction | reconstruction + visible.

Inputs are what the graphs see and produce:
    pixel_values  float32 [N, 3, S, S]  normalized with the preprocessing mean/std
    pred          float32 [N, L, p*p*3] the decoder's output, in the space the model was trained on
    mask          float32 [N, L]        1 = removed, 0 = kept

The model predicts normalized pixels; with `norm_pix_loss` it predicts each patch normalized by its own mean and
(unbiased) std, so those statistics are taken from the input image to map the prediction back to pixels (as the
Hugging Face ViTMAE demo does). Pictures are float in [0, 1], [N, S, S, 3].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .patches import normalize_patches, patchify, unpatchify

DEFAULT_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
NORM_PIX_NOTE = "norm_pix_loss: each predicted patch de-normalized with the input patch's own mean and std"
MASK_GREY = 0.5  # fill of removed patches in the masked panel


class Panels(NamedTuple):
    original: np.ndarray  # [N, S, S, 3] float32 in [0, 1], the input as the model saw it
    masked: np.ndarray  # [N, S, S, 3] removed patches grey
    reconstruction: np.ndarray  # [N, S, S, 3] the whole prediction in pixels, clipped to [0, 1]
    reconstruction_visible: np.ndarray  # [N, S, S, 3] prediction on removed patches, input on kept ones


class MaskedMetrics(NamedTuple):
    mse: np.ndarray  # [N] mean squared error in [0, 1] pixels over removed patches (of the clipped picture)
    psnr: np.ndarray  # [N] dB, 10 log10(1 / mse)
    loss: np.ndarray  # [N] the training loss: MSE over removed patches in the model's target space


# --------------------------------------------------------------------------------------------- pixels
def denormalize_chw(pixel_values: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[N, 3, S, S] normalized -> [N, S, S, 3] float32 pixels in [0, 1] (not clipped)."""
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (np.asarray(pixel_values, dtype=np.float32) * std_arr + mean_arr).transpose(0, 2, 3, 1)


def target_patches(pixel_values: np.ndarray, patch_size: int, norm_pix_loss: bool) -> np.ndarray:
    """What the decoder was trained to predict: [N, L, p*p*3] patches of the normalized input (per patch
    normalized again when `norm_pix_loss`)."""
    patches = patchify(np.asarray(pixel_values, dtype=np.float32), patch_size)
    return normalize_patches(patches)[0] if norm_pix_loss else patches


def prediction_to_normalized(
    pred: np.ndarray, pixel_values: np.ndarray, patch_size: int, norm_pix_loss: bool
) -> np.ndarray:
    """pred [N, L, p*p*3] -> [N, 3, S, S] in the input's normalized space (before mean/std de-normalization).

    With `norm_pix_loss` each patch is mapped back with the mean and unbiased std of the same input patch.
    """
    pred = np.asarray(pred, dtype=np.float32)
    if norm_pix_loss:
        _, patch_mean, patch_std = normalize_patches(patchify(np.asarray(pixel_values, np.float32), patch_size))
        pred = pred * patch_std + patch_mean  # [N, L, p*p*3]
    return unpatchify(pred, patch_size, chans=pixel_values.shape[1])


def mask_to_pixels(mask: np.ndarray, patch_size: int, image_size: int) -> np.ndarray:
    """[N, L] patch mask -> [N, S, S, 1] pixel mask (1 = removed)."""
    mask = np.asarray(mask, dtype=np.float32)
    batch, length = mask.shape
    grid = image_size // patch_size
    if grid * grid != length:
        raise ValueError(f"mask has {length} patches, but a {image_size}px image has {grid * grid} of {patch_size}px")
    pixel_mask = np.repeat(np.repeat(mask.reshape(batch, grid, grid), patch_size, axis=1), patch_size, axis=2)
    return pixel_mask[..., None]


@dataclass(frozen=True)
class PixelSpace:
    """How a model's predictions map back to pictures: its patch size, the pre-processing's mean and std, and
    whether it predicts per-patch normalized pixels (norm_pix_loss)."""

    patch_size: int
    mean: Sequence[float]
    std: Sequence[float]
    norm_pix_loss: bool


def build_panels(pixel_values: np.ndarray, pred: np.ndarray, mask: np.ndarray, space: PixelSpace) -> Panels:
    """The four pictures of the MAE demo, float32 [N, S, S, 3] in [0, 1]."""
    patch_size, mean, std, norm_pix_loss = space.patch_size, space.mean, space.std, space.norm_pix_loss
    pixel_values = np.asarray(pixel_values, dtype=np.float32)  # [N, 3, S, S]
    original = np.clip(denormalize_chw(pixel_values, mean, std), 0.0, 1.0)
    recon_normalized = prediction_to_normalized(pred, pixel_values, patch_size, norm_pix_loss)
    reconstruction = np.clip(denormalize_chw(recon_normalized, mean, std), 0.0, 1.0)
    removed = mask_to_pixels(mask, patch_size, pixel_values.shape[-1])  # [N, S, S, 1]
    masked = original * (1.0 - removed) + MASK_GREY * removed
    visible = original * (1.0 - removed) + reconstruction * removed
    return Panels(original, masked.astype(np.float32), reconstruction, visible.astype(np.float32))


def masked_metrics(
    pixel_values: np.ndarray, pred: np.ndarray, mask: np.ndarray, space: PixelSpace, panels: Panels | None = None
) -> MaskedMetrics:
    """Per image, on removed patches only: pixel MSE / PSNR of the picture, and the training loss."""
    patch_size, norm_pix_loss = space.patch_size, space.norm_pix_loss
    mask = np.asarray(mask, dtype=np.float32)  # [N, L]
    removed_count = np.maximum(mask.sum(axis=1), 1.0)  # [N]; mask ratio 0 gives 0 removed patches
    target = target_patches(pixel_values, patch_size, norm_pix_loss)
    per_patch_loss = ((np.asarray(pred, np.float32) - target) ** 2).mean(axis=-1)  # [N, L]
    loss = (per_patch_loss * mask).sum(axis=1) / removed_count

    panels = panels or build_panels(pixel_values, pred, mask, space)
    to_chw = (0, 3, 1, 2)
    squared = (panels.reconstruction - panels.original) ** 2  # [N, S, S, 3]
    per_patch_mse = patchify(squared.transpose(to_chw), patch_size).mean(axis=-1)  # [N, L]
    mse = (per_patch_mse * mask).sum(axis=1) / removed_count
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-30)), np.inf)
    no_removed = mask.sum(axis=1) == 0
    mse, psnr, loss = (np.where(no_removed, np.nan, values).astype(np.float32) for values in (mse, psnr, loss))
    return MaskedMetrics(mse=mse, psnr=psnr, loss=loss)


# --------------------------------------------------------------------------------------------- picture
def to_uint8_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] as is; float in [0, 1] scaled and rounded; a single [H, W, 3] image gets N = 1."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `width` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def reconstruction_panels(
    original: np.ndarray,
    masked: np.ndarray,
    reconstruction: np.ndarray,
    reconstruction_visible: np.ndarray,
    titles: Sequence[str] = DEFAULT_TITLES,
    note: str | None = None,
    row_labels: Sequence[str] | None = None,
    min_panel: int = 192,
) -> Image.Image:
    """N rows of 4 panels with column headers, an optional label under each row and a note line at the bottom.

    Arrays are uint8 or float in [0, 1], [N, H, W, 3] (all the same shape). Small images are enlarged with
    nearest-neighbour sampling to at least `min_panel` pixels so that patches stay crisp.
    """
    columns = [to_uint8_images(a) for a in (original, masked, reconstruction, reconstruction_visible)]
    if len({c.shape for c in columns}) != 1:
        raise ValueError(f"panel arrays differ in shape: {[c.shape for c in columns]}")
    if len(titles) != 4:
        raise ValueError(f"need 4 titles, got {len(titles)}")
    rows, height, width, _ = columns[0].shape
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"need {rows} row labels, got {len(row_labels)}")

    scale = max(1, math.ceil(min_panel / max(height, width)))
    panel_h, panel_w = height * scale, width * scale
    gap = max(4, panel_w // 40)
    font_size = max(11, min(18, panel_w // 14))
    font = _font(font_size)
    header_h = font_size + 2 * gap
    label_h = font_size + gap if row_labels is not None else 0
    note_h = font_size + 2 * gap if note else 0
    canvas_w = 4 * panel_w + 5 * gap
    canvas_h = header_h + rows * (panel_h + label_h + gap) + note_h

    canvas = Image.new("RGB", (canvas_w, canvas_h), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        text = _fit_text(draw, title, font, panel_w)
        x = gap + col * (panel_w + gap) + (panel_w - _text_width(draw, text, font)) // 2
        draw.text((x, gap), text, fill="black", font=font)
    y = header_h
    for row in range(rows):
        for col, images in enumerate(columns):
            tile = Image.fromarray(images[row])
            if scale > 1:
                tile = tile.resize((panel_w, panel_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (gap + col * (panel_w + gap), y))
        y += panel_h
        if row_labels is not None:
            text = _fit_text(draw, row_labels[row], font, canvas_w - 2 * gap)
            draw.text((gap, y + gap // 2), text, fill="black", font=font)
            y += label_h
        y += gap
    if note:
        text = _fit_text(draw, note, font, canvas_w - 2 * gap)
        draw.text((gap, y + gap // 2), text, fill=(90, 90, 90), font=font)
    return canvas


def panels_picture(
    panels: Panels, mask_ratio: float | None = None, norm_pix_loss: bool = False, row_labels=None
) -> Image.Image:
    """`reconstruction_panels` for a `Panels`, with the removed share in the masked header and the norm_pix note."""
    titles = list(DEFAULT_TITLES)
    if mask_ratio is not None:
        titles[1] = f"masked {mask_ratio:.0%}"
    note = NORM_PIX_NOTE if norm_pix_loss else None
    return reconstruction_panels(*panels, titles=titles, note=note, row_labels=row_labels)
