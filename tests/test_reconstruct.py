"""Masked reconstruction: pictures and metrics against the original MAE's steps, engines agreeing, the CLI."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mae.checkpoint import save_checkpoint
from mae.core.config import get_preset
from mae.core.errors import MAEError
from mae.core.masking import masking_from_noise, random_noise
from mae.core.visualize import (
    NORM_PIX_NOTE,
    PixelSpace,
    build_panels,
    masked_metrics,
    reconstruction_panels,
    target_patches,
)
from mae.model import MaskedAutoencoder
from mae.runtime.reconstruct import reconstruct

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A random mae_vit_test_patch8 exported (fp32) by the real exporter, with its checkpoint."""
    from mae.export import export_bundle

    folder = tmp_path_factory.mktemp("reconstruct")
    torch.manual_seed(1)
    config = get_preset("mae_vit_test_patch8")
    save_checkpoint(folder / "model.pt", MaskedAutoencoder(config).state_dict(), config)
    return export_bundle(folder / "model.pt", folder / "bundle", verify=False)


@pytest.fixture(scope="module")
def photo_files(photo_dir):
    return sorted(photo_dir.iterdir())


def variant(bundle, folder, change) -> str:
    """A copy of the bundle with its mae.json edited by `change(manifest)`."""
    shutil.copytree(bundle.path, folder)
    manifest = json.loads((folder / "mae.json").read_text())
    change(manifest)
    (folder / "mae.json").write_text(json.dumps(manifest))
    return str(folder)


def model_outputs(norm_pix_loss: bool, seed: int = 0):
    """A tiny model's forward pass on random normalized images: (pixel_values, MAEOutput)."""
    torch.manual_seed(seed)
    model = MaskedAutoencoder(get_preset("mae_vit_test_patch8", norm_pix_loss=norm_pix_loss)).eval()
    pixel_values = torch.randn(3, 3, 32, 32)
    noise = torch.from_numpy(random_noise(3, 16, seed))
    with torch.no_grad():
        return pixel_values.numpy(), model(pixel_values, mask_ratio=0.75, noise=noise)


# --------------------------------------------------------------------------------------------- visualize
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_masked_loss_is_the_models_loss(norm_pix_loss):
    pixel_values, out = model_outputs(norm_pix_loss)
    metrics = masked_metrics(pixel_values, out.pred.numpy(), out.mask.numpy(), PixelSpace(8, MEAN, STD, norm_pix_loss))
    assert metrics.loss.shape == (3,)
    np.testing.assert_allclose(metrics.loss.mean(), out.loss.item(), rtol=1e-6)


def test_panels_follow_the_original_demo():
    """facebookresearch/mae's demo: unpatchify, paste x * (1 - mask) + y * mask, de-normalize, clip."""
    pixel_values, out = model_outputs(norm_pix_loss=False)
    model = MaskedAutoencoder(get_preset("mae_vit_test_patch8"))
    y = torch.einsum("nchw->nhwc", model.unpatchify(out.pred))
    mask = out.mask.unsqueeze(-1).repeat(1, 1, 8 * 8 * 3)
    mask = torch.einsum("nchw->nhwc", model.unpatchify(mask))
    x = torch.einsum("nchw->nhwc", torch.from_numpy(pixel_values))
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    shown = {
        "original": x,
        "masked": x * (1 - mask),
        "reconstruction": y,
        "reconstruction_visible": x * (1 - mask) + y * mask,
    }
    shown = {k: torch.clip(v * std + mean, 0, 1).numpy() for k, v in shown.items()}

    panels = build_panels(
        pixel_values, out.pred.numpy(), out.mask.numpy(), PixelSpace(8, MEAN, STD, norm_pix_loss=False)
    )
    for name in ("original", "reconstruction", "reconstruction_visible"):
        np.testing.assert_allclose(getattr(panels, name), shown[name], atol=1e-6, err_msg=name)
    removed = mask.numpy() == 1
    # The demo blacks out removed patches (mean colour after de-normalization); we paint them grey.
    np.testing.assert_allclose(panels.masked[~removed], shown["original"][~removed], atol=1e-6)
    assert np.all(panels.masked[removed] == 0.5)


