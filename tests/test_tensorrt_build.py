"""TensorRT engines: the pure logic (profiles, plan, sidecars, compatibility), the builder's API sequence against a
recording fake `tensorrt` (10 and 11), clear errors without TensorRT, and real builds where TensorRT and CUDA exist.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mae.checkpoint import save_checkpoint
from mae.core.bundle import Bundle
from mae.core.config import get_preset
from mae.core.engine_files import check_engine_compatible, engine_file, engine_sidecar_path, load_sidecar
from mae.core.errors import MAEError
from mae.core.files import sha256_file
from mae.export import export_bundle
from mae.export import tensorrt as trt_export
from mae.export.tensorrt import (
    GpuInfo,
    ShapeRange,
    build_engine,
    build_plan,
    make_sidecar,
    onnx_graph_inputs,
    profile_shapes,
)
from mae.model import MaskedAutoencoder
from mae.runtime.engines import create_engine

CONFIG = get_preset("mae_vit_test_patch8")  # L = 16, D = 32, K at mask 0.75 = 4
ENCODER_INPUTS = [("pixel_values", ["batch", 3, 32, 32]), ("ids_keep", ["batch", "kept"])]
DECODER_INPUTS = [("latent", ["batch", "tokens", 32]), ("ids_restore", ["batch", 16])]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    torch.manual_seed(0)
    model = MaskedAutoencoder(CONFIG).eval()
    folder = tmp_path_factory.mktemp("trt")
    save_checkpoint(folder / "tiny.pt", model.state_dict(), CONFIG)
    return export_bundle(folder / "tiny.pt", folder / "bundle", precisions=("fp32", "fp16"))


# ---------------------------------------------------------------------------------------------- names
def test_file_names() -> None:
    assert engine_file("encoder", "fp32") == "encoder.engine"
    assert engine_file("decoder", "fp16") == "decoder.fp16.engine"
    assert engine_sidecar_path("/b/encoder.fp16.engine") == Path("/b/encoder.fp16.engine.json")


# ------------------------------------------------------------------------------------------- profiles
def test_profiles_from_graph_inputs() -> None:
    encoder = profile_shapes(ENCODER_INPUTS, CONFIG, max_batch=64)
    assert encoder == {
        "pixel_values": ShapeRange((1, 3, 32, 32), (32, 3, 32, 32), (64, 3, 32, 32)),
        "ids_keep": ShapeRange((1, 1), (32, 4), (64, 16)),  # kept tokens 1..L, opt at the default ratio's K
    }
    decoder = profile_shapes(DECODER_INPUTS, CONFIG, max_batch=8, opt_batch=2)
    assert decoder == {
        "latent": ShapeRange((1, 2, 32), (2, 5, 32), (8, 17, 32)),  # 1 + K tokens: 2..1+L
        "ids_restore": ShapeRange((1, 16), (2, 16), (8, 16)),  # L fixed
    }
    # A mask ratio other than the config's moves only the optimum; a small max batch caps the default optimum.
    assert profile_shapes(ENCODER_INPUTS, CONFIG, 4, mask_ratio=0.5)["ids_keep"] == ShapeRange((1, 1), (4, 8), (4, 16))


def test_profile_errors() -> None:
    with pytest.raises(MAEError, match="--opt-batch 9 must be between 1 and --max-batch 8"):
        profile_shapes(ENCODER_INPUTS, CONFIG, max_batch=8, opt_batch=9)
    with pytest.raises(MAEError, match="--max-batch must be at least 1"):
        profile_shapes(ENCODER_INPUTS, CONFIG, max_batch=0)
    with pytest.raises(MAEError, match="dynamic axis 2"):
        profile_shapes([("pixel_values", ["batch", 3, "height", 32])], CONFIG, max_batch=8)


def test_profiles_match_the_exported_graphs(bundle: Bundle) -> None:
    inputs = onnx_graph_inputs(bundle.graph("encoder", "fp16"))
    assert [name for name, _ in inputs] == ["pixel_values", "ids_keep"]
    (_, pixel_dims), (_, ids_dims) = inputs
    assert pixel_dims[1:] == [3, 32, 32] and all(isinstance(d, str) and d for d in [pixel_dims[0], *ids_dims])
    shapes = profile_shapes(onnx_graph_inputs(bundle.graph("decoder")), bundle.config, max_batch=16)
    assert shapes["latent"] == ShapeRange((1, 2, 32), (16, 5, 32), (16, 17, 32))
    assert shapes["ids_restore"] == ShapeRange((1, 16), (16, 16), (16, 16))


# ------------------------------------------------------------------------------------------------ plan
def test_build_plan_10_vs_11() -> None:
    ten = build_plan("10.3.0", "fp16")
    assert (ten.onnx_precision, ten.strongly_typed_flag, ten.clear_flags) == ("fp16", True, ())
    eleven = build_plan("11.1.0", "fp16")
    assert (eleven.onnx_precision, eleven.strongly_typed_flag) == ("fp16", False)
    assert build_plan("10.0.1", "fp32").clear_flags == ("TF32",)
    with pytest.raises(MAEError, match="TensorRT 8.6.1 is not supported"):
        build_plan("8.6.1", "fp32")
    with pytest.raises(MAEError, match="fp32 or fp16, not int8"):
        build_plan("10.3.0", "int8")


# --------------------------------------------------------------------------------- sidecar + compatibility
def sidecar(**changes) -> dict:
    profiles = profile_shapes(ENCODER_INPUTS, CONFIG, max_batch=8)
    made = make_sidecar(
        "encoder.fp16.engine",
        "encoder",
        build_plan("10.3.0", "fp16"),
        GpuInfo("NVIDIA H100 80GB HBM3", "9.0"),
        profiles,
        "encoder.fp16.onnx",
        "ab" * 32,
        4.0,
    )
    made.update(changes)
    return made


def test_sidecar_contents() -> None:
    made = sidecar()
    assert made["tensorrt_version"] == "10.3.0" and made["compute_capability"] == "9.0"
    assert made["gpu_name"] == "NVIDIA H100 80GB HBM3" and made["precision"] == "fp16"
    assert made["onnx"] == {"file": "encoder.fp16.onnx", "sha256": "ab" * 32, "precision": "fp16"}
    assert made["profiles"][0]["ids_keep"] == {"min": [1, 1], "opt": [8, 4], "max": [8, 16]}
    json.dumps(made)  # plain JSON


def test_check_engine_compatible() -> None:
    made = sidecar()
    check_engine_compatible(made, "10.3.0", "NVIDIA H100 80GB HBM3", (9, 0))  # tuple or text capability
    check_engine_compatible(made, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(MAEError, match=r"built with TensorRT 10\.3\.0, and this is TensorRT 10\.4\.0") as info:
        check_engine_compatible(made, "10.4.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert "mae export BUNDLE --format trt --precision fp16" in info.value.hint
    with pytest.raises(MAEError, match="built for NVIDIA H100 80GB HBM3 .* this GPU is NVIDIA L4") as info:
        check_engine_compatible(made, "10.3.0", "NVIDIA L4", "8.9")
    assert "--format trt" in str(info.value)
    with pytest.raises(MAEError, match="compute capability 9.0.*compute capability 8.0"):
        check_engine_compatible(made, "10.3.0", "NVIDIA H100 80GB HBM3", (8, 0))
    # TensorRT's rule is the compute capability, not the GPU's name: an H100 PCIe runs an H100 SXM engine, and says so
    assert check_engine_compatible(made, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0") is None
    note = check_engine_compatible(made, "10.3.0", "NVIDIA H100 PCIe", "9.0")
    assert "built on NVIDIA H100 80GB HBM3 and runs here on NVIDIA H100 PCIe" in note
    # a hardware-compatibility level: any compute capability from 8.0
    portable = {**made, "hardware_compatibility": "AMPERE_PLUS"}
    assert "runs here on NVIDIA L4" in check_engine_compatible(portable, "10.3.0", "NVIDIA L4", "8.9")
    with pytest.raises(MAEError, match="Ampere and newer"):
        check_engine_compatible(portable, "10.3.0", "Tesla T4", "7.5")


def test_load_sidecar(tmp_path: Path) -> None:
    engine = tmp_path / "encoder.engine"
    with pytest.raises(MAEError, match="rebuild"):
        load_sidecar(engine)
    engine_sidecar_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MAEError, match="not an mae engine sidecar"):
        load_sidecar(engine)
    engine_sidecar_path(engine).write_text(json.dumps(sidecar()))
    assert load_sidecar(engine)["engine"] == "encoder.fp16.engine"


# ------------------------------------------------------------------------------- the builder, against a fake
class FakeTensorRT:
    """Just enough of the `tensorrt` module to record what mae asks of it, following NVIDIA's documented API."""

    def __init__(self, version: str, parse_ok: bool = True, build_ok: bool = True, cache_matches: bool = True):
        self.__version__ = version
        self.calls: list[tuple] = []
        self.parse_ok, self.build_ok, self.cache_matches = parse_ok, build_ok, cache_matches
        self.profile_refused = False
        self.Logger = self._logger_class()
        # The real values: STRONGLY_TYPED is 1 in TensorRT 10 (0 in 11, where it is deprecated and ignored);
        # BuilderFlag.TF32 is 6 (7 is SPARSE_WEIGHTS).
        major = int(version.split(".")[0])
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1 if major == 10 else 0)
        self.BuilderFlag = SimpleNamespace(FP16=0, INT8=1, DEBUG=2, GPU_FALLBACK=3, REFIT=5, TF32=6, SPARSE_WEIGHTS=7)
        if major >= 11:
            del self.BuilderFlag.FP16  # gone in TensorRT 11 (strongly typed only)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE=0)

    def _logger_class(self):
        record = self.calls

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity):
                record.append(("Logger", severity))

        return Logger

    def Builder(self, logger):  # noqa: N802 - the module's class name
        self.calls.append(("Builder",))
        fake = self

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, index):
                return SimpleNamespace(name=self.inputs[index])

        class Profile:
            def set_shape(self, name, low, best, high):
                fake.calls.append(("set_shape", name, tuple(low), tuple(best), tuple(high)))
                if not all(a <= b <= c for a, b, c in zip(low, best, high, strict=True)):
                    raise ValueError("min <= opt <= max is required")  # the real one raises too

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile",))
                return -1 if fake.profile_refused else 0  # the profile's index, or -1

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                if bytes(data).startswith(b"cut"):  # unreadable (another version's format, a cut file): None
                    return None
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                self.cache = cache
                return fake.cache_matches or cache.data == b""

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                fake.network = Network(flags)
                return fake.network

            def create_builder_config(self):
                fake.calls.append(("create_builder_config",))
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network",))
                return memoryview(b"ENGINE:" + str(network.flags).encode()) if fake.build_ok else None

        return Builder()

    def OnnxParser(self, network, logger):  # noqa: N802
        fake = self

        class Parser:
            num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", Path(path).name))
                network.inputs = [name for name, _ in onnx_graph_inputs(Path(path))]
                return fake.parse_ok

            def get_error(self, index):
                return SimpleNamespace(desc=lambda: "No importer registered for op: Attention")

        self.calls.append(("OnnxParser",))
        return Parser()


