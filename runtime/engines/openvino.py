"""OpenVINO engine on the bundle's ONNX graph, or on its OpenVINO int8 model (NNCF-quantized IR) for int8.

Inference precision follows the hardware: bf16 where the CPU has bf16 instructions (AMX-BF16, AVX512-BF16), else
f32, decided by `mae.core.hardware` and set explicitly (OpenVINO's own choice ignores ONEDNN_MAX_CPU_ISA and then
fails to compile for a capped ISA). Asking for bf16 on a CPU without it is refused: it would be emulated.

For throughput, each distinct input shape gets its own statically shaped compiled model (cached),
compiled with the THROUGHPUT hint, and `run` splits the batch across `num_requests` infer requests that run
concurrently on the streams OpenVINO made: with a single synchronous request in flight it would use half the cores.
"""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mae.core import hardware
from mae.core.errors import MAEError, require
from mae.core.integrity import verify_entry

from .base import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    check_graph_precision,
    check_inputs,
    load_bundle,
    warn_int8_cpu,
)

INFERENCE_PRECISIONS = {"auto": None, "bf16": "bf16", "f32": "f32", "fp32": "f32", "f16": "f16", "fp16": "f16"}
MAX_COMPILED_SHAPES = 8  # static-shape compilations kept (each holds its own copy of the weights)


