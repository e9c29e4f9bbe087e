"""What this machine's CPU (and GPU) can do, for the choices that depend on it: bf16, int8, the engine `auto` picks.

The project's machines are not all one CPU: an Intel Sapphire Rapids class (AVX-512, VNNI, AMX-BF16/INT8) and an
AMD EPYC Zen 3 class (AVX2 only) have both been seen. Nothing here assumes either; every decision that differs by
instruction set goes through `CpuInfo`, so tests can hand in any CPU. Torch-free (numpy is not even needed).

int8 classes (how integer GEMMs run in ONNX Runtime's MLAS and oneDNN):
- "amx": AMX-INT8 tiles (TDPBUSD, exact int32 accumulation).
- "vnni": AVX-512 VNNI or AVX-VNNI (VPDPBUSD, exact int32 accumulation).
- "avx512" / "avx2": no VNNI: u8 x s8 products are summed in pairs into int16 with saturation (VPMADDUBSW), so
  weights must stay within 7 bits for the results to be exact (see `mae.export.precision`).
- "baseline": anything else (older x86, ARM without dot-product instructions).
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field

from .errors import MAEError

# The flags that change what runs fast or right here, in the order they are reported.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    # aarch64 (/proc/cpuinfo "Features")
    "asimd",
    "asimddp",
    "i8mm",
    "bf16",
    "sve",
)
FLAG_NAMES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "asimd": "NEON",
    "asimddp": "DOTPROD",
    "i8mm": "I8MM",
    "bf16": "BF16",
    "sve": "SVE",
}
INT8_CLASSES = ("amx", "vnni", "avx512", "avx2", "baseline")
INT8_NOTES = {  # each class in a few words, for `mae info --system`
    "amx": "AMX-INT8 tiles, exact int32 accumulation",
    "vnni": "VNNI dot products, exact int32 accumulation",
    "avx512": "no VNNI: u8 x s8 pairs summed into int16 with saturation (exact for 7-bit weights)",
    "avx2": "no VNNI: u8 x s8 pairs summed into int16 with saturation (exact for 7-bit weights)",
    "baseline": "no int8 dot-product instructions",
}

# oneDNN (and so OpenVINO and PyTorch's CPU kernels) can be held to a lower instruction set with ONEDNN_MAX_CPU_ISA;
# the flags each cap leaves (x86 only). Honouring it here keeps our own choices (bf16, OpenVINO's precision, the
# engine `auto` picks) consistent with what those libraries will really run, and lets tests take the lower paths.
_AVX2 = frozenset({"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c"})
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
ISA_CAPS: dict[str, frozenset[str]] = {
    "SSE41": frozenset({"sse4_1"}),
    "AVX": frozenset({"sse4_1", "sse4_2", "avx"}),
    "AVX2": _AVX2,
    "AVX2_VNNI": _AVX2 | {"avx_vnni"},
    "AVX2_VNNI_2": _AVX2 | {"avx_vnni", "avx_vnni_int8", "avx_ne_convert"},
    "AVX512_CORE": _AVX512,
    "AVX512_CORE_VNNI": _AVX512 | {"avx512_vnni"},
    "AVX512_CORE_BF16": _AVX512 | {"avx512_vnni", "avx512_bf16"},
    "AVX10_1_512": _AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16"},
    "AVX512_CORE_FP16": _AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni"},
}
ISA_CAP_VARIABLE = "ONEDNN_MAX_CPU_ISA"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    machine: str = ""  # platform.machine(): x86_64, aarch64, arm64, ...
    threads: int = 1  # CPUs this process may run on

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (x86: AVX512-BF16 or AMX-BF16; ARM: the BF16 extension)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16", "bf16"})

    @property
    def int8_class(self) -> str:
        """One of INT8_CLASSES (see the module docstring)."""
        if "amx_int8" in self.flags:
            return "amx"
        if self.flags & {"avx512_vnni", "avx_vnni"}:
            return "vnni"
        if "avx512bw" in self.flags:
            return "avx512"
        if "avx2" in self.flags:
            return "avx2"
        return "baseline"

    @property
    def isa(self) -> list[str]:
        """The flags that matter, by their usual names: ["AVX2", "AVX-512", "AVX512-VNNI", "AMX-INT8", ...]."""
        return [FLAG_NAMES[flag] for flag in ISA_FLAGS if flag in self.flags]

    def describe(self) -> str:
        """'Intel(R) Xeon(R) Processor (AVX2, FMA, AVX-512, ..., AMX-INT8), 2 threads'."""
        isa = ", ".join(self.isa) or "no AVX2"
        return f"{self.model} ({isa}), {self.threads} threads"

    def to_dict(self) -> dict[str, object]:
        """What a bundle records about the CPU an int8 graph was verified on."""
        return {
            "model": self.model,
            "machine": self.machine,
            "isa": self.isa,
            "int8_class": self.int8_class,
            "native_bf16": self.native_bf16,
        }


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) from the text of /proc/cpuinfo: the first processor's "model name" and "flags" (x86) or
    "Hardware"/"CPU model" and "Features" (ARM); ("", empty) for text that has neither."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return model, frozenset(flags)


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; ("", empty) where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return parse_cpuinfo(handle.read())
    except OSError:
        return "", frozenset()


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def capped_flags(flags: frozenset[str], cap: str | None) -> frozenset[str]:
    """`flags` less what ONEDNN_MAX_CPU_ISA=`cap` forbids (unset, ALL, DEFAULT or an AMX cap: unchanged)."""
    cap = (cap or "").strip().upper()
    if cap in ISA_CAPS:
        removable = {flag for flag in flags if flag.startswith(("avx", "amx", "sse4", "fma", "f16c"))}
        return frozenset(flags - (removable - ISA_CAPS[cap]))
    return flags


@functools.lru_cache(maxsize=4)
def _cpu_info(cap: str | None) -> CpuInfo:
    model, flags = _read_cpuinfo()
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown CPU",
        flags=capped_flags(flags, cap),
        machine=platform.machine(),
        threads=_threads(),
    )


def cpu_info() -> CpuInfo:
    """This machine's CPU as oneDNN will use it (ONEDNN_MAX_CPU_ISA honoured), read once per cap."""
    return _cpu_info(os.environ.get(ISA_CAP_VARIABLE))


