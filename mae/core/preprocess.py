"""Image files -> the normalized float32 `pixel_values` the graphs take. Numpy + Pillow only.

Steps (those of timm / torchvision's eval transform, to the last digit for a fully decoded image):

1. decode; a JPEG is decoded at a reduced DCT scale (Pillow `draft`) when the reduced image is still at least as
   large as the resize target, so the bicubic step still only downsamples (2-4x faster decode of a typical photo);
   `draft=False` decodes at full size and matches torchvision bit for bit;
2. EXIF orientation applied;
3. RGB. Grayscale is replicated; 16-bit grayscale (`I;16*`, `I`) is scaled to 8 bits with rounding (v / 257)
   rather than clipped; 16-bit RGB(A) PNG/TIFF are reduced to 8 bits by Pillow's decoder (high byte); float `F`
   images are taken to be in [0, 1]; CMYK goes through Pillow's conversion (ICC profiles are not applied).
   Transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) is **composited on white**: what a
   viewer shows on a page. Dropping alpha instead would expose whatever colour hides under transparent pixels
   (often black, or garbage from an editor), which says nothing about the picture. A fully opaque alpha channel
   gives exactly the same pixels as dropping it;
4. bicubic (antialiased) resize: `center` sets the shorter side to floor(size / crop_pct) (the longer side scaled
   and truncated, as torchvision's `Resize(int)`), then takes a centre crop with offsets round((side - size) / 2);
   `squash` resizes straight to size x size, and an image already that size is left untouched;
5. [0, 1] then (x - mean) / std in float32, channels first: [3, S, S].

Bad files raise `ImageError` (an `MAEError`) with a short `.reason`: "missing", "unreadable", "empty",
"not_an_image", "corrupt", "truncated", "too_large" (more pixels than Pillow's `Image.MAX_IMAGE_PIXELS`, checked
from the header before anything is decoded) or "unsupported_mode".
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import is_number, is_whole_number, shown
from .errors import MAEError

RESIZE_MODES = ("center", "squash")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = (255, 255, 255)
# EXIF orientations 5-8 transpose the picture: width and height swap.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION_TAG = 0x0112

ImageSize = tuple[int, int]  # (width, height)
T = TypeVar("T")

# What Pillow raises for a damaged file, besides its own errors (a broken chunk is a SyntaxError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


@dataclass(frozen=True)
class Preprocessing:
    size: int  # model input side
    resize: str = "center"  # "center": shorter side to size / crop_pct, centre crop; "squash": straight to size
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        """As mae.json and run.json record it (lists, not tuples: what JSON reads back)."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "pre-processing settings", hint: str | None = None) -> Preprocessing:
        """Pre-processing from a JSON object (mae.json's `preprocessing`, an ONNX graph's `mae.preprocessing`);
        keys left out take their defaults, a wrong value is one MAEError naming `source` and the key."""

        interpolations = ("bicubic",)  # what mae.core.preprocess resizes with

        def wrong(key: str, expected: str) -> MAEError:
            return MAEError(f"{source}: preprocessing.{key} must be {expected}, got {shown(data[key])}.", hint=hint)

        if not isinstance(data, dict):
            raise MAEError(f"{source}: preprocessing must be a JSON object, got {shown(data)}.", hint=hint)
        if "size" not in data:
            raise MAEError(f"{source}: preprocessing.size (the model's input side, pixels) is missing.", hint=hint)
        data = {"resize": "center", "crop_pct": 0.875, "interpolation": "bicubic", **data}
        data.setdefault("mean", list(IMAGENET_MEAN))
        data.setdefault("std", list(IMAGENET_STD))
        if not is_whole_number(data["size"]) or data["size"] < 1:
            raise wrong("size", "a positive whole number (pixels)")
        if not isinstance(data["resize"], str) or data["resize"] not in RESIZE_MODES:
            raise wrong("resize", " or ".join(map(repr, RESIZE_MODES)))
        if not is_number(data["crop_pct"]) or not 0 < data["crop_pct"] <= 1:
            raise wrong("crop_pct", "a number in (0, 1]")
        if not isinstance(data["interpolation"], str) or data["interpolation"] not in interpolations:
            raise wrong("interpolation", " or ".join(map(repr, interpolations)))
        for key, positive in (("mean", False), ("std", True)):
            values = data[key]
            if not (
                isinstance(values, (list, tuple))
                and len(values) == 3
                and all(is_number(v) and (v > 0 or not positive) for v in values)
            ):
                raise wrong(key, f"3 {'positive ' if positive else ''}numbers (one per RGB channel)")
        return cls(
            size=int(data["size"]),
            resize=data["resize"],
            crop_pct=float(data["crop_pct"]),
            interpolation=data["interpolation"],
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


class ImageError(MAEError):
    """A file that cannot be turned into an image. `reason` is a short code; `path` the file."""

    def __init__(self, reason: str, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message, hint=None)
        self.reason = reason
        self.path = None if path is None else str(path)


# ------------------------------------------------------------------------------------------------ geometry
def _check_resize(pre: Preprocessing, resize: str | None) -> str:
    mode = resize or pre.resize
    if mode not in RESIZE_MODES:
        raise MAEError(f"Unknown resize mode {mode!r}", hint=f"use one of: {', '.join(RESIZE_MODES)}")
    if mode == "center" and not 0.0 < pre.crop_pct <= 1.0:
        raise MAEError(f"crop_pct {pre.crop_pct} must be in (0, 1]: the centre crop cannot be larger than the image")
    return mode


def resized_size(width: int, height: int, pre: Preprocessing, resize: str | None = None) -> ImageSize:
    """(width, height) of the image after the resize step, before the centre crop."""
    mode = _check_resize(pre, resize)
    if mode == "squash":
        return pre.size, pre.size
    short_target = math.floor(pre.size / pre.crop_pct)
    # torchvision Resize(int): the longer side is scaled and truncated with int().
    if width <= height:
        return short_target, int(short_target * height / width)
    return int(short_target * width / height), short_target


# -------------------------------------------------------------------------------------------------- decode
def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block does not make a broken picture: keep the stored orientation
        return 1


def _open(path: str | os.PathLike) -> Image.Image:
    """Open (header only) with every failure mapped to an ImageError."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ImageError("missing", f"{path}: no such file", path) from exc
    except OSError as exc:
        raise ImageError("unreadable", f"{path}: {exc.strerror or exc}", path) from exc
    if path.is_dir():
        raise ImageError("unreadable", f"{path} is a directory", path)
    if size == 0:
        raise ImageError("empty", f"{path} is empty (0 bytes)", path)
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; we refuse those too (checked below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"{path}: {exc}", path) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", f"{path} is not an image Pillow can read", path) from exc
    except PermissionError as exc:
        raise ImageError("unreadable", f"{path}: permission denied", path) from exc
    except DECODE_ERRORS as exc:
        raise ImageError("corrupt", f"{path}: cannot read the image header ({exc})", path) from exc
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        image.close()
        raise ImageError(
            "too_large",
            f"{path}: {width}x{height} = {width * height} pixels is more than the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS; guards against decompression bombs)",
            path,
        )
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError("corrupt", f"{path}: image size {width}x{height}", path)
    return image


def _load_pixels(image: Image.Image, path: str | os.PathLike) -> None:
    """Decode the pixel data, mapping decoder failures to ImageError."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"{path}: {exc}", path) from exc
    except MemoryError as exc:
        raise ImageError("too_large", f"{path}: not enough memory to decode it", path) from exc
    except DECODE_ERRORS as exc:
        reason = "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise ImageError(reason, f"{path}: {reason} image data ({exc})", path) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module notes for 16-bit, float and transparency)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale: Pillow's convert("L") clips at 255, so scale 0..65535 -> 0..255 ourselves.
        values = np.asarray(image).astype(np.float64)  # [H, W]
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)  # [H, W], taken to be in [0, 1]
        gray = np.clip(np.rint(np.nan_to_num(values) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    has_transparency = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_transparency:
        try:
            rgba = image.convert("RGBA")
        except (ValueError, OSError) as exc:
            message = f"cannot convert mode {mode} with transparency to RGB ({exc})"
            raise ImageError("unsupported_mode", message) from exc
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported_mode", f"cannot convert image mode {mode} to RGB ({exc})") from exc


def _decode(
    path: str | os.PathLike,
    draft_for: tuple[Preprocessing, str] | ImageSize | None,
    finish: Callable[[Image.Image], T],
) -> tuple[T, ImageSize]:
    """Open once, draft (JPEG), decode, orient, RGB, then `finish(rgb)` while the file is still open.

    Returns (what finish returned, (width, height) of the upright original). `finish` must not return the image
    itself: closing the file on the way out also releases the pixels of the image it was decoded into.
    """
    image = _open(path)
    with image:
        orientation = _exif_orientation(image)
        stored = image.size
        upright = (stored[1], stored[0]) if orientation in TRANSPOSING_ORIENTATIONS else stored
        if draft_for is not None and image.format == "JPEG":
            if isinstance(draft_for[0], Preprocessing):
                pre, mode = draft_for
                # The resize target of the upright picture, mapped back to the stored orientation.
                target_w, target_h = resized_size(upright[0], upright[1], pre, mode)
                draft_size = (target_w, target_h) if upright == stored else (target_h, target_w)
            else:
                draft_size = draft_for
            image.draft("RGB", (max(1, int(draft_size[0])), max(1, int(draft_size[1]))))
        _load_pixels(image, path)
        if orientation != 1:
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # an unusual EXIF block: keep the stored orientation rather than lose the picture
                upright = stored
        try:
            rgb = to_rgb(image)
        except ImageError as exc:
            raise ImageError(exc.reason, f"{path}: {exc.message}", path) from exc
        return finish(rgb), upright


def load_image(path: str | os.PathLike, draft_size: ImageSize | None = None) -> Image.Image:
    """Decode `path` to an RGB Pillow image with its EXIF orientation applied.

    draft_size: (width, height) in the *stored* orientation that a decoded JPEG must at least have; the decoder
    then picks the largest DCT reduction (1/2, 1/4, 1/8) that keeps both sides at least that large. None: full size.
    """
    return _decode(path, draft_size, lambda rgb: rgb.copy())[0]


# ------------------------------------------------------------------------------------------------- tensors
def _normalization_tables(pre: Preprocessing) -> np.ndarray:
    """[3, 256] float32: (v / 255 - mean) / std for every byte value, with torchvision's float32 op order."""
    values = np.arange(256, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None]
    return ((values[None, :] - mean) / std).astype(np.float32)


_TABLE_CACHE: dict[tuple, np.ndarray] = {}


def _tables(pre: Preprocessing) -> np.ndarray:
    key = (tuple(pre.mean), tuple(pre.std))
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = _TABLE_CACHE[key] = _normalization_tables(pre)
    return table


def resize_image(image: Image.Image, pre: Preprocessing, resize: str | None = None) -> Image.Image:
    """RGB image -> RGB image of pre.size x pre.size (bicubic resize, then centre crop for `center`)."""
    mode = _check_resize(pre, resize)
    if pre.interpolation != "bicubic":
        raise MAEError(f"interpolation {pre.interpolation!r} is not supported", hint="bundles use bicubic")
    target = resized_size(image.width, image.height, pre, mode)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC)
    if mode == "center":
        size = pre.size
        left = int(round((image.width - size) / 2.0))
        top = int(round((image.height - size) / 2.0))
        if (left, top, image.width, image.height) != (0, 0, size, size):
            image = image.crop((left, top, left + size, top + size))
    return image


def preprocess_image(image: Image.Image | np.ndarray, pre: Preprocessing, resize: str | None = None) -> np.ndarray:
    """A Pillow image (any mode) or a uint8 [H, W, 3] array -> float32 [3, S, S] normalized pixel values."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise MAEError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image, "RGB")
    image = resize_image(to_rgb(image), pre, resize)
    pixels = np.asarray(image)  # [S, S, 3] uint8
    table = _tables(pre)  # [3, 256]
    out = np.empty((3, pre.size, pre.size), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[:, :, channel], out=out[channel])
    return out


def load_and_preprocess(
    path: str | os.PathLike, pre: Preprocessing, resize: str | None = None, draft: bool = True
) -> tuple[np.ndarray, ImageSize]:
    """Decode and preprocess one file: (float32 [3, S, S], (width, height) of the upright original)."""
    mode = _check_resize(pre, resize)
    return _decode(path, (pre, mode) if draft else None, lambda rgb: preprocess_image(rgb, pre, mode))


def denormalize(pixel_values: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """float32 [B, 3, S, S] normalized -> float32 [B, S, S, 3] in [0, 1], for pictures."""
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    if pixel_values.ndim == 3:
        pixel_values = pixel_values[None]
    mean = np.asarray(pre.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[None, :, None, None]
    pictures = pixel_values * std + mean  # [B, 3, S, S]
    return np.clip(pictures, 0.0, 1.0).transpose(0, 2, 3, 1).copy()
