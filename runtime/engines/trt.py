"""Native TensorRT engine (TensorRT 10/11 named-tensor API) for engines built by `mae export --format trt`.

Device memory and the stream come from cuda-python (the `tensorrt` extra), not torch, so the runtime stays
torch-free. The checks that need no GPU (engine files in the bundle, optimization-profile bounds, dtype mapping,
device names) are plain functions, tested without TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mae.core.bundle import Bundle
from mae.core.engine_files import (
    check_engine_compatible,
    check_engine_source,
    engine_file_path,
    import_tensorrt,
    load_sidecar,
)
from mae.core.errors import MAEError
from mae.core.hardware import gpu_name
from mae.core.integrity import verify_file

from .base import INPUT_NAMES, OUTPUT_NAMES, check_inputs, load_bundle, warn

EXTRA = "tensorrt"
# TensorRT DataType names -> numpy dtypes for host buffers. BF16 / FP8 / INT4 I/O have no numpy type.
NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


# ------------------------------------------------------------------------------------------ pure helpers
@dataclass(frozen=True)
class TensorSpec:
    name: str
    is_input: bool
    dtype: str  # TensorRT DataType name, e.g. "FLOAT", "HALF", "INT64"
    shape: tuple[int, ...]  # -1 for dynamic dimensions
    profile_min: tuple[int, ...] | None = None  # inputs: optimization profile 0 bounds
    profile_max: tuple[int, ...] | None = None


def parse_cuda_device(device: str | int | None) -> int:
    """ "auto" | "cuda" | "cuda:N" | N -> CUDA device index; "cpu" is an error (TensorRT runs on GPUs only)."""
    if device is None or device in ("auto", "cuda"):
        return 0
    if isinstance(device, int):
        return device
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise MAEError(f"The trt engine runs on a CUDA GPU, not {device!r}.", hint="use --device cuda or cuda:N")


def check_profile(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    """An input shape must lie inside the engine's optimization profile, or TensorRT refuses it deep inside."""
    if len(shape) != len(spec.shape):
        raise MAEError(f"{spec.name} must be {len(spec.shape)}-D for this engine, got shape {list(shape)}")
    for axis, (size, fixed) in enumerate(zip(shape, spec.shape, strict=True)):
        if fixed != -1 and size != fixed:
            raise MAEError(f"{spec.name} dimension {axis} must be {fixed} for this engine, got {size}")
    if spec.profile_min is None or spec.profile_max is None:
        return
    low, high = spec.profile_min, spec.profile_max
    if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
        raise MAEError(
            f"{spec.name} shape {list(shape)} is outside the TensorRT engine's optimization profile: "
            f"min {list(low)}, max {list(high)}.",
            hint="split the batch (e.g. --batch-size), or rebuild the engine with a larger profile "
            "(mae export BUNDLE --format trt --max-batch N)",
        )


