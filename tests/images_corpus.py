"""A corpus of odd and broken image files for pre-processing and embedding tests.

`write_corpus(folder)` writes every case and returns {file name: Case}; `Case.reason` is None for files that must
decode (with `check`, a property of the decoded RGB array to verify) and the expected `ImageError.reason` otherwise.
Everything is generated here (no downloads) and small: the decompression bombs only *claim* a huge size in their
header, so they cost a few bytes on disk and must be refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 48, 32  # small, non-square: orientation mistakes show up as swapped sides


@dataclass(frozen=True)
class Case:
    reason: str | None  # None: decodes; otherwise the expected ImageError.reason
    size: tuple[int, int] | None = None  # (width, height) of the upright original, for files that decode
    check: Callable[[np.ndarray], bool] | None = None  # on the decoded RGB uint8 [H, W, 3]


def gradient_rgb(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """uint8 [H, W, 3]: distinct values per channel, so channel swaps and flips are visible."""
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    red = np.broadcast_to(cols / max(width - 1, 1) * 255, (height, width))
    green = np.broadcast_to(rows / max(height - 1, 1) * 255, (height, width))
    blue = np.full((height, width), 64.0)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def png_bytes(pixels: np.ndarray, bit_depth: int, color_type: int, width: int | None = None, height: int | None = None):
    """A minimal PNG (IHDR, IDAT, IEND) written by hand: Pillow cannot write 16-bit RGB, nor lie about the size."""
    height = height if height is not None else pixels.shape[0]
    width = width if width is not None else pixels.shape[1]
    dtype = ">u2" if bit_depth == 16 else np.uint8
    rows = pixels.reshape(pixels.shape[0], -1).astype(dtype)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _jpeg_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(image, "JPEG", quality=95, exif=exif.tobytes())


def write_corpus(folder: Path) -> dict[str, Case]:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = gradient_rgb()
    files: dict[str, tuple[bytes, Case]] = {}

    def add(name: str, data: bytes, case: Case) -> None:
        files[name] = (data, case)

    size = (WIDTH, HEIGHT)
    # --- files that decode -------------------------------------------------------------------------------
    add("rgb.jpg", _save(Image.fromarray(rgb), "JPEG", quality=95), Case(None, size))
    add("rgb.png", _save(Image.fromarray(rgb), "PNG"), Case(None, size, lambda a: np.array_equal(a, rgb)))
    gray = rgb[:, :, 0]
    add(
        "gray_L.png",
        _save(Image.fromarray(gray, "L"), "PNG"),
        Case(None, size, lambda a: all(np.array_equal(a[:, :, c], gray) for c in range(3))),
    )
    # 16-bit grayscale spanning the whole range: scaled (65535 -> 255, 32768 -> 128), never clipped at 255.
    gray16 = (np.linspace(0, 65535, WIDTH)[None, :].repeat(HEIGHT, 0)).round().astype(np.uint16)
    expected16 = np.rint(gray16 / 257.0).astype(np.uint8)
    add(
        "gray16.png",
        png_bytes(gray16, 16, 0),
        Case(None, size, lambda a: np.array_equal(a[:, :, 1], expected16)),
    )
    add(
        "gray16.tif",
        _save(Image.fromarray(gray16), "TIFF"),
        Case(None, size, lambda a: np.array_equal(a[:, :, 0], expected16)),
    )
    # 16-bit RGB: Pillow keeps the high byte.
    rgb16 = rgb.astype(np.uint16) * 257
    add("rgb16.png", png_bytes(rgb16, 16, 2), Case(None, size, lambda a: np.array_equal(a, rgb)))
    # Palette, and palette with a transparent index (-> white).
    palette_image = Image.fromarray(rgb).quantize(colors=16)
    add("palette.png", _save(palette_image, "PNG"), Case(None, size))
    transparent = palette_image.copy()
    transparent.info["transparency"] = int(np.asarray(palette_image)[0, 0])
    add(
        "palette_transparent.png",
        _save(transparent, "PNG", transparency=int(np.asarray(palette_image)[0, 0])),
        Case(None, size, lambda a: np.array_equal(a[0, 0], [255, 255, 255])),
    )
    add("palette.gif", _save(palette_image, "GIF"), Case(None, size))
    # RGBA: left half fully transparent black (-> white), right half opaque (unchanged).
    rgba = np.concatenate([rgb, np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=-1)
    rgba[:, : WIDTH // 2, :3] = 0
    rgba[:, : WIDTH // 2, 3] = 0
    add(
        "rgba.png",
        _save(Image.fromarray(rgba, "RGBA"), "PNG"),
        Case(
            None,
            size,
            lambda a: (
                bool((a[:, : WIDTH // 2] == 255).all()) and np.array_equal(a[:, WIDTH // 2 :], rgb[:, WIDTH // 2 :])
            ),
        ),
    )
    la = np.stack([gray, np.full_like(gray, 0)], axis=-1)
    add("la.png", _save(Image.fromarray(la, "LA"), "PNG"), Case(None, size, lambda a: bool((a == 255).all())))
    # CMYK JPEG of pure cyan -> RGB (0, 255, 255) (within JPEG error).
    cyan = Image.new("CMYK", size, (255, 0, 0, 0))
    add(
        "cmyk.jpg",
        _save(cyan, "JPEG", quality=100),
        Case(None, size, lambda a: bool(np.abs(a.astype(int) - [0, 255, 255]).max() <= 3)),
    )
    add("bilevel.png", _save(Image.fromarray(gray > 128), "PNG"), Case(None, size))
    add("tiny_1x1.png", _save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), Case(None, (1, 1)))
    add("tiny_2x1.jpg", _save(Image.new("RGB", (2, 1), (200, 10, 30)), "JPEG"), Case(None, (2, 1)))
    # EXIF orientation 6 (rotate 90° clockwise to view): stored 48x32, upright 32x48.
    add(
        "exif_rotated.jpg",
        _jpeg_with_orientation(rgb, 6),
        Case(None, (HEIGHT, WIDTH), lambda a: a.shape[:2] == (WIDTH, HEIGHT)),
    )
    add("rgb.webp", _save(Image.fromarray(rgb), "WEBP", lossless=True), Case(None, size))
    add("rgb.bmp", _save(Image.fromarray(rgb), "BMP"), Case(None, size, lambda a: np.array_equal(a, rgb)))
    # --- files that must be refused ----------------------------------------------------------------------
    good_jpeg = _save(Image.fromarray(gradient_rgb(160, 120)), "JPEG", quality=90)
    good_png = _save(Image.fromarray(gradient_rgb(160, 120)), "PNG")
    add("empty.jpg", b"", Case("empty"))
    add("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], Case("truncated"))
    add("truncated.png", good_png[: len(good_png) // 2], Case("truncated"))
    # A JPEG start-of-image marker followed by garbage.
    garbage = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    add("corrupt.jpg", b"\xff\xd8\xff\xe0" + garbage, Case("corrupt"))
    add("not_an_image.jpg", b"this is a text file, not a picture\n" * 20, Case("not_an_image"))
    # Decompression bombs: headers claiming 100000 x 100000 (Pillow's error) and 10000 x 10000 pixels (over
    # MAX_IMAGE_PIXELS but under twice that, where Pillow only warns).
    tiny = np.zeros((1, 3), np.uint8)
    add("bomb_huge.png", png_bytes(tiny, 8, 2, width=100_000, height=100_000), Case("too_large"))
    add("bomb_large.png", png_bytes(tiny, 8, 2, width=10_000, height=10_000), Case("too_large"))

    corpus = {}
    for name, (data, case) in files.items():
        (folder / name).write_bytes(data)
        corpus[name] = case
    return corpus


# ---------------------------------------------------------------------------------------------- embed tests
def tiny_model_files(base: Path) -> tuple[Path, Path]:
    """(checkpoint, ONNX bundle) of a seeded mae_vit_test_patch8, made once per test session under `base`."""
    checkpoint = base / "tiny_mae" / "checkpoint.pt"
    bundle = base / "tiny_mae" / "bundle"
    if not (bundle / "mae.json").is_file():
        import torch

        from mae.checkpoint import save_checkpoint
        from mae.core.config import get_preset
        from mae.export import export_bundle
        from mae.model import MaskedAutoencoder

        torch.manual_seed(0)
        config = get_preset("mae_vit_test_patch8")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, MaskedAutoencoder(config).state_dict(), config)
        export_bundle(checkpoint, bundle, verify=False)
    return checkpoint, bundle


def decode_or_crash(task):  # noqa: ANN001, ANN201 - DecodeTask -> DecodedChunk
    """A decoder whose process dies on files named *crash*: stands in for a codec that segfaults."""
    import os

    from mae.runtime.embed_worker import decode_chunk

    if any("crash" in Path(path).name for path in task.paths):
        os._exit(3)
    return decode_chunk(task)


def tiny_hf_config(**changes):  # noqa: ANN201 - transformers.ViTMAEConfig
    """A Hugging Face ViTMAEConfig the size of mae_vit_test_patch8 (32 px, 8 px patches, D = 32)."""
    import transformers

    values = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
        "decoder_hidden_size": 16,
        "decoder_num_hidden_layers": 1,
        "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 64,
    }
    return transformers.ViTMAEConfig(**{**values, **changes})


def assert_same_output(out: Path, reference: Path, folders=("embeddings", "metadata", "failures", "done")) -> None:
    """Two `mae embed` output folders hold the same files, byte for byte (and no leftover ones)."""
    for folder in folders:
        names = sorted(p.name for p in (reference / folder).iterdir())
        assert sorted(p.name for p in (out / folder).iterdir()) == names, f"{folder}: different (or leftover) files"
        for name in names:
            assert (out / folder / name).read_bytes() == (reference / folder / name).read_bytes(), f"{folder}/{name}"
