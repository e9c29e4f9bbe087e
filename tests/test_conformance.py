"""Conformance against Hugging Face transformers' ViTMAE, an independent implementation of the same model.

For the same weights and the same noise, our pred, mask, ids_restore, encoder output and loss match HF's within
1e-5 (fp32): for HF-format weights (save_pretrained folders) and for the same weights written in the official
facebookresearch/mae layout ({'model': state_dict} .pth, written here from HF's modules, not by our converter).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mae.core.errors import MAEError
from mae.model import patchify, unpatchify
from mae.pos_embed import sincos_2d
from mae.weights import load_model

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")

ATOL = 1e-5
GRID = 4  # 32 px images, 8 px patches
LENGTH = GRID * GRID


def hf_config(**overrides) -> transformers.ViTMAEConfig:
    """Hidden 64, 2 layers, 4 heads, MLP 96 (not 4x: explicit sizes are honoured), decoder 32/1/4 with MLP 48."""
    fields = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=48,
    )
    fields.update(overrides)
    return transformers.ViTMAEConfig(**fields)


def hf_layers(hf_encoder) -> list:
    return list(getattr(hf_encoder, "layers", None) or hf_encoder.encoder.layer)  # transformers 5.x | 4.x


def hf_projections(layer) -> dict[str, torch.nn.Linear]:
    """q, k, v, out, fc1, fc2 of one HF layer (5.x module names, falling back to 4.x)."""
    attention = layer.attention
    if hasattr(attention, "q_proj"):
        return dict(
            q=attention.q_proj,
            k=attention.k_proj,
            v=attention.v_proj,
            out=attention.o_proj,
            fc1=layer.mlp.fc1,
            fc2=layer.mlp.fc2,
        )
    return dict(
        q=attention.attention.query,
        k=attention.attention.key,
        v=attention.attention.value,
        out=attention.output.dense,
        fc1=layer.intermediate.dense,
        fc2=layer.output.dense,
    )


def initialize_sincos(model) -> None:
    """HF 5.x leaves position embeddings at zero in a freshly built model; run its own sin-cos initializers."""
    encoder = model.vit if hasattr(model, "vit") else model
    embeddings = encoder.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False  # else initialize_weights returns early
    embeddings.initialize_weights()
    if hasattr(model, "decoder"):
        model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    assert embeddings.position_embeddings.abs().sum() > 0


def randomize(model, seed: int) -> None:
    """Every weight random, LayerNorm scales and shifts included (so norms and their eps are exercised);
    position embeddings stay HF's sin-cos tables."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "position_embeddings" in name or "decoder_pos_embed" in name:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * noise)
            elif param.dim() == 1 or "token" in name:
                param.copy_(0.3 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / fan_in**0.5)


def make_hf_model(cls_name: str = "ViTMAEForPreTraining", seed: int = 0, **overrides):
    model = getattr(transformers, cls_name)(hf_config(**overrides))
    initialize_sincos(model)
    randomize(model, seed)
    return model.eval()


def official_state_dict(hf) -> dict[str, torch.Tensor]:
    """HF ViTMAEForPreTraining (or ViTMAEModel) -> facebookresearch/mae names, read off HF's modules."""
    encoder = hf.vit if hasattr(hf, "vit") else hf
    embeddings = encoder.embeddings
    state = {
        "cls_token": embeddings.cls_token,
        "pos_embed": embeddings.position_embeddings,
        "patch_embed.proj.weight": embeddings.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": embeddings.patch_embeddings.projection.bias,
        "norm.weight": encoder.layernorm.weight,
        "norm.bias": encoder.layernorm.bias,
    }

    def add_blocks(prefix: str, layers: list) -> None:
        for index, layer in enumerate(layers):
            linear = hf_projections(layer)
            block = f"{prefix}.{index}"
            state[f"{block}.norm1.weight"] = layer.layernorm_before.weight
            state[f"{block}.norm1.bias"] = layer.layernorm_before.bias
            state[f"{block}.attn.qkv.weight"] = torch.cat([linear[n].weight for n in "qkv"])
            if linear["q"].bias is not None:
                state[f"{block}.attn.qkv.bias"] = torch.cat([linear[n].bias for n in "qkv"])
            state[f"{block}.attn.proj.weight"] = linear["out"].weight
            state[f"{block}.attn.proj.bias"] = linear["out"].bias
            state[f"{block}.norm2.weight"] = layer.layernorm_after.weight
            state[f"{block}.norm2.bias"] = layer.layernorm_after.bias
            for name in ("fc1", "fc2"):
                state[f"{block}.mlp.{name}.weight"] = linear[name].weight
                state[f"{block}.mlp.{name}.bias"] = linear[name].bias

    add_blocks("blocks", hf_layers(encoder))
    if hasattr(hf, "decoder"):
        decoder = hf.decoder
        state.update(
            {
                "mask_token": decoder.mask_token,
                "decoder_pos_embed": decoder.decoder_pos_embed,
                "decoder_embed.weight": decoder.decoder_embed.weight,
                "decoder_embed.bias": decoder.decoder_embed.bias,
                "decoder_norm.weight": decoder.decoder_norm.weight,
                "decoder_norm.bias": decoder.decoder_norm.bias,
                "decoder_pred.weight": decoder.decoder_pred.weight,
                "decoder_pred.bias": decoder.decoder_pred.bias,
            }
        )
        add_blocks("decoder_blocks", list(decoder.decoder_layers))
    return {k: v.detach().clone() for k, v in state.items()}


