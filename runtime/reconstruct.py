"""Masked reconstruction: images -> masking -> encoder -> decoder -> pictures, arrays and metrics.

Every engine goes through the same numpy steps (preprocess, `masking`, `visualize`), so engines differ only by
the numerics of their graphs. `reconstruct` is the library call (the demo uses it); `save_pictures` and
`write_arrays` write what `mae reconstruct` asks for, and `mae.reports.reconstruct` prints its table.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mae.core.bundle import Bundle, is_bundle, no_decoder_error, not_a_bundle_error
from mae.core.config import MAEConfig
from mae.core.errors import MAEError
from mae.core.files import atomic_write_bytes
from mae.core.masking import Masking, masking_from_noise, random_noise
from mae.core.preprocess import Preprocessing, load_and_preprocess, preprocess_image
from mae.core.visualize import (
    NORM_PIX_NOTE,
    MaskedMetrics,
    Panels,
    PixelSpace,
    build_panels,
    masked_metrics,
    panels_picture,
)

from .engines import Engine, create_engine
from .engines.auto import choose
from .engines.torch import load_weights

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class PreparedImage:
    """An image already decoded and pre-processed with the bundle's pre-processing (what `mae embed`'s decode
    gives, e.g. in `mae serve`'s decode threads): `reconstruct` then runs only the engines on it."""

    name: str
    size: tuple[int, int]  # (width, height) of the original
    pixel_values: np.ndarray  # float32 [3, S, S]


ImageInput = str | os.PathLike | np.ndarray | Image.Image | PreparedImage


@dataclass
class ReconstructionResult:
    names: list[str]  # file names (or "image N" for in-memory images)
    original_sizes: list[tuple[int, int]]  # (width, height) before preprocessing
    pixel_values: np.ndarray  # [N, 3, S, S] normalized model input
    noise: np.ndarray  # [N, L] the masking noise (smallest kept)
    ids_keep: np.ndarray  # [N, K]
    mask: np.ndarray  # [N, L] 1 = removed
    ids_restore: np.ndarray  # [N, L]
    latent: np.ndarray  # [N, 1+K, D]
    pred: np.ndarray  # [N, L, p*p*3] decoder output (per-patch normalized when norm_pix_loss)
    panels: Panels  # four [N, S, S, 3] pictures in [0, 1]
    metrics: MaskedMetrics  # per image, removed patches only
    mask_ratio: float
    norm_pix_loss: bool
    config: MAEConfig
    preprocessing: Preprocessing
    engines: list[str] = field(default_factory=list)  # descriptions of the encoder and decoder engines
    notes: list[str] = field(default_factory=list)  # things the user should know

    def row_labels(self) -> list[str]:
        labels = []
        for name, psnr, mse in zip(self.names, self.metrics.psnr, self.metrics.mse, strict=True):
            scores = "" if np.isnan(psnr) else f"  PSNR {psnr:.2f} dB  MSE {mse:.5f} (removed patches)"
            labels.append(f"{name}{scores}")
        return labels

    def picture(self, indices: Sequence[int] | None = None) -> Image.Image:
        """The 4-panel picture of the chosen images (all by default), one row each."""
        chosen = list(range(len(self.names))) if indices is None else list(indices)
        panels = Panels(*(panel[chosen] for panel in self.panels))
        labels = self.row_labels()
        return panels_picture(panels, self.mask_ratio, self.norm_pix_loss, row_labels=[labels[i] for i in chosen])

    def arrays(self) -> dict[str, np.ndarray]:
        """What `--save-arrays` writes."""
        return {
            "pred": self.pred,
            "mask": self.mask,
            "ids_restore": self.ids_restore,
            "latent": self.latent,
            "ids_keep": self.ids_keep,
            "noise": self.noise,
            "names": np.asarray(self.names),
        }


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class _Model:
    config: MAEConfig
    preprocessing: Preprocessing
    norm_pix_loss: bool
    source: Any  # what the engines are created from: a bundle path or an in-memory MaskedAutoencoder
    bundle: Bundle | None
    notes: list[str]


