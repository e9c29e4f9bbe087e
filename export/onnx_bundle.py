"""Weights -> a verified ONNX bundle (encoder.onnx, decoder.onnx, precision variants, mae.json).

Nothing half-written: a new bundle is assembled in a hidden directory beside the target and renamed into place
only after every graph passed verification; adding a precision to an existing bundle stages the new files the same
way, moves them in, and rewrites mae.json (atomically) last.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from mae import __version__
from mae.core.bundle import FORMAT, FORMAT_VERSION, PRECISIONS, Bundle, is_bundle
from mae.core.config import MAEConfig
from mae.core.errors import MAEError
from mae.core.files import FolderLock, current_umask, faults, make_dirs, remove_leftovers, sha256_file, temporary_name
from mae.core.hardware import cpu_info
from mae.core.preprocess import Preprocessing
from mae.model import MaskedAutoencoder
from mae.weights import LoadedWeights, load_model

from .calibration import DEFAULT_COUNT, Calibration, load_calibration
from .graphs import (
    ATTENTION_OPSET,
    DEFAULT_OPSET,
    EXPORTER,
    check_opset,
    export_graph,
    graph_opset,
)
from .metadata import graph_metadata, set_metadata
from .precision import INT8_METHOD, check_int8_weight_range, quantize_int8, quantize_openvino_int8, to_fp16
from .progress import Steps
from .verify import (
    TOLERANCES,
    Tolerance,
    TorchReference,
    VerificationError,
    external_data_path,
    graph_bytes,
    verify_graph,
    verify_openvino_model,
)

RESIZE_POLICIES = ("center", "squash")
OPENVINO_INT8_FILE = "encoder.int8.xml"  # + encoder.int8.bin: the NNCF-quantized OpenVINO model
# Above this many bytes of weights a graph keeps them in "<file>.data" beside it: protobuf cannot hold 2 GiB.
EXTERNAL_DATA_BYTES = 1 << 30


def graph_file(part: str, precision: str) -> str:
    """encoder.onnx, decoder.fp16.onnx, encoder.int8.onnx, ..."""
    return f"{part}.onnx" if precision == "fp32" else f"{part}.{precision}.onnx"


def precision_parts(precision: str, has_decoder: bool) -> tuple[str, ...]:
    """The graphs a precision has: int8 quantizes the encoder only (the decoder's pixels gain nothing from it)."""
    if precision == "int8" or not has_decoder:
        return ("encoder",)
    return ("encoder", "decoder")


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Int8Options:
    """How the int8 encoder is made and gated (see mae.export.precision and mae.export.calibration)."""

    calibration: str | os.PathLike | None = None  # images to calibrate on; None: crops of the shipped photos
    calibration_count: int = DEFAULT_COUNT
    min_cosine: float | None = None  # the gate on held-out images; None: TOLERANCES["int8"]
    # Build the OpenVINO int8 model too. None: when openvino and nncf are installed, and a model that fails the gate
    # is left out with a note (the ONNX Runtime graph stands); True: it must pass, or the export fails.
    openvino: bool | None = None
    seed: int = 0

    @property
    def tolerance(self) -> Tolerance:
        if self.min_cosine is None:
            return TOLERANCES["int8"]
        if not 0.0 < self.min_cosine <= 1.0:
            raise MAEError(f"--int8-min-cosine {self.min_cosine} must be in (0, 1].", hint="e.g. 0.999 (the default)")
        return Tolerance(min_cosine=float(self.min_cosine))

    def build_openvino(self) -> bool:
        if self.openvino is not None:
            return self.openvino
        import importlib.util

        return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


def _check_precisions(precisions: Any) -> list[str]:
    if isinstance(precisions, str):
        precisions = (precisions,)
    wanted = []
    for precision in precisions:
        precision = str(getattr(precision, "value", precision))
        if precision not in PRECISIONS:
            raise MAEError(f"Unknown precision {precision!r}", hint=f"use one of: {', '.join(PRECISIONS)}")
        if precision not in wanted:
            wanted.append(precision)
    if not wanted:
        raise MAEError("No precision asked for.", hint="use fp32, fp16 or int8")
    return wanted


def _model_for_export(model: MaskedAutoencoder) -> MaskedAutoencoder:
    """An fp32 CPU eval-mode model: the caller's own when it already is one, otherwise a copy (never mutated)."""
    parameter = next(model.parameters())
    if model.training or parameter.dtype != torch.float32 or parameter.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu().eval()
    return model


def load_source(
    weights: Any, num_heads: int | None = None, decoder_num_heads: int | None = None
) -> tuple[MaskedAutoencoder, LoadedWeights]:
    """`weights` as an (fp32 CPU eval model, LoadedWeights) pair: a path mae.weights reads, a bundle (its recorded
    source), or an already-loaded pair."""
    if isinstance(weights, tuple):
        model, loaded = weights
        if not isinstance(model, MaskedAutoencoder) or not isinstance(loaded, LoadedWeights):
            raise MAEError("weights must be a path or a (MaskedAutoencoder, LoadedWeights) pair.")
        return _model_for_export(model), loaded

    path = Path(weights)
    if is_bundle(path):
        path = bundle_source_path(Bundle.load(path))
    model, loaded = load_model(path, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    return _model_for_export(model), loaded


def bundle_source_path(bundle: Bundle) -> Path:
    """The weights file a bundle was exported from, or an error saying it is gone."""
    path = bundle.source_path()
    if path is None:
        raise MAEError(
            f"Adding graphs to {bundle.path} needs the weights it was exported from, and they are not at "
            f"{bundle.recorded_source or '(no source recorded)'}.",
            hint="pass the weights file itself: mae export WEIGHTS --out BUNDLE --precision ...",
        )
    return path


def _existing_bundle(out_dir: Path) -> Bundle | None:
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise MAEError(f"{out_dir} exists and is not a directory.", hint="choose another --out")
    if is_bundle(out_dir):
        return Bundle.load(out_dir)
    if any(out_dir.iterdir()):
        raise MAEError(
            f"{out_dir} exists, is not empty and is not an mae bundle: refusing to write into it.",
            hint="choose a new or empty --out directory",
        )
    return None


def _check_same_source(bundle: Bundle, loaded: LoadedWeights, opset: int | None, resize: str | None) -> int:
    """Adding to `bundle` is only sound from the same weights at the same opset and pre-processing."""
    recorded = (bundle.manifest.get("source") or {}).get("sha256")
    if recorded != loaded.sha256:
        raise MAEError(
            f"{bundle.path} was exported from other weights (sha256 {str(recorded)[:12]}..., these are "
            f"{loaded.sha256[:12]}...): a bundle holds one model.",
            hint="export these weights into a new --out directory",
        )
    if bundle.config != loaded.config:
        raise MAEError(f"{bundle.path} records a different architecture than {loaded.path}.", hint="use a new --out")
    bundle_opset = int(bundle.manifest.get("opset", DEFAULT_OPSET))
    if opset is not None and int(opset) != bundle_opset:
        raise MAEError(
            f"{bundle.path} holds opset {bundle_opset} graphs; all graphs of a bundle share one opset.",
            hint=f"leave --opset out (or pass {bundle_opset}), or export into a new --out directory",
        )
    if resize is not None and resize != bundle.preprocessing.resize:
        raise MAEError(
            f"{bundle.path} was exported with resize {bundle.preprocessing.resize!r}, not {resize!r}.",
            hint="leave the resize policy out, or export into a new --out directory",
        )
    return bundle_opset


# ------------------------------------------------------------------------------------------------ files
def save_graph(proto: onnx.ModelProto, path: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """Write a graph; weights go to `<file>.data` beside it when they are too large for one protobuf."""
    weight_bytes = sum(len(tensor.raw_data) for tensor in proto.graph.initializer)
    data_path = external_data_path(path)
    data_path.unlink(missing_ok=True)  # external data is appended to, never overwritten
    if weight_bytes > external_data_bytes:
        onnx.save_model(
            proto,
            os.fspath(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, os.fspath(path))


def graph_entry(path: Path) -> dict[str, Any]:
    """What mae.json records about one graph file (and its external data, if any)."""
    entry: dict[str, Any] = {"file": path.name, "sha256": sha256_file(path), "bytes": graph_bytes(path)}
    data_path = external_data_path(path)
    if data_path.is_file():
        entry["external_data"] = {"file": data_path.name, "sha256": sha256_file(data_path)}
    return entry


def _files_of(entry: dict[str, Any]) -> list[str]:
    """The files of a graph entry: the graph, its external data (ONNX) or its weights (OpenVINO IR)."""
    extra = entry.get("external_data") or entry.get("weights")
    return [entry["file"]] + ([extra["file"]] if extra else [])


def openvino_entry(xml_path: Path) -> dict[str, Any]:
    """What mae.json records about an OpenVINO IR (.xml + .bin)."""
    weights = xml_path.with_suffix(".bin")
    return {
        "file": xml_path.name,
        "sha256": sha256_file(xml_path),
        "bytes": xml_path.stat().st_size + weights.stat().st_size,
        "weights": {"file": weights.name, "sha256": sha256_file(weights)},
    }


# ------------------------------------------------------------------------------------------------ export
def export_bundle(
    weights: Any,
    out_dir: str | os.PathLike,
    precisions: Any = ("fp32",),
    opset: int | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    verify: bool = True,
    resize: str | None = None,
    *,
    progress: bool = False,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    int8: Int8Options | None = None,
) -> Bundle:
    """Export `weights` into the bundle `out_dir` and return it.

    weights: a path `mae.weights.load_weights` reads, a bundle (re-uses its recorded source weights), or a
        (MaskedAutoencoder, LoadedWeights) pair.
    precisions: any of "fp32", "fp16", "int8". A new bundle always gets fp32 (the others derive from it and the
        runtime expects it); an existing bundle from the same weights gets the asked-for precisions added.
    opset: ONNX opset (default 18; see docs/export.md). resize: "center" or "squash" pre-processing policy
        recorded in the bundle (default: "center", or the existing bundle's).
    verify: check every graph against PyTorch on real photos (module `mae.export.verify`) before writing.
    int8: calibration images, gate and OpenVINO model of the int8 encoder (`Int8Options`).
    Encoder-only weights give an encoder-only bundle.
    """
    wanted = _check_precisions(precisions)
    int8 = int8 or Int8Options()
    if "int8" in wanted:
        int8.tolerance  # noqa: B018 - a bad gate fails before the (slow) weights are read
    if resize is not None and resize not in RESIZE_POLICIES:
        raise MAEError(f"Unknown resize policy {resize!r}", hint=f"use one of: {', '.join(RESIZE_POLICIES)}")
    if opset is not None:
        check_opset(opset)  # before the (slow) weights are read
    out_dir = Path(out_dir)
    with _export_lock(out_dir):
        return _export_locked(
            weights, out_dir, wanted, opset, num_heads, decoder_num_heads, verify, resize, progress,
            external_data_bytes, int8,
        )  # fmt: skip


@contextlib.contextmanager
def _export_lock(out_dir: Path) -> Iterator[None]:
    """One export into `out_dir` at a time (a second one is told who holds it); the staging folders of exports
    that were killed (their owner is dead) are removed."""
    make_dirs(out_dir.parent)
    hint = "wait for that export to finish, or export into another --out"
    with FolderLock(out_dir.parent / f".{out_dir.name}.lock", f"{out_dir} (being exported)", hint):
        remove_leftovers(out_dir.parent, [out_dir.name], kind="export")
        for legacy in out_dir.parent.glob(f".{out_dir.name}.export-*"):  # untagged staging of earlier versions
            shutil.rmtree(legacy, ignore_errors=True)
        yield


def _export_locked(
    weights: Any,
    out_dir: Path,
    wanted: list[str],
    opset: int | None,
    num_heads: int | None,
    decoder_num_heads: int | None,
    verify: bool,
    resize: str | None,
    progress: bool,
    external_data_bytes: int,
    int8: Int8Options,
) -> Bundle:
    steps = Steps(enabled=progress)
    existing = _existing_bundle(out_dir)

    with steps.step("loading weights"):
        model, loaded = load_source(weights, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    config: MAEConfig = model.cfg
    if existing is not None:
        opset = _check_same_source(existing, loaded, opset, resize)
        preprocessing = existing.preprocessing
        if "fp32" not in existing.precisions:
            wanted = ["fp32", *[p for p in wanted if p != "fp32"]]
    else:
        opset = check_opset(opset)
        preprocessing = Preprocessing(size=config.img_size, resize=resize or "center")
        if "fp32" not in wanted:
            wanted.insert(0, "fp32")
    if opset >= ATTENTION_OPSET:
        steps.note(f"opset {opset}: attention becomes the ONNX Attention op, which TensorRT 10 cannot parse.")
    if not model.has_decoder:
        steps.note("These weights have no decoder: exporting the encoder alone (embeddings yes, reconstruction no).")

    prefix, suffix = temporary_name(out_dir.name, "export")
    with faults(out_dir.parent, "create a staging folder in"):
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=prefix, suffix=suffix))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; the bundle is an ordinary directory
        graphs, reports, int8_record = _export_precisions(
            model, loaded, wanted, opset, preprocessing, staging, existing, verify, steps, external_data_bytes, int8
        )
        if existing is None:
            bundle = Bundle(staging, config, preprocessing, _new_manifest(loaded, opset, model.has_decoder))
        else:
            bundle = existing
        manifest = bundle.manifest
        for precision in wanted:
            manifest.setdefault("graphs", {})[precision] = graphs[precision]
            manifest.setdefault("verification", {})[precision] = reports[precision]
        stale: list[str] = []
        if int8_record is not None:
            new_model = int8_record.pop("openvino_encoder", None)
            old = (manifest.get("openvino") or {}).pop("int8", None)
            if old is not None and new_model is None:  # the previous int8 export's OpenVINO model, now dropped
                stale = _files_of(old["encoder"])
            if new_model is not None:
                manifest.setdefault("openvino", {})["int8"] = {"encoder": new_model}
            if not manifest.get("openvino"):
                manifest.pop("openvino", None)
            manifest["int8"] = int8_record
        # Keep the manifest's precisions in their canonical order.
        manifest["graphs"] = {p: manifest["graphs"][p] for p in PRECISIONS if p in manifest["graphs"]}
        manifest["verification"] = {p: manifest["verification"][p] for p in PRECISIONS if p in manifest["verification"]}
        if existing is None:
            bundle.save()
            with faults(out_dir, "write the bundle"):
                os.replace(staging, out_dir)  # also replaces an empty directory
        else:
            entries = [entry for precision in wanted for entry in graphs[precision].values()]
            entries += list(((manifest.get("openvino") or {}).get("int8") or {}).values()) if int8_record else []
            for entry in entries:
                for name in _files_of(entry):
                    if (staging / name).exists():
                        os.replace(staging / name, out_dir / name)
            bundle.save()  # last: until here the old manifest describes the old, untouched files
            for name in stale:
                (out_dir / name).unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle.load(out_dir)


def _new_manifest(loaded: LoadedWeights, opset: int, has_decoder: bool) -> dict[str, Any]:
    import onnxruntime

    notes = list(loaded.notes)
    if not has_decoder:
        notes.append("encoder-only weights: this bundle has no decoder (embeddings only, no reconstruction)")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "norm_pix_loss": loaded.config.norm_pix_loss,
        "norm_pix_loss_known": loaded.norm_pix_loss_known,
        "source": {"path": str(loaded.path.resolve()), "format": loaded.source_format, "sha256": loaded.sha256},
        "opset": opset,
        "exporter": EXPORTER,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "notes": notes,
    }


def _export_precisions(
    model: MaskedAutoencoder,
    loaded: LoadedWeights,
    wanted: list[str],
    opset: int,
    preprocessing: Preprocessing,
    staging: Path,
    existing: Bundle | None,
    verify: bool,
    steps: Steps,
    external_data_bytes: int,
    int8: Int8Options,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Write and verify each precision's graphs into `staging`; return their mae.json entries, reports and (with
    int8) the int8 record, whose "openvino_encoder" is the OpenVINO model's entry when one was built."""
    config = model.cfg
    reference = TorchReference(model, preprocessing) if verify else None
    calibration: Calibration | None = None
    int8_reference = None
    if "int8" in wanted:
        with steps.step("reading int8 calibration images"):
            calibration = load_calibration(int8.calibration, preprocessing, int8.calibration_count, int8.seed)
        steps.note(
            f"  calibration: {len(calibration.pixels)} images from {calibration.source}; {len(calibration.held_out)} "
            "held out for the int8 check"
            + (f"; {calibration.skipped} unreadable, skipped" if calibration.skipped else "")
        )
        if verify:
            int8_reference = TorchReference(model, preprocessing, (calibration.held_out_names, calibration.held_out))

    def metadata(part: str, precision: str) -> dict[str, str]:
        return graph_metadata(
            part, config, preprocessing, precision, opset, EXPORTER, loaded.sha256, loaded.source_format
        )

    def fp32_path(part: str) -> Path:
        """The fp32 graph the variants derive from: just exported, or the existing bundle's."""
        fresh = staging / graph_file(part, "fp32")
        return fresh if fresh.is_file() or existing is None else existing.graph(part, "fp32")

    graphs: dict[str, dict[str, Any]] = {}
    reports: dict[str, dict[str, Any]] = {}
    for precision in wanted:
        graphs[precision], reports[precision] = {}, {}
        for part in precision_parts(precision, model.has_decoder):
            path = staging / graph_file(part, precision)
            started = time.perf_counter()
            with steps.step(f"exporting {precision} {part} -> {path.name}"):
                if precision == "fp32":
                    proto = export_graph(model, part, opset)
                elif precision == "fp16":
                    proto = to_fp16(onnx.load(os.fspath(fp32_path(part))))
                else:
                    quantize_int8(fp32_path(part), path)
                    proto = onnx.load(os.fspath(path))
                    check_int8_weight_range(proto)
                if graph_opset(proto) != opset:
                    raise MAEError(f"The {part} graph came out at opset {graph_opset(proto)}, not {opset}.")
                set_metadata(proto, metadata(part, precision))
                save_graph(proto, path, external_data_bytes)
                del proto
            seconds = time.perf_counter() - started
            judge = int8_reference if precision == "int8" else reference
            tolerance = int8.tolerance if precision == "int8" else TOLERANCES[precision]
            if judge is None:
                report: dict[str, Any] = {"file": path.name, "bytes": graph_bytes(path), "verified": False}
            else:
                with steps.step(f"verifying {path.name} against PyTorch ({tolerance.describe()})"):
                    report = verify_graph(path, part, precision, judge, tolerance)
                report["verified"] = True
                steps.note(_one_line(precision, part, report))
            report["export_seconds"] = round(seconds, 3)
            graphs[precision][part] = graph_entry(path)
            reports[precision][part] = report
        judge = int8_reference if precision == "int8" else reference
        if judge is not None:
            reports[precision]["inputs"] = {
                "images": judge.image_names,
                "mask_ratios": sorted({case.mask_ratio for case in judge.cases}),
                "batch_sizes": sorted({case.batch for case in judge.cases}),
            }
    int8_record = None
    if calibration is not None:
        int8_record = _int8_record(calibration, int8, verify)
        if int8.build_openvino():
            try:
                int8_record["openvino_encoder"] = _export_openvino_int8(
                    fp32_path("encoder"), staging, calibration, config.num_patches, int8, int8_reference, steps
                )
            except VerificationError as exc:
                if int8.openvino:  # asked for by name: its failure is the export's
                    raise
                # Built because OpenVINO happens to be installed: the verified ONNX Runtime int8 graph stands.
                for name in (OPENVINO_INT8_FILE, Path(OPENVINO_INT8_FILE).with_suffix(".bin").name):
                    (staging / name).unlink(missing_ok=True)  # never part of a new bundle
                steps.note(f"  no OpenVINO int8 model: {exc.message}")
                int8_record["openvino_refused"] = exc.message
        else:
            steps.note("  no OpenVINO int8 model: install the openvino extra (openvino + nncf) to add one")
    return graphs, reports, int8_record


def _int8_record(calibration: Calibration, int8: Int8Options, verified: bool) -> dict[str, Any]:
    """mae.json's "int8": how the int8 graphs were made and where they were checked."""

    return {
        "method": dict(INT8_METHOD) if int8.build_openvino() else {"onnxruntime": INT8_METHOD["onnxruntime"]},
        "calibration": calibration.to_dict(),
        "min_cosine": int8.tolerance.min_cosine,
        "verified_on": cpu_info().to_dict() if verified else None,
    }


def _export_openvino_int8(
    fp32_encoder: Path,
    staging: Path,
    calibration: Calibration,
    num_patches: int,
    int8: Int8Options,
    reference: TorchReference | None,
    steps: Steps,
) -> dict[str, Any]:
    """NNCF-quantize the fp32 encoder into staging/OPENVINO_INT8_FILE, check it, and return its mae.json entry."""
    xml_path = staging / OPENVINO_INT8_FILE
    started = time.perf_counter()
    with steps.step(f"quantizing the OpenVINO int8 encoder with NNCF -> {xml_path.name}"):
        quantize_openvino_int8(fp32_encoder, xml_path, calibration.feeds(num_patches))
    entry = openvino_entry(xml_path)
    if reference is None:
        report: dict[str, Any] = {"file": xml_path.name, "bytes": entry["bytes"], "verified": False}
    else:
        with steps.step(f"verifying {xml_path.name} against PyTorch ({int8.tolerance.describe()})"):
            report = verify_openvino_model(xml_path, "encoder", reference, int8.tolerance)
        report["verified"] = True
        steps.note(_one_line("int8", "encoder (OpenVINO)", report))
    report["export_seconds"] = round(time.perf_counter() - started, 3)
    entry["verification"] = report
    return entry


def _one_line(precision: str, part: str, report: dict[str, Any]) -> str:
    text = f"  {precision} {part}: max |diff| {report['max_abs_diff']:.2e}"
    if "cosine_cls" in report:
        text += f", cosine cls {report['cosine_cls']:.6f}, mean {report['cosine_mean']:.6f}"
    if "cosine_pred" in report:
        text += f", cosine pred {report['cosine_pred']:.6f}"
    return text
