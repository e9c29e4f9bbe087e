"""Load the weights people have: our checkpoints, official MAE .pth files, Hugging Face ViTMAE directories.

Everything is converted to one layout, the original MAE state-dict names (those of facebookresearch/mae, which
`mae.model` uses), and described by an `MAEConfig`:

- our checkpoints (`mae train`) carry their config;
- official facebookresearch/mae files (`{'model': state_dict}`, also bare state dicts, `{'state_dict': ...}`,
  DDP `module.` prefixes and timm-style `.safetensors`) record no config: the architecture is read from tensor
  shapes, head counts from the preset with the same widths and depths (or from `num_heads` / `decoder_num_heads`);
- Hugging Face ViTMAE directories (`config.json` + `model.safetensors` or `pytorch_model.bin`, sharded or not) are
  converted: split q/k/v fused into qkv, every config field honoured.

Pickled files are read with `torch.load(weights_only=True)` only (see `mae.checkpoint.safe_torch_load`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import checkpoint_from_payload, is_mae_checkpoint, safe_torch_load
from .core.config import DECODER_PREFIXES, PRESETS, MAEConfig
from .core.errors import MAEError
from .core.files import sha256_file
from .core.hf import HF_WEIGHT_FILES, convert_hf_state, hf_config, read_hf_config
from .model import MaskedAutoencoder
from .pos_embed import resize_pos_embed


@dataclass
class LoadedWeights:
    config: MAEConfig
    state_dict: dict[str, torch.Tensor]  # original MAE names, float32
    source_format: str  # "mae-checkpoint" | "official" | "huggingface"
    has_decoder: bool
    path: Path
    sha256: str  # of the weights file
    norm_pix_loss_known: bool = True  # official checkpoints do not record it
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by `mae info`)


# ----------------------------------------------------------------------------------------------------- entry points
def load_weights(
    path: str | os.PathLike,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    *,
    norm_pix_loss: bool | None = None,
) -> LoadedWeights:
    """Read any supported weights into our layout; the format is detected from the path and the contents.

    num_heads / decoder_num_heads: head counts for official checkpoints, which do not record them (files that do
    record them must agree). norm_pix_loss: what the weights were trained with, when the file does not say.
    """
    path = Path(path)
    if not path.exists():
        raise MAEError(f"{path} does not exist.", hint="pass a checkpoint, an official MAE .pth or a HF ViTMAE folder")
    for name, value in (("num_heads", num_heads), ("decoder_num_heads", decoder_num_heads)):
        if value is not None and value <= 0:
            raise MAEError(f"{name} must be a positive number, got {value}.")

    if path.is_dir():
        if (path / "config.json").is_file():
            loaded = _load_huggingface(path, num_heads, decoder_num_heads, norm_pix_loss)
        elif (path / "mae.json").is_file():
            raise MAEError(
                f"{path} is an exported bundle, which holds ONNX graphs, not PyTorch weights.",
                hint="pass the weights the bundle was exported from (`mae info` on the bundle shows its source)",
            )
        else:
            raise MAEError(
                f"{path} is a folder without config.json, so it is not a Hugging Face ViTMAE checkpoint.",
                hint="pass a weights file (.pt/.pth/.safetensors) or a folder from save_pretrained()",
            )
    elif path.name in HF_WEIGHT_FILES and (path.parent / "config.json").is_file():
        loaded = _load_huggingface(path.parent, num_heads, decoder_num_heads, norm_pix_loss)
    else:
        loaded = _load_file(path, num_heads, decoder_num_heads, norm_pix_loss)

    _check_state_dict(loaded)
    return loaded


def load_model(
    path: str | os.PathLike,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
    *,
    norm_pix_loss: bool | None = None,
) -> tuple[MaskedAutoencoder, LoadedWeights]:
    """A MaskedAutoencoder in eval mode with the weights loaded (position embeddings resized to img_size).

    The model's parameters are the tensors of `loaded.state_dict` (no copy) until it is moved to another device.
    """
    loaded = load_weights(path, num_heads=num_heads, decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss)
    if img_size is not None and img_size != loaded.config.img_size:
        loaded = resize_weights(loaded, img_size)
    # Built on the meta device: no time spent initializing weights that are replaced right away.
    with torch.device("meta"):
        model = MaskedAutoencoder(loaded.config, decoder=loaded.has_decoder)
    model.load_state_dict(loaded.state_dict, strict=True, assign=True)
    return model.eval().to(device), loaded


def resize_weights(loaded: LoadedWeights, img_size: int) -> LoadedWeights:
    """The same weights for another input size: position embeddings resized bicubically over the patch grid,
    as the original's `interpolate_pos_embed` (the cls row is kept)."""
    old = loaded.config
    new_config = old.replace(img_size=img_size)  # validates img_size against the patch size
    state = dict(loaded.state_dict)
    for name in ("pos_embed", "decoder_pos_embed"):
        if name in state:
            state[name] = resize_pos_embed(state[name], new_config.grid_size)  # [1, 1+L', D]
    note = (
        f"position embeddings resized from {old.img_size} px ({old.grid_size}x{old.grid_size} patches) to "
        f"{img_size} px ({new_config.grid_size}x{new_config.grid_size}) by bicubic interpolation"
    )
    return dataclasses.replace(loaded, config=new_config, state_dict=state, notes=[*loaded.notes, note])


