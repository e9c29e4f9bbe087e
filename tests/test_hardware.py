"""What the CPU can do decides bf16 and int8: fake CPUs (AVX2-only Zen 3, Sapphire Rapids, ...) stand in for real ones.

`mae.core.hardware.cpu_info` is monkeypatched, so every check runs on whichever CPU the tests land on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from mae.checkpoint import save_checkpoint
from mae.core import hardware
from mae.core.config import get_preset
from mae.core.errors import MAEError
from mae.core.hardware import CpuInfo, parse_cpuinfo, require_native_bf16
from mae.model import MaskedAutoencoder
from mae.runtime.engines import create_engine

ZEN3 = CpuInfo(
    "AMD EPYC 7B13 64-Core Processor",
    frozenset({"sse4_2", "avx", "avx2", "fma", "bmi2", "sha_ni", "vaes"}),
    "x86_64",
    2,
)
SAPPHIRE_RAPIDS = CpuInfo(
    "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
    frozenset(
        [
            "sse4_2",
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
            "avx_vnni",
            "avx512_bf16",
            "avx512_fp16",
            "amx_tile",
            "amx_bf16",
            "amx_int8",
        ]
    ),
    "x86_64",
    2,
)
CASCADE_LAKE = CpuInfo("Intel(R) Xeon(R) Gold 6248", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}))
SKYLAKE = CpuInfo("Intel(R) Xeon(R) Gold 6148", frozenset({"avx2", "fma", "avx512f", "avx512bw"}))
GRAVITON2 = CpuInfo("Neoverse-N1", frozenset({"fp", "asimd", "asimddp"}), "aarch64")


@pytest.fixture
def on_cpu(monkeypatch):
    """on_cpu(ZEN3): this process now runs on that CPU, for every caller of hardware.cpu_info()."""

    def use(cpu: CpuInfo) -> CpuInfo:
        monkeypatch.setattr(hardware, "cpu_info", lambda: cpu)
        return cpu

    return use


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    config = get_preset("mae_vit_test_patch8")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hardware") / "tiny.pt"
    save_checkpoint(path, MaskedAutoencoder(config).state_dict(), config)
    return path


# ------------------------------------------------------------------------------------------------ CpuInfo
def test_int8_class_and_bf16_per_cpu():
    expected = {
        "amx": SAPPHIRE_RAPIDS,
        "vnni": CASCADE_LAKE,
        "avx512": SKYLAKE,
        "avx2": ZEN3,
        "baseline": GRAVITON2,
    }
    assert {cls: cpu.int8_class for cls, cpu in expected.items()} == {cls: cls for cls in expected}
    assert SAPPHIRE_RAPIDS.native_bf16 and not any(cpu.native_bf16 for cpu in (ZEN3, CASCADE_LAKE, SKYLAKE))
    assert ZEN3.isa == ["AVX2", "FMA"]
    assert "AMX-INT8" in SAPPHIRE_RAPIDS.isa and "AVX512-BF16" in SAPPHIRE_RAPIDS.describe()
    assert ZEN3.to_dict() == {
        "model": ZEN3.model,
        "machine": "x86_64",
        "isa": ["AVX2", "FMA"],
        "int8_class": "avx2",
        "native_bf16": False,
    }


def test_parse_cpuinfo_reads_the_first_processor():
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
        "flags\t\t: fpu sse4_2 avx avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: something else\nflags\t\t: fpu avx512f\n"
    )
    model, flags = parse_cpuinfo(text)
    assert model == "AMD EPYC 7B13 64-Core Processor" and flags == {"fpu", "sse4_2", "avx", "avx2", "fma"}
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp bf16 i8mm\nCPU implementer\t: 0x41\n"
    assert parse_cpuinfo(arm) == ("", frozenset({"fp", "asimd", "asimddp", "bf16", "i8mm"}))
    assert parse_cpuinfo("") == ("", frozenset())
    here = hardware.cpu_info()
    assert here.model and here.threads >= 1 and here.int8_class in hardware.INT8_CLASSES


def test_require_native_bf16_names_the_cpu():
    with pytest.raises(MAEError, match="AMD EPYC 7B13.*would be emulated") as info:
        require_native_bf16("--precision bf16 (training)", cpu=ZEN3)
    assert "--precision fp32" in info.value.hint and "--allow-emulated-bf16" in info.value.hint
    require_native_bf16("x", cpu=SAPPHIRE_RAPIDS)
    require_native_bf16("x", cpu=ZEN3, allow_emulated=True)


# --------------------------------------------------------------------------------------------- training
def test_train_refuses_emulated_bf16_at_once(on_cpu, monkeypatch, capsys, tmp_path):
    """Exit status 2 before any image is read (the data folder is empty), with the CPU named."""
    on_cpu(ZEN3)
    args = ["train", "--data", str(tmp_path), "--model", "mae_vit_test_patch8", "--precision", "bf16"]
    code, text = run_cli(monkeypatch, capsys, *args, "--device", "cpu", "--out", str(tmp_path / "run"))
    assert code == 2 and "AMD EPYC 7B13" in text and "would be emulated" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()


def test_train_accepts_bf16_where_native_or_insisted(on_cpu, monkeypatch, capsys, photo_dir, tmp_path):
    from mae.train import TrainOptions, _check_options

    on_cpu(SAPPHIRE_RAPIDS)
    _check_options(TrainOptions(data=tmp_path, precision="bf16"), torch.device("cpu"))
    on_cpu(ZEN3)
    _check_options(TrainOptions(data=tmp_path, precision="fp32"), torch.device("cpu"))
    with pytest.raises(MAEError, match="would be emulated"):
        _check_options(TrainOptions(data=tmp_path, precision="bf16"), torch.device("cpu"))
    # Insisting through the CLI trains (the tiny model is cheap to emulate).
    args = ["train", "--data", str(photo_dir), "--model", "mae_vit_test_patch8", "--precision", "bf16"]
    args += ["--allow-emulated-bf16", "--device", "cpu", "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "1"]
    args += ["--batch-size", "2", "--workers", "0", "--preview-images", "0", "--out", str(tmp_path / "run")]
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 0, text
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------------------- torch engine
def test_torch_engine_bf16_follows_the_cpu(on_cpu, weights):
    on_cpu(ZEN3)
    with pytest.raises(MAEError, match="bf16 in the torch engine on this CPU \\(AMD EPYC 7B13"):
        create_engine("torch", weights, precision="bf16", device="cpu")
    assert create_engine("torch", weights, precision="fp32", device="cpu").precision == "fp32"
    insisted = create_engine("torch", weights, precision="bf16", device="cpu", allow_emulated_bf16=True)
    assert next(insisted.network.parameters()).dtype == torch.bfloat16
    on_cpu(SAPPHIRE_RAPIDS)
    assert create_engine("torch", weights, precision="bf16", device="cpu").precision == "bf16"


def test_bench_leaves_emulated_bf16_out(on_cpu, weights):
    from mae.benchmark import bench
    from mae.runtime.bench import default_engines

    on_cpu(ZEN3)
    rows = bench(str(weights), "torch-bf16", batch_size=1, mask_ratios=[0.5], seconds=0.0, progress=False, peaks={})
    assert rows[1]["engine"] == "torch-bf16" and "would be emulated" in rows[1]["error"]  # asked for: refused
    labels, left_out = default_engines(str(weights), gpus=[])
    assert labels == ["torch"] and left_out["torch-bf16"] == "no bf16 instructions on this CPU"  # not chosen
    on_cpu(SAPPHIRE_RAPIDS)
    assert default_engines(str(weights), gpus=[])[0] == ["torch", "torch-bf16"]


def test_reconstruct_cli_refuses_emulated_bf16(on_cpu, monkeypatch, capsys, weights, photo_dir, tmp_path):
    on_cpu(ZEN3)
    photo = str(sorted(photo_dir.iterdir())[0])
    args = ["reconstruct", photo, "--model", str(weights), "--engine", "torch", "--precision", "bf16"]
    code, text = run_cli(monkeypatch, capsys, *args, "--device", "cpu", "--out", str(tmp_path / "r.png"))
    assert code == 2 and "AMD EPYC 7B13" in text and "Traceback" not in text
    code, text = run_cli(
        monkeypatch, capsys, *args, "--device", "cpu", "--out", str(tmp_path / "r.png"), "--allow-emulated-bf16"
    )
    assert code == 0 and (tmp_path / "r.png").is_file(), text


# --------------------------------------------------------------------------------------------- info --system
def test_installed_engines_are_the_importable_ones():
    import onnxruntime

    from mae.runtime.system import PACKAGES, installed_engines

    engines = installed_engines()
    assert engines["onnxruntime"] == onnxruntime.__version__ and engines["torch"] == torch.__version__
    assert set(engines) <= set(PACKAGES)
    assert list(engines) == [name for name in PACKAGES if name in engines]  # the report's order


def test_info_system_reports_the_cpu_and_engines(on_cpu, monkeypatch, capsys):
    from mae.runtime.system import system_report

    on_cpu(ZEN3)
    report = system_report()
    assert report["cpu"]["model"] == ZEN3.model and report["cpu"]["int8_class"] == "avx2"
    assert report["cpu"]["native_bf16"] is False and report["cpu"]["threads"] == 2
    assert "CPUExecutionProvider" in report["engines"]["onnxruntime"]["providers"]
    assert isinstance(report["engines"]["torch"]["cuda_available"], bool)

    code, text = run_cli(monkeypatch, capsys, "info", "--system")
    assert code == 0 and "AMD EPYC 7B13" in text and "onnxruntime" in text and "avx2" in text
    assert "would be emulated" in text and "Traceback" not in text
    on_cpu(SAPPHIRE_RAPIDS)
    code, text = run_cli(monkeypatch, capsys, "info", "--system")
    assert code == 0 and "AMX-INT8" in text and "native" in text


def test_info_needs_a_path_or_system(monkeypatch, capsys):
    code, text = run_cli(monkeypatch, capsys, "info")
    assert code == 2 and "Nothing to describe" in text and "--system" in text and "Traceback" not in text


def test_cuda_gpus_through_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-python's view (name, compute capability) feeds both `auto` and the TensorRT build's GPU check; a driver
    that fails to initialize is no GPU."""
    import types

    from mae.export import tensorrt as trt_export

    class Properties:
        name, major, minor = b"NVIDIA L4\0\0", 8, 9

    fake = types.ModuleType("cuda.bindings.runtime")
    fake.cudaGetDeviceCount = lambda: (0, 1)
    fake.cudaGetDeviceProperties = lambda index: (0, Properties())
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake)
    assert hardware.cuda_gpus() == [hardware.GpuSummary("NVIDIA L4", "cuda-python", "8.9")]
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch: the TensorRT check asks cuda-python too
    assert trt_export.gpu_info() == trt_export.GpuInfo("NVIDIA L4", "8.9")
    fake.cudaGetDeviceCount = lambda: (35, 0)  # cudaErrorInsufficientDriver
    assert hardware.cuda_gpus() == [] and trt_export.gpu_info() is None
