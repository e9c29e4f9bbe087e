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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from mae import __version__
from mae.core.bundle import FORMAT, FORMAT_VERSION, GRAPH_PRECISIONS, NO_DECODER_NOTE, Bundle, is_bundle
from mae.core.errors import MAEError
from mae.core.files import FolderLock, current_umask, faults, make_dirs, remove_leftovers, sha256_file, temporary_name
from mae.core.hardware import cpu_info
from mae.core.preprocess import RESIZE_MODES, Preprocessing
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
from .progress import ExportProgress
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
        if precision not in GRAPH_PRECISIONS:
            raise MAEError(f"Unknown precision {precision!r}", hint=f"use one of: {', '.join(GRAPH_PRECISIONS)}")
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
        hint = "pass the weights file itself: mae export WEIGHTS --out BUNDLE --precision ..."
        path = Bundle.load(path).source_weights("Adding graphs", hint)
    model, loaded = load_model(path, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    return _model_for_export(model), loaded


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
@dataclass(frozen=True)
class _Request:
    """What `export_bundle` was asked for, checked before the (slow) weights are read."""

    wanted: list[str]  # precisions, as asked for
    opset: int | None
    num_heads: int | None
    decoder_num_heads: int | None
    verify: bool
    resize: str | None
    progress: ExportProgress
    external_data_bytes: int
    int8: Int8Options


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
    progress: ExportProgress | None = None,
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
    progress: told each step and note (`mae.export.progress.ExportProgress`); None says nothing.
    int8: calibration images, gate and OpenVINO model of the int8 encoder (`Int8Options`).
    Encoder-only weights give an encoder-only bundle.
    """
    wanted = _check_precisions(precisions)
    int8 = int8 or Int8Options()
    if "int8" in wanted:
        int8.tolerance  # noqa: B018 - a bad gate fails before the (slow) weights are read
    if resize is not None and resize not in RESIZE_MODES:
        raise MAEError(f"Unknown resize mode {resize!r}", hint=f"use one of: {', '.join(RESIZE_MODES)}")
    if opset is not None:
        check_opset(opset)  # before the (slow) weights are read
    request = _Request(
        wanted, opset, num_heads, decoder_num_heads, verify, resize, progress or ExportProgress(), external_data_bytes,
        int8,
    )  # fmt: skip
    out_dir = Path(out_dir)
    with _export_lock(out_dir):
        return _export_locked(weights, out_dir, request)


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


@dataclass(frozen=True)
class _Plan:
    """The graphs this export writes, and what they share with the bundle they join."""

    wanted: list[str]  # precisions in the order they are made: fp32 first when the bundle has none yet
    opset: int
    preprocessing: Preprocessing


@dataclass
class _Written:
    """What the staging folder holds after `_Job.run`, as mae.json records it."""

    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> part -> graph entry
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> part (and "inputs") -> report
    int8_record: dict[str, Any] | None = None  # "int8"; its "openvino_encoder": the OpenVINO model's entry, if built


def _export_locked(weights: Any, out_dir: Path, request: _Request) -> Bundle:
    """Load the weights, write and verify every graph in a staging folder beside `out_dir`, then move them in."""
    existing = _existing_bundle(out_dir)
    with request.progress.step("loading weights"):
        model, loaded = load_source(weights, num_heads=request.num_heads, decoder_num_heads=request.decoder_num_heads)
    plan = _plan(model, loaded, existing, request)

    prefix, suffix = temporary_name(out_dir.name, "export")
    with faults(out_dir.parent, "create a staging folder in"):
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=prefix, suffix=suffix))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; the bundle is an ordinary directory
        written = _Job(model, loaded, plan, staging, existing, request).run()
        if existing is None:
            manifest = _new_manifest(loaded, plan.opset, model.has_decoder)
            bundle = Bundle(staging, model.cfg, plan.preprocessing, manifest)
            _record(bundle.manifest, plan.wanted, written)
            bundle.save()
            with faults(out_dir, "write the bundle"):
                os.replace(staging, out_dir)  # also replaces an empty directory
        else:
            stale = _record(existing.manifest, plan.wanted, written)
            _move_in(existing, staging, plan.wanted, written, stale)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle.load(out_dir)


def _plan(model: MaskedAutoencoder, loaded: LoadedWeights, existing: Bundle | None, request: _Request) -> _Plan:
    """A new bundle's opset and pre-processing, or those of the bundle the graphs join (from the same weights)."""
    if existing is not None:
        opset = _check_same_source(existing, loaded, request.opset, request.resize)
        preprocessing = existing.preprocessing
        needs_fp32 = "fp32" not in existing.precisions
    else:
        opset = check_opset(request.opset)
        preprocessing = Preprocessing(size=model.cfg.img_size, resize=request.resize or "center")
        needs_fp32 = True
    wanted = ["fp32", *[p for p in request.wanted if p != "fp32"]] if needs_fp32 else list(request.wanted)
    if opset >= ATTENTION_OPSET:
        note = f"opset {opset}: attention becomes the ONNX Attention op, which TensorRT 10 cannot parse."
        request.progress.note(note)
    if not model.has_decoder:
        request.progress.note(NO_DECODER_NOTE)
    return _Plan(wanted, opset, preprocessing)


def _record(manifest: dict[str, Any], wanted: list[str], written: _Written) -> list[str]:
    """Enter what was written into `manifest`; return the files it no longer lists (an earlier int8 export's
    OpenVINO model, when this one made none)."""
    for precision in wanted:
        manifest.setdefault("graphs", {})[precision] = written.graphs[precision]
        manifest.setdefault("verification", {})[precision] = written.reports[precision]
    stale: list[str] = []
    if written.int8_record is not None:
        new_model = written.int8_record.pop("openvino_encoder", None)
        old = (manifest.get("openvino") or {}).pop("int8", None)
        if old is not None and new_model is None:  # the previous int8 export's OpenVINO model, now dropped
            stale = _files_of(old["encoder"])
        if new_model is not None:
            manifest.setdefault("openvino", {})["int8"] = {"encoder": new_model}
        if not manifest.get("openvino"):
            manifest.pop("openvino", None)
        manifest["int8"] = written.int8_record
    # Keep the manifest's precisions in their canonical order.
    for section in ("graphs", "verification"):
        manifest[section] = {p: manifest[section][p] for p in GRAPH_PRECISIONS if p in manifest[section]}
    return stale


def _move_in(bundle: Bundle, staging: Path, wanted: list[str], written: _Written, stale: list[str]) -> None:
    """Move the staged files into the existing `bundle`, then save its mae.json (until then the old manifest
    describes the old, untouched files) and remove what it no longer lists."""
    entries = [entry for precision in wanted for entry in written.graphs[precision].values()]
    if written.int8_record is not None:
        entries += list(((bundle.manifest.get("openvino") or {}).get("int8") or {}).values())
    for entry in entries:
        for name in _files_of(entry):
            if (staging / name).exists():
                os.replace(staging / name, bundle.path / name)
    bundle.save()
    for name in stale:
        (bundle.path / name).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _new_manifest(loaded: LoadedWeights, opset: int, has_decoder: bool) -> dict[str, Any]:
    import onnxruntime

    notes = list(loaded.notes)
    if not has_decoder:
        notes.append(NO_DECODER_NOTE)
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


class _Job:
    """Writes and verifies each precision's graphs (and the OpenVINO int8 model) into the staging folder."""

    def __init__(
        self,
        model: MaskedAutoencoder,
        loaded: LoadedWeights,
        plan: _Plan,
        staging: Path,
        existing: Bundle | None,
        request: _Request,
    ) -> None:
        self.model, self.loaded, self.plan, self.staging, self.existing = model, loaded, plan, staging, existing
        self.request, self.progress, self.int8 = request, request.progress, request.int8
        self.reference = TorchReference(model, plan.preprocessing) if request.verify else None
        self.calibration: Calibration | None = None
        self.int8_reference: TorchReference | None = None

    def run(self) -> _Written:
        if "int8" in self.plan.wanted:
            self._calibrate()
        written = _Written()
        for precision in self.plan.wanted:
            written.graphs[precision], written.reports[precision] = {}, {}
            for part in precision_parts(precision, self.model.has_decoder):
                written.graphs[precision][part], written.reports[precision][part] = self._graph(precision, part)
            judge = self._judge(precision)
            if judge is not None:
                written.reports[precision]["inputs"] = {
                    "images": judge.image_names,
                    "mask_ratios": sorted({case.mask_ratio for case in judge.cases}),
                    "batch_sizes": sorted({case.batch for case in judge.cases}),
                }
        if self.calibration is not None:
            written.int8_record = self._int8_record(self.calibration)
        return written

    def _calibrate(self) -> None:
        """The int8 calibration images, and the reference of the int8 gate: the photos and the held-out images."""
        int8, preprocessing = self.int8, self.plan.preprocessing
        with self.progress.step("reading int8 calibration images"):
            calibration = load_calibration(int8.calibration, preprocessing, int8.calibration_count, int8.seed)
        self.progress.note(
            f"  calibration: {len(calibration.pixels)} images from {calibration.source}; {len(calibration.held_out)} "
            "held out for the int8 check"
            + (f"; {calibration.skipped} unreadable, skipped" if calibration.skipped else "")
        )
        self.calibration = calibration
        if self.request.verify:
            held_out = (calibration.held_out_names, calibration.held_out)
            self.int8_reference = TorchReference(self.model, preprocessing, held_out)

    def _judge(self, precision: str) -> TorchReference | None:
        return self.int8_reference if precision == "int8" else self.reference

    def _tolerance(self, precision: str) -> Tolerance:
        return self.int8.tolerance if precision == "int8" else TOLERANCES[precision]

    def _fp32_path(self, part: str) -> Path:
        """The fp32 graph the variants derive from: just exported, or the existing bundle's."""
        fresh = self.staging / graph_file(part, "fp32")
        return fresh if fresh.is_file() or self.existing is None else self.existing.graph(part, "fp32")

    def _graph(self, precision: str, part: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write one graph file and verify it: (its mae.json entry, its verification report)."""
        path = self.staging / graph_file(part, precision)
        started = time.perf_counter()
        with self.progress.step(f"exporting {precision} {part} -> {path.name}"):
            proto = self._convert(precision, part, path)
            if graph_opset(proto) != self.plan.opset:
                raise MAEError(f"The {part} graph came out at opset {graph_opset(proto)}, not {self.plan.opset}.")
            set_metadata(proto, self._metadata(part, precision))
            save_graph(proto, path, self.request.external_data_bytes)
            del proto
        seconds = time.perf_counter() - started
        judge, tolerance = self._judge(precision), self._tolerance(precision)
        if judge is None:
            report: dict[str, Any] = {"file": path.name, "bytes": graph_bytes(path), "verified": False}
        else:
            with self.progress.step(f"verifying {path.name} against PyTorch ({tolerance.describe()})"):
                report = verify_graph(path, part, precision, judge, tolerance)
            report["verified"] = True
            self.progress.note(_one_line(precision, part, report))
        report["export_seconds"] = round(seconds, 3)
        return graph_entry(path), report

    def _metadata(self, part: str, precision: str) -> dict[str, str]:
        plan, loaded = self.plan, self.loaded
        return graph_metadata(
            part, self.model.cfg, plan.preprocessing, precision, plan.opset, EXPORTER, loaded.sha256,
            loaded.source_format,
        )  # fmt: skip

    def _convert(self, precision: str, part: str, path: Path) -> onnx.ModelProto:
        """The graph of `part` at `precision`: exported (fp32), converted from the fp32 graph (fp16) or quantized
        from it into `path` (int8)."""
        if precision == "fp32":
            return export_graph(self.model, part, self.plan.opset)
        if precision == "fp16":
            return to_fp16(onnx.load(os.fspath(self._fp32_path(part))))
        quantize_int8(self._fp32_path(part), path)
        proto = onnx.load(os.fspath(path))
        check_int8_weight_range(proto)
        return proto

    def _int8_record(self, calibration: Calibration) -> dict[str, Any]:
        """mae.json's "int8": how the int8 graphs were made and where they were checked; with the OpenVINO model
        (its entry under "openvino_encoder") when it is built and passes."""
        int8 = self.int8
        record = {
            "method": dict(INT8_METHOD) if int8.build_openvino() else {"onnxruntime": INT8_METHOD["onnxruntime"]},
            "calibration": calibration.to_dict(),
            "min_cosine": int8.tolerance.min_cosine,
            "verified_on": cpu_info().to_dict() if self.request.verify else None,
        }
        if not int8.build_openvino():
            self.progress.note("  no OpenVINO int8 model: install the openvino extra (openvino + nncf) to add one")
            return record
        try:
            record["openvino_encoder"] = self._openvino_int8(calibration)
        except VerificationError as exc:
            if int8.openvino:  # asked for by name: its failure is the export's
                raise
            # Built because OpenVINO happens to be installed: the verified ONNX Runtime int8 graph stands.
            for name in (OPENVINO_INT8_FILE, Path(OPENVINO_INT8_FILE).with_suffix(".bin").name):
                (self.staging / name).unlink(missing_ok=True)  # never part of a new bundle
            self.progress.note(f"  no OpenVINO int8 model: {exc.message}")
            record["openvino_refused"] = exc.message
        return record

    def _openvino_int8(self, calibration: Calibration) -> dict[str, Any]:
        """NNCF-quantize the fp32 encoder into staging/OPENVINO_INT8_FILE, check it, and return its mae.json entry."""
        xml_path = self.staging / OPENVINO_INT8_FILE
        started = time.perf_counter()
        with self.progress.step(f"quantizing the OpenVINO int8 encoder with NNCF -> {xml_path.name}"):
            feeds = calibration.feeds(self.model.cfg.num_patches)
            quantize_openvino_int8(self._fp32_path("encoder"), xml_path, feeds)
        entry = openvino_entry(xml_path)
        tolerance = self.int8.tolerance
        if self.int8_reference is None:
            report: dict[str, Any] = {"file": xml_path.name, "bytes": entry["bytes"], "verified": False}
        else:
            with self.progress.step(f"verifying {xml_path.name} against PyTorch ({tolerance.describe()})"):
                report = verify_openvino_model(xml_path, "encoder", self.int8_reference, tolerance)
            report["verified"] = True
            self.progress.note(_one_line("int8", "encoder (OpenVINO)", report))
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