def inputs(seed: int = 1, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, 32, 32, generator=generator)  # [B, 3, H, W]
    noise = torch.rand(batch, LENGTH, generator=generator)  # [B, L]
    return pixel_values, noise


def assert_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    difference = (ours.float() - reference.float()).abs().max().item()
    assert difference <= ATOL, f"{what}: largest difference {difference:.3g} > {ATOL}"


@torch.no_grad()
def compare_pretraining(ours, hf, seed: int = 1) -> None:
    """pred, mask, ids_restore, encoder output and loss, for the same pixels and noise."""
    pixel_values, noise = inputs(seed)
    reference = hf(pixel_values=pixel_values, noise=noise)
    reference_latent = hf.vit(pixel_values=pixel_values, noise=noise).last_hidden_state
    result = ours(pixel_values, noise=noise)
    assert torch.equal(result.mask.float(), reference.mask.float()), "mask differs"
    assert torch.equal(result.ids_restore, reference.ids_restore), "ids_restore differs"
    assert_close(result.latent, reference_latent, "encoder output (latent)")
    assert_close(result.pred, reference.logits, "pred")
    assert_close(result.loss, reference.loss, "loss")
    # The comparison has teeth: the reference outputs are far from trivial.
    assert reference.logits.abs().max() > 0.1 and reference_latent.std() > 0.1


# ----------------------------------------------------------------------------------------------- sin-cos tables
@pytest.mark.parametrize(("width", "image_size", "patch_size"), [(64, 32, 8), (768, 224, 16), (1280, 224, 14)])
def test_sincos_table_equals_hf(width: int, image_size: int, patch_size: int) -> None:
    """Our table ([sin/cos of column | of row], as the official checkpoints) equals HF's initializer's."""
    config = hf_config(hidden_size=width, image_size=image_size, patch_size=patch_size, decoder_hidden_size=width // 2)
    grid = image_size // patch_size
    embeddings = modeling.ViTMAEEmbeddings(config)
    embeddings.initialize_weights()
    reference = embeddings.position_embeddings[0].detach().numpy()  # [1+L, D]
    assert reference.shape == (1 + grid * grid, width)
    np.testing.assert_allclose(sincos_2d(width, grid), reference, rtol=0, atol=1e-6)

    decoder = modeling.ViTMAEDecoder(config.__class__(**{**config.to_dict(), "decoder_num_hidden_layers": 0}), grid**2)
    np.testing.assert_allclose(sincos_2d(width // 2, grid), decoder.decoder_pos_embed[0].detach().numpy(), atol=1e-6)


def test_patchify_matches_hf() -> None:
    hf = transformers.ViTMAEForPreTraining(hf_config())
    pixel_values, _ = inputs()
    patches = patchify(pixel_values, 8)  # [B, L, p*p*3]
    assert torch.equal(patches, hf.patchify(pixel_values))
    assert torch.equal(unpatchify(patches, 8), hf.unpatchify(patches))


# ------------------------------------------------------------------------------------------ HF-format weights
def load_model_from_hf(hf, tmp_path, **kwargs):
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return load_model(folder, **kwargs)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="hf-defaults-eps1e-12"),
        pytest.param({"norm_pix_loss": True, "layer_norm_eps": 1e-6}, id="norm-pix-loss"),
        pytest.param({"layer_norm_eps": 1e-3, "mask_ratio": 0.6}, id="eps1e-3-mask0.6"),
        pytest.param({"qkv_bias": False, "hidden_act": "gelu_new"}, id="no-qkv-bias-gelu-tanh"),
    ],
)
def test_huggingface_weights_match_transformers(overrides: dict, tmp_path) -> None:
    hf = make_hf_model(**overrides)
    ours, loaded = load_model_from_hf(hf, tmp_path)
    assert loaded.source_format == "huggingface" and loaded.has_decoder
    config = loaded.config
    assert (config.layer_norm_eps, config.norm_pix_loss, config.mask_ratio, config.qkv_bias) == (
        hf.config.layer_norm_eps,
        hf.config.norm_pix_loss,
        hf.config.mask_ratio,
        hf.config.qkv_bias,
    )
    assert (config.encoder_hidden, config.decoder_hidden) == (96, 48)
    compare_pretraining(ours, hf)