@pytest.mark.parametrize(("version", "flags"), [("10.3.0", 1 << 1), ("11.1.0", 0)])
def test_builder_call_sequence(tmp_path: Path, bundle: Bundle, version: str, flags: int) -> None:
    fake = FakeTensorRT(version)
    plan = build_plan(version, "fp32")
    onnx_path = bundle.graph("encoder")
    profiles = profile_shapes(onnx_graph_inputs(onnx_path), bundle.config, max_batch=8, opt_batch=4)
    cache = tmp_path / "tensorrt.timing.cache"
    engine = build_engine(fake, onnx_path, profiles, plan, workspace_gib=2.0, timing_cache_path=cache)
    assert engine == f"ENGINE:{flags}".encode()
    assert fake.calls == [
        ("Logger", "WARNING"),
        ("Builder",),
        ("create_network", flags),  # TensorRT 10: STRONGLY_TYPED; 11: always strongly typed, no flags
        ("OnnxParser",),
        ("parse_from_file", "encoder.onnx"),
        ("create_builder_config",),
        ("set_memory_pool_limit", 0, 2 << 30),
        ("clear_flag", 6),  # fp32: no TF32
        ("set_shape", "pixel_values", (1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32)),
        ("set_shape", "ids_keep", (1, 1), (4, 4), (8, 16)),
        ("add_optimization_profile",),
        ("create_timing_cache", b""),
        ("set_timing_cache", b"", False),
        ("build_serialized_network",),
    ]
    assert cache.read_bytes() == b"+timings"
    # The next build starts from the saved cache.
    fake.calls.clear()
    build_engine(fake, onnx_path, profiles, build_plan(version, "fp16"), timing_cache_path=cache)
    assert ("create_timing_cache", b"+timings") in fake.calls and ("clear_flag", 6) not in fake.calls


