"""Pre-processing: decoding odd and broken files, geometry, normalization, and agreement with reference processors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from images_corpus import write_corpus
from PIL import Image

from mae.core.errors import MAEError
from mae.core.preprocess import (
    ImageError,
    Preprocessing,
    denormalize,
    load_and_preprocess,
    load_image,
    preprocess_image,
    resized_size,
)

PRE = Preprocessing(size=32)
PRE_224 = Preprocessing(size=224)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_corpus(folder)


def normalize_reference(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] with torchvision's ToTensor + Normalize operations."""
    values = pixels.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    return (values - mean) / std


def test_corpus_every_file_decodes_or_fails_with_its_reason(corpus):
    folder, cases = corpus
    for name, case in cases.items():
        path = folder / name
        if case.reason is None:
            pixels, size = load_and_preprocess(path, PRE)
            assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32, name
            assert np.isfinite(pixels).all(), name
            assert size == case.size, name
            decoded = np.asarray(load_image(path))
            assert decoded.dtype == np.uint8 and decoded.shape[2] == 3, name
            if case.check is not None:
                assert case.check(decoded), f"{name}: decoded pixels are wrong"
        else:
            with pytest.raises(ImageError) as info:
                load_and_preprocess(path, PRE)
            assert info.value.reason == case.reason, f"{name}: {info.value}"
            assert info.value.path == str(path)
            assert isinstance(info.value, MAEError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.reason == "missing"
    with pytest.raises(ImageError) as info:
        load_image(tmp_path)
    assert info.value.reason == "unreadable"


def test_bomb_limit_follows_pillow_setting(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "small.png")
    assert info.value.reason == "too_large"


def test_center_geometry_matches_torchvision_rules():
    # 300x200, size 224, crop_pct 0.875: shorter side -> floor(224 / 0.875) = 256, longer int(256 * 1.5) = 384;
    # centre crop offsets round((384 - 224) / 2) = 80 and round((256 - 224) / 2) = 16.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    assert resized_size(300, 200, PRE_224, "center") == (384, 256)
    expected = np.asarray(Image.fromarray(pixels).resize((384, 256), Image.Resampling.BICUBIC).crop((80, 16, 304, 240)))
    ours = preprocess_image(pixels, PRE_224, "center")
    np.testing.assert_array_equal(ours, normalize_reference(expected, PRE_224))
    # Portrait with an odd margin: 199 wide -> 256 x int(256 * 301 / 199) = 387; top offset round(163 / 2) = 82.
    assert resized_size(199, 301, PRE_224, "center") == (256, 387)
    tall = rng.integers(0, 256, (301, 199, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(tall).resize((256, 387), Image.Resampling.BICUBIC).crop((16, 82, 240, 306)))
    np.testing.assert_array_equal(preprocess_image(tall, PRE_224, "center"), normalize_reference(expected, PRE_224))


def test_squash_leaves_an_image_at_size_untouched_and_normalizes_in_float32():
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = preprocess_image(Image.fromarray(pixels), PRE, "squash")
    np.testing.assert_array_equal(ours, normalize_reference(pixels, PRE))
    other = Preprocessing(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_array_equal(preprocess_image(pixels, other, "squash"), normalize_reference(pixels, other))
    # The bundle's default resize is used when none is given.
    squash_bundle = Preprocessing(size=32, resize="squash")
    np.testing.assert_array_equal(preprocess_image(pixels, squash_bundle), ours)


def test_tiny_image_is_upsampled_to_a_constant():
    ours = preprocess_image(Image.new("RGB", (1, 1), (10, 200, 30)), PRE)
    expected = normalize_reference(np.array([[[10, 200, 30]]], np.uint8), PRE)[:, 0, 0]
    np.testing.assert_allclose(ours, np.broadcast_to(expected[:, None, None], ours.shape), atol=1e-6)


def test_bad_options():
    with pytest.raises(MAEError, match="resize"):
        preprocess_image(np.zeros((4, 4, 3), np.uint8), PRE, "stretch")
    with pytest.raises(MAEError, match="crop_pct"):
        preprocess_image(np.zeros((4, 4, 3), np.uint8), Preprocessing(size=32, crop_pct=1.2), "center")
    with pytest.raises(MAEError, match="uint8"):
        preprocess_image(np.zeros((4, 4, 3), np.float32), PRE)


def jpeg_file(path, pixels: np.ndarray, orientation: int | None = None) -> None:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, "JPEG", quality=92, exif=exif.tobytes())


@pytest.mark.parametrize("resize", ["center", "squash"])
@pytest.mark.parametrize("orientation", [None, 6])
def test_jpeg_draft_keeps_at_least_the_resize_target(tmp_path, real_photos, resize, orientation):
    """Reduced-scale decoding still only downsamples, so it stays close to a full decode; EXIF is honoured."""
    photo = np.asarray(Image.fromarray(real_photos[0]).resize((640, 480)))  # astronaut, 640x480
    path = tmp_path / "photo.jpg"
    jpeg_file(path, photo, orientation)
    pre = Preprocessing(size=112)
    fast, size = load_and_preprocess(path, pre, resize)
    full, full_size = load_and_preprocess(path, pre, resize, draft=False)
    assert size == full_size == ((480, 640) if orientation == 6 else (640, 480))
    # The draft really reduces the decode (640x480 -> at least the target), and never below the target.
    with Image.open(path) as image:
        target = resized_size(*image.size, pre, resize)
        image.draft("RGB", target)
        assert image.size[0] >= target[0] and image.size[1] >= target[1]
        assert image.size[0] < 640
    difference = np.abs(denormalize(fast, pre) - denormalize(full, pre))
    assert difference.mean() < 0.01 and difference.max() < 0.25
    # Full decode equals Pillow decode + our preprocessing of the upright picture.
    upright = np.asarray(load_image(path))
    np.testing.assert_array_equal(full, preprocess_image(upright, pre, resize))


def test_denormalize_inverts_normalization():
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    values = preprocess_image(pixels, PRE, "squash")
    pictures = denormalize(values[None], PRE)  # [1, S, S, 3]
    assert pictures.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(pictures[0], pixels / 255.0, atol=1e-6)


def test_opaque_alpha_equals_dropping_it():
    rgb = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 255, np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    np.testing.assert_array_equal(
        preprocess_image(Image.open(buffer), PRE, "squash"), preprocess_image(rgb, PRE, "squash")
    )


@pytest.mark.slow
def test_matches_hugging_face_image_processors(real_photos):
    """squash == ViTImageProcessor (bicubic), center == CLIP-style shortest edge + centre crop, to the last bit."""
    transformers = pytest.importorskip("transformers")
    mean, std = list(PRE_224.mean), list(PRE_224.std)
    bicubic = Image.Resampling.BICUBIC
    vit = transformers.ViTImageProcessorPil(
        size={"height": 224, "width": 224}, resample=bicubic, image_mean=mean, image_std=std
    )
    clip = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=bicubic,
        image_mean=mean, image_std=std,
    )  # fmt: skip
    for photo in real_photos[:3]:
        image = Image.fromarray(photo)
        reference = vit(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(preprocess_image(image, PRE_224, "squash"), reference)
        # HF crops at floor((h - 224) / 2), torchvision at round(); they agree when the margin is even.
        target = resized_size(image.width, image.height, PRE_224, "center")
        if all((side - 224) % 2 == 0 for side in target):
            reference = clip(images=image, return_tensors="np")["pixel_values"][0]
            np.testing.assert_array_equal(preprocess_image(image, PRE_224, "center"), reference)