def require_native_bf16(purpose: str, cpu: CpuInfo | None = None, allow_emulated: bool = False) -> None:
    """Stop before a bf16 run on a CPU that would emulate it (minutes for what fp32 does in seconds).

    purpose: what was asked for, e.g. "--precision bf16 (training)". allow_emulated: the user insisted.
    """
    cpu = cpu or cpu_info()
    if cpu.native_bf16 or allow_emulated:
        return
    raise MAEError(
        f"{purpose} on this CPU ({cpu.model}; {', '.join(cpu.isa) or 'no AVX2'}) would be emulated: it has no "
        "bf16 instructions (AVX512-BF16 or AMX-BF16), and emulated bf16 is many times slower than fp32.",
        hint="use --precision fp32 (or int8 graphs for inference); add --allow-emulated-bf16 to run it anyway",
    )


@dataclass(frozen=True)
class GpuSummary:
    name: str
    source: str  # what found it: cuda-python, nvidia-smi
    compute_capability: str | None = None  # "8.9"; None where nvidia-smi -L found it


def gpu_name(raw: bytes | str) -> str:
    """cudaDeviceProp.name (a NUL-padded char array) as text."""
    if isinstance(raw, bytes):
        raw = raw.split(b"\0")[0].decode(errors="replace")
    return str(raw).split("\0")[0].strip()


def cudart_gpus() -> list[GpuSummary] | None:
    """The CUDA GPUs cuda-python sees (name, compute capability), as the TensorRT engine sees them; None when
    cuda-python is not installed.

    A driver that fails to initialize (or a bindings/driver mismatch) counts as no GPU.
    """
    import importlib

    for module_name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            error, count = cudart.cudaGetDeviceCount()
            if int(error) != 0:
                return []
            gpus = []
            for index in range(count):
                error, properties = cudart.cudaGetDeviceProperties(index)
                if int(error) != 0:
                    continue
                capability = f"{properties.major}.{properties.minor}"
                gpus.append(GpuSummary(gpu_name(properties.name), "cuda-python", capability))
            return gpus
        except Exception:
            return []
    return None


def cuda_gpus() -> list[GpuSummary]:
    """The CUDA GPUs visible here, found without torch: cuda-python when installed, else `nvidia-smi -L`."""
    found = cudart_gpus()
    if found is not None:
        return found
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    return [
        GpuSummary(line.split(":", 1)[1].split("(UUID")[0].strip(), "nvidia-smi")
        for line in listing.stdout.splitlines()
        if line.startswith("GPU ") and ":" in line
    ]
