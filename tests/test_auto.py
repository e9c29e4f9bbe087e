"""`--engine auto`: by CPU class (tested for each class with fake CPUs), by a stored `mae bench` measurement, gated
on accuracy, printed with its reason, kept when an embedding run resumes."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli

from mae.checkpoint import save_random_weights
from mae.core import hardware
from mae.core.bundle import Bundle
from mae.core.config import get_preset
from mae.export import export_bundle
from mae.export.onnx_bundle import Int8Options
from mae.runtime.bench_cache import load_rows, save_rows
from mae.runtime.engines import create_engine
from mae.runtime.engines.auto import choose

AMD_ZEN3 = hardware.CpuInfo("AMD EPYC 7B13 64-Core Processor", frozenset({"avx2", "fma"}), "x86_64", 2)
SAPPHIRE_RAPIDS = hardware.CpuInfo(
    "Intel(R) Xeon(R) Platinum 8481C",
    frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}),
    "x86_64",
    2,
)
CASCADE_LAKE = hardware.CpuInfo("Intel(R) Xeon(R) Gold 6230", frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}))
SKYLAKE = hardware.CpuInfo("Intel(R) Xeon(R) Gold 6148", frozenset({"avx2", "avx512f", "avx512bw"}))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own measurement cache: a measurement one test stores must not steer another's choice."""
    monkeypatch.setenv("MAE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """fp32 + a verified ONNX Runtime int8 encoder; the OpenVINO int8 entry is added by `with_openvino`."""
    folder = tmp_path_factory.mktemp("auto")
    weights = save_random_weights(get_preset("mae_vit_test_patch8"), folder / "model.pt", seed=0)
    return export_bundle(weights, folder / "bundle", precisions=("fp32", "int8"), int8=Int8Options(openvino=False))


def edited(bundle: Bundle, folder: Path, edit) -> Path:  # noqa: ANN001 - a function of the manifest
    copy_path = Path(shutil.copytree(bundle.path, folder / f"bundle-{len(list(folder.iterdir()))}"))
    manifest = json.loads((copy_path / "mae.json").read_text())
    edit(manifest)
    (copy_path / "mae.json").write_text(json.dumps(manifest))
    return copy_path


def with_openvino(manifest: dict) -> None:
    """As an export with OpenVINO and NNCF installed records it (choose() reads the record, not the model)."""
    report = copy.deepcopy(manifest["verification"]["int8"]["encoder"])
    manifest["openvino"] = {
        "int8": {"encoder": {"file": "encoder.int8.xml", "sha256": "0" * 64, "verification": report}}
    }


@pytest.mark.parametrize(
    ("cpu", "engine"),
    [(AMD_ZEN3, "onnx"), (SKYLAKE, "onnx"), (CASCADE_LAKE, "openvino"), (SAPPHIRE_RAPIDS, "openvino")],
)
def test_by_cpu_class(bundle: Bundle, tmp_path: Path, cpu: hardware.CpuInfo, engine: str) -> None:
    pytest.importorskip("openvino")
    both = edited(bundle, tmp_path, with_openvino)
    choice = choose(both, "embed", cpu=cpu)
    assert (choice.engine, choice.precision) == (engine, "int8")
    assert cpu.int8_class in choice.reason and "0.999" in choice.reason
    assert choose(bundle.path, "embed", cpu=cpu).label == "onnx int8"  # no OpenVINO model: ONNX Runtime's
    assert choose(both, "reconstruct", cpu=cpu).label == "onnx fp32"  # the decoder has no int8
    assert choose(both, "embed", precision="fp32", cpu=cpu).label == "onnx fp32"  # a precision is a constraint


def test_unverified_or_weaker_int8_is_never_chosen(bundle: Bundle, tmp_path: Path) -> None:
    def weaker_gate(manifest: dict) -> None:
        manifest["int8"]["min_cosine"] = 0.99

    def unverified(manifest: dict) -> None:
        manifest["verification"]["int8"]["encoder"]["verified"] = False

    def no_record(manifest: dict) -> None:  # an int8 graph from an older mae
        del manifest["int8"]

    for edit in (weaker_gate, unverified, no_record):
        assert choose(edited(bundle, tmp_path, edit), "embed", cpu=AMD_ZEN3).label == "onnx fp32", edit.__name__
    with pytest.raises(Exception, match="no int8 encoder that passed the gate"):
        choose(edited(bundle, tmp_path, no_record), "embed", precision="int8", cpu=AMD_ZEN3)


def test_weights_run_on_torch(bundle: Bundle) -> None:
    choice = choose(bundle.manifest["source"]["path"], "reconstruct")
    assert choice.engine == "torch" and "weights" in choice.reason


def rows(fastest: str, cosine: float) -> list[dict]:
    """bench rows at mask 0 in which `fastest` wins with `cosine`, onnx is exact, torch the baseline."""
    speeds = {"torch": 100.0, "onnx": 200.0, "onnx-int8": 300.0, fastest: 900.0}
    return [
        {"engine": label, "mask_ratio": 0.0, "images_per_s": speed, "cosine_cls": 1.0, "cosine_mean": 1.0}
        if label != fastest
        else {"engine": label, "mask_ratio": 0.0, "images_per_s": speed, "cosine_cls": cosine, "cosine_mean": 1.0}
        for label, speed in speeds.items()
    ]


def test_a_stored_measurement_wins(bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    path = edited(bundle, tmp_path, lambda manifest: None)
    stored = Bundle.load(path)
    monkeypatch.setattr(hardware, "cpu_info", lambda: SAPPHIRE_RAPIDS)
    assert save_rows(stored, rows("openvino", 0.99998)) is not None
    assert load_rows(stored) is not None and load_rows(stored, AMD_ZEN3) is None  # per machine
    choice = choose(path, "embed")
    assert choice.label == "openvino fp32" and "mae bench" in choice.reason and "900.0 img/s" in choice.reason
    assert choose(path, "embed", cpu=AMD_ZEN3).label == "onnx int8"  # measured on another CPU: not evidence here
    save_rows(stored, rows("openvino", 0.995))  # fastest, but outside the gate
    assert choose(path, "embed").label == "onnx int8"  # next fastest gated: int8 at 300 img/s
    save_rows(stored, rows("torch-bf16", 0.9999))  # torch is the reference, never deployed by auto
    assert choose(path, "embed").label == "onnx int8"


def test_create_engine_auto(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_ZEN3)
    with warnings.catch_warnings():  # "verified on another CPU class" where this CPU is not AVX2-only (test_int8)
        warnings.simplefilter("ignore", RuntimeWarning)
        encoder = create_engine("auto", bundle.path)
    assert encoder.auto_choice.label == "onnx int8" and "int8" in encoder.description
    decoder = create_engine("auto", bundle.path, "decoder")
    assert decoder.auto_choice.label == "onnx fp32"
    pixels = np.zeros((2, 3, 32, 32), np.float32)
    assert encoder.run({"pixel_values": pixels, "ids_keep": np.tile(np.arange(16), (2, 1))})["latent"].shape == (
        2,
        17,
        32,
    )


def test_cli_embed_says_what_auto_chose_and_resumes_with_it(
    bundle: Bundle, photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_ZEN3)
    out = tmp_path / "emb"
    code, text = run_cli(monkeypatch, capsys, "embed", photo_dir, "--model", bundle.path, "--out", out, "--workers", 0)
    assert code == 0 and "engine auto: onnx int8 (avx2 int8 class CPU" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"]["precision"] == "int8" and summary["engine"]["auto"].startswith("engine auto: onnx int8")
    # A measurement made since prefers another engine; the run's own files were made with int8, so it stays.
    save_rows(bundle, rows("onnx", 1.0))
    assert choose(bundle.path, "embed").label == "onnx fp32"
    (out / "done" / "00000.json").unlink()  # as if killed before the last marker
    code, text = run_cli(monkeypatch, capsys, "embed", photo_dir, "--model", bundle.path, "--out", out, "--workers", 0)
    assert code == 0 and "resuming: as this run began" in text


def test_cli_reconstruct_default_is_auto(
    bundle: Bundle, photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    photo = sorted(photo_dir.iterdir())[0]
    code, text = run_cli(monkeypatch, capsys, "reconstruct", photo, "--model", bundle.path, "--out", tmp_path / "r.png")
    assert code == 0 and "engine auto: onnx fp32" in text
    assert (tmp_path / "r.png").is_file()


def test_a_cuda_gpu_comes_first(bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a GPU: the bundle's TensorRT engine when TensorRT is installed (fp16 first), else ONNX Runtime's CUDA
    provider; without either, the CPU rules."""
    from mae.runtime.engines import auto

    def with_engines(manifest: dict) -> None:
        manifest["engines"] = {p: {"encoder": {"file": f"encoder.{p}.engine"}} for p in ("fp32", "fp16")}

    path = edited(bundle, tmp_path, with_engines)
    monkeypatch.setattr(hardware, "cuda_gpus", lambda: [hardware.GpuSummary("NVIDIA L4", "cuda-python", "8.9")])
    installed = auto._installed
    monkeypatch.setattr(auto, "_installed", lambda module: module == "tensorrt" or installed(module))
    assert choose(path, "embed", cpu=AMD_ZEN3).label == "trt fp16"
    assert choose(path, "embed", precision="fp32", cpu=AMD_ZEN3).label == "trt fp32"
    assert choose(bundle.path, "embed", cpu=AMD_ZEN3).label == "onnx int8"  # no engine built: no CUDA provider here
    monkeypatch.setattr(auto, "_onnxruntime_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose(bundle.path, "embed", cpu=AMD_ZEN3).label == "onnx fp32 provider=cuda"