def split_batch(batch: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges cutting `batch` rows into at most `parts` nearly equal, non-empty chunks."""
    parts = max(1, min(parts, batch))
    base, extra = divmod(batch, parts)
    ranges, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def _type_name(value: object) -> str:
    """OpenVINO reports precisions as `ov.Type` (bf16, f32) or plain strings."""
    to_string = getattr(value, "to_string", None)
    return to_string() if callable(to_string) else str(value)


def inference_precision_for(requested: str, cpu: object | None = None) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for `requested` (auto, bf16, f32, ...) on this CPU."""

    if requested not in INFERENCE_PRECISIONS:
        raise MAEError(f"Unknown OpenVINO inference precision {requested!r}", hint="use auto, bf16 or f32")
    cpu = cpu or hardware.cpu_info()
    chosen = INFERENCE_PRECISIONS[requested]
    if chosen is None:
        return "bf16" if cpu.native_bf16 else "f32"
    if chosen == "bf16":
        hardware.require_native_bf16("OpenVINO inference precision bf16", cpu)
    return chosen


def compile_options(
    inference_precision: str, num_requests: int, num_threads: int | None = None, device: str = "CPU"
) -> dict[str, object]:
    """The compile configuration of the engine (and of the export's check of the OpenVINO int8 model)."""
    options: dict[str, object] = {"PERFORMANCE_HINT": "THROUGHPUT" if num_requests > 1 else "LATENCY"}
    if device == "CPU" or inference_precision != "auto":  # other devices choose for themselves
        options["INFERENCE_PRECISION_HINT"] = inference_precision_for(inference_precision)
    if num_threads:
        options["INFERENCE_NUM_THREADS"] = int(num_threads)
    return options


def int8_model_path(bundle: object, part: str, fresh: bool = False) -> Path:  # bundle: mae.core.bundle.Bundle
    """The bundle's OpenVINO int8 model (IR) for `part`, or an MAEError saying how to make one."""
    entry = ((bundle.manifest.get("openvino") or {}).get("int8") or {}).get(part)
    if not entry:
        raise MAEError(
            f"The bundle {bundle.path} has no OpenVINO int8 {part} model (the int8 ONNX graph is for ONNX Runtime).",
            hint=f"install the openvino extra (pip install 'mae-toolkit[openvino]') and run "
            f"`mae export {bundle.path} --precision int8`, or use --engine onnx --precision int8",
        )
    path = bundle.path / entry["file"]
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise MAEError(f"{path} (or its .bin) is listed in mae.json but missing.", hint="re-run `mae export`")
    verify_entry(bundle.path, entry, fresh=fresh)  # the .xml and its .bin are those export verified
    return path


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Restore the calling thread's alternate signal stack after OpenVINO calls.

    OpenVINO's CPU plugin (seen with 2026.4 on Linux) installs an alternate signal stack on the thread that loads
    it and frees that memory when the plugin is unloaded; a later signal such as Ctrl-C, delivered on the freed
    stack, then kills the process with a segmentation fault instead of raising KeyboardInterrupt.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    saved = StackT()
    if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


class OpenVINOEngine:
    """One graph of a bundle, compiled by OpenVINO for the CPU.

    inference_precision: "auto" (bf16 on CPUs with AMX-BF16/AVX512-BF16, else f32), "bf16" or "f32".
    precision "int8" runs the bundle's NNCF-quantized OpenVINO model, not the ONNX Runtime int8 graph.
    static_shapes: compile per input shape (faster by 3-11%, a compile of a second or so per new shape); False
    compiles one dynamic model.
    """

    name = "openvino"

    def __init__(
        self,
        model: object,
        part: str = "encoder",
        precision: str = "fp32",
        num_threads: int | None = None,
        inference_precision: str = "auto",
        num_requests: int = 2,
        static_shapes: bool = True,
        device: str = "CPU",
    ) -> None:
        ov = require("openvino", "openvino", "The openvino engine")
        self.part = part
        self.precision = precision
        check_graph_precision(precision, "openvino")
        inference_precision_for(inference_precision)  # a bad or emulated precision fails before any loading
        self.bundle = load_bundle(model, "openvino")
        self.config = self.bundle.config
        if precision == "int8":
            self.graph_path = int8_model_path(self.bundle, part)
            warn_int8_cpu(self.bundle, "openvino")
        else:
            self.graph_path = self.bundle.graph(part, precision)
        with keep_signal_stack():  # loading the CPU plugin replaces this thread's signal stack
            self.core = ov.Core()
            # "auto" / "cpu" as the other engines spell them; OpenVINO names such as "GPU" pass through.
            self.device = "CPU" if device.lower() in ("auto", "cpu") else device.upper()
            if self.device not in self.core.available_devices:
                raise MAEError(
                    f"OpenVINO has no device {device!r} here (it has: {', '.join(self.core.available_devices)}).",
                    hint="use the CPU device",
                )
            try:
                self.model = self.core.read_model(str(self.graph_path))
            except RuntimeError as exc:
                raise MAEError(f"OpenVINO cannot read {self.graph_path}: {exc}", hint="re-run `mae export`") from exc
            names = {port.get_any_name() for port in self.model.inputs}
            if not set(INPUT_NAMES[part]) <= names:
                raise MAEError(f"{self.graph_path} is not an MAE {part} graph (inputs {sorted(names)}).")

            self.num_requests = max(1, int(num_requests))
            self.static_shapes = static_shapes
            self.compile_config = compile_options(inference_precision, self.num_requests, num_threads, self.device)
            # shape key -> (compiled model, its infer requests); least recently used first.
            self._compiled: OrderedDict[tuple, tuple[object, list]] = OrderedDict()
            self._version = ov.__version__.split("-")[0]
            self._set_description(
                str(self.compile_config.get("INFERENCE_PRECISION_HINT", "device's own")), streams=None
            )

    def _set_description(self, inference_precision: str, streams: object) -> None:
        streams_text = f", {streams} streams" if streams is not None else ""
        shapes = "static shapes" if self.static_shapes else "dynamic shapes"
        self.description = (
            f"openvino {self._version} {self.device} {self.precision} graph, {inference_precision} compute "
            f"({self.graph_path.name}, {self.compile_config['PERFORMANCE_HINT'].lower()}, {self.num_requests} "
            f"requests{streams_text}, {shapes})"
        )

    def _compiled_for(self, shapes: dict[str, tuple[int, ...]]) -> tuple[object, list]:
        key = tuple(sorted(shapes.items())) if self.static_shapes else ()
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        model = self.model
        if self.static_shapes:
            model = self.model.clone()
            model.reshape({name: list(shape) for name, shape in shapes.items()})
        try:
            with keep_signal_stack():
                compiled = self.core.compile_model(model, self.device, self.compile_config)
                requests = [compiled.create_infer_request() for _ in range(self.num_requests)]
        except RuntimeError as exc:
            raise MAEError(f"OpenVINO cannot compile {self.graph_path} for shapes {shapes}: {exc}") from exc
        self._compiled[key] = (compiled, requests)
        if len(self._compiled) > MAX_COMPILED_SHAPES:
            self._compiled.popitem(last=False)
        self._set_description(
            _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")), compiled.get_property("NUM_STREAMS")
        )
        return compiled, requests

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_inputs(self.part, inputs)
        batch = next(iter(checked.values())).shape[0]
        chunks = split_batch(batch, self.num_requests)
        in_flight = []
        for index, (start, stop) in enumerate(chunks):
            feeds = {name: array[start:stop] for name, array in checked.items()}
            _, requests = self._compiled_for({name: array.shape for name, array in feeds.items()})
            request = requests[index]
            request.start_async(feeds, share_inputs=False)
            in_flight.append(request)
        outputs = []
        for request in in_flight:
            request.wait()
            # The request's output buffer is reused by its next inference: copy out as float32.
            outputs.append(np.array(request.get_output_tensor(0).data, dtype=np.float32))
        name = OUTPUT_NAMES[self.part][0]
        return {name: outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=0)}
