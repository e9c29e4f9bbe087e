"""Calibration images for int8: the user's own, or random crops of photos that ship with scikit-image/-learn.

The images go through the bundle's own pre-processing, so the ranges an int8 graph is calibrated on are the ones
it will see. A part is held out: the int8 gate (`mae.export.verify`) judges the graphs on images that calibration
never saw, next to the fixed verification photos.

- `--calibration DIR` (a folder, a text file of paths or a glob, as `mae embed` reads them): a seeded shuffle,
  then `held_out_count(n)` images held out and up to `count` of the rest for calibration. Unreadable files are
  skipped and counted.
- No `--calibration`: random crops (scale, aspect, flip) of the shipped photos, except the verification photos,
  whose crops are the held-out set. Real photos, but not the user's: the bundle records that it was so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mae.core.errors import MAEError
from mae.core.masking import masking_from_noise, random_noise
from mae.core.preprocess import ImageError, Preprocessing, load_and_preprocess, preprocess_image
from mae.runtime.inputs import list_inputs

DEFAULT_COUNT = 64
MIN_CALIBRATION = 8  # fewer images than this do not give ranges worth trusting
MIN_HELD_OUT, MAX_HELD_OUT = 4, 32
HELD_OUT_FRACTION = 0.2
MASK_RATIOS = (0.0, 0.75)  # calibrate on what both the embedding path and masked encoding see
BATCH = 8
SHIPPED = "shipped photos (random crops of scikit-image / scikit-learn photos; pass --calibration DIR for yours)"


@dataclass(frozen=True)
class Calibration:
    source: str  # a path as given, or SHIPPED
    names: list[str]  # one per calibration image
    pixels: np.ndarray  # float32 [N, 3, S, S], pre-processed
    held_out_names: list[str]
    held_out: np.ndarray  # float32 [M, 3, S, S]
    seed: int
    skipped: int = 0  # user files that could not be read

    def feeds(self, num_patches: int) -> list[dict[str, np.ndarray]]:
        """Encoder inputs for calibration: batches of BATCH images at each of MASK_RATIOS, seeded masks."""
        feeds = []
        for start in range(0, len(self.pixels), BATCH):
            batch = self.pixels[start : start + BATCH]
            for index, ratio in enumerate(MASK_RATIOS):
                noise = random_noise(len(batch), num_patches, seed=self.seed + 7919 * start + index)
                feeds.append({"pixel_values": batch, "ids_keep": masking_from_noise(noise, ratio).ids_keep})
        return feeds

    def to_dict(self) -> dict[str, Any]:
        """What mae.json records."""
        return {
            "source": self.source,
            "count": len(self.pixels),
            "held_out": len(self.held_out),
            "skipped": self.skipped,
            "mask_ratios": list(MASK_RATIOS),
            "seed": self.seed,
        }


def held_out_count(total: int) -> int:
    return int(min(MAX_HELD_OUT, max(MIN_HELD_OUT, math.ceil(HELD_OUT_FRACTION * total))))


def load_calibration(
    source: str | Path | None, preprocessing: Preprocessing, count: int = DEFAULT_COUNT, seed: int = 0
) -> Calibration:
    """The calibration and held-out images for int8, pre-processed as the bundle says."""
    if count < MIN_CALIBRATION:
        raise MAEError(
            f"--calibration-count {count} is too few to calibrate int8.", hint=f"use at least {MIN_CALIBRATION}"
        )
    if source is None:
        return _shipped(preprocessing, count, seed)
    return _user_images(source, preprocessing, count, seed)


def _user_images(source: str | Path, preprocessing: Preprocessing, count: int, seed: int) -> Calibration:

    inputs = list_inputs(source)
    order = np.random.default_rng(seed).permutation(len(inputs))
    wanted = count + held_out_count(count)
    names: list[str] = []
    pixels: list[np.ndarray] = []
    skipped = 0
    for index in order:
        if len(pixels) >= wanted:
            break
        try:
            array, _ = load_and_preprocess(inputs.paths[index], preprocessing)
        except ImageError:
            skipped += 1
            continue
        names.append(inputs.keys[index])
        pixels.append(array)
    held = held_out_count(count if len(pixels) >= wanted else len(pixels))
    if len(pixels) - held < MIN_CALIBRATION:
        raise MAEError(
            f"{source} gave {len(pixels)} readable images ({skipped} unreadable); int8 calibration needs at least "
            f"{MIN_CALIBRATION + MIN_HELD_OUT} ({MIN_CALIBRATION} to calibrate, {MIN_HELD_OUT} held out to check).",
            hint="pass a folder with more images, or leave --calibration out to use the shipped photos",
        )
    stacked = np.stack(pixels)
    return Calibration(
        source=str(source),
        names=names[held:],
        pixels=stacked[held:],
        held_out_names=names[:held],
        held_out=stacked[:held],
        seed=seed,
        skipped=skipped,
    )


def random_crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crop of 25-100% of the area with aspect 3:4..4:3, flipped half the time (uint8 [h, w, 3])."""
    height, width = photo.shape[:2]
    area = height * width * rng.uniform(0.25, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_h = int(min(height, max(8, round(math.sqrt(area / aspect)))))
    crop_w = int(min(width, max(8, round(math.sqrt(area * aspect)))))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    crop = photo[top : top + crop_h, left : left + crop_w]
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def _shipped(preprocessing: Preprocessing, count: int, seed: int) -> Calibration:
    from mae.data import shipped_photos

    from .verify import PHOTOS

    photos = shipped_photos()
    verification = [name for name in PHOTOS if name in photos]  # held out: the export checks on these
    pool = sorted(name for name in photos if name not in verification)
    rng = np.random.default_rng(seed)

    def crops(names: list[str], number: int) -> tuple[list[str], np.ndarray]:
        picked = [names[i % len(names)] for i in range(number)]
        arrays = [preprocess_image(random_crop(photos[name], rng), preprocessing) for name in picked]
        return [f"{name} (crop {i})" for i, name in enumerate(picked)], np.stack(arrays)

    names, pixels = crops(pool, count)
    held_names, held = crops(verification, held_out_count(count))
    return Calibration(SHIPPED, names, pixels, held_names, held, seed)