def test_norm_pix_prediction_is_denormalized_with_the_inputs_patch_statistics():
    """A perfect norm_pix_loss prediction (the per-patch normalized target) gives back the input exactly."""
    # Bright, low-contrast images: each patch's own mean and std are far from 0 and 1.
    pixel_values = (0.8 + 0.3 * np.random.default_rng(0).standard_normal((2, 3, 32, 32))).astype(np.float32)
    mask = masking_from_noise(random_noise(2, 16, 0), 0.75).mask
    perfect = target_patches(pixel_values, 8, norm_pix_loss=True)  # [2, 16, 192]
    panels = build_panels(pixel_values, perfect, mask, PixelSpace(8, MEAN, STD, norm_pix_loss=True))
    np.testing.assert_allclose(panels.reconstruction, panels.original, atol=1e-5)
    metrics = masked_metrics(pixel_values, perfect, mask, PixelSpace(8, MEAN, STD, True), panels=panels)
    assert np.all(metrics.loss == 0) and np.all(metrics.mse < 1e-10) and np.all(metrics.psnr > 90)
    # Read as plain normalized pixels, the same numbers are a poor reconstruction.
    plain = masked_metrics(pixel_values, perfect, mask, PixelSpace(8, MEAN, STD, norm_pix_loss=False))
    assert np.all(plain.mse > 0.01)


def test_picture_layout():
    rng = np.random.default_rng(0)
    floats = [rng.random((2, 32, 32, 3), dtype=np.float32) for _ in range(4)]
    as_bytes = [np.round(a * 255).astype(np.uint8) for a in floats]
    picture = reconstruction_panels(*floats)
    assert picture.mode == "RGB" and picture.width > 4 * 192 and picture.height > 2 * 192
    assert np.array_equal(np.asarray(picture), np.asarray(reconstruction_panels(*as_bytes)))
    noted = reconstruction_panels(*floats, note=NORM_PIX_NOTE, row_labels=["a", "b"])
    assert noted.width == picture.width and noted.height > picture.height
    # The first panel of the first row is the first image, enlarged 6x (to 192 px) with nearest-neighbour sampling,
    # below a header of 13 px text with 4 px gaps, 4 px from the left edge.
    tile = np.asarray(picture)[21 : 21 + 192, 4 : 4 + 192]
    np.testing.assert_array_equal(tile[::6, ::6], as_bytes[0][0])
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_panels(floats[0], floats[1][:1], floats[2], floats[3])
    with pytest.raises(ValueError, match="need 2 row labels"):
        reconstruction_panels(*floats, row_labels=["a"])


# ------------------------------------------------------------------------------------------- reconstruct
def test_reconstruct_equals_the_models_forward(tiny_bundle, photo_files, tmp_path):
    """Same images and noise file: the engines' arrays are MaskedAutoencoder.forward's (HF-style `noise`)."""
    from mae.core.preprocess import load_and_preprocess
    from mae.weights import load_model

    noise = random_noise(len(photo_files), 16, 7)
    np.save(tmp_path / "noise.npy", noise)
    model, _ = load_model(tiny_bundle.manifest["source"]["path"])
    pixel_values = np.stack([load_and_preprocess(f, tiny_bundle.preprocessing)[0] for f in photo_files])
    with torch.no_grad():
        expected = model(torch.from_numpy(pixel_values), mask_ratio=0.6, noise=torch.from_numpy(noise))

    results = {
        engine: reconstruct(
            photo_files, tiny_bundle.path, engine=engine, mask_ratio=0.6, noise=tmp_path / "noise.npy", device="cpu"
        )
        for engine in ("torch", "onnx", "openvino")
    }
    torch_result = results["torch"]
    np.testing.assert_array_equal(torch_result.pixel_values, pixel_values)
    np.testing.assert_array_equal(torch_result.mask, expected.mask.numpy())
    np.testing.assert_array_equal(torch_result.ids_restore, expected.ids_restore.numpy())
    np.testing.assert_allclose(torch_result.latent, expected.latent.numpy(), atol=1e-6)
    np.testing.assert_allclose(torch_result.pred, expected.pred.numpy(), atol=1e-6)
    np.testing.assert_allclose(torch_result.metrics.loss.mean(), expected.loss.item(), rtol=1e-5)
    assert torch_result.ids_keep.shape == (len(photo_files), int(16 * 0.4))
    for engine in ("onnx", "openvino"):
        other = results[engine]
        np.testing.assert_array_equal(other.mask, torch_result.mask)
        np.testing.assert_allclose(other.latent, torch_result.latent, atol=0.05 if engine == "openvino" else 2e-5)
        psnr_gap = np.abs(other.metrics.psnr - torch_result.metrics.psnr).max()
        assert psnr_gap < (0.2 if engine == "openvino" else 1e-3), engine  # openvino computes in bf16 here