def _resolve_model(model: Any, engine: str) -> _Model:
    """Read what the pictures need (config, preprocessing, norm_pix_loss) once, without building engines."""
    if not isinstance(model, str | os.PathLike):  # an in-memory MaskedAutoencoder (training previews, tests)
        if engine != "torch":
            raise MAEError("An in-memory model runs with the torch engine only.")
        cfg = model.cfg
        return _Model(cfg, Preprocessing(size=cfg.img_size), cfg.norm_pix_loss, model, None, [])
    path = Path(model)
    if not path.exists():
        raise MAEError(f"{path} does not exist.", hint="pass a bundle directory (`mae export`) or weights")
    if is_bundle(path):
        bundle = Bundle.load(path)
        if not bundle.has_decoder:
            raise no_decoder_error(f"The bundle {bundle.path}")
        notes = []
        if not bundle.manifest.get("norm_pix_loss_known", True):
            notes.append(f"the source weights do not record norm_pix_loss; assumed {bundle.norm_pix_loss}")
        return _Model(bundle.config, bundle.preprocessing, bundle.norm_pix_loss, str(bundle.path), bundle, notes)
    if engine != "torch":
        raise not_a_bundle_error(path, engine)

    network, loaded = load_weights(path)
    if not loaded.has_decoder:
        raise no_decoder_error(str(path))
    cfg = loaded.config
    notes = []
    if not loaded.norm_pix_loss_known:  # the loader says what it assumed and why
        notes += [note for note in loaded.notes if "norm_pix_loss" in note] or [
            f"these weights do not record norm_pix_loss; assumed {cfg.norm_pix_loss}"
        ]
    return _Model(cfg, Preprocessing(size=cfg.img_size), cfg.norm_pix_loss, network, None, notes)


def _decoder_precision(model: _Model, precision: str, engine: str) -> str:
    """int8 bundles usually quantize the encoder only: the decoder then runs its fp32 graph."""
    if model.bundle is None or engine == "torch" or model.bundle.has_graph("decoder", precision):
        return precision
    return "fp32"


def resolve_auto(model: Any, engine: str, precision: str | None) -> tuple[str, str, dict[str, Any], str | None]:
    """(engine, precision, extra engine options, the line saying what auto chose) for reconstruction."""
    if engine != "auto":
        return engine, precision or "fp32", {}, None

    if not isinstance(model, (str, os.PathLike)):  # an in-memory MaskedAutoencoder
        return "torch", precision or "fp32", {}, "engine auto: torch (an in-memory model)"
    choice = choose(model, "reconstruct", precision)
    return choice.engine, choice.precision, dict(choice.options), choice.line()


def create_engines(
    model: Any, engine: str = "auto", precision: str | None = None, **options: Any
) -> tuple[Engine, Engine, list[str]]:
    """(encoder engine, decoder engine, notes) for reconstruction; weights are loaded once for both."""
    engine, precision, extra, line = resolve_auto(model, engine, precision)
    resolved = _resolve_model(model, engine)
    encoder, decoder, notes = _create_engines(resolved, engine, precision, {**options, **extra})
    return encoder, decoder, ([line] if line else []) + notes


def _create_engines(resolved: _Model, engine: str, precision: str, options: dict[str, Any]):  # noqa: ANN202
    notes = list(resolved.notes)
    encoder = create_engine(engine, resolved.source, "encoder", precision=precision, **options)
    decoder_precision = _decoder_precision(resolved, precision, engine)
    if decoder_precision != precision:
        notes.append(f"the bundle has no {precision} decoder: the decoder runs {decoder_precision}")
    decoder = create_engine(engine, resolved.source, "decoder", precision=decoder_precision, **options)
    return encoder, decoder, notes