def test_layer_norm_eps_is_observable(tmp_path) -> None:
    """Guards the test above: with eps 1e-3, running our model at the original's 1e-6 would fail it."""
    hf = make_hf_model(layer_norm_eps=1e-3)
    ours, loaded = load_model_from_hf(hf, tmp_path)
    wrong = type(ours)(loaded.config.replace(layer_norm_eps=1e-6))
    wrong.load_state_dict(ours.state_dict())
    pixel_values, noise = inputs()
    with torch.no_grad():
        assert (wrong.eval()(pixel_values, noise=noise).pred - hf(pixel_values, noise=noise).logits).abs().max() > 1e-4


def test_huggingface_encoder_only_model(tmp_path) -> None:
    """ViTMAEModel checkpoints (no `vit.` prefix, no decoder) load for feature work."""
    hf = make_hf_model("ViTMAEModel", layer_norm_eps=1e-6)
    ours, loaded = load_model_from_hf(hf, tmp_path)
    assert not loaded.has_decoder and not ours.has_decoder
    pixel_values, noise = inputs()
    with torch.no_grad():
        reference = hf(pixel_values=pixel_values, noise=noise)
        masking = ours.masking(pixel_values.shape[0], noise=noise)
        latent = ours.forward_encoder(pixel_values, masking.ids_keep)
        assert torch.equal(masking.mask, reference.mask) and torch.equal(masking.ids_restore, reference.ids_restore)
        assert_close(latent, reference.last_hidden_state, "encoder output (latent)")
        with pytest.raises(MAEError, match="no decoder"):
            ours.forward_decoder(latent, masking.ids_restore)


# ------------------------------------------------------------------------------------ official-layout weights
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_official_layout_matches_transformers(norm_pix_loss: bool, tmp_path) -> None:
    """The same weights as an official {'model': state_dict} .pth (the original uses LayerNorm eps 1e-6)."""
    hf = make_hf_model(seed=3, layer_norm_eps=1e-6, norm_pix_loss=norm_pix_loss)
    path = tmp_path / "mae_checkpoint.pth"
    torch.save({"model": official_state_dict(hf)}, path)
    with pytest.raises(MAEError, match="--num-heads"):  # 64-wide, 2 blocks: no preset, so heads must be given
        load_model(path)
    ours, loaded = load_model(path, num_heads=4, decoder_num_heads=4, norm_pix_loss=norm_pix_loss)
    assert loaded.source_format == "official" and loaded.has_decoder
    assert (loaded.config.encoder_hidden, loaded.config.decoder_hidden) == (96, 48)
    compare_pretraining(ours, hf, seed=4)


def test_official_encoder_only_matches_transformers(tmp_path) -> None:
    """An encoder-only file (as mae_pretrain_vit_*.pth: no decoder, no mask token) against HF's encoder."""
    hf = make_hf_model(seed=5, layer_norm_eps=1e-6)
    state = {k: v for k, v in official_state_dict(hf).items() if not k.startswith(("decoder_", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_test.pth"
    torch.save({"model": state}, path)
    ours, loaded = load_model(path, num_heads=4)
    assert not loaded.has_decoder
    pixel_values, noise = inputs(seed=6)
    with torch.no_grad():
        reference = hf.vit(pixel_values=pixel_values, noise=noise)
        masking = ours.masking(pixel_values.shape[0], noise=noise)
        assert_close(ours.forward_encoder(pixel_values, masking.ids_keep), reference.last_hidden_state, "latent")
