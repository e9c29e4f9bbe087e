"""Every exported graph is checked before it joins a bundle, as optimum validates its exports.

Order: `onnx.checker.check_model(full_check=True)`, then the graph's input and output names, then output shapes,
then values against the fp32 PyTorch model on real photos (scikit-image's astronaut, chelsea, coffee, rocket,
resized with the bundle's own pre-processing) at mask ratios 0 and 0.75 and batch sizes 1 and 3. Masks are random
(seeded), so mask ratio 0 also checks a shuffled token order. The decoder gets the PyTorch latent of the same case,
so its check does not inherit the encoder's error.

Tolerances per precision (see `TOLERANCES`): fp32 must match PyTorch to 1e-4 absolute; fp16 and int8 are judged by
the cosine of pooled features (cls and patch mean; the decoder's: the whole prediction per image) and fp16 also by
a bound on the absolute difference relative to the output's scale.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from mae.core.bundle import INPUT_NAMES, OUTPUT_NAMES
from mae.core.errors import MAEError, require
from mae.core.masking import masking_from_noise, random_noise
from mae.core.numerics import cosine_rows
from mae.core.preprocess import Preprocessing, preprocess_image
from mae.model import MaskedAutoencoder
from mae.runtime.engines.openvino import compile_options, keep_signal_stack

from .tolerances import TOLERANCES, Tolerance

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
MASK_RATIOS = (0.0, 0.75)
BATCH_SIZES = (1, 3)
MASK_SEED = 1234


class VerificationError(MAEError):
    """An exported graph does not match PyTorch (or is not a valid graph). Nothing is written."""


# ------------------------------------------------------------------------------------------------- inputs
def reference_photos() -> tuple[list[str], list[np.ndarray]]:
    """Real photos (uint8 [H, W, 3]); synthetic scenes when scikit-image is not installed."""
    try:
        from skimage import data
    except ImportError:
        return _synthetic_photos()
    names = [name for name in PHOTOS if hasattr(data, name)]
    return [f"skimage.data.{name}" for name in names], [np.ascontiguousarray(getattr(data, name)()) for name in names]


def _synthetic_photos(count: int = len(PHOTOS), size: int = 320) -> tuple[list[str], list[np.ndarray]]:
    """Smooth colour gradients with edges and a little noise: image-like statistics without any download."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    photos = []
    for index in range(count):
        angle = index * math.pi / count
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        disc = ((xx - 0.3 - 0.1 * index) ** 2 + (yy - 0.5) ** 2 < 0.04).astype(np.float32)
        channels = [np.clip(ramp * (0.5 + 0.2 * c) + disc * (0.6 - 0.2 * c), 0, 1) for c in range(3)]
        picture = np.stack(channels, axis=-1) + rng.normal(0, 0.03, (size, size, 3)).astype(np.float32)
        photos.append((np.clip(picture, 0, 1) * 255).astype(np.uint8))
    return [f"synthetic_{i}" for i in range(count)], photos


def reference_pixels(preprocessing: Preprocessing) -> tuple[list[str], np.ndarray]:
    """The reference photos through the bundle's pre-processing: float32 [N, 3, S, S]."""

    names, photos = reference_photos()
    return names, np.stack([preprocess_image(photo, preprocessing) for photo in photos])


@dataclass(frozen=True)
class Case:
    mask_ratio: float
    images: tuple[int, ...]  # indices into the reference photos
    ids_keep: np.ndarray  # [B, K] int64
    ids_restore: np.ndarray  # [B, L] int64

    @property
    def batch(self) -> int:
        return len(self.images)

    @property
    def kept(self) -> int:
        return int(self.ids_keep.shape[1])


def verification_cases(num_patches: int, num_images: int, cover_all: bool = False) -> list[Case]:
    """Batch 1 takes the first photo, batch 3 the next three (wrapping), at each mask ratio; `cover_all` adds
    batches of 8 until every image has been seen at each ratio (the int8 gate's held-out images)."""
    cases = []
    for ratio in MASK_RATIOS:
        start = 0
        for batch in BATCH_SIZES:
            images = tuple((start + i) % num_images for i in range(batch))
            start += batch
            noise = random_noise(batch, num_patches, seed=MASK_SEED + batch)
            masking = masking_from_noise(noise, ratio)
            cases.append(Case(ratio, images, masking.ids_keep, masking.ids_restore))
        while cover_all and start < num_images:
            images = tuple(range(start, min(start + 8, num_images)))
            noise = random_noise(len(images), num_patches, seed=MASK_SEED + start)
            masking = masking_from_noise(noise, ratio)
            cases.append(Case(ratio, images, masking.ids_keep, masking.ids_restore))
            start += len(images)
    return cases


