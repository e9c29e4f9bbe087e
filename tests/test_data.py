"""Training data: discovery, the pretraining augmentation, per-sample determinism, corrupt files, sharding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae.core.errors import MAEError
from mae.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from mae.data import (
    CROP_RATIO,
    CROP_SCALE,
    PretrainDataset,
    ShardedBatchSampler,
    SkippedSample,
    collate,
    draft_side,
    find_images,
    holdout_indices,
    make_loader,
    pretrain_augment,
    random_resized_crop_box,
    sample_rng,
    split_holdout,
)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, real_photos) -> Path:
    """10 small crops of real photos in two sub-folders, plus a corrupt JPEG and a non-image file."""
    root = tmp_path_factory.mktemp("train_images")
    for i in range(10):
        photo = real_photos[i % len(real_photos)]
        height, width = photo.shape[:2]
        tile = photo[(i * height) // 20 : (i * height) // 20 + height // 2, : width // 2]
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        Image.fromarray(tile).resize((60, 44), Image.Resampling.BICUBIC).save(folder / f"img_{i}.png")
    (root / "dogs" / "broken.JPG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------- discovery
def test_find_images_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("b/deep/x.JPEG", "a.png", "b/y.webp", ".hidden/z.jpg", "b/.dot.jpg", "c.txt", "d.npy"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "b" / "deep" / "loop").symlink_to(tmp_path / "b", target_is_directory=True)  # walked once
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "a.png",
        "b/deep/x.JPEG",
        "b/y.webp",
    ]


def test_find_images_errors(tmp_path):
    with pytest.raises(MAEError, match="does not exist"):
        find_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(MAEError, match="not a folder"):
        find_images(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no pictures here")
    with pytest.raises(MAEError, match="No images found"):
        find_images(tmp_path / "empty")


def test_holdout_is_spread_deterministic_and_excluded():
    assert holdout_indices(3, 4) == []  # too few images: nothing held out
    assert holdout_indices(10, 4) == [2, 7]  # at most one in five
    assert holdout_indices(100, 4) == [12, 37, 62, 87]
    paths = [Path(f"{i:03d}.png") for i in range(40)]
    train, held = split_holdout(paths, 4)
    assert len(held) == 4 and len(train) == 36
    assert not set(held) & set(train)
    assert split_holdout(paths, 4) == (train, held)


# ------------------------------------------------------------------------------------------ augmentation
def test_random_resized_crop_box_follows_the_recipe():
    rng = np.random.default_rng(0)
    scales, ratios = [], []
    for _ in range(2000):
        width, height = (int(v) for v in rng.integers(8, 400, size=2))
        left, top, crop_w, crop_h = random_resized_crop_box(width, height, rng)
        assert left >= 0 and top >= 0 and left + crop_w <= width and top + crop_h <= height
        assert crop_w > 0 and crop_h > 0
        if width >= 100 and height >= 100 and 0.8 < width / height < 1.25:
            scales.append(crop_w * crop_h / (width * height))
            ratios.append(crop_w / crop_h)
    # rounding to whole pixels moves area and ratio a little past the nominal bounds
    assert CROP_SCALE[0] - 0.03 <= min(scales) < 0.25 and max(scales) > 0.95
    assert CROP_RATIO[0] - 0.03 <= min(ratios) < 0.8 and 1.25 < max(ratios) <= CROP_RATIO[1] + 0.03
    # area fraction uniform on [0.2, 1], log aspect uniform, a draw kept when the crop fits: for a square image
    # that is s <= exp(-|log a|); the accepted mean by numerical integration over that region
    log_a, s = np.meshgrid(np.linspace(-math.log(4 / 3), math.log(4 / 3), 801), np.linspace(0.2, 1.0, 801))
    fits = s <= np.exp(-np.abs(log_a))
    assert np.mean(scales) == pytest.approx((s * fits).sum() / fits.sum(), abs=0.02)
    log_ratios = np.log(ratios)
    assert np.mean(log_ratios) == pytest.approx(0.0, abs=0.02)  # log-uniform aspect ratio


def test_random_resized_crop_falls_back_to_a_clamped_centre_crop():
    # a 1000x10 strip: no random crop with ratio <= 4/3 fits in 10 tries, so the centre crop is 13 x 10
    rng = np.random.default_rng(0)
    assert random_resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)


class _ScriptedRng:
    """Stands in for np.random.Generator: crop = the whole (square) image, flip as told."""

    def __init__(self, flip: bool) -> None:
        self.flip = flip

    def uniform(self, low: float, high: float) -> float:
        return high if low > 0 else 0.0  # area fraction 1.0; log aspect ratio 0

    def integers(self, low: int, high: int) -> int:
        return low

    def random(self) -> float:
        return 0.1 if self.flip else 0.9


def test_pretrain_augment_is_bicubic_resize_then_imagenet_normalization(real_photos):
    image = Image.fromarray(real_photos[0]).crop((0, 0, 300, 300))
    pre = Preprocessing(size=32, resize="squash")
    pixels = pretrain_augment(image, 32, _ScriptedRng(flip=False), pre)
    expected_uint8 = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC))  # [32, 32, 3]
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    expected = ((expected_uint8.astype(np.float32) / np.float32(255) - mean) / std).transpose(2, 0, 1)
    assert pixels.dtype == np.float32 and pixels.shape == (3, 32, 32)
    np.testing.assert_array_equal(pixels, expected)  # torchvision's float32 op order, bit for bit
    flipped = pretrain_augment(image, 32, _ScriptedRng(flip=True), pre)
    np.testing.assert_array_equal(flipped, pixels[:, :, ::-1])


def test_augmentation_crops_varied_regions_per_sample():
    # red rises left to right, green top to bottom: a crop's mean colour says where it was taken
    ramp_x = np.broadcast_to(np.linspace(0, 255, 200), (100, 200))
    ramp_y = np.broadcast_to(np.linspace(0, 255, 100)[:, None], (100, 200))
    array = np.stack([ramp_x, ramp_y, np.zeros((100, 200))], axis=-1).round().astype(np.uint8)
    image = Image.fromarray(array)
    pre = Preprocessing(size=16, resize="squash")
    samples = [pretrain_augment(image, 16, sample_rng(0, 0, i), pre) for i in range(60)]
    red = np.array([s[0].mean() for s in samples]) * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # [60] in [0, 1]
    assert red.min() < 0.35 and red.max() > 0.65  # crops from the left and from the right
    assert len({s.tobytes() for s in samples}) == 60  # every sample its own crop / flip
    assert samples[0].tobytes() == pretrain_augment(image, 16, sample_rng(0, 0, 0), pre).tobytes()


# ---------------------------------------------------------------------------------------------- dataset
def test_dataset_samples_depend_only_on_seed_epoch_index(image_folder):
    paths = [p for p in find_images(image_folder) if "broken" not in p.name]
    dataset = PretrainDataset(paths, img_size=32, num_patches=16, seed=3)
    pixels, noise = dataset[(2, 0)]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert noise.shape == (16,) and noise.dtype == torch.float32 and noise.min() >= 0 and noise.max() < 1
    again = PretrainDataset(paths, img_size=32, num_patches=16, seed=3)[(2, 0)]
    assert torch.equal(again[0], pixels) and torch.equal(again[1], noise)
    other_epoch = dataset[(2, 1)]
    other_seed = PretrainDataset(paths, img_size=32, num_patches=16, seed=4)[(2, 0)]
    assert not torch.equal(other_epoch[0], pixels) and not torch.equal(other_epoch[1], noise)
    assert not torch.equal(other_seed[1], noise)


def test_repeat_passes_over_each_image_with_fresh_crops(image_folder):
    paths = [p for p in find_images(image_folder) if "broken" not in p.name]
    once = PretrainDataset(paths, img_size=32, num_patches=16, seed=3)
    repeated = PretrainDataset(paths, img_size=32, num_patches=16, seed=3, repeat=3)
    assert len(repeated) == 3 * len(once)
    # index i reads image i % N; the first pass equals the plain dataset, later passes crop and mask anew
    assert torch.equal(repeated[(1, 0)][0], once[(1, 0)][0])
    second_pass = repeated[(1 + len(paths), 0)]
    assert not torch.equal(second_pass[0], once[(1, 0)][0]) and not torch.equal(second_pass[1], once[(1, 0)][1])


def test_large_jpegs_are_drafted_but_every_crop_still_downsamples(tmp_path, real_photos, monkeypatch):
    import mae.data

    path = tmp_path / "big.jpg"
    Image.fromarray(real_photos[0]).resize((1600, 1200), Image.Resampling.BICUBIC).save(path, quality=90)
    decoded_sizes = []
    real_load = mae.data.load_image

    def recording_load(file, draft_size=None):
        image = real_load(file, draft_size=draft_size)
        decoded_sizes.append(image.size)
        return image

    monkeypatch.setattr(mae.data, "load_image", recording_load)
    PretrainDataset([path], img_size=32, num_patches=16, seed=0)[(0, 0)]
    width, height = decoded_sizes[0]
    assert width <= 1600 // 4 and min(width, height) >= draft_side(32)  # decoded at 1/8 (200 x 150)
    rng = np.random.default_rng(0)
    smallest = min(min(random_resized_crop_box(width, height, rng)[2:]) for _ in range(2000))
    assert smallest >= 32  # the bicubic resize to 32 px never enlarges


def test_corrupt_files_become_markers_and_are_dropped_by_collate(image_folder):
    paths = find_images(image_folder)
    broken = next(i for i, p in enumerate(paths) if p.name == "broken.JPG")
    dataset = PretrainDataset(paths, img_size=32, num_patches=16, seed=0)
    marker = dataset[(broken, 0)]
    assert isinstance(marker, SkippedSample)
    assert marker.reason == "corrupt" and marker.path.endswith("broken.JPG")

    batch = collate([dataset[(0, 0)], marker, dataset[(1, 0)]])
    assert batch.images.shape == (2, 3, 32, 32) and batch.noise.shape == (2, 16)
    assert batch.skipped == [marker]
    empty = collate([marker])
    assert empty.images.shape[0] == 0 and empty.skipped == [marker]


# ---------------------------------------------------------------------------------------------- sampling
def test_sampler_order_is_a_seeded_permutation_per_epoch():
    sampler = ShardedBatchSampler(num_items=10, batch_size=3, seed=5)
    assert sampler.batches_per_epoch() == 3 and len(sampler) == 3  # the incomplete last batch is dropped
    sampler.set_epoch(0)
    batches = list(sampler)
    indices = [index for batch in batches for index, _ in batch]
    assert all(epoch == 0 for batch in batches for _, epoch in batch)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 + 0)).tolist()[:9]
    assert indices == expected
    sampler.set_epoch(1)
    assert [i for b in sampler for i, _ in b] != indices
    sampler.set_epoch(0, start_batch=2)
    assert len(sampler) == 1 and list(sampler) == batches[2:]


def test_ranks_split_each_global_batch():
    """Rank r's k-th batch of size b and the other ranks' k-th batches together are the single-process k-th
    batch of size world*b: data-parallel training sees the data a single process with the larger batch sees."""
    single = ShardedBatchSampler(num_items=24, batch_size=6, seed=1)
    ranks = [ShardedBatchSampler(num_items=24, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(4)
    rank_batches = [list(s) for s in ranks]
    assert not {i for b in rank_batches[0] for i in b} & {i for b in rank_batches[1] for i in b}
    for k, global_batch in enumerate(single):
        assert sorted(global_batch) == sorted(rank_batches[0][k] + rank_batches[1][k])


def test_uneven_split_pads_by_wrapping_around():
    ranks = [ShardedBatchSampler(num_items=5, batch_size=1, seed=0, rank=r, world_size=3) for r in range(3)]
    orders = [s.epoch_order(0) for s in ranks]
    assert [len(o) for o in orders] == [2, 2, 2]
    everything = [i for o in orders for i in o]
    assert set(everything) == set(range(5))
    first = torch.randperm(5, generator=torch.Generator().manual_seed(0))[0].item()
    assert everything.count(first) == 2  # the permutation's first index fills the one empty slot


def test_loader_batches_do_not_depend_on_worker_count(image_folder):
    paths = find_images(image_folder)
    dataset = PretrainDataset(paths, img_size=32, num_patches=16, seed=0)

    def epoch_batches(workers: int):
        sampler = ShardedBatchSampler(len(paths), batch_size=4, seed=0)
        sampler.set_epoch(1)
        return list(make_loader(dataset, sampler, workers))

    serial, parallel = epoch_batches(0), epoch_batches(2)
    assert len(serial) == len(parallel) == math.floor(len(paths) / 4)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.noise, b.noise) and a.skipped == b.skipped