def test_a_timing_cache_tensorrt_cannot_read_is_replaced(tmp_path: Path, bundle: Bundle) -> None:
    """create_timing_cache gives None for a cache it cannot read (another TensorRT, a cut file); passing None on to
    set_timing_cache used to raise."""
    fake = FakeTensorRT("10.3.0")
    onnx_path = bundle.graph("encoder")
    profiles = profile_shapes(onnx_graph_inputs(onnx_path), bundle.config, max_batch=8, opt_batch=4)
    cache = tmp_path / "tensorrt.timing.cache"
    cache.write_bytes(b"cut off in the mid")
    build_engine(fake, onnx_path, profiles, build_plan("10.3.0", "fp32"), timing_cache_path=cache)
    assert ("create_timing_cache", b"cut off in the mid") in fake.calls
    assert ("set_timing_cache", b"", False) in fake.calls
    assert cache.read_bytes() == b"+timings"  # a fresh one, saved


def test_refused_profiles_are_errors_naming_the_input(bundle: Bundle) -> None:
    onnx_path = bundle.graph("encoder")
    profiles = profile_shapes(onnx_graph_inputs(onnx_path), bundle.config, max_batch=8, opt_batch=4)
    plan = build_plan("11.1.0", "fp32")
    fake = FakeTensorRT("11.1.0")
    fake.profile_refused = True
    with pytest.raises(MAEError, match="add_optimization_profile: -1"):
        build_engine(fake, onnx_path, profiles, plan)
    bad = {**profiles, "ids_keep": ShapeRange((1, 1), (9, 4), (8, 16))}  # opt batch above max
    with pytest.raises(MAEError, match="refused the optimization profile of encoder.onnx input ids_keep"):
        build_engine(FakeTensorRT("11.1.0"), onnx_path, bad, plan)