# ----------------------------------------------------------------------------------------------- inputs
def load_noise(noise: str | os.PathLike | np.ndarray, count: int, length: int) -> np.ndarray:
    """[N, L] float32 noise from an array or a .npy file, checked against N images and L patches."""
    npy_magic = b"\x93NUMPY"  # every .npy file starts with it (numpy.lib.format)
    array = f"float array of shape [{count}, {length}] (one row per image, one value per patch)"
    wanted = f"a .npy {array}"
    hint = "save it with numpy.save(path, noise), noise a float array [N, L]"
    if isinstance(noise, str | os.PathLike):
        path = Path(noise)
        try:
            with open(path, "rb") as handle:
                head = handle.read(len(npy_magic))
            if head != npy_magic:  # np.load would take it for a pickle and talk of allow_pickle
                what = "empty" if not head else "not a .npy file (no NumPy header)"
                raise MAEError(f"Noise file {path} is {what}: it must be {wanted}.", hint=hint)
            noise = np.load(path, allow_pickle=False)
        except FileNotFoundError as exc:
            raise MAEError(f"Noise file {path} does not exist.") from exc
        except IsADirectoryError as exc:
            raise MAEError(f"Noise file {path} is a folder: it must be {wanted}.", hint=hint) from exc
        except MAEError:
            raise
        except (OSError, ValueError, EOFError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "allow_pickle" in reason or "pickled" in reason:
                reason = "it holds Python objects"
            elif "EOF" in reason or "cannot reshape" in reason or "Failed to read all data" in reason:
                reason = f"it is truncated ({reason})"
            raise MAEError(f"Noise file {path} is not {wanted}: {reason}.", hint=hint) from exc
    noise = np.asarray(noise)
    if noise.dtype == object or not (np.issubdtype(noise.dtype, np.floating) or np.issubdtype(noise.dtype, np.integer)):
        raise MAEError(f"noise must be a {array}, got dtype {noise.dtype}", hint=hint)
    if noise.shape != (count, length):
        raise MAEError(
            f"noise has shape {list(noise.shape)}, expected [{count}, {length}]: one row per image, one value per "
            "patch (the smallest values are kept)",
        )
    noise = noise.astype(np.float32)
    if not np.isfinite(noise).all():
        raise MAEError("noise holds NaN or infinite values")
    return noise


def _load_images(images: Sequence[ImageInput], pre: Preprocessing, resize: str | None):  # noqa: ANN202

    names, sizes, arrays = [], [], []
    for index, image in enumerate(images):
        if isinstance(image, PreparedImage):
            expected = (3, pre.size, pre.size)
            if np.shape(image.pixel_values) != expected:
                shape = np.shape(image.pixel_values)
                raise MAEError(f"{image.name}: pre-processed pixels {shape}, expected {expected}.")
            arrays.append(np.asarray(image.pixel_values, dtype=np.float32))
            names.append(image.name)
            sizes.append(image.size)
            continue
        if isinstance(image, str | os.PathLike):
            array, size = load_and_preprocess(image, pre, resize)
            names.append(Path(image).name)
        else:
            picture = image if isinstance(image, Image.Image) else np.asarray(image)
            size = picture.size if isinstance(picture, Image.Image) else (picture.shape[1], picture.shape[0])
            array = preprocess_image(picture, pre, resize)
            names.append(f"image {index}")
        arrays.append(array)
        sizes.append(size)
    return names, sizes, np.stack(arrays)  # [N, 3, S, S]


# ------------------------------------------------------------------------------------------------- library
class ReconstructProgress(Protocol):
    """How `reconstruct` reports its batches, for the app to show (`mae reconstruct` draws a bar while they run)."""

    def start(self, total: int, label: str) -> None:
        """`total` batches (of `batch_size` images) are about to run."""

    def advance(self, count: int) -> None:
        """`count` more batches are done."""

    def close(self) -> None:
        """The batches stopped, finished or not."""


def reconstruct(
    images: Sequence[ImageInput],
    model: Any,
    engine: str = "auto",
    mask_ratio: float = 0.75,
    seed: int | None = 0,
    noise: str | os.PathLike | np.ndarray | None = None,
    resize: str | None = None,
    precision: str | None = None,
    provider: str | None = None,
    device: str | None = None,
    batch_size: int = 16,
    engines: tuple[Engine, Engine] | None = None,
    progress: ReconstructProgress | None = None,
    allow_emulated_bf16: bool = False,
) -> ReconstructionResult:
    """Reconstruct images (files, uint8 [H, W, 3] arrays, Pillow images or `PreparedImage`s) with `model`.

    model: a bundle directory, or (torch engine) weights or a MaskedAutoencoder. engine: onnx, openvino, trt,
    torch or auto (`mae.runtime.engines.auto`; precision None lets it choose, else fp32). Masking comes from `noise`
    ([N, L] array or .npy, smallest kept, as Hugging Face's `noise`) or else from numpy noise seeded by `seed`.
    engines: an (encoder, decoder) pair from `create_engines`, to reuse across calls.
    progress: told of the batches as they run.
    allow_emulated_bf16: torch bf16 on a CPU without bf16 instructions (refused otherwise, as it is very slow).
    """
    if not images:
        raise MAEError("No images to reconstruct.")
    if not 0.0 <= mask_ratio < 1.0:
        raise MAEError(f"mask ratio {mask_ratio} must be in [0, 1)")
    auto_line, auto_options = None, {}
    if engines is None:
        engine, precision, auto_options, auto_line = resolve_auto(model, engine, precision)
    resolved = _resolve_model(model, engine)
    names, sizes, pixel_values = _load_images(images, resolved.preprocessing, resize)
    count, length = len(names), resolved.config.num_patches
    noise_array = load_noise(noise, count, length) if noise is not None else random_noise(count, length, seed)
    masking = masking_from_noise(noise_array, mask_ratio)

    notes = ([auto_line] if auto_line else []) + list(resolved.notes)
    if engines is None:
        options = {"provider": provider, "device": device or "auto", "allow_emulated_bf16": allow_emulated_bf16}
        encoder, decoder, engine_notes = _create_engines(resolved, engine, precision, {**options, **auto_options})
        notes += engine_notes
    else:
        encoder, decoder = engines
    latent, pred = _run_batches(encoder, decoder, pixel_values, masking, batch_size, progress)
    prepared = _Images(names, sizes, pixel_values, noise_array, masking)
    return _result(resolved, prepared, latent, pred, mask_ratio, [encoder.description, decoder.description], notes)


def _run_batches(
    encoder: Engine,
    decoder: Engine,
    pixel_values: np.ndarray,
    masking: Masking,
    batch_size: int,
    progress: ReconstructProgress | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The encoder and the decoder over batches of `batch_size` images: (latent [N, 1+K, D], pred [N, L, p*p*3])."""
    latents, preds = [], []
    starts = range(0, len(pixel_values), batch_size)
    if progress is not None:
        progress.start(len(starts), "reconstructing")
    try:
        for start in starts:
            rows = slice(start, start + batch_size)
            latent = encoder.run({"pixel_values": pixel_values[rows], "ids_keep": masking.ids_keep[rows]})["latent"]
            pred = decoder.run({"latent": latent, "ids_restore": masking.ids_restore[rows]})["pred"]
            latents.append(latent)  # [b, 1+K, D]
            preds.append(pred)  # [b, L, p*p*3]
            if progress is not None:
                progress.advance(1)
    finally:
        if progress is not None:
            progress.close()
    return np.concatenate(latents), np.concatenate(preds)


@dataclass(frozen=True)
class _Images:
    """The images as the engines got them."""

    names: list[str]
    sizes: list[tuple[int, int]]
    pixel_values: np.ndarray  # [N, 3, S, S]
    noise: np.ndarray  # [N, L]
    masking: Masking


def _result(
    resolved: _Model,
    images: _Images,
    latent: np.ndarray,
    pred: np.ndarray,
    mask_ratio: float,
    engines: list[str],
    notes: list[str],
) -> ReconstructionResult:
    """The pictures and metrics of the reconstructed images, with everything they were made from."""
    cfg, pre, masking = resolved.config, resolved.preprocessing, images.masking
    space = PixelSpace(cfg.patch_size, pre.mean, pre.std, resolved.norm_pix_loss)
    panels = build_panels(images.pixel_values, pred, masking.mask, space)
    metrics = masked_metrics(images.pixel_values, pred, masking.mask, space, panels=panels)
    return ReconstructionResult(
        names=images.names,
        original_sizes=images.sizes,
        pixel_values=images.pixel_values,
        noise=images.noise,
        ids_keep=masking.ids_keep,
        mask=masking.mask,
        ids_restore=masking.ids_restore,
        latent=latent,
        pred=pred,
        panels=panels,
        metrics=metrics,
        mask_ratio=mask_ratio,
        norm_pix_loss=resolved.norm_pix_loss,
        config=cfg,
        preprocessing=pre,
        engines=engines,
        notes=[*notes, NORM_PIX_NOTE] if resolved.norm_pix_loss else notes,
    )


# ------------------------------------------------------------------------------------------------- output
def _picture_stem(name: str) -> str:
    """The start of an image's picture file name: its own name's stem, spaces made underscores."""
    return Path(name).stem.replace(" ", "_") or "image"


def picture_paths(names: Sequence[str], out: Path) -> list[Path] | Path:
    """One picture file for all images when `out` names a picture file, else one per image inside `out`.

    Inside a folder, a name already taken (by another image of this call, or by a file there from an earlier
    run) gets the next free number: a picture the user already has is never overwritten.
    """
    if out.suffix.lower() in PICTURE_SUFFIXES:
        return out
    paths, used = [], set()
    for name in names:
        stem = _picture_stem(name)
        candidate, counter = stem, 1
        # photos from different folders may share a name, and an earlier run may have left its pictures here
        while candidate in used or (out / f"{candidate}_reconstruction.png").exists():
            counter += 1
            candidate = f"{stem}_{counter}"
        used.add(candidate)
        paths.append(out / f"{candidate}_reconstruction.png")
    return paths


def save_picture(picture: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    picture.save(buffer, format=Image.registered_extensions()[path.suffix.lower()])
    atomic_write_bytes(path, buffer.getvalue())


@dataclass(frozen=True)
class SavedPictures:
    """What `save_pictures` wrote, and what the person who asked should be told."""

    files: list[Path]  # the picture of each image (one file for all when `out` named a picture file)
    replaced: list[Path]  # files named by the user that existed: overwritten (the arrays file: about to be)
    numbered: int  # pictures given a number, so as to overwrite no file of the same name


def save_pictures(result: ReconstructionResult, out: Path, save_arrays: Path | None = None) -> SavedPictures:
    """`mae reconstruct`'s pictures (see `picture_paths`); `save_arrays`, where the arrays will go, is only checked
    for an existing file."""
    targets = picture_paths(result.names, out)
    replaced = [targets] if isinstance(targets, Path) and targets.exists() else []
    if save_arrays is not None and arrays_file(save_arrays).exists():
        replaced.append(arrays_file(save_arrays))
    if isinstance(targets, Path):
        save_picture(result.picture(), targets)
        return SavedPictures([targets] * len(result.names), replaced, 0)
    for index, target in enumerate(targets):
        save_picture(result.picture([index]), target)
    plain = [f"{_picture_stem(name)}_reconstruction" for name in result.names]
    numbered = sum(path.stem != stem for path, stem in zip(targets, plain, strict=True))
    return SavedPictures(targets, replaced, numbered)


def arrays_file(path: Path) -> Path:
    """Where `--save-arrays PATH` writes: PATH, with .npz added when it has another suffix (as numpy would)."""
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def write_arrays(result: ReconstructionResult, path: Path) -> Path:
    """`--save-arrays`: an .npz with pred, mask, ids_restore, latent (and ids_keep, noise, names), atomically."""
    path = arrays_file(path)
    buffer = io.BytesIO()
    np.savez(buffer, **result.arrays())
    atomic_write_bytes(path, buffer.getvalue())
    return path