def host_array(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """`array` as the contiguous host array the engine's tensor wants (int64 ids may go to an int32 engine)."""
    if dtype_name not in NUMPY_DTYPES:
        raise MAEError(f"TensorRT tensors of type {dtype_name} cannot be fed from numpy.")
    target = np.dtype(NUMPY_DTYPES[dtype_name])
    if np.issubdtype(array.dtype, np.integer) and np.issubdtype(target, np.integer) and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise MAEError(f"values in [{array.min()}, {array.max()}] do not fit the engine's {dtype_name} input")
    return np.ascontiguousarray(array, dtype=target)


def check_io(specs: dict[str, TensorSpec], part: str, source: Path) -> None:
    """The engine's tensors must be those of an MAE `part` graph."""
    inputs = {name for name, spec in specs.items() if spec.is_input}
    outputs = {name for name, spec in specs.items() if not spec.is_input}
    if inputs != set(INPUT_NAMES[part]) or not set(OUTPUT_NAMES[part]) <= outputs:
        raise MAEError(
            f"{source} is not an MAE {part} engine (inputs {sorted(inputs)}, outputs {sorted(outputs)}).",
            hint="rebuild it with `mae export BUNDLE --format trt`",
        )


# --------------------------------------------------------------------------------------------- CUDA calls
def _cudart():  # noqa: ANN202 - the cuda-python runtime module
    """cuda-python's runtime API: `cuda.bindings.runtime` (12.6+), or `cuda.cudart` before that."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise MAEError(
                "The trt engine needs cuda-python for GPU memory.",
                hint=f"pip install 'mae-toolkit[{EXTRA}]'",
            ) from exc
    return runtime


def _require_tensorrt_and_gpu(device_index: int) -> tuple[Any, Any]:
    """(tensorrt, cuda-python runtime) with CUDA GPU `device_index` usable, or one MAEError naming all that is
    missing: the packages, the GPU."""
    missing = []
    trt = import_tensorrt()
    if trt is None:
        missing.append("the Python package 'tensorrt'")
    try:
        cudart = _cudart()
    except MAEError:
        cudart = None
        missing.append("the Python package 'cuda-python'")
    if cudart is not None:
        error, count = cudart.cudaGetDeviceCount()
        if int(error) == CUDA_ERROR_INSUFFICIENT_DRIVER:
            raise _driver_too_old(cudart)
        if int(error) != int(cudart.cudaError_t.cudaSuccess) or count <= device_index:
            missing.append(f"CUDA GPU {device_index} (the driver reports no usable GPU)")
    if missing:
        raise MAEError(
            f"The trt engine needs TensorRT, cuda-python and an NVIDIA GPU; missing here: {'; '.join(missing)}.",
            hint=f"on a machine with an NVIDIA GPU and driver: pip install 'mae-toolkit[gpu,{EXTRA}]', then build the "
            "engines there (mae export BUNDLE --format trt); on this machine use --engine auto or onnx",
        )
    return trt, cudart


CUDA_ERROR_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: the bindings' CUDA is newer than the driver


def _driver_too_old(cudart) -> MAEError:  # noqa: ANN001 - the cuda-python runtime module
    """cuda-python built for a newer CUDA than the driver supports fails every call: say exactly that."""
    try:
        from importlib.metadata import version

        bindings = version("cuda-python")
    except Exception:  # metadata missing (a source install): the major is still in the error below
        bindings = "?"
    try:
        error, driver = cudart.cudaDriverGetVersion()
        driver_text = f"CUDA {driver // 1000}.{driver % 1000 // 10}" if int(error) == 0 and driver else "older"
    except Exception:  # the call itself may be what fails on such a driver
        driver_text = "older"
    return MAEError(
        f"The CUDA driver here supports {driver_text}, and the installed cuda-python {bindings} needs a newer one "
        "(cuda-python 13 needs a CUDA 13 driver): every CUDA call fails with cudaErrorInsufficientDriver.",
        hint="install the bindings of the driver's CUDA major: pip install 'mae-toolkit[tensorrt]' (CUDA 12: "
        "cuda-python 12, runs on CUDA 12 and 13 drivers), or update the NVIDIA driver",
    )


def stream_handle(stream: Any) -> int:
    """The CUDA stream's address for execute_async_v3: `get_cuda_native_handle` in cuda-bindings 13 (where
    `int(stream)` is deprecated), `int(stream)` before it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-bindings >= 12.9 / 13
    except ImportError:
        return int(stream)
    return int(get_cuda_native_handle(stream))


def _set_address(context: Any, name: str, pointer: int) -> None:
    if context.set_tensor_address(name, pointer) is False:
        raise MAEError(f"TensorRT refused the device address of {name} (set_tensor_address returned False).")


def _check(cudart, result: tuple) -> Any:  # noqa: ANN001
    """cuda-python calls return (error, *values): raise on error, return the value(s)."""
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(error)[1]
        raise MAEError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else (values or None)


class _DeviceBuffer:
    """A device allocation that grows (never shrinks) to the largest batch seen."""

    def __init__(self, cudart) -> None:  # noqa: ANN001
        self.cudart, self.pointer, self.capacity = cudart, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.free()
            self.pointer = int(_check(self.cudart, self.cudart.cudaMalloc(max(nbytes, 256))))
            self.capacity = max(nbytes, 256)
        return self.pointer

    def free(self) -> None:
        if self.pointer:
            self.cudart.cudaFree(self.pointer)
            self.pointer, self.capacity = 0, 0