def test_builder_errors(tmp_path: Path, bundle: Bundle) -> None:
    onnx_path = bundle.graph("decoder")
    profiles = profile_shapes(onnx_graph_inputs(onnx_path), bundle.config, max_batch=8)
    plan = build_plan("10.3.0", "fp32")
    with pytest.raises(MAEError, match="cannot parse decoder.onnx: No importer registered for op: Attention"):
        build_engine(FakeTensorRT("10.3.0", parse_ok=False), onnx_path, profiles, plan)
    with pytest.raises(MAEError, match="failed to build an engine"):
        build_engine(FakeTensorRT("10.3.0", build_ok=False), onnx_path, profiles, plan)
    with pytest.raises(MAEError, match="the profile covers"):
        build_engine(FakeTensorRT("10.3.0"), onnx_path, {"latent": profiles["latent"]}, plan)
    # A timing cache from another GPU is refused by TensorRT: start a fresh one instead of failing.
    cache = tmp_path / "tensorrt.timing.cache"
    cache.write_bytes(b"other-gpu")
    fake = FakeTensorRT("10.3.0", cache_matches=False)
    build_engine(fake, onnx_path, profiles, plan, timing_cache_path=cache)
    assert [c for c in fake.calls if c[0] == "set_timing_cache"] == [
        ("set_timing_cache", b"other-gpu", False),
        ("set_timing_cache", b"", False),
    ]


