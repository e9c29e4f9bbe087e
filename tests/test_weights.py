"""Reading the weights people have: our checkpoints, official MAE files, Hugging Face folders; and `mae info`."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from images_corpus import tiny_hf_config

from mae.checkpoint import load_checkpoint, safe_torch_load, save_checkpoint
from mae.core.config import MAEConfig
from mae.core.errors import MAEError
from mae.model import MaskedAutoencoder, count_parameters, random_noise
from mae.weights import load_model, load_weights, weights_summary
from mae.weights_info import describe_weights


@pytest.fixture
def tiny_model(tiny_config: MAEConfig) -> MaskedAutoencoder:
    torch.manual_seed(0)
    model = MaskedAutoencoder(tiny_config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mixed-up weight shows
        for param in model.parameters():
            if param.requires_grad and param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def official_file(tmp_path: Path, model: MaskedAutoencoder, name: str = "mae_checkpoint.pth", **payload) -> Path:
    path = tmp_path / name
    torch.save({"model": model.state_dict(), **payload}, path)
    return path


def same_outputs(first: MaskedAutoencoder, second: MaskedAutoencoder) -> bool:
    pixels = torch.randn(2, 3, first.cfg.img_size, first.cfg.img_size, generator=torch.Generator().manual_seed(1))
    noise = random_noise(2, first.cfg.num_patches, seed=2)
    with torch.no_grad():
        a, b = first(pixels, 0.75, noise), second(pixels, 0.75, noise)
    return torch.equal(a.pred, b.pred) and torch.equal(a.latent, b.latent)


class CreatesFile:
    """Unpickling this calls open(path, "w"): a file appears if anything in the pickle runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------------------------- our checkpoints
def test_our_checkpoint_round_trip(tmp_path: Path, tiny_model: MaskedAutoencoder, tiny_config) -> None:
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    save_checkpoint(path, tiny_model.state_dict(), tiny_config, epoch=4, optimizer={"step": torch.tensor(3)})
    assert load_checkpoint(path)["config"] == tiny_config
    model, loaded = load_model(path)
    assert (loaded.source_format, loaded.has_decoder, loaded.norm_pix_loss_known) == ("mae-checkpoint", True, True)
    assert loaded.config == tiny_config and loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "saved after epoch 4" in loaded.notes
    assert not model.training and same_outputs(model, tiny_model)
    assert not model.pos_embed.requires_grad and model.cls_token.requires_grad
    with pytest.raises(MAEError, match="records num_heads=2"):
        load_weights(path, num_heads=4)


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_model.state_dict(), "payload": CreatesFile(marker)}, path)
    for loader in (safe_torch_load, load_weights, load_model, load_checkpoint):
        with pytest.raises(MAEError, match="Refusing to load") as error:
            loader(path)
        assert "open" in str(error.value)  # names what it refused
        assert not marker.exists()


def test_a_file_that_is_no_pickle_is_not_called_dangerous(tmp_path: Path) -> None:
    from PIL import Image

    picture = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(picture)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    for path in (picture, text):
        with pytest.raises(MAEError, match="not a PyTorch") as error:
            safe_torch_load(path)
        assert "Refusing" not in str(error.value)