def test_seed_and_noise_file_agree(tiny_bundle, photo_files, tmp_path):
    by_seed = reconstruct(photo_files[:2], tiny_bundle.path, seed=3)
    np.save(tmp_path / "noise.npy", random_noise(2, 16, 3))
    by_file = reconstruct(photo_files[:2], tiny_bundle.path, noise=tmp_path / "noise.npy", seed=99)
    np.testing.assert_array_equal(by_seed.ids_restore, by_file.ids_restore)
    np.testing.assert_array_equal(by_seed.pred, by_file.pred)
    other_seed = reconstruct(photo_files[:2], tiny_bundle.path, seed=4)
    assert not np.array_equal(other_seed.mask, by_seed.mask)


def test_mask_ratio_zero_removes_nothing(tiny_bundle, photo_files):
    result = reconstruct(photo_files[:2], tiny_bundle.path, mask_ratio=0.0)
    assert result.mask.sum() == 0 and result.latent.shape[1] == 17
    assert np.isnan(result.metrics.psnr).all()
    np.testing.assert_array_equal(result.panels.reconstruction_visible, result.panels.original)


def test_in_memory_images_and_model(photo_files, real_photos):
    torch.manual_seed(0)
    model = MaskedAutoencoder(get_preset("mae_vit_test_patch8")).eval()
    result = reconstruct([real_photos[0], Image.fromarray(real_photos[1])], model, engine="torch", device="cpu")
    assert result.names == ["image 0", "image 1"]
    assert result.original_sizes[0] == (real_photos[0].shape[1], real_photos[0].shape[0])
    with pytest.raises(MAEError, match="torch engine only"):
        reconstruct([real_photos[0]], model, engine="onnx")


def test_norm_pix_loss_bundle_says_so(tiny_bundle, photo_files, tmp_path):
    def set_norm_pix(manifest):
        manifest["norm_pix_loss"] = True
        manifest["norm_pix_loss_known"] = False  # as for official weights: assumed, and the user is told

    bundle = variant(tiny_bundle, tmp_path / "normpix", set_norm_pix)
    plain = reconstruct(photo_files[:1], tiny_bundle.path)
    normpix = reconstruct(photo_files[:1], bundle)
    assert normpix.norm_pix_loss and NORM_PIX_NOTE in normpix.notes and NORM_PIX_NOTE not in plain.notes
    assert any("do not record norm_pix_loss; assumed True" in note for note in normpix.notes)
    assert not any("record norm_pix_loss" in note for note in plain.notes)
    np.testing.assert_array_equal(normpix.pred, plain.pred)  # same graphs: only the mapping to pixels differs
    assert not np.allclose(normpix.panels.reconstruction, plain.panels.reconstruction)
    assert normpix.picture().height > plain.picture().height  # the note line


def test_library_errors(tiny_bundle, photo_files, tmp_path):
    with pytest.raises(MAEError, match="expected \\[2, 16\\]"):
        reconstruct(photo_files[:2], tiny_bundle.path, noise=np.zeros((3, 16)))
    with pytest.raises(MAEError, match="NaN"):
        reconstruct(photo_files[:1], tiny_bundle.path, noise=np.full((1, 16), np.nan))
    with pytest.raises(MAEError, match="No images"):
        reconstruct([], tiny_bundle.path)

    def drop_decoder(manifest):
        del manifest["graphs"]["fp32"]["decoder"]

    encoder_only = variant(tiny_bundle, tmp_path / "encoder_only", drop_decoder)
    with pytest.raises(MAEError, match="needs the full \\(decoder\\) weights"):
        reconstruct(photo_files[:1], encoder_only)

    torch.manual_seed(0)
    config = get_preset("mae_vit_test_patch8")
    save_checkpoint(tmp_path / "encoder.pt", MaskedAutoencoder(config, decoder=False).state_dict(), config)
    with pytest.raises(MAEError, match="encoder only: reconstruction needs the full"):
        reconstruct(photo_files[:1], tmp_path / "encoder.pt", engine="torch")


