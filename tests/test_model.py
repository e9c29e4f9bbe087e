"""The model's steps: patches, masking, loss, features, pooling, presets, position embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mae.core import masking as np_masking
from mae.core.config import PRESETS, MAEConfig, get_preset
from mae.core.errors import MAEError
from mae.model import (
    MaskedAutoencoder,
    masking_from_noise,
    monotone_noise,
    noise_from_ids_keep,
    normalize_patches,
    patchify,
    pool,
    random_noise,
    unpatchify,
)
from mae.pos_embed import resize_pos_embed, sincos_2d


@pytest.fixture
def model(tiny_config) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(tiny_config).eval()


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------- patches
def test_patchify_order_is_row_col_channel() -> None:
    """Each patch is laid out (row, col, channel), channels last, patches in row-major grid order."""
    p, chans, size = 4, 3, 12
    channel, row, col = torch.meshgrid(torch.arange(chans), torch.arange(size), torch.arange(size), indexing="ij")
    image = (channel * 10000 + row * 100 + col).float().unsqueeze(0)  # value encodes (c, y, x)
    patches = patchify(image, p)  # [1, 9, 48]
    assert patches.shape == (1, (size // p) ** 2, p * p * chans)
    for index in range(9):
        grid_row, grid_col = divmod(index, size // p)
        for i in range(p):
            for j in range(p):
                for c in range(chans):
                    expected = c * 10000 + (grid_row * p + i) * 100 + (grid_col * p + j)
                    assert patches[0, index, (i * p + j) * chans + c] == expected


@pytest.mark.parametrize(("size", "p", "chans"), [(32, 8, 3), (28, 14, 3), (16, 4, 1)])
def test_patchify_unpatchify_round_trip(size: int, p: int, chans: int) -> None:
    image = torch.randn(2, chans, size, size)
    assert torch.equal(unpatchify(patchify(image, p), p, chans), image)


# ------------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75, 0.9])
def test_torch_masking_equals_numpy_contract(mask_ratio: float) -> None:
    noise = np_masking.random_noise(4, 49, seed=3)
    ours = masking_from_noise(torch.from_numpy(noise), mask_ratio)
    reference = np_masking.masking_from_noise(noise, mask_ratio)
    np.testing.assert_array_equal(ours.ids_keep.numpy(), reference.ids_keep)
    np.testing.assert_array_equal(ours.ids_restore.numpy(), reference.ids_restore)
    np.testing.assert_array_equal(ours.mask.numpy(), reference.mask)
    keep = int(49 * (1 - mask_ratio))
    assert ours.ids_keep.shape == (4, keep) and (ours.mask.sum(dim=1) == 49 - keep).all()
    # The kept patches are those with the smallest noise, and ids_restore undoes the shuffle.
    smallest = np.sort(np.argsort(noise, axis=1)[:, :keep], axis=1)
    np.testing.assert_array_equal(np.sort(ours.ids_keep.numpy(), axis=1), smallest)


def test_masking_from_seed_is_reproducible(model: MaskedAutoencoder) -> None:
    first = model.masking(2, seed=7)
    assert torch.equal(first.ids_keep, model.masking(2, seed=7).ids_keep)
    assert not torch.equal(first.ids_keep, model.masking(2, seed=8).ids_keep)
    assert torch.equal(random_noise(2, 16, seed=7), random_noise(2, 16, seed=7))


def test_masking_rejects_wrong_noise_shape(model: MaskedAutoencoder) -> None:
    with pytest.raises(MAEError, match="noise has shape"):
        model.masking(2, noise=torch.rand(2, 15))


def test_noise_from_ids_keep_reproduces_the_kept_patches() -> None:
    generator = torch.Generator().manual_seed(0)
    ids_keep = torch.stack([torch.randperm(16, generator=generator)[:5] for _ in range(3)])  # [3, 5]
    masking = masking_from_noise(noise_from_ids_keep(ids_keep, 16), 1 - 5 / 16)
    assert torch.equal(masking.ids_keep, ids_keep)
    assert torch.equal(masking.mask.sum(dim=1), torch.full((3,), 11.0))
    assert (masking.mask.gather(1, ids_keep) == 0).all()


def test_forward_with_ids_keep_equals_forward_with_noise(model: MaskedAutoencoder) -> None:
    pixels = images()
    noise = random_noise(2, 16, seed=1)
    by_noise = model(pixels, noise=noise)
    ids_keep = masking_from_noise(noise, 0.75).ids_keep
    by_ids = model(pixels, ids_keep=ids_keep)
    assert torch.allclose(by_ids.latent, by_noise.latent, atol=1e-6)
    assert torch.equal(by_ids.mask, by_noise.mask)
    # ids_restore differs only in how removed patches are ordered; reconstructions agree
    assert torch.allclose(by_ids.pred, by_noise.pred, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- loss
def test_loss_counts_only_removed_patches(model: MaskedAutoencoder) -> None:
    pixels = images()
    masking = model.masking(2, seed=0)
    with torch.no_grad():
        pred = model.forward_decoder(model.forward_encoder(pixels, masking.ids_keep), masking.ids_restore)
    loss = model.forward_loss(pixels, pred, masking.mask)
    kept = masking.ids_keep[0, 0]
    removed = (masking.mask[0] == 1).nonzero()[0, 0]
    changed_kept = pred.clone()
    changed_kept[0, kept] += 5.0
    assert torch.equal(model.forward_loss(pixels, changed_kept, masking.mask), loss)
    changed_removed = pred.clone()
    changed_removed[0, removed] += 5.0
    assert model.forward_loss(pixels, changed_removed, masking.mask) > loss + 0.1
    # Mean over pixels per patch, then over removed patches.
    target = patchify(pixels, 8)
    expected = (((pred - target) ** 2).mean(dim=-1) * masking.mask).sum() / masking.mask.sum()
    assert torch.allclose(loss, expected)


def test_norm_pix_loss_normalizes_with_unbiased_variance() -> None:
    patches = torch.randn(2, 5, 12) * 3 + 1
    normalized = normalize_patches(patches)
    count = patches.shape[-1]
    mean = patches.sum(-1, keepdim=True) / count
    unbiased = ((patches - mean) ** 2).sum(-1, keepdim=True) / (count - 1)
    assert torch.allclose(normalized, (patches - mean) / torch.sqrt(unbiased + 1e-6), atol=1e-6)
    # eps 1e-6 keeps a flat patch finite (zero), as the original
    assert torch.equal(normalize_patches(torch.ones(1, 1, 12)), torch.zeros(1, 1, 12))


def test_model_with_norm_pix_loss_uses_normalized_targets(tiny_config: MAEConfig) -> None:
    torch.manual_seed(0)
    plain = MaskedAutoencoder(tiny_config).eval()
    normed = MaskedAutoencoder(tiny_config.replace(norm_pix_loss=True)).eval()
    normed.load_state_dict(plain.state_dict())
    pixels = images() * 4 + 2  # patches far from zero mean, unit variance
    noise = random_noise(2, 16, seed=0)
    out = normed(pixels, noise=noise)
    target = normalize_patches(patchify(pixels, 8))
    expected = (((out.pred - target) ** 2).mean(-1) * out.mask).sum() / out.mask.sum()
    assert torch.allclose(out.loss, expected)
    assert not torch.allclose(out.loss, plain(pixels, noise=noise).loss)


# ------------------------------------------------------------------------------------------- features, pooling
def test_forward_features_is_encoder_with_all_patches_in_order(model: MaskedAutoencoder) -> None:
    pixels = images()
    features = model.forward_features(pixels)  # [B, 1+L, D]
    assert features.shape == (2, 17, 32)
    ids_keep = torch.arange(16).expand(2, -1)
    assert torch.equal(features, model.forward_encoder(pixels, ids_keep))
    monotone = masking_from_noise(monotone_noise(2, 16), 0.0)
    assert torch.equal(monotone.ids_keep, ids_keep) and monotone.mask.sum() == 0


def test_pool_kinds() -> None:
    tokens = torch.randn(2, 5, 4)
    assert torch.equal(pool(tokens, "cls"), tokens[:, 0])
    assert torch.allclose(pool(tokens, "mean"), tokens[:, 1:].sum(1) / 4)
    both = MaskedAutoencoder.pool(tokens, "cls+mean")
    assert both.shape == (2, 8) and torch.equal(both[:, :4], tokens[:, 0])
    with pytest.raises(MAEError, match="Unknown pooling"):
        pool(tokens, "max")


def test_forward_shapes_and_encoder_only_model(tiny_config: MAEConfig) -> None:
    full = MaskedAutoencoder(tiny_config)
    out = full(images(), mask_ratio=0.5)
    assert out.pred.shape == (2, 16, 8 * 8 * 3) and out.latent.shape == (2, 1 + 8, 32)
    assert out.mask.shape == (2, 16) and out.ids_restore.shape == (2, 16) and out.loss.ndim == 0
    encoder_only = MaskedAutoencoder(tiny_config, decoder=False)
    assert not any(k.startswith("decoder") for k in encoder_only.state_dict())
    with pytest.raises(MAEError, match="no decoder"):
        encoder_only.forward_decoder(out.latent, out.ids_restore)


# ---------------------------------------------------------------------------------------------- configs, presets
# Encoder parameter counts of timm's ViT-B/16, L/16, H/14 at 224 px without the classifier head (timm's published
# 86,567,656 / 304,326,632 / 632,045,800 minus the 1000-class head), and the MAE ViT-B total of 111.9 M.
PAPER_MODELS = {
    "mae_vit_base_patch16": (16, 768, 12, 12, 85_798_656),
    "mae_vit_large_patch16": (16, 1024, 24, 16, 303_301_632),
    "mae_vit_huge_patch14": (14, 1280, 32, 16, 630_764_800),
}


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_presets_have_the_papers_dims(name: str) -> None:
    patch, width, depth, heads, encoder_params = PAPER_MODELS[name]
    config = PRESETS[name]
    assert (config.img_size, config.patch_size, config.embed_dim, config.depth, config.num_heads) == (
        224,
        patch,
        width,
        depth,
        heads,
    )
    assert (config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads) == (512, 8, 16)
    assert (config.encoder_hidden, config.layer_norm_eps, config.mask_ratio) == (4 * width, 1e-6, 0.75)
    with torch.device("meta"):
        state = MaskedAutoencoder(config).state_dict()
    encoder = sum(v.numel() for k, v in state.items() if not k.startswith(("decoder_", "mask_token")))
    assert encoder == encoder_params
    if name == "mae_vit_base_patch16":
        assert sum(v.numel() for v in state.values()) == 111_907_840


def test_img_and_patch_size_overrides() -> None:
    config = get_preset("mae_vit_test_patch8", img_size=48, patch_size=4)
    assert (config.grid_size, config.num_patches, config.patch_dim) == (12, 144, 48)
    model = MaskedAutoencoder(config)
    assert model.pos_embed.shape == (1, 145, 32) and model.decoder_pos_embed.shape == (1, 145, 16)
    out = model(images(size=48), mask_ratio=0.75)
    assert out.pred.shape == (2, 144, 48) and out.latent.shape == (2, 1 + 36, 32)
    assert get_preset("mae_vit_test_patch8", img_size=None) == PRESETS["mae_vit_test_patch8"]
    with pytest.raises(MAEError, match="multiple of patch_size"):
        get_preset("mae_vit_test_patch8", img_size=30)
    with pytest.raises(MAEError, match="Unknown model preset"):
        get_preset("vit_gigantic")


def test_config_round_trip_and_validation(tiny_config: MAEConfig) -> None:
    assert MAEConfig.from_dict(tiny_config.to_dict()) == tiny_config
    with pytest.raises(MAEError, match="Unknown MAE config fields"):
        MAEConfig.from_dict({**tiny_config.to_dict(), "dropout": 0.1})
    with pytest.raises(MAEError, match="not divisible by num_heads"):
        tiny_config.replace(num_heads=3)
    with pytest.raises(MAEError, match="act"):
        tiny_config.replace(act="mish")


# ------------------------------------------------------------------------------------------ position embeddings
def test_model_position_embeddings_are_the_sincos_tables(model: MaskedAutoencoder) -> None:
    assert torch.equal(model.pos_embed[0], torch.from_numpy(sincos_2d(32, 4)))
    assert torch.equal(model.decoder_pos_embed[0], torch.from_numpy(sincos_2d(16, 4)))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_sincos_layout_columns_then_rows() -> None:
    """First half of the channels encodes the column, second half the row; the cls row is zero."""
    table = sincos_2d(8, 3)  # [1+9, 8]
    assert not table[0].any()
    grid = table[1:].reshape(3, 3, 8)  # [row, col, channel]
    assert np.allclose(grid[:, 0, :4], grid[0, 0, :4]) and np.allclose(grid[0, :, 4:], grid[0, 0, 4:])
    np.testing.assert_allclose(grid[0, 2, 0], np.sin(2.0), rtol=1e-6)  # sin(col * omega_0), omega_0 = 1
    np.testing.assert_allclose(grid[1, 0, 6], np.cos(1.0), rtol=1e-6)  # cos(row * omega_0)


def test_resize_pos_embed() -> None:
    table = torch.from_numpy(sincos_2d(16, 4)).unsqueeze(0)  # [1, 17, 16]
    assert resize_pos_embed(table, 4) is table
    resized = resize_pos_embed(table, 6)
    assert resized.shape == (1, 37, 16)
    assert torch.equal(resized[:, 0], table[:, 0])  # cls row kept
    # Orientation survives: a channel that varies along columns only still does so after resizing.
    ramp = torch.zeros(1, 17, 2)
    cols, rows = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="xy")
    ramp[0, 1:, 0], ramp[0, 1:, 1] = cols.reshape(-1), 10 * rows.reshape(-1)
    grid = resize_pos_embed(ramp, 8)[0, 1:].reshape(8, 8, 2)  # [row, col, channel]
    assert torch.allclose(grid[:, :, 0], grid[:1, :, 0].expand(8, 8), atol=1e-5)  # constant down each column
    assert (grid[0, 1:, 0] >= grid[0, :-1, 0]).all() and grid[0, -1, 0] > grid[0, 0, 0] + 2
    assert torch.allclose(grid[:, :, 1], grid[:, :1, 1].expand(8, 8), atol=1e-5)  # rows in channel 1
    # Bicubic keeps constants exactly.
    constant = torch.full((1, 17, 3), 0.5)
    assert torch.allclose(resize_pos_embed(constant, 7), torch.full((1, 50, 3), 0.5), atol=1e-6)