def test_official_training_checkpoint_with_args(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    """The official main_pretrain.py stores its argparse.Namespace in `args`: readable, and it says norm_pix_loss."""
    args = argparse.Namespace(model="mae_vit_test_patch8", norm_pix_loss=True, mask_ratio=0.6, input_size=32)
    path = official_file(tmp_path, tiny_model, "checkpoint-799.pth", args=args, epoch=799, scaler={"scale": 1.0})
    model, loaded = load_model(path)
    assert loaded.source_format == "official" and loaded.norm_pix_loss_known
    assert loaded.config.norm_pix_loss and loaded.config.mask_ratio == 0.6
    assert same_outputs(model, tiny_model)
    with pytest.raises(MAEError, match="records norm_pix_loss=True"):
        load_weights(path, norm_pix_loss=False)


# ------------------------------------------------------------------------------------------------ official files
def test_official_full_checkpoint(tmp_path: Path, tiny_model: MaskedAutoencoder, tiny_config) -> None:
    path = official_file(tmp_path, tiny_model, "mae_visualize_vit_test.pth")
    model, loaded = load_model(path)
    assert loaded.source_format == "official" and loaded.has_decoder
    assert loaded.config == tiny_config  # architecture from shapes, heads from the matching preset
    assert any("from preset mae_vit_test_patch8" in note for note in loaded.notes)
    # Official files do not record norm_pix_loss; the demo documents mae_visualize_* as trained on pixels.
    assert not loaded.norm_pix_loss_known and not loaded.config.norm_pix_loss
    assert same_outputs(model, tiny_model)


@pytest.mark.parametrize(
    ("name", "given", "expected", "known"),
    [
        ("mae_pretrain_vit_test_full.pth", None, True, False),
        ("my_weights.pth", None, False, False),
        ("my_weights.pth", True, True, True),
    ],
)
def test_official_norm_pix_loss(tmp_path, tiny_model, name: str, given, expected: bool, known: bool) -> None:
    loaded = load_weights(official_file(tmp_path, tiny_model, name), norm_pix_loss=given)
    assert (loaded.config.norm_pix_loss, loaded.norm_pix_loss_known) == (expected, known)
    assert any("norm_pix_loss" in note for note in loaded.notes)


def test_official_containers(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    """Bare state dicts, {'state_dict': ...}, DDP 'module.' prefixes, fp16 files and safetensors load too."""
    from safetensors.torch import save_file

    state = tiny_model.state_dict()
    variants = {
        "bare.pth": state,
        "wrapped.pth": {"state_dict": state, "epoch": 1},
        "ddp.pth": {"model": {f"module.{k}": v for k, v in state.items()}},
        "half.pth": {"model": {k: v.half() for k, v in state.items()}},
    }
    for name, payload in variants.items():
        torch.save(payload, tmp_path / name)
        model, loaded = load_model(tmp_path / name)
        if name == "half.pth":
            assert "weights stored as float16; converted to float32" in loaded.notes
            assert model.cls_token.dtype == torch.float32
        else:
            assert same_outputs(model, tiny_model), name
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "timm_style.safetensors")
    model, loaded = load_model(tmp_path / "timm_style.safetensors")
    assert loaded.source_format == "official" and same_outputs(model, tiny_model)


def test_official_encoder_only(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    """As mae_pretrain_vit_*.pth: encoder and its final norm, no mask token, no decoder."""
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_test.pth")
    model, loaded = load_model(tmp_path / "mae_pretrain_vit_test.pth")
    assert not loaded.has_decoder and not model.has_decoder
    assert any("reconstruction needs the decoder" in note for note in loaded.notes)
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.forward_features(pixels), tiny_model.forward_features(pixels))
    with pytest.raises(MAEError, match="no decoder"):
        model(pixels)


def test_official_heads_must_be_known(tmp_path: Path) -> None:
    config = MAEConfig(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, decoder_embed_dim=24, decoder_num_heads=3
    )
    path = official_file(tmp_path, MaskedAutoencoder(config))
    with pytest.raises(MAEError, match="--num-heads") as error:
        load_weights(path)
    assert "do not record attention head counts" in str(error.value)
    with pytest.raises(MAEError, match="--decoder-num-heads"):
        load_weights(path, num_heads=3)
    with pytest.raises(MAEError, match="5 heads do not divide"):
        load_weights(path, num_heads=5, decoder_num_heads=3)
    loaded = load_weights(path, num_heads=6, decoder_num_heads=3)
    assert (loaded.config.num_heads, loaded.config.decoder_num_heads) == (6, 3)


def test_official_broken_files_give_clear_errors(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    state = tiny_model.state_dict()
    cases = {
        "missing: blocks.1.attn.proj.bias": {k: v for k, v in state.items() if k != "blocks.1.attn.proj.bias"},
        "unexpected: extra.weight": {**state, "extra.weight": torch.zeros(2)},
        "wrong shape: blocks.0.norm2.weight": {**state, "blocks.0.norm2.weight": torch.ones(31)},
        "fine-tuned classifier": {**state, "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)},
        "not in the MAE layout: missing norm.weight": {k: v for k, v in state.items() if not k.startswith("norm.")},
        "some blocks are missing": {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items()},
    }
    for message, broken in cases.items():
        torch.save({"model": broken}, tmp_path / "broken.pth")
        with pytest.raises(MAEError, match=message.replace(".", r"\.")):
            load_weights(tmp_path / "broken.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "broken.pth").read_bytes()[:200])
    with pytest.raises(MAEError, match="Cannot read"):
        load_weights(tmp_path / "truncated.pth")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "no_model.pth")
    with pytest.raises(MAEError, match="no state dict"):
        load_weights(tmp_path / "no_model.pth")
    with pytest.raises(MAEError, match="does not exist"):
        load_weights(tmp_path / "nothing.pth")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "mae.json").write_text("{}")
    with pytest.raises(MAEError, match="exported bundle"):
        load_weights(tmp_path / "bundle")


def test_load_model_resizes_position_embeddings(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    path = official_file(tmp_path, tiny_model)
    model, loaded = load_model(path, img_size=48)
    assert loaded.config.img_size == 48 and model.pos_embed.shape == (1, 37, 32)
    assert model.decoder_pos_embed.shape == (1, 37, 16)
    assert any("resized from 32 px" in note for note in loaded.notes)
    assert torch.equal(model.patch_embed.proj.weight, tiny_model.patch_embed.proj.weight)
    assert model(torch.randn(1, 3, 48, 48)).pred.shape == (1, 36, 192)
    with pytest.raises(MAEError, match="multiple of patch_size"):
        load_model(path, img_size=50)


# ---------------------------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = tiny_hf_config(norm_pix_loss=True)
    folder = tmp_path_factory.mktemp("hf") / "vit-mae-tiny"
    transformers.ViTMAEForPreTraining(config).save_pretrained(folder)
    return folder


def copy_folder(source: Path, tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_huggingface_folder(hf_folder: Path, tmp_path: Path) -> None:
    model, loaded = load_model(hf_folder)
    assert loaded.source_format == "huggingface" and loaded.has_decoder and loaded.norm_pix_loss_known
    config = loaded.config
    assert (config.embed_dim, config.depth, config.num_heads, config.encoder_hidden) == (32, 2, 2, 64)
    assert (config.decoder_embed_dim, config.decoder_hidden, config.layer_norm_eps) == (16, 64, 1e-12)
    assert config.norm_pix_loss
    assert loaded.sha256 == hashlib.sha256((hf_folder / "model.safetensors").read_bytes()).hexdigest()
    # The weights file itself (with config.json beside it) is the same checkpoint.
    assert load_weights(hf_folder / "model.safetensors").config == config
    with pytest.raises(MAEError, match="records num_heads=2"):
        load_weights(hf_folder, num_heads=4)

    # pytorch_model.bin (read with weights_only) instead of safetensors
    from safetensors.torch import load_file

    bin_folder = copy_folder(hf_folder, tmp_path)
    torch.save(load_file(bin_folder / "model.safetensors"), bin_folder / "pytorch_model.bin")
    (bin_folder / "model.safetensors").unlink()
    bin_model, bin_loaded = load_model(bin_folder)
    assert bin_loaded.config == config and same_outputs(bin_model, model)
    # ...but not on its own: HF weights need their config
    lone = tmp_path / "lone.bin"
    shutil.copy(bin_folder / "pytorch_model.bin", lone)
    with pytest.raises(MAEError, match="need their config.json"):
        load_weights(lone)


def test_huggingface_sharded_folder(hf_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy_folder(hf_folder, tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert same_outputs(load_model(folder)[0], load_model(hf_folder)[0])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'"),
        ({"model_type": "vit"}, "ViTMAE"),
        ({"image_size": [32, 48]}, "square"),
        ({"head_dim": 8}, "head_dim"),
    ],
)
def test_huggingface_config_errors(hf_folder: Path, tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(MAEError, match=message):
        load_weights(copy_folder(hf_folder, tmp_path, **changes))


def test_huggingface_config_fields_are_honoured(hf_folder: Path, tmp_path: Path) -> None:
    changes = {"layer_norm_eps": 1e-5, "hidden_act": "gelu_pytorch_tanh", "mask_ratio": 0.5, "image_size": [32, 32]}
    loaded = load_weights(copy_folder(hf_folder, tmp_path, **changes))
    config = loaded.config
    assert (config.layer_norm_eps, config.act, config.mask_ratio, config.img_size) == (1e-5, "gelu_tanh", 0.5, 32)
    folder = copy_folder(hf_folder, tmp_path / "broken")
    (folder / "model.safetensors").unlink()
    with pytest.raises(MAEError, match="no weights"):
        load_weights(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MAEError, match="without config.json"):
        load_weights(tmp_path / "empty")


# ------------------------------------------------------------------------------------------- summary, mae info
def test_weights_summary(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    summary = weights_summary(official_file(tmp_path, tiny_model, "mae_visualize_vit_test.pth"))
    params = summary["parameters"]
    assert params["total"] == count_parameters(tiny_model) == params["encoder"] + params["decoder"]
    assert params["decoder"] == sum(
        p.numel() for n, p in tiny_model.named_parameters() if n.startswith(("decoder", "mask_token"))
    )
    assert summary["source_format"] == "official" and summary["has_decoder"]
    assert summary["norm_pix_loss"] is None and summary["norm_pix_loss_known"] is False
    assert summary["config"]["embed_dim"] == 32 and summary["num_patches"] == 16
    assert len(summary["sha256"]) == 64 and summary["notes"]


def test_describe_weights_prints_everything(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    from rich.console import Console

    buffer = io.StringIO()
    summary = describe_weights(official_file(tmp_path, tiny_model), console=Console(file=buffer, width=200))
    text = buffer.getvalue()
    for expected in (
        "official MAE",
        "unknown (official checkpoints do not record it)",
        summary["sha256"],
        "decoder_num_heads",
        "layer_norm_eps",
        f"{summary['parameters']['total']:,}",
    ):
        assert expected in text


def test_describe_encoder_only_weights(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    """No decoder: norm_pix_loss does not apply (no "assumed off" for a mae_pretrain_* file), no decoder fields."""
    from rich.console import Console

    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_test.pth")
    buffer = io.StringIO()
    describe_weights(tmp_path / "mae_pretrain_vit_test.pth", console=Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "not applicable: no decoder" in text and "assumed" not in text
    assert "decoder_embed_dim" not in text and "decoder_num_heads" not in text and "embed_dim" in text


def test_mae_info_cli(tmp_path: Path, tiny_model: MaskedAutoencoder, monkeypatch, capsys) -> None:
    from mae.cli import main

    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": state}, tmp_path / "encoder.pth")
    monkeypatch.setattr(sys, "argv", ["mae", "info", str(tmp_path / "encoder.pth")])
    monkeypatch.setenv("COLUMNS", "200")  # no line wrapping inside the phrases checked
    main()
    assert "reconstruction needs decoder weights" in capsys.readouterr().out

    marker = tmp_path / "created_by_unpickling"
    torch.save({"model": state, "x": CreatesFile(marker)}, tmp_path / "evil.pth")
    monkeypatch.setattr(sys, "argv", ["mae", "info", str(tmp_path / "evil.pth")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "Refusing to load" in captured.err and "Traceback" not in captured.err
    assert not marker.exists()


def test_info_on_a_safetensors_folder_reads_headers_only(hf_folder: Path, tmp_path: Path) -> None:
    """The header-only description gives the facts the full load gives, without importing PyTorch."""
    import subprocess
    import sys
    import textwrap

    from mae.weights_info import hf_folder_summary

    light, full = hf_folder_summary(hf_folder), weights_summary(hf_folder)
    for key in ("source_format", "sha256", "config", "num_patches", "parameters", "has_decoder", "norm_pix_loss"):
        assert light[key] == full[key], key
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from mae.cli import main
        sys.argv = ["mae", "info", {str(hf_folder)!r}]
        main()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "Hugging Face ViTMAE" in done.stdout and f"{full['parameters']['total']:,}" in done.stdout