# --------------------------------------------------------------------------------------------------- CLI
def run_cli(monkeypatch, *args: str) -> int:
    from mae.cli import main

    monkeypatch.setattr(sys, "argv", ["mae", "reconstruct", *map(str, args)])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_writes_pictures_and_arrays(tiny_bundle, photo_files, tmp_path, monkeypatch, capsys):
    images = photo_files[:3]
    out = tmp_path / "pictures"
    code = run_cli(
        monkeypatch, *images, "--model", tiny_bundle.path, "--out", out, "--save-arrays", tmp_path / "arrays.npz"
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and images[0].name in printed and "onnxruntime" in printed
    written = sorted(out.iterdir())
    assert [p.name for p in written] == sorted(f"{p.stem}_reconstruction.png" for p in images)
    assert Image.open(written[0]).size == reconstruct(images[:1], tiny_bundle.path).picture().size
    arrays = np.load(tmp_path / "arrays.npz")
    assert arrays["pred"].shape == (3, 16, 192) and arrays["mask"].shape == (3, 16)
    assert arrays["ids_restore"].shape == (3, 16) and arrays["latent"].shape == (3, 1 + 4, 32)
    assert arrays["mask"].sum(axis=1).tolist() == [12, 12, 12]

    single = tmp_path / "all.png"
    assert run_cli(monkeypatch, *images, "--model", tiny_bundle.path, "--engine", "torch", "--out", single) == 0
    assert Image.open(single).height > Image.open(written[0]).height * 2  # three rows in one picture

    # Again into the same folder: the earlier pictures stay, the new ones are numbered, and both are said.
    before = {p.name: p.read_bytes() for p in written}
    capsys.readouterr()
    code = run_cli(
        monkeypatch, *images, "--model", tiny_bundle.path, "--out", out, "--save-arrays", tmp_path / "arrays.npz"
    )
    printed = capsys.readouterr().out
    assert code == 0 and {p.name: p.read_bytes() for p in written} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*before, *(f"{p.stem}_2_reconstruction.png" for p in images)]
    )
    assert "numbered 3 picture(s)" in printed and f"replaced {tmp_path / 'arrays.npz'}" in printed


def test_cli_errors_are_plain(tiny_bundle, photo_files, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.jpg").write_text("not a picture")
    np.save(tmp_path / "noise.npy", np.zeros((5, 16)))
    weights = tiny_bundle.manifest["source"]["path"]
    cases = [
        ((tmp_path / "missing.jpg", "--model", tiny_bundle.path), "no such file"),
        ((tmp_path / "notes.jpg", "--model", tiny_bundle.path), "not an image"),
        ((photo_files[0], "--model", tiny_bundle.path, "--noise", tmp_path / "noise.npy"), "expected [1, 16]"),
        ((photo_files[0], "--model", weights, "--engine", "onnx"), "--engine torch"),
        ((photo_files[0], "--model", tmp_path / "nowhere"), "does not exist"),
    ]
    for args, message in cases:
        assert run_cli(monkeypatch, *args) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_prepared_pixels_reconstruct_exactly_as_their_file(tiny_bundle, photo_files):
    """`PreparedImage` (pixels decoded elsewhere, as mae serve's decode threads do) gives the file's result."""
    from mae.core.preprocess import load_and_preprocess
    from mae.runtime.reconstruct import PreparedImage

    path = photo_files[0]
    pixels, size = load_and_preprocess(path, tiny_bundle.preprocessing)
    from_file = reconstruct([path], tiny_bundle.path, engine="onnx", seed=5)
    prepared = reconstruct([PreparedImage("mine.jpg", size, pixels)], tiny_bundle.path, engine="onnx", seed=5)
    np.testing.assert_array_equal(prepared.pred, from_file.pred)
    np.testing.assert_array_equal(prepared.pixel_values, from_file.pixel_values)
    assert prepared.names == ["mine.jpg"]
    with pytest.raises(MAEError, match="pre-processed pixels"):
        reconstruct([PreparedImage("small", size, pixels[:, :8])], tiny_bundle.path, engine="onnx")
