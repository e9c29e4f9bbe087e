"""`mae info --system`: this machine's CPU, CUDA GPUs and installed engines, for engine choices and bug reports, as
plain data (`mae.reports.export` prints it).

Torch-free: versions come from package metadata, and PyTorch's view of CUDA is asked (through the torch engine's
module) only when torch is installed. A package that is installed but fails to load is reported with its error
instead of stopping the report.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import asdict, dataclass
from typing import Any

from mae import __version__
from mae.core import hardware

from .engines.openvino import keep_signal_stack
from .engines.torch import torch_details


@dataclass(frozen=True)
class _Package:
    module: str  # import name
    distributions: tuple[str, ...]  # pip names that install it (the CPU and GPU wheels of one module differ)
    import_for_version: bool = False  # no pip metadata is common (e.g. TensorRT from NVIDIA's tarballs)


# The engines and the packages that extend them, in the order they are reported.
PACKAGES: dict[str, _Package] = {
    "onnxruntime": _Package(
        "onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")
    ),
    "openvino": _Package("openvino", ("openvino", "openvino-nightly")),
    "tensorrt": _Package("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"), True),
    "torch": _Package("torch", ("torch",)),
    "nncf": _Package("nncf", ("nncf",)),
    "cuda-python": _Package("cuda", ("cuda-python", "cuda-bindings")),
}


def _version(package: _Package) -> str | None:
    if importlib.util.find_spec(package.module) is None:
        return None  # metadata left behind by an uninstalled wheel does not make a module
    for distribution in package.distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    if package.import_for_version:
        try:
            return str(importlib.import_module(package.module).__version__)
        except Exception:
            return "unknown version"
    return None


def installed_engines() -> dict[str, str]:
    """Engine or package name -> version, for those of PACKAGES installed here: {"onnxruntime": "1.32.0", ...}."""
    versions = {name: _version(package) for name, package in PACKAGES.items()}
    return {name: version for name, version in versions.items() if version is not None}


def _details(name: str) -> dict[str, Any]:
    """What an installed engine can run on here (providers, devices, CUDA)."""
    if name == "onnxruntime":
        import onnxruntime

        return {"providers": list(onnxruntime.get_available_providers())}
    if name == "openvino":
        import openvino

        with keep_signal_stack():  # the CPU plugin swaps this thread's signal stack (see the engine)
            core = openvino.Core()
            devices = list(core.available_devices)
            precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT") if "CPU" in devices else None
        to_string = getattr(precision, "to_string", None)  # an ov.Type ("bf16", "f32") or a plain string
        cpu_precision = to_string() if callable(to_string) else (None if precision is None else str(precision))
        return {"devices": devices, "cpu_inference_precision": cpu_precision}
    if name == "torch":
        return torch_details()
    return {}


def system_report() -> dict[str, Any]:
    """The CPU (model, ISA, int8 class, native bf16, threads), CUDA GPUs and installed engines, as plain data."""
    cpu = hardware.cpu_info()
    engines: dict[str, dict[str, Any]] = {}
    for name, version in installed_engines().items():
        try:
            engines[name] = {"version": version, **_details(name)}
        except Exception as exc:  # an engine that cannot load is worth reporting, not a crash of the report
            engines[name] = {"version": version, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return {
        "cpu": {**cpu.to_dict(), "threads": cpu.threads},
        "cuda_gpus": [asdict(gpu) for gpu in hardware.cuda_gpus()],
        "engines": engines,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "toolkit_version": __version__,
    }