def test_engines_written_into_the_bundle(tmp_path: Path, bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole `--format trt` flow with the fake: engines, sidecars, mae.json entries, timing cache."""
    import shutil

    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    fake = FakeTensorRT("11.1.0")
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    monkeypatch.setattr(trt_export, "check_tensorrt_available", lambda: (fake, gpu))
    grown = trt_export.run_tensorrt_export(copy, copy, precision="fp16", max_batch=8, verify=False)
    assert grown.manifest["engines"] == {
        "fp16": {
            "encoder": {"file": "encoder.fp16.engine", "sidecar": "encoder.fp16.engine.json"},
            "decoder": {"file": "decoder.fp16.engine", "sidecar": "decoder.fp16.engine.json"},
        }
    }
    for part in ("encoder", "decoder"):
        engine_path = copy / engine_file(part, "fp16")
        made = load_sidecar(engine_path)
        assert engine_path.read_bytes() == b"ENGINE:0"
        assert made["onnx"]["sha256"] == sha256_file(copy / f"{part}.fp16.onnx") and made["sha256"]
        check_engine_compatible(made, "11.1.0", gpu.name, "9.0")
    assert (copy / "tensorrt.timing.cache").is_file()
    assert ("parse_from_file", "decoder.fp16.onnx") in fake.calls  # built from the fp16 graph
    with pytest.raises(MAEError, match="written into the bundle itself"):
        trt_export.run_tensorrt_export(copy, tmp_path / "elsewhere", precision="fp16")


class FakeRunnableTensorRT(FakeTensorRT):
    """The recording builder, whose plans also run: each deserializes to test_trt_engine's `FakeEngine` of the graph
    it was built from (its kernels are the PyTorch model's), so the export's check runs through the runtime's own
    `TensorRTEngine` (with test_trt_engine's `FakeCudart` for cuda-python)."""

    def __init__(self, version: str, model: MaskedAutoencoder) -> None:
        super().__init__(version)
        self.model = model
        self.TensorIOMode = SimpleNamespace(INPUT="input")

    def Builder(self, logger):  # noqa: N802 - the module's class name
        builder = super().Builder(logger)
        build = builder.build_serialized_network

        def build_serialized_network(network, config):  # the plan names its graph, for the runtime below
            part = b"encoder" if "pixel_values" in network.inputs else b"decoder"
            return memoryview(bytes(build(network, config)) + b":" + part)

        builder.build_serialized_network = build_serialized_network
        return builder

    def Runtime(self, logger):  # noqa: N802
        from test_trt_engine import FakeEngine

        model = self.model

        class Runtime:
            def deserialize_cuda_engine(self, data):
                return FakeEngine(model, "INT64", max_batch=8, part=bytes(data).rsplit(b":", 1)[1].decode())

        return Runtime()


def test_engines_are_verified_by_the_runtime_engine(
    tmp_path: Path, bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export holds each engine, as the runtime's TensorRTEngine runs it (cuda-python buffers, its own stream),
    to the bundle's fp32 ONNX graphs before writing it, and records the report in the sidecar."""
    import shutil

    from test_trt_engine import FakeCudart

    from mae.runtime.engines import trt as trt_engine
    from mae.weights import load_model

    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    fake = FakeRunnableTensorRT("10.3.0", load_model(bundle.source_path())[0])
    cudart = FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_engine, "_cudart", lambda: cudart)
    gpu = GpuInfo("Fake GPU", "9.0")  # as FakeCudart names it: the runtime checks the sidecar against it
    monkeypatch.setattr(trt_export, "check_tensorrt_available", lambda: (fake, gpu))
    trt_export.run_tensorrt_export(copy, copy, precision="fp32", max_batch=8)
    for part in ("encoder", "decoder"):
        report = load_sidecar(copy / engine_file(part, "fp32"))["verification"]
        assert report["verified"] and report["passed"], report
        assert report["max_abs_diff"] <= trt_export.ENGINE_TOLERANCE_FP32_ABS
        assert report["file"] == engine_file(part, "fp32") and report["reference"] == "the bundle's fp32 ONNX graphs"
    assert {kind for kind, _ in cudart.copies} == {1, 2}  # through device buffers, both ways
    # A plan that computes something else is refused, and nothing is written.
    other = MaskedAutoencoder(CONFIG).eval()
    fake.model = other
    for path in copy.glob("*.engine*"):
        path.unlink()
    before = json.loads((copy / "mae.json").read_text())
    with pytest.raises(MAEError, match="does not match the bundle's fp32 ONNX graphs"):
        trt_export.run_tensorrt_export(copy, copy, precision="fp32", max_batch=8)
    assert not list(copy.glob("*.engine")) and json.loads((copy / "mae.json").read_text()) == before


# --------------------------------------------------------------------------------- without TensorRT / GPU
def test_missing_tensorrt_and_gpu_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(trt_export, "gpu_info", lambda: None)
    with pytest.raises(MAEError, match="needs the Python package 'tensorrt' .* and a CUDA GPU") as info:
        trt_export.check_tensorrt_available()
    assert "mae-toolkit[tensorrt]" in info.value.hint
    monkeypatch.setattr(trt_export, "gpu_info", lambda: GpuInfo("NVIDIA L4", "8.9"))
    with pytest.raises(MAEError) as info:
        trt_export.check_tensorrt_available()
    assert info.value.message == "--format trt needs the Python package 'tensorrt' (not installed)."


def test_cli_trt_without_tensorrt_stops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mae import cli

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    weights = tmp_path / "tiny.pt"
    save_checkpoint(weights, MaskedAutoencoder(CONFIG).state_dict(), CONFIG)
    monkeypatch.setattr(sys, "argv", ["mae", "export", str(weights), "--format", "trt", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    text = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in text
    assert "'tensorrt'" in text and "mae-toolkit[tensorrt]" in text
    assert not (tmp_path / "b").exists()  # nothing was exported first


# ------------------------------------------------------------------------------------ real TensorRT + CUDA
def _tensorrt_or_skip():
    try:
        import tensorrt
    except ImportError:
        pytest.skip("tensorrt is not installed")
    if trt_export.gpu_info() is None:
        pytest.skip("no CUDA GPU (or no cuda-python, which runs the engines)")
    return tensorrt


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_build_matches_onnx(tmp_path: Path, bundle: Bundle, precision: str) -> None:
    import shutil

    tensorrt = _tensorrt_or_skip()
    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    grown = trt_export.run_tensorrt_export(copy, copy, precision=precision, max_batch=8)
    gpu = trt_export.gpu_info()
    for part in ("encoder", "decoder"):
        made = load_sidecar(copy / engine_file(part, precision))
        report = made["verification"]
        assert report["verified"] and report["passed"], report
        if precision == "fp32":
            assert report["max_abs_diff"] <= trt_export.ENGINE_TOLERANCE_FP32_ABS
        check_engine_compatible(made, tensorrt.__version__, gpu.name, gpu.compute_capability)
        with pytest.raises(MAEError, match="rebuild"):
            check_engine_compatible(made, tensorrt.__version__ + ".1", gpu.name, gpu.compute_capability)
    # Dynamic shapes inside the profile: batch 5, 2 kept tokens.
    engine = create_engine("trt", copy, "encoder", precision=precision)
    pixels = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    ids_keep = np.tile(np.array([[7, 2]], dtype=np.int64), (5, 1))
    latent = engine.run({"pixel_values": pixels, "ids_keep": ids_keep})["latent"]
    assert latent.shape == (5, 3, 32) and np.isfinite(latent).all()
    assert grown.manifest["engines"][precision]["encoder"]["file"] == engine_file("encoder", precision)
