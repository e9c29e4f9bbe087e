"""Training data: image discovery, the MAE pretraining augmentation, deterministic sharded sampling.

Every random choice for a sample (crop, flip, masking noise) comes from a generator seeded with
(seed, epoch, index). The data a step sees therefore depends only on the seed, the epoch and the step, not on the
number of loader workers, on which rank loads it, or on whether the run was interrupted and resumed.

Augmentation, as the original's `transforms.Compose` (torchvision is not needed):
RandomResizedCrop(img_size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) -> RandomHorizontalFlip(0.5) ->
ToTensor -> Normalize(ImageNet mean, std).

JPEGs are decoded at a reduced DCT scale (Pillow `draft`) only as far as both sides stay at least
img_size / sqrt(0.2 * 3/4): the smallest possible crop is then still at least img_size wide and high, so the bicubic
resize only ever downsamples and the picture loses nothing, while a large photo decodes several times faster.

A file that cannot be decoded never stops training: the dataset returns a `SkippedSample` marker, `collate` drops it
and reports it with the batch, and the trainer counts and logs it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .core.errors import MAEError
from .core.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    Preprocessing,
    load_and_preprocess,
    load_image,
    preprocess_image,
)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
CROP_SCALE = (0.2, 1.0)  # fraction of the image area kept by the random crop (the paper's recipe)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratio range of the random crop
CROP_ATTEMPTS = 10  # random tries before the centre-crop fallback, as torchvision


def draft_side(img_size: int) -> int:
    """Least side a drafted JPEG keeps: the smallest crop (area 0.2, aspect 3/4) of it is still >= img_size."""
    return math.ceil(img_size / math.sqrt(CROP_SCALE[0] * CROP_RATIO[0]))


# --------------------------------------------------------------------------------------------- discovery
def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root` (recursive, common extensions, case-insensitive), sorted, hidden entries skipped."""
    root = Path(root)
    if not root.exists():
        raise MAEError(f"Data folder {root} does not exist.", hint="pass --data with a folder of images")
    if not root.is_dir():
        raise MAEError(f"--data {root} is not a folder.", hint="pass the folder that holds the images")
    found: list[Path] = []
    visited: set[str] = set()  # real paths: a symlink loop is walked once
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(
            Path(folder) / name
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    if not found:
        raise MAEError(
            f"No images found in {root}.",
            hint=f"the folder is searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    return sorted(found)


def holdout_indices(count: int, wanted: int) -> list[int]:
    """Indices of up to `wanted` images held out for previews: evenly spread over the sorted list, independent of the
    seed (so a class-per-folder dataset gives previews from different folders), and at most one image in five."""
    held = min(wanted, count // 5)
    return [int((i + 0.5) * count / held) for i in range(held)] if held else []


def split_holdout(paths: Sequence[Path], wanted: int) -> tuple[list[Path], list[Path]]:
    """(training paths, held-out preview paths); the held-out images are never trained on."""
    held = set(holdout_indices(len(paths), wanted))
    train = [path for i, path in enumerate(paths) if i not in held]
    return train, [paths[i] for i in sorted(held)]


# ------------------------------------------------------------------------------------------ augmentation
def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample in one epoch."""
    return np.random.default_rng([seed, epoch, index])


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height), following torchvision's RandomResizedCrop.get_params.

    Area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`; up to 10 tries for a crop that fits,
    then a centre crop with the aspect ratio clamped into `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    image_ratio = width / height
    if image_ratio < min(ratio):  # too tall: full width, height from the narrowest allowed ratio
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):  # too wide
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def pretrain_augment(image: Image.Image, size: int, rng: np.random.Generator, pre: Preprocessing) -> np.ndarray:
    """RGB image -> float32 [3, size, size]: random resized crop (bicubic), horizontal flip, ImageNet normalization."""
    left, top, crop_w, crop_h = random_resized_crop_box(image.width, image.height, rng)
    # crop, then resize: the same pixels as torchvision's resized_crop on a PIL image (resize(box=) would read
    # neighbours outside the crop at the borders)
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return preprocess_image(image, pre, resize="squash")  # already size x size: normalization only


# ---------------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class SkippedSample:
    """Marker for a file that could not be decoded."""

    path: str
    reason: str  # short code from mae.core.preprocess.ImageError ("corrupt", "truncated", ...)
    message: str


class PretrainDataset(torch.utils.data.Dataset):
    """Indexed by (index, epoch) pairs from `ShardedBatchSampler`: returns (pixels [3, S, S], noise [L]) or a
    `SkippedSample`. The masking noise is drawn here, from the same per-sample generator as the augmentation."""

    def __init__(self, paths: Sequence[Path], img_size: int, num_patches: int, seed: int, repeat: int = 1) -> None:
        self.paths = list(paths)
        self.repeat = repeat  # index i reads paths[i % len(paths)]; the crop and noise still come from i itself
        self.img_size = img_size
        self.num_patches = num_patches
        self.seed = seed
        self.pre = Preprocessing(size=img_size, resize="squash", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        side = draft_side(img_size)
        self.draft_size = (side, side)

    def __len__(self) -> int:
        return len(self.paths) * self.repeat

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | SkippedSample:
        index, epoch = key
        path = self.paths[index % len(self.paths)]
        rng = sample_rng(self.seed, epoch, index)
        try:
            image = load_image(path, draft_size=self.draft_size)
        except ImageError as exc:
            return SkippedSample(str(path), exc.reason, exc.message)
        pixels = pretrain_augment(image, self.img_size, rng, self.pre)  # [3, S, S]
        noise = rng.random(self.num_patches, dtype=np.float32)  # [L]; smallest kept (masking contract)
        return torch.from_numpy(pixels), torch.from_numpy(noise)


class Batch(NamedTuple):
    images: torch.Tensor  # [B, 3, S, S]; B may be 0 when every file of the batch was unreadable
    noise: torch.Tensor  # [B, L]
    skipped: list[SkippedSample]


def collate(samples: list[tuple[torch.Tensor, torch.Tensor] | SkippedSample]) -> Batch:
    """Stack the good samples, report the skipped ones."""
    good = [s for s in samples if not isinstance(s, SkippedSample)]
    skipped = [s for s in samples if isinstance(s, SkippedSample)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0), skipped)
    return Batch(torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), skipped)


# ---------------------------------------------------------------------------------------------- sampling
class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys for one rank, like DistributedSampler + BatchSampler(drop_last=True).

    Per epoch: a permutation from a generator seeded with seed + epoch, padded by wrapping around to a multiple of
    world_size, rank r taking positions r, r + world, ...; incomplete last batches are dropped (as the original).
    `set_epoch(epoch, start_batch)` skips the batches a resumed run has already done.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_items / world_size)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        padded_len = self.per_rank * self.world_size
        while len(order) < padded_len:  # wrap around (more than once when num_items < world_size)
            order += order[: padded_len - len(order)]
        return order[self.rank : padded_len : self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.epoch_order(self.epoch)
        for batch_index in range(self.start_batch, self.batches_per_epoch()):
            chunk = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            yield [(index, self.epoch) for index in chunk]


def _ignore_interrupts_in_worker(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group; the trainer handles it (finish the step, checkpoint), so workers
    must keep serving batches instead of dying."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: PretrainDataset, sampler: ShardedBatchSampler, workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """Batches from `sampler`; the samples need no worker RNG, and the workers' own seeds come from a generator
    seeded with the run's seed (and rank) rather than from the global torch RNG."""
    generator = torch.Generator().manual_seed(sampler.seed * 1000 + sampler.rank)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_ignore_interrupts_in_worker if workers > 0 else None,
        generator=generator,
    )


def load_preview_images(
    paths: Sequence[Path], pre: Preprocessing
) -> tuple[np.ndarray, list[Path], list[SkippedSample]]:
    """Preview images preprocessed by `pre` (for `mae reconstruct`'s pictures, its preprocessing of weights):
    (float32 [N, 3, S, S], the paths read, the files that could not be)."""
    arrays, used, skipped = [], [], []
    for path in paths:
        try:
            arrays.append(load_and_preprocess(path, pre)[0])
            used.append(path)
        except ImageError as exc:
            skipped.append(SkippedSample(str(path), exc.reason, exc.message))
    stacked = np.stack(arrays) if arrays else np.zeros((0, 3, pre.size, pre.size), np.float32)
    return stacked, used, skipped


# Colour photos shipped in scikit-image (no download) and scikit-learn; grey ones are converted to RGB.
SKIMAGE_COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SKIMAGE_GREY = ("camera", "moon", "coins", "brick", "grass", "gravel", "clock", "page", "text")


def shipped_photos() -> dict[str, np.ndarray]:
    """Every photo scikit-image (and scikit-learn, when installed) ships, as uint8 RGB [H, W, 3], by name: real
    photos without a download, for the demo and int8 calibration."""
    try:
        from skimage import data
    except ImportError as exc:
        raise MAEError(
            "The shipped photos come with scikit-image, which is not installed.",
            hint="pip install scikit-image (or pass your own images)",
        ) from exc
    photos: dict[str, np.ndarray] = {}
    for name in SKIMAGE_COLOUR + SKIMAGE_GREY:
        array = np.asarray(getattr(data, name)())
        photos[name] = np.stack([array] * 3, axis=-1) if array.ndim == 2 else array[..., :3]
    photos["motorcycle_left"], photos["motorcycle_right"], _ = data.stereo_motorcycle()
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for filename, array in zip(sample.filenames, sample.images, strict=True):
            photos[Path(filename).stem] = array
    except ImportError:  # scikit-learn is optional: scikit-image alone has enough photos
        pass
    return {name: np.ascontiguousarray(array, dtype=np.uint8) for name, array in photos.items()}


def shipped_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits (UCI optdigits, 8 x 8, 17 grey levels) as uint8 [N, 8, 8] scaled to
    0..255, with their labels [N] (0-9): labelled images without a download, on which a CPU-sized MAE visibly learns
    in minutes (the demo), and whose classes let `mae eval` judge the embeddings."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MAEError(
            "The shipped digits come with scikit-learn, which is not installed.",
            hint="pip install scikit-learn (the search extra: pip install 'mae-toolkit[search]')",
        ) from exc
    digits = load_digits()
    images = np.round(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return images, np.asarray(digits.target, dtype=np.int64)