class Reference:
    """Expected outputs for every case, computed once and shared by the checks of all precisions.

    Subclasses say where the truth comes from (`_compute`): the fp32 PyTorch model, or a bundle's verified fp32
    ONNX graphs (for TensorRT engines, which are built from a bundle without needing the weights).
    """

    label = "reference"

    def __init__(
        self, num_patches: int, preprocessing: Preprocessing, extra: tuple[list[str], np.ndarray] | None = None
    ) -> None:
        """extra: more (names, pre-processed pixels [M, 3, S, S]) to check on, after the verification photos, in
        batches of 8 (the int8 gate's held-out calibration images)."""
        self.image_names, self.pixels = reference_pixels(preprocessing)
        if extra is not None and len(extra[0]):
            self.image_names = [*self.image_names, *extra[0]]
            self.pixels = np.concatenate([self.pixels, np.asarray(extra[1], dtype=np.float32)])
        self.cases = verification_cases(num_patches, len(self.image_names), cover_all=extra is not None)
        self._outputs: dict[tuple[str, int], np.ndarray] = {}

    def inputs(self, part: str, index: int) -> dict[str, np.ndarray]:
        case = self.cases[index]
        if part == "encoder":
            return {"pixel_values": self.pixels[list(case.images)], "ids_keep": case.ids_keep}
        latent = self.expected("encoder", index)  # the decoder is checked on the reference latent
        return {"latent": latent, "ids_restore": case.ids_restore}

    def expected(self, part: str, index: int) -> np.ndarray:
        key = (part, index)
        if key not in self._outputs:
            self._outputs[key] = self._compute(part, self.inputs(part, index))
        return self._outputs[key]

    def _compute(self, part: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class TorchReference(Reference):
    """The fp32 PyTorch model: the truth every exported graph is held to."""

    label = "PyTorch"

    def __init__(
        self,
        model: MaskedAutoencoder,
        preprocessing: Preprocessing,
        extra: tuple[list[str], np.ndarray] | None = None,
    ) -> None:
        super().__init__(model.cfg.num_patches, preprocessing, extra)
        self.model = model

    def _compute(self, part: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(array)) for array in feeds.values()]
        # encoder: [B, 1+K, D]; decoder: [B, L, p*p*3]
        forward = self.model.forward_encoder if part == "encoder" else self.model.forward_decoder
        with torch.inference_mode():
            return forward(*tensors).float().numpy()