# --------------------------------------------------------------------------------------------------- file formats
def _load_file(
    path: Path, num_heads: int | None, decoder_num_heads: int | None, norm_pix_loss: bool | None
) -> LoadedWeights:
    """A single file: our checkpoint, or an official-layout state dict (.pth/.pt/.bin or .safetensors)."""
    if path.suffix == ".safetensors":
        payload: Any = _read_safetensors(path)
    else:
        payload = safe_torch_load(path)

    if is_mae_checkpoint(payload):
        return _from_mae_checkpoint(path, payload, num_heads, decoder_num_heads, norm_pix_loss)

    state, container = _unwrap_state_dict(payload, path)
    if _looks_huggingface(state):
        raise MAEError(
            f"{path} holds Hugging Face ViTMAE weights, which need their config.json.",
            hint="pass the folder that holds config.json and the weights (as written by save_pretrained)",
        )
    args = payload.get("args") if isinstance(payload, dict) else None
    return _from_official(path, state, container, args, num_heads, decoder_num_heads, norm_pix_loss)


def _from_mae_checkpoint(
    path: Path,
    payload: dict[str, Any],
    num_heads: int | None,
    decoder_num_heads: int | None,
    norm_pix_loss: bool | None,
) -> LoadedWeights:
    checkpoint = checkpoint_from_payload(payload, path)
    config: MAEConfig = checkpoint["config"]
    _check_recorded_heads(config, num_heads, decoder_num_heads, path)
    state, notes = _as_float32(checkpoint["model"])
    if norm_pix_loss is not None and norm_pix_loss != config.norm_pix_loss:
        raise MAEError(
            f"{path} was trained with norm_pix_loss={config.norm_pix_loss}; it cannot be loaded as {norm_pix_loss}."
        )
    epoch = checkpoint.get("epoch")
    if isinstance(epoch, int):
        notes.append(f"saved after epoch {epoch}")
    has_decoder = any(k.startswith(DECODER_PREFIXES) for k in state)
    if not has_decoder:
        notes.append(_NO_DECODER_NOTE)
    return LoadedWeights(config, state, "mae-checkpoint", has_decoder, path, sha256_file(path), True, notes)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # a core dependency

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise MAEError(f"Cannot read {path} as safetensors: {exc}", hint="is the file complete?") from exc


