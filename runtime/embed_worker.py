"""Decoding for `mae embed`, run in worker processes (or in the main one with --workers 0).

Kept apart from `embed.py` so that a spawned worker imports only numpy, Pillow and the pre-processing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mae.core.preprocess import ImageError, Preprocessing, load_and_preprocess


@dataclass(frozen=True)
class DecodeTask:
    indexes: list[int]  # global input positions
    paths: list[str]
    preprocessing: dict  # Preprocessing.to_dict(), picklable
    resize: str


@dataclass
class DecodedChunk:
    pixel_values: np.ndarray  # float32 [n_ok, 3, S, S]
    ok_indexes: list[int]  # positions of the rows of pixel_values
    sizes: list[tuple[int, int]]  # (width, height) of each decoded original
    failures: list[tuple[int, str, str]]  # (position, reason, message)
    seconds: float  # time spent decoding in the worker


def init_worker(max_image_pixels: int | None) -> None:
    """Workers inherit the caller's decompression-bomb limit (a spawned process would start from Pillow's)."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels


def ready() -> int:
    """A no-op task: unpickling it imports this module (numpy, Pillow) in a fresh worker."""
    return os.getpid()


def decode_chunk(task: DecodeTask) -> DecodedChunk:
    started = time.perf_counter()
    pre = Preprocessing.from_dict(task.preprocessing)
    arrays: list[np.ndarray] = []
    ok_indexes: list[int] = []
    sizes: list[tuple[int, int]] = []
    failures: list[tuple[int, str, str]] = []
    for index, path in zip(task.indexes, task.paths, strict=True):
        try:
            pixels, size = load_and_preprocess(path, pre, task.resize)
        except ImageError as exc:
            failures.append((index, exc.reason, exc.message))
            continue
        except Exception as exc:  # a decoder bug must cost one image, not the job
            failures.append((index, "decode_error", f"{path}: {type(exc).__name__}: {exc}"))
            continue
        arrays.append(pixels)
        ok_indexes.append(index)
        sizes.append(size)
    pixel_values = np.stack(arrays) if arrays else np.zeros((0, 3, pre.size, pre.size), dtype=np.float32)
    return DecodedChunk(pixel_values, ok_indexes, sizes, failures, time.perf_counter() - started)