class OnnxReference(Reference):
    """A bundle's fp32 ONNX graphs in ONNX Runtime (CPU): themselves verified against PyTorch at export."""

    label = "the bundle's fp32 ONNX graphs"

    def __init__(self, bundle: Any) -> None:  # mae.core.bundle.Bundle
        super().__init__(bundle.config.num_patches, bundle.preprocessing)
        self.bundle = bundle
        self._sessions: dict[str, Any] = {}

    def _compute(self, part: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if part not in self._sessions:
            self._sessions[part] = _session(self.bundle.graph(part, "fp32"))
        (output,) = self._sessions[part].run([OUTPUT_NAMES[part][0]], feeds)
        return np.asarray(output, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- checks
def check_graph_file(path: Path) -> None:
    """onnx's full check (structure, types, strict shape inference); reads external data beside the file."""
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError, InferenceError or protobuf errors
        raise VerificationError(f"{path.name} is not a valid ONNX graph: {exc}", hint="this is an export bug") from exc


def _session(path: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
    ort = require("onnxruntime", "cpu", "Verifying an export")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # our own report says what went wrong
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot load {path.name}: {exc}", hint="this is an export bug") from exc


def verify_graph(
    path: Path, part: str, precision: str, reference: Reference, tolerance: Tolerance | None = None
) -> dict[str, Any]:
    """Check one graph file against the reference; return its report, or raise VerificationError naming the worst
    case. tolerance: default TOLERANCES[precision]."""
    check_graph_file(path)
    session = _session(path)

    input_names, output_names = INPUT_NAMES[part], OUTPUT_NAMES[part]
    got_inputs = [value.name for value in session.get_inputs()]
    got_outputs = [value.name for value in session.get_outputs()]
    if sorted(got_inputs) != sorted(input_names) or got_outputs != list(output_names):
        raise VerificationError(
            f"{path.name} has inputs {got_inputs} and outputs {got_outputs}; the {part} contract is "
            f"{list(input_names)} -> {list(output_names)}."
        )

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        (output,) = session.run(list(output_names), feeds)
        return np.asarray(output)

    report = compare_outputs(run, path.name, part, precision, reference, tolerance or TOLERANCES[precision])
    report["bytes"] = graph_bytes(path)
    return report


def verify_openvino_model(xml_path: Path, part: str, reference: Reference, tolerance: Tolerance) -> dict[str, Any]:
    """Check an OpenVINO IR (the int8 encoder) against the reference, compiled as the openvino engine compiles it
    on this CPU (`mae.runtime.engines.openvino.compile_options`, dynamic shapes)."""

    ov = require("openvino", "openvino", "Verifying an OpenVINO export")
    with keep_signal_stack():
        core = ov.Core()
        try:
            compiled = core.compile_model(core.read_model(os.fspath(xml_path)), "CPU", compile_options("auto", 1))
        except RuntimeError as exc:
            raise VerificationError(
                f"OpenVINO cannot compile {xml_path.name}: {exc}", hint="this is an export bug"
            ) from exc
        request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        request.infer(feeds, share_inputs=False)
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    report = compare_outputs(run, xml_path.name, part, "int8", reference, tolerance)
    report["bytes"] = xml_path.stat().st_size + xml_path.with_suffix(".bin").stat().st_size
    return report


def compare_outputs(
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    name: str,
    part: str,
    precision: str,
    reference: Reference,
    tolerance: Tolerance,
) -> dict[str, Any]:
    """Run every case through `run` and hold the outputs to `reference` within `tolerance`: the report, or a
    VerificationError naming what failed and the worst case."""
    cases = [_compare_case(run, name, part, reference, index) for index in range(len(reference.cases))]
    worst_abs, worst_case = 0.0, {}
    for entry in cases:
        if entry["max_abs_diff"] >= worst_abs:
            worst_abs, worst_case = entry["max_abs_diff"], entry
    report: dict[str, Any] = {
        "file": name,
        "reference": reference.label,
        "max_abs_diff": worst_abs,
        "max_rel_diff": max([0.0, *(entry["max_rel_diff"] for entry in cases)]),
        "tolerance": {k: v for k, v in asdict(tolerance).items() if v is not None},
        "cases": cases,
    }
    for key in ("cosine_cls", "cosine_mean") if part == "encoder" else ("cosine_pred",):
        values = [entry[key] for entry in cases]
        # A NaN cosine (non-finite outputs) must stay NaN: min() would silently drop it and the graph would pass.
        report[key] = math.nan if any(math.isnan(value) for value in values) else min([1.0, *values])
    failures = _failures(report, part, tolerance)
    report["passed"] = not failures
    if failures:
        where = f"mask ratio {worst_case.get('mask_ratio')}, batch {worst_case.get('batch')}"
        raise VerificationError(
            f"The {precision} {part} ({name}) does not match {reference.label}: {'; '.join(failures)} "
            f"(worst at {where}).",
            hint=(
                "nothing was written; calibrate on more of your own images (--calibration DIR --calibration-count "
                "N), or accept less with --int8-min-cosine, or use fp32"
                if precision == "int8"
                else "nothing was written; the weights may not suit this precision, export fp32 instead"
            ),
        )
    return report


def _compare_case(
    run: Callable[[dict[str, np.ndarray]], np.ndarray], name: str, part: str, reference: Reference, index: int
) -> dict[str, Any]:
    """One case's largest differences and lowest cosines; a wrong shape or dtype is a VerificationError at once."""
    case, output_name = reference.cases[index], OUTPUT_NAMES[part][0]
    expected = reference.expected(part, index)
    actual = run(reference.inputs(part, index))
    if actual.shape != expected.shape:
        raise VerificationError(
            f"{name} returned {output_name} of shape {list(actual.shape)} for batch {case.batch} and "
            f"{case.kept} kept tokens; {reference.label} gives {list(expected.shape)}."
        )
    if actual.dtype != np.float32:
        raise VerificationError(f"{name} returned {actual.dtype} {output_name}; the contract is float32.")
    difference = float(np.abs(actual.astype(np.float64) - expected).max())
    entry: dict[str, Any] = {
        "mask_ratio": case.mask_ratio,
        "batch": case.batch,
        "kept": case.kept,
        "max_abs_diff": difference,
        "max_rel_diff": difference / max(float(np.abs(expected).max()), 1e-30),
    }
    if not np.isfinite(actual).all():
        entry.update(max_abs_diff=math.inf, max_rel_diff=math.inf, non_finite=True)
    if part == "encoder":
        entry["cosine_cls"] = float(cosine_rows(expected[:, 0], actual[:, 0]).min())
        entry["cosine_mean"] = float(cosine_rows(expected[:, 1:].mean(axis=1), actual[:, 1:].mean(axis=1)).min())
    else:
        rows = (expected.reshape(case.batch, -1), actual.reshape(case.batch, -1))
        entry["cosine_pred"] = float(cosine_rows(*rows).min())
    return entry


def _failures(report: dict[str, Any], part: str, tolerance: Tolerance) -> list[str]:
    """What of `tolerance` the report's worst numbers break (none: it passed)."""
    worst_abs, worst_rel = report["max_abs_diff"], report["max_rel_diff"]
    worst_cosine = min(report["cosine_cls"], report["cosine_mean"]) if part == "encoder" else report["cosine_pred"]
    failures = []
    if any(entry.get("non_finite") for entry in report["cases"]):
        failures.append("outputs that are not finite (NaN or infinity)")
    if tolerance.max_abs is not None and not worst_abs <= tolerance.max_abs:
        failures.append(f"largest |difference| {worst_abs:.3g} > {tolerance.max_abs:g}")
    if tolerance.max_rel is not None and not worst_rel <= tolerance.max_rel:
        failures.append(f"largest |difference| / max |output| {worst_rel:.3g} > {tolerance.max_rel:g}")
    if tolerance.min_cosine is not None and not worst_cosine >= tolerance.min_cosine:
        what = "pooled-feature" if part == "encoder" else "prediction"
        failures.append(f"lowest {what} cosine {worst_cosine:.6f} < {tolerance.min_cosine:g}")
    return failures


def graph_bytes(path: Path) -> int:
    """Size of a graph file plus its external-data file, if any."""
    data = external_data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def external_data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")