def _unwrap_state_dict(payload: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside an official-style file and where it was found ('model', 'state_dict' or bare)."""
    state: Any = None
    container = "bare"
    if isinstance(payload, dict):
        for key in ("model", "state_dict"):
            if isinstance(payload.get(key), dict):
                state, container = payload[key], key
                break
        else:
            if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
                state = payload
    if not isinstance(state, dict) or not state:
        keys = ", ".join(map(str, list(payload)[:8])) if isinstance(payload, dict) else type(payload).__name__
        raise MAEError(
            f"{path} holds no state dict mae recognises (found: {keys}).",
            hint="expected an mae checkpoint, an official MAE file ({'model': state_dict}) or a bare state dict",
        )
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, container


def _looks_huggingface(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in state)


def _as_float32(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Floating tensors as contiguous float32 (files in fp16/bf16 exist); a note names a conversion."""
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.dtype != torch.float32})
    converted = {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    notes = [f"weights stored as {', '.join(dtypes)}; converted to float32"] if dtypes else []
    return converted, notes


_NO_DECODER_NOTE = (
    "no decoder weights: good for features and embeddings; reconstruction needs the decoder "
    "(e.g. mae_visualize_vit_*.pth, mae_pretrain_vit_*_full.pth or a checkpoint from `mae train`)"
)


# ------------------------------------------------------------------------------------------------ official layout
def _from_official(
    path: Path,
    state: dict[str, torch.Tensor],
    container: str,
    args: Any,
    num_heads: int | None,
    decoder_num_heads: int | None,
    norm_pix_loss: bool | None,
) -> LoadedWeights:
    """facebookresearch/mae names; the architecture comes from tensor shapes."""
    state, notes = _as_float32(state)
    _check_official_layout(path, state)
    fields = _official_encoder(path, state, num_heads, notes)
    has_decoder = "decoder_pred.weight" in state
    if has_decoder:
        fields.update(_official_decoder(path, state, decoder_num_heads, notes))
    else:
        # Unused without a decoder; a preset's decoder (or the default) keeps the config valid and familiar.
        preset = _preset_for(fields["embed_dim"], fields["depth"], "encoder")
        base = PRESETS[preset] if preset else MAEConfig()
        fields.update(
            decoder_embed_dim=base.decoder_embed_dim,
            decoder_depth=base.decoder_depth,
            decoder_num_heads=base.decoder_num_heads,
        )
        notes.append(_NO_DECODER_NOTE)

    pix_loss, known, pix_note = _official_norm_pix_loss(path, args, norm_pix_loss, has_decoder)
    fields["norm_pix_loss"] = pix_loss
    if pix_note:
        notes.append(pix_note)
    if args is not None and isinstance(getattr(args, "mask_ratio", None), float):
        fields["mask_ratio"] = args.mask_ratio
    if container != "model":
        notes.append(f"state dict found {'at the top level' if container == 'bare' else f'under {container!r}'}")
    config = MAEConfig(**fields)
    return LoadedWeights(config, state, "official", has_decoder, path, sha256_file(path), known, notes)


def _check_official_layout(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Pretrained MAE weights in the original's names, not a fine-tuned classifier or another model."""
    classifier = sorted(k for k in state if k.startswith(("head.", "fc_norm.")))
    if classifier:
        raise MAEError(
            f"{path} looks like a fine-tuned classifier (it has {', '.join(classifier[:4])}), "
            "not pretrained MAE weights.",
            hint="use the pretrained weights (e.g. mae_pretrain_vit_base.pth or mae_visualize_vit_large.pth)",
        )
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise MAEError(
            f"{path} is not in the MAE layout: missing {', '.join(missing)} (found e.g. {_some_keys(state)}).",
            hint="mae reads its own checkpoints, official MAE .pth files and Hugging Face ViTMAE folders",
        )


def _official_encoder(
    path: Path, state: dict[str, torch.Tensor], num_heads: int | None, notes: list[str]
) -> dict[str, Any]:
    """The encoder's MAEConfig fields, read from the tensor shapes (the head count from `_resolve_heads`)."""
    embed_dim, in_chans, patch_size, _ = state["patch_embed.proj.weight"].shape  # [D, C, p, p]
    tokens = state["pos_embed"].shape[1]  # 1 + L
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise MAEError(f"{path}: pos_embed has {tokens - 1} patch rows, not a square grid; mae needs square inputs.")
    depth = _count_blocks(state, "blocks")
    encoder_mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
    encoder_heads, encoder_note = _resolve_heads(embed_dim, depth, num_heads, "encoder", path)
    notes.append(encoder_note)
    return {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": encoder_heads,
        "encoder_mlp_dim": None if encoder_mlp_dim == 4 * embed_dim else encoder_mlp_dim,
        "layer_norm_eps": 1e-6,  # the original builds every LayerNorm with eps=1e-6
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "act": "gelu",
    }


def _official_decoder(
    path: Path, state: dict[str, torch.Tensor], decoder_num_heads: int | None, notes: list[str]
) -> dict[str, Any]:
    """The decoder's MAEConfig fields, read from the tensor shapes."""
    decoder_dim = state["decoder_embed.weight"].shape[0]  # [Dd, D]
    decoder_depth = _count_blocks(state, "decoder_blocks")
    decoder_heads, decoder_note = _resolve_heads(decoder_dim, decoder_depth, decoder_num_heads, "decoder", path)
    notes.append(decoder_note)
    decoder_mlp_dim = state["decoder_blocks.0.mlp.fc1.weight"].shape[0] if decoder_depth else 4 * decoder_dim
    return {
        "decoder_embed_dim": decoder_dim,
        "decoder_depth": decoder_depth,
        "decoder_num_heads": decoder_heads,
        "decoder_mlp_dim": None if decoder_mlp_dim == 4 * decoder_dim else decoder_mlp_dim,
    }


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if indices != set(range(len(indices))):
        raise MAEError(f"The weights' {prefix} are numbered {sorted(indices)}: some blocks are missing.")
    return len(indices)


def _preset_for(width: int, depth: int, part: str) -> str | None:
    """The first preset whose encoder (or decoder) has this width and depth."""
    for name, preset in PRESETS.items():
        if part == "encoder":
            dims = (preset.embed_dim, preset.depth)
        else:
            dims = (preset.decoder_embed_dim, preset.decoder_depth)
        if dims == (width, depth):
            return name
    return None


def _resolve_heads(width: int, depth: int, given: int | None, part: str, path: Path) -> tuple[int, str]:
    """Head count for an official file: the caller's, else the preset's with the same width and depth."""
    option = "--num-heads" if part == "encoder" else "--decoder-num-heads"
    if given is not None:
        if width % given:
            raise MAEError(f"The {part} is {width} wide, which {given} heads do not divide.", hint=f"check {option}")
        return given, f"{part} heads: {given} (given by the caller; official checkpoints do not record head counts)"
    preset = _preset_for(width, depth, part)
    if preset is None:
        raise MAEError(
            f"{path} has a {width}-wide, {depth}-block {part} that matches no preset, and official checkpoints do "
            "not record attention head counts.",
            hint=f"pass {option} N (the paper's models use 64-wide heads for ViT-B/L, 80 for ViT-H, 32 in the decoder)",
        )
    heads = PRESETS[preset].num_heads if part == "encoder" else PRESETS[preset].decoder_num_heads
    return heads, f"{part} heads: {heads}, from preset {preset} (official checkpoints do not record head counts)"


def _official_norm_pix_loss(
    path: Path, args: Any, given: bool | None, has_decoder: bool
) -> tuple[bool, bool, str | None]:
    """(norm_pix_loss, known, note). Official weight files do not record it; a training script's `args` does."""
    recorded = getattr(args, "norm_pix_loss", None)
    if isinstance(recorded, bool):
        if given is not None and given != recorded:
            raise MAEError(f"{path} records norm_pix_loss={recorded} in its training arguments, not {given}.")
        return recorded, True, "norm_pix_loss read from the training arguments stored in the file"
    if given is not None:
        return given, True, "norm_pix_loss given by the caller (the file does not record it)"
    if not has_decoder:
        return False, False, None  # only the decoder's targets depend on it
    name = path.name.lower()
    if "visualize" in name:
        return (
            False,
            False,
            (
                "norm_pix_loss assumed off: the MAE demo describes its mae_visualize_* models as trained with pixels "
                "as targets (the file does not record it)"
            ),
        )
    if "pretrain" in name:
        return (
            True,
            False,
            (
                "norm_pix_loss assumed on: the paper's pre-trained models (mae_pretrain_*) use normalized-pixel "
                "targets, per the MAE repo's PRETRAIN.md (the file does not record it)"
            ),
        )
    return (
        False,
        False,
        (
            "norm_pix_loss unknown (official checkpoints do not record it); assumed off: if reconstructions look flat "
            "and grey, the model predicts normalized patches (load with norm_pix_loss=True)"
        ),
    )


# --------------------------------------------------------------------------------------------------- Hugging Face


def _load_huggingface(
    folder: Path, num_heads: int | None, decoder_num_heads: int | None, norm_pix_loss: bool | None
) -> LoadedWeights:
    hf_json = read_hf_config(folder)
    weights_file, raw = _read_hf_weights(folder)
    state, notes = _as_float32(convert_hf_state(raw, weights_file, lambda parts: torch.cat(parts, dim=0)))
    has_decoder = any(k.startswith(DECODER_PREFIXES) for k in state)
    config, config_notes = hf_config(hf_json, folder)
    notes += config_notes
    _check_recorded_heads(config, num_heads, decoder_num_heads, folder)
    if norm_pix_loss is not None and norm_pix_loss != config.norm_pix_loss:
        raise MAEError(f"{folder}/config.json records norm_pix_loss={config.norm_pix_loss}, not {norm_pix_loss}.")
    if not has_decoder:
        notes.append(_NO_DECODER_NOTE)
    notes.append(f"converted from Hugging Face ViTMAE ({weights_file.name}; q/k/v fused into qkv)")
    return LoadedWeights(config, state, "huggingface", has_decoder, folder, sha256_file(weights_file), True, notes)


def _read_hf_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file hashed, the raw state dict); sharded checkpoints are read through their index."""
    for name in HF_WEIGHT_FILES:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(candidate.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise MAEError(f"Cannot read the shard index {candidate}: {exc}") from exc
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_hf_file(folder / shard))
            return candidate, state
        return candidate, _read_hf_file(candidate)
    raise MAEError(
        f"{folder} has config.json but no weights ({', '.join(HF_WEIGHT_FILES)}).",
        hint="download the weights too (e.g. huggingface-cli download facebook/vit-mae-base)",
    )


def _read_hf_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MAEError(f"{path} is listed in the shard index but missing.", hint="is the download complete?")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    payload = safe_torch_load(path)
    if not isinstance(payload, dict):
        raise MAEError(f"{path} does not hold a state dict.")
    return {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------------------- checks
def _check_recorded_heads(config: MAEConfig, num_heads: int | None, decoder_num_heads: int | None, path: Path):
    for given, recorded, name in (
        (num_heads, config.num_heads, "num_heads"),
        (decoder_num_heads, config.decoder_num_heads, "decoder_num_heads"),
    ):
        if given is not None and given != recorded:
            raise MAEError(
                f"{path} records {name}={recorded}, but {given} was asked for.",
                hint=f"leave out --{name.replace('_', '-')}: only official checkpoints need it",
            )


def _some_keys(state: dict[str, Any], count: int = 4) -> str:
    return ", ".join(list(state)[:count]) or "nothing"


def _check_state_dict(loaded: LoadedWeights) -> None:
    """Every weight the model needs, none it does not, each with the right shape; else a clear error."""
    with torch.device("meta"):
        reference = MaskedAutoencoder(loaded.config, decoder=loaded.has_decoder).state_dict()
    state = loaded.state_dict
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    mismatched = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(reference[k].shape)})"
        for k in reference
        if k in state and state[k].shape != reference[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise MAEError(
            f"The weights in {loaded.path} do not fit the architecture they describe ({loaded.source_format}): "
            + "; ".join(problems),
            hint="is the file complete, and are --num-heads / --decoder-num-heads right?",
        )


# ------------------------------------------------------------------------------------------------------- describe
def weights_summary(
    path: str | os.PathLike,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    *,
    norm_pix_loss: bool | None = None,
) -> dict[str, Any]:
    """What `mae info WEIGHTS` prints, as plain data: format, config, parameter counts, decoder, norm_pix_loss."""
    loaded = load_weights(path, num_heads=num_heads, decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss)
    return summary_of(loaded)


def summary_of(loaded: LoadedWeights) -> dict[str, Any]:
    encoder = sum(v.numel() for k, v in loaded.state_dict.items() if not k.startswith(DECODER_PREFIXES))
    decoder = sum(v.numel() for k, v in loaded.state_dict.items() if k.startswith(DECODER_PREFIXES))
    return {
        "path": str(loaded.path),
        "source_format": loaded.source_format,
        "sha256": loaded.sha256,
        "config": loaded.config.to_dict(),
        "num_patches": loaded.config.num_patches,
        "parameters": {"encoder": encoder, "decoder": decoder, "total": encoder + decoder},
        "has_decoder": loaded.has_decoder,
        "norm_pix_loss": loaded.config.norm_pix_loss if loaded.norm_pix_loss_known else None,
        "norm_pix_loss_assumed": loaded.config.norm_pix_loss,
        "norm_pix_loss_known": loaded.norm_pix_loss_known,
        "notes": list(loaded.notes),
    }