# ------------------------------------------------------------------------------------------------ engine
class TensorRTEngine:
    """One graph of a bundle as a native TensorRT engine on CUDA device `device`, on a stream of its own."""

    name = "trt"

    def __init__(self, model: object, part: str = "encoder", precision: str = "fp32", device: str = "auto") -> None:
        bundle = load_bundle(model, "trt")
        device_index = parse_cuda_device(device)
        # What this machine lacks comes first: how to build an engine is no help where none can be built.
        trt, cudart = _require_tensorrt_and_gpu(device_index)
        engine_path = engine_file_path(bundle.manifest, bundle.path, part, precision)
        sidecar = load_sidecar(engine_path)
        check_engine_source(sidecar, bundle.manifest, part, engine_path)
        verify_file(engine_path, sidecar.get("sha256"), bundle.path)  # the plan file that was built and checked
        self._start(
            trt, cudart, bundle, part, precision, device_index, engine_path.read_bytes(), sidecar, engine_path.name
        )

    @classmethod
    def from_plan(
        cls, bundle: Bundle, part: str, precision: str, plan: bytes, sidecar: dict[str, Any], device: str = "auto"
    ) -> TensorRTEngine:
        """An engine that is not in the bundle yet: `plan` (the serialized engine) with the sidecar it will get.
        The export runs its freshly built engines through this before it writes them."""
        engine = cls.__new__(cls)
        device_index = parse_cuda_device(device)
        trt, cudart = _require_tensorrt_and_gpu(device_index)
        engine._start(trt, cudart, bundle, part, precision, device_index, plan, sidecar, sidecar["engine"])
        return engine

    def _start(
        self,
        trt: Any,
        cudart: Any,
        bundle: Bundle,
        part: str,
        precision: str,
        device_index: int,
        plan: bytes,
        sidecar: dict[str, Any],
        file_name: str,
    ) -> None:
        """Deserialize `plan` (the engine file `file_name` of the bundle) on the GPU once its sidecar says it was
        built here, check it is an MAE `part` engine, and make its context, stream and buffers."""
        self.part, self.precision, self.bundle, self.config = part, precision, bundle, bundle.config
        self.device_index, self.cudart = device_index, cudart
        _check(cudart, cudart.cudaSetDevice(device_index))
        props = _check(cudart, cudart.cudaGetDeviceProperties(device_index))
        gpu = gpu_name(props.name)
        # Engines load only on the TensorRT version and GPU that built them: say so, with the command to rebuild.
        self.note = check_engine_compatible(sidecar, trt.__version__, gpu, f"{props.major}.{props.minor}")
        if self.note:
            warn(self.note)

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise MAEError(
                f"TensorRT {trt.__version__} cannot load {bundle.path / file_name} (another TensorRT or GPU built it?)",
                hint=f"rebuild it here: mae export {bundle.path} --format trt --precision {precision}",
            )
        self.specs = self._tensor_specs(trt)
        check_io(self.specs, part, bundle.path / file_name)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise MAEError(
                f"TensorRT could not create an execution context for {file_name} (out of GPU memory?).",
                hint="free GPU memory (other processes, a smaller --max-batch engine), or use another GPU",
            )
        self.stream = _check(cudart, cudart.cudaStreamCreate())  # a stream of its own, not the default one
        self.buffers = {name: _DeviceBuffer(cudart) for name in self.specs}
        self.description = f"tensorrt {trt.__version__} {gpu} {precision} ({file_name})"

    def _tensor_specs(self, trt) -> dict[str, TensorSpec]:  # noqa: ANN001
        specs = {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            profile = self.engine.get_tensor_profile_shape(name, 0) if is_input else None
            specs[name] = TensorSpec(
                name=name,
                is_input=is_input,
                dtype=self.engine.get_tensor_dtype(name).name,
                shape=tuple(self.engine.get_tensor_shape(name)),
                profile_min=tuple(profile[0]) if profile else None,
                profile_max=tuple(profile[2]) if profile else None,
            )
        return specs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        _check(cudart, cudart.cudaSetDevice(self.device_index))
        host_inputs = {}
        for name, array in check_inputs(self.part, inputs).items():
            spec = self.specs[name]
            check_profile(spec, array.shape)
            host_inputs[name] = host_array(array, spec.dtype)
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, host in host_inputs.items():
            pointer = self.buffers[name].ensure(host.nbytes)
            _check(cudart, cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, to_device, self.stream))
            if not self.context.set_input_shape(name, host.shape):
                raise MAEError(f"TensorRT refused the shape {list(host.shape)} for {name}")
            _set_address(self.context, name, pointer)

        outputs = {}
        for name, spec in self.specs.items():
            if spec.is_input:
                continue
            shape = tuple(self.context.get_tensor_shape(name))  # resolved from the input shapes
            if any(size < 0 for size in shape):
                raise MAEError(f"TensorRT could not infer the shape of {name} ({list(shape)})")
            outputs[name] = np.empty(shape, dtype=NUMPY_DTYPES[spec.dtype])
            _set_address(self.context, name, self.buffers[name].ensure(outputs[name].nbytes))
        if not self.context.execute_async_v3(stream_handle(self.stream)):
            raise MAEError("TensorRT failed to run the engine (see the TensorRT log above).")
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in outputs.items():
            pointer = self.buffers[name].pointer
            _check(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, to_host, self.stream))
        _check(cudart, cudart.cudaStreamSynchronize(self.stream))
        name = OUTPUT_NAMES[self.part][0]
        return {name: outputs[name].astype(np.float32, copy=False)}

    def __del__(self) -> None:
        for buffer in getattr(self, "buffers", {}).values():
            buffer.free()
        stream = getattr(self, "stream", None)
        if stream is not None:
            self.cudart.cudaStreamDestroy(stream)
