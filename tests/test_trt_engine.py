"""The native TensorRT engine.

Without TensorRT (CI, CPUs): the pure checks, and `run` driven end to end through a fake `tensorrt` module and a
fake CUDA runtime whose "device memory" is host memory, so every byte the engine copies and every shape it sets
is checked against PyTorch. With TensorRT and a CUDA GPU: real engines built by `mae export --format trt`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mae.core.bundle import Bundle
from mae.core.config import get_preset
from mae.core.engine_files import SIDECAR_FORMAT, check_engine_source, engine_file_path
from mae.core.errors import MAEError
from mae.core.masking import masking_from_noise, random_noise
from mae.core.preprocess import Preprocessing
from mae.model import MaskedAutoencoder
from mae.runtime.engines import create_engine
from mae.runtime.engines import trt as trt_engine
from mae.runtime.engines.trt import (
    TensorSpec,
    check_io,
    check_profile,
    gpu_name,
    host_array,
    parse_cuda_device,
)

TRT_VERSION = "10.9.0"
ENCODER_SHA = "a" * 64


# ------------------------------------------------------------------------------------------ pure checks
def test_parse_cuda_device():
    assert [parse_cuda_device(d) for d in ("auto", "cuda", "cuda:2", 1, None)] == [0, 0, 2, 1, 0]
    with pytest.raises(MAEError, match="runs on a CUDA GPU, not 'cpu'"):
        parse_cuda_device("cpu")


def test_profile_bounds_name_min_and_max():
    spec = TensorSpec("ids_keep", True, "INT64", (-1, -1), profile_min=(1, 1), profile_max=(8, 16))
    check_profile(spec, (8, 16))
    check_profile(spec, (1, 1))
    with pytest.raises(MAEError, match="outside .* profile: min \\[1, 1\\], max \\[8, 16\\]") as info:
        check_profile(spec, (9, 4))
    assert "--max-batch" in info.value.hint
    fixed = TensorSpec("pixel_values", True, "FLOAT", (-1, 3, 32, 32), (1, 3, 32, 32), (8, 3, 32, 32))
    with pytest.raises(MAEError, match="dimension 2 must be 32"):
        check_profile(fixed, (2, 3, 64, 64))
    with pytest.raises(MAEError, match="must be 4-D"):
        check_profile(fixed, (2, 3, 32))


def test_host_arrays_match_the_engine_dtypes():
    ids = np.array([[0, 15]], dtype=np.int64)
    assert host_array(ids, "INT32").dtype == np.int32
    assert host_array(np.ones((1, 2), np.float32), "HALF").dtype == np.float16
    with pytest.raises(MAEError, match="do not fit the engine's INT8"):
        host_array(np.array([[300]]), "INT8")
    with pytest.raises(MAEError, match="BF16 cannot be fed"):
        host_array(np.ones(2, np.float32), "BF16")


def test_gpu_name_and_io_check():
    assert gpu_name(b"NVIDIA H100\x00\x00\x00") == "NVIDIA H100"
    assert gpu_name("L4") == "L4"
    specs = {
        "pixel_values": TensorSpec("pixel_values", True, "FLOAT", (-1, 3, 32, 32)),
        "ids_keep": TensorSpec("ids_keep", True, "INT64", (-1, -1)),
        "latent": TensorSpec("latent", False, "FLOAT", (-1, -1, 32)),
    }
    check_io(specs, "encoder", "encoder.engine")
    with pytest.raises(MAEError, match="is not an MAE decoder engine"):
        check_io(specs, "decoder", "encoder.engine")


def manifest_with(engines=None) -> dict:
    graphs = {"fp32": {"encoder": {"file": "encoder.onnx", "sha256": ENCODER_SHA}}}
    return {"graphs": graphs, **({"engines": engines} if engines is not None else {})}


def test_engine_files_and_errors(tmp_path):
    with pytest.raises(MAEError, match="has no TensorRT engines") as info:
        engine_file_path(manifest_with(), tmp_path, "encoder", "fp16")
    assert "--format trt --precision fp16" in info.value.hint
    engines = {"fp32": {"encoder": {"file": "encoder.engine", "sidecar": "encoder.engine.json"}}}
    with pytest.raises(MAEError, match="no fp16 TensorRT encoder engine \\(it has encoder engines for: fp32\\)"):
        engine_file_path(manifest_with(engines), tmp_path, "encoder", "fp16")
    with pytest.raises(MAEError, match="fp32 or fp16, not int8") as info:
        engine_file_path(manifest_with(engines), tmp_path, "encoder", "int8")
    assert "onnx engine" in info.value.hint
    with pytest.raises(MAEError, match="listed in mae.json but missing"):
        engine_file_path(manifest_with(engines), tmp_path, "encoder", "fp32")
    (tmp_path / "encoder.engine").write_bytes(b"plan")
    assert engine_file_path(manifest_with(engines), tmp_path, "encoder", "fp32") == tmp_path / "encoder.engine"


def test_engine_from_a_re_exported_graph_is_refused(tmp_path):
    sidecar = {"precision": "fp32", "onnx": {"file": "encoder.onnx", "sha256": ENCODER_SHA, "precision": "fp32"}}
    check_engine_source(sidecar, manifest_with(), "encoder", tmp_path / "encoder.engine")
    stale = {**sidecar, "onnx": {**sidecar["onnx"], "sha256": "b" * 64}}
    with pytest.raises(MAEError, match="built from an earlier encoder.onnx"):
        check_engine_source(stale, manifest_with(), "encoder", tmp_path / "encoder.engine")


# --------------------------------------------------------------------------- a fake TensorRT and CUDA
class FakeCudart:
    """cuda-python's runtime API over host memory: pointers are addresses of numpy buffers."""

    cudaError_t = SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        self.allocations: dict[int, np.ndarray] = {}
        self.copies: list[tuple[int, int]] = []  # (kind, bytes)

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaSetDevice(self, index):
        return (0,)

    def cudaGetDeviceProperties(self, index):
        return 0, SimpleNamespace(name=b"Fake GPU\x00\x00", major=9, minor=0)

    def cudaMalloc(self, nbytes):
        buffer = np.zeros(nbytes, np.uint8)
        self.allocations[buffer.ctypes.data] = buffer
        return 0, buffer.ctypes.data

    def cudaFree(self, pointer):
        self.allocations.pop(pointer)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        device = dst if kind == 1 else src
        assert any(p <= device and device + nbytes <= p + b.nbytes for p, b in self.allocations.items())
        ctypes.memmove(dst, src, nbytes)
        self.copies.append((kind, nbytes))
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaGetErrorName(self, error):
        return 0, b"cudaErrorFake"


def read_device(pointer: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * count).from_address(pointer), dtype=dtype).reshape(shape).copy()


class FakeEngine:
    """An engine of graph `part` whose kernels are MaskedAutoencoder.forward_encoder (or forward_decoder)."""

    def __init__(self, model: MaskedAutoencoder, ids_dtype: str, max_batch: int, part: str = "encoder") -> None:
        self.model, self.max_batch, self.part = model, max_batch, part
        cfg = model.cfg
        size, dim, length = cfg.img_size, cfg.embed_dim, cfg.num_patches
        if part == "encoder":
            self.tensors = {  # name: (is input, dtype name, shape)
                "pixel_values": (True, "FLOAT", (-1, 3, size, size)),
                "ids_keep": (True, ids_dtype, (-1, -1)),
                "latent": (False, "FLOAT", (-1, -1, dim)),
            }
        else:
            self.tensors = {
                "latent": (True, "FLOAT", (-1, -1, dim)),
                "ids_restore": (True, ids_dtype, (-1, length)),
                "pred": (False, "FLOAT", (-1, length, cfg.patch_dim)),
            }
        self.num_io_tensors = 3

    def get_tensor_name(self, index):
        return list(self.tensors)[index]

    def get_tensor_mode(self, name):
        return "input" if self.tensors[name][0] else "output"

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=self.tensors[name][1])

    def get_tensor_shape(self, name):
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name, profile):
        size, length, dim = self.model.cfg.img_size, self.model.cfg.num_patches, self.model.cfg.embed_dim
        batches = (1, 4, self.max_batch)
        if name == "pixel_values":
            return [(batch, 3, size, size) for batch in batches]
        if name == "latent":
            return [(1, 2, dim), (4, 1 + length // 4, dim), (self.max_batch, 1 + length, dim)]
        if name == "ids_restore":
            return [(batch, length) for batch in batches]
        return [(1, 1), (4, length // 4), (self.max_batch, length)]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shapes, self.addresses, self.runs = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        cfg = self.engine.model.cfg
        if self.engine.part == "decoder":
            return (self.shapes["ids_restore"][0], cfg.num_patches, cfg.patch_dim)
        batch, kept = self.shapes["ids_keep"]
        return (batch, 1 + kept, cfg.embed_dim)

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True  # the real one returns whether it took the address

    def execute_async_v3(self, stream):
        assert stream == 7
        data_name, ids_name, out_name = self.engine.tensors  # inputs first, then the output
        ids_dtype = np.int32 if self.engine.tensors[ids_name][1] == "INT32" else np.int64
        data = read_device(self.addresses[data_name], self.shapes[data_name], np.float32)
        ids = read_device(self.addresses[ids_name], self.shapes[ids_name], ids_dtype)
        model = self.engine.model
        forward = model.forward_encoder if self.engine.part == "encoder" else model.forward_decoder
        with torch.no_grad():
            result = forward(torch.from_numpy(data), torch.from_numpy(ids).long())
        out = np.ascontiguousarray(result.numpy())
        ctypes.memmove(self.addresses[out_name], out.ctypes.data, out.nbytes)
        self.runs += 1
        return True


def fake_tensorrt(engine: FakeEngine | None) -> SimpleNamespace:
    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"serialized plan"
            return engine

    return SimpleNamespace(
        __version__=TRT_VERSION, Logger=Logger, Runtime=Runtime, TensorIOMode=SimpleNamespace(INPUT="input")
    )


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return MaskedAutoencoder(get_preset("mae_vit_test_patch8")).eval()


def fake_bundle(folder, config, sidecar_changes=None) -> str:
    """A bundle whose mae.json lists an fp32 encoder engine (a plan file and its sidecar)."""
    engines = {"fp32": {"encoder": {"file": "encoder.engine", "sidecar": "encoder.engine.json"}}}
    manifest = {**manifest_with(engines), "norm_pix_loss": False}
    Bundle(folder, config, Preprocessing(size=config.img_size), manifest).save()
    (folder / "encoder.engine").write_bytes(b"serialized plan")
    sidecar = {
        "format": SIDECAR_FORMAT,
        "engine": "encoder.engine",
        "part": "encoder",
        "precision": "fp32",
        "tensorrt_version": TRT_VERSION,
        "gpu_name": "Fake GPU",
        "compute_capability": "9.0",
        "onnx": {"file": "encoder.onnx", "sha256": ENCODER_SHA, "precision": "fp32"},
        **(sidecar_changes or {}),
    }
    (folder / "encoder.engine.json").write_text(json.dumps(sidecar))
    return str(folder)


@pytest.fixture
def fakes(monkeypatch, tiny_model):
    """Install the fakes; returns a function setting which engine deserialization yields."""
    cudart = FakeCudart()
    monkeypatch.setattr(trt_engine, "_cudart", lambda: cudart)

    def install(engine):
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
        return cudart

    return install


def test_an_engine_file_that_is_not_the_one_built_is_refused(tmp_path, tiny_model, fakes):
    """Issue 15: the plan file is checked against the sha256 its sidecar recorded when it was built."""
    fakes(FakeEngine(tiny_model, "INT64", max_batch=4))
    bundle = fake_bundle(tmp_path, tiny_model.cfg, {"sha256": "c" * 64})
    with pytest.raises(MAEError, match="encoder.engine is not the file that was exported"):
        create_engine("trt", bundle, "encoder", device="auto")


@pytest.mark.parametrize("ids_dtype", ["INT64", "INT32"])
def test_run_copies_shapes_and_values_like_torch(tmp_path, tiny_model, fakes, ids_dtype):
    cudart = fakes(FakeEngine(tiny_model, ids_dtype, max_batch=4))
    engine = create_engine("trt", fake_bundle(tmp_path, tiny_model.cfg), "encoder", device="auto")
    assert engine.description == f"tensorrt {TRT_VERSION} Fake GPU fp32 (encoder.engine)"
    rng = np.random.default_rng(0)
    for batch, mask_ratio in ((3, 0.75), (4, 0.0), (1, 0.5)):  # buffers grow and are reused
        pixels = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
        ids_keep = masking_from_noise(random_noise(batch, 16, batch), mask_ratio).ids_keep
        latent = engine.run({"pixel_values": pixels, "ids_keep": ids_keep})["latent"]
        with torch.no_grad():
            expected = tiny_model.forward_encoder(torch.from_numpy(pixels), torch.from_numpy(ids_keep)).numpy()
        assert latent.dtype == np.float32
        np.testing.assert_array_equal(latent, expected)
    assert len(cudart.allocations) == 3  # one buffer per tensor, grown in place of the old one
    assert engine.context.runs == 3

    with pytest.raises(MAEError, match="outside the TensorRT engine's optimization profile") as info:
        engine.run({"pixel_values": np.zeros((5, 3, 32, 32), np.float32), "ids_keep": np.zeros((5, 4), np.int64)})
    assert "max [4, 3, 32, 32]" in str(info.value)


def test_engine_for_another_tensorrt_or_gpu_is_refused(tmp_path, tiny_model, fakes):
    fakes(FakeEngine(tiny_model, "INT64", max_batch=4))
    other_version = fake_bundle(tmp_path / "version", tiny_model.cfg, {"tensorrt_version": "10.3.0"})
    with pytest.raises(MAEError, match="built with TensorRT 10.3.0, and this is TensorRT 10.9.0"):
        create_engine("trt", other_version)
    other_gpu = fake_bundle(tmp_path / "gpu", tiny_model.cfg, {"gpu_name": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(MAEError, match="built for NVIDIA L4"):
        create_engine("trt", other_gpu)


def test_unloadable_plan_and_wrong_graph(tmp_path, tiny_model, fakes):
    fakes(None)
    with pytest.raises(MAEError, match="cannot load .*encoder.engine") as info:
        create_engine("trt", fake_bundle(tmp_path / "a", tiny_model.cfg))
    assert "--format trt --precision fp32" in info.value.hint
    fakes(FakeEngine(tiny_model, "INT64", max_batch=4))
    with pytest.raises(MAEError, match="no fp32 TensorRT decoder engine"):
        create_engine("trt", fake_bundle(tmp_path / "b", tiny_model.cfg), "decoder")


def test_without_tensorrt_the_error_names_the_extra(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(MAEError, match="missing here: the Python package 'tensorrt'") as info:
        create_engine("trt", fake_bundle(tmp_path, tiny_model.cfg))
    assert "mae-toolkit[gpu,tensorrt]" in info.value.hint


def test_what_is_missing_comes_before_how_to_build(tmp_path, tiny_model, monkeypatch):
    """A bundle without engines on a machine without TensorRT or a GPU: the message names what is missing, and
    does not send the user to `mae export --format trt`, which would refuse for the same reason."""
    from mae.checkpoint import save_random_weights
    from mae.export import export_bundle

    weights = save_random_weights(tiny_model.cfg, tmp_path / "w.pt", decoder=False)
    bundle = export_bundle(weights, tmp_path / "bundle", verify=False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_engine, "_cudart", lambda: (_ for _ in ()).throw(MAEError("no cuda-python")))
    with pytest.raises(MAEError) as info:
        create_engine("trt", bundle.path)
    message = str(info.value)
    assert "'tensorrt'" in message and "'cuda-python'" in message and "build one on this machine" not in message
    cudart = FakeCudart()
    cudart.cudaGetDeviceCount = lambda: (0, 0)  # a driver that sees no GPU
    monkeypatch.setattr(trt_engine, "_cudart", lambda: cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(None))
    with pytest.raises(MAEError, match=r"missing here: CUDA GPU 0 \(the driver reports no usable GPU\)"):
        create_engine("trt", bundle.path)


# --------------------------------------------------------------------------------- real TensorRT + CUDA
def tensorrt_usable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.tensorrt
@pytest.mark.skipif(not tensorrt_usable(), reason="needs TensorRT and a CUDA GPU")
def test_real_engines_match_torch(tmp_path, real_photos):
    from mae.checkpoint import save_checkpoint
    from mae.core.preprocess import preprocess_image
    from mae.export.tensorrt import run_tensorrt_export
    from mae.runtime.reconstruct import reconstruct

    config = get_preset("mae_vit_test_patch8")
    torch.manual_seed(0)
    model = MaskedAutoencoder(config).eval()
    save_checkpoint(tmp_path / "model.pt", model.state_dict(), config)
    bundle = run_tensorrt_export(tmp_path / "model.pt", tmp_path / "bundle", precision="fp32", max_batch=4)
    bundle = run_tensorrt_export(bundle.path, bundle.path, precision="fp16", max_batch=4)

    pixels = np.stack([preprocess_image(photo, bundle.preprocessing) for photo in real_photos[:4]])
    masking = masking_from_noise(random_noise(4, 16, 0), 0.75)
    inputs = {"pixel_values": pixels, "ids_keep": masking.ids_keep}
    reference = create_engine("torch", bundle.path, "encoder", device="cuda").run(inputs)["latent"]
    latent = create_engine("trt", bundle.path, "encoder", precision="fp32").run(inputs)["latent"]
    np.testing.assert_allclose(latent, reference, atol=1e-3)
    half = create_engine("trt", bundle.path, "encoder", precision="fp16").run(inputs)["latent"]
    for pooled_half, pooled_ref in ((half[:, 0], reference[:, 0]), (half[:, 1:].mean(1), reference[:, 1:].mean(1))):
        norms = np.linalg.norm(pooled_half, axis=-1) * np.linalg.norm(pooled_ref, axis=-1)
        assert ((pooled_half * pooled_ref).sum(-1) / norms).min() > 0.999

    decoder_inputs = {"latent": reference, "ids_restore": masking.ids_restore}
    pred = create_engine("trt", bundle.path, "decoder").run(decoder_inputs)["pred"]
    expected = create_engine("torch", bundle.path, "decoder", device="cuda").run(decoder_inputs)["pred"]
    np.testing.assert_allclose(pred, expected, atol=1e-3)

    with pytest.raises(MAEError, match="max \\[4, 3, 32, 32\\]"):
        create_engine("trt", bundle.path).run({k: np.concatenate([v, v[:1]]) for k, v in inputs.items()})
    result = reconstruct(real_photos[:2], bundle.path, engine="trt")
    assert result.pred.shape == (2, 16, 192) and np.isfinite(result.metrics.psnr).all()


def test_bindings_newer_than_the_driver_are_named_not_no_gpu(tmp_path, tiny_model, fakes, monkeypatch):
    """cuda-python 13 on a CUDA 12 driver fails every call with cudaErrorInsufficientDriver: the user was told
    there was no usable GPU."""
    cudart = fakes(FakeEngine(tiny_model, "INT64", max_batch=4))
    cudart.cudaGetDeviceCount = lambda: (35, 0)
    cudart.cudaDriverGetVersion = lambda: (0, 12040)
    with pytest.raises(MAEError, match="driver here supports CUDA 12.4.*needs a newer one") as info:
        create_engine("trt", fake_bundle(tmp_path, tiny_model.cfg), "encoder", device="auto")
    assert "mae-toolkit[tensorrt]" in info.value.hint


def test_what_tensorrt_refuses_is_named(tmp_path, tiny_model, fakes, monkeypatch):
    """create_execution_context -> None (out of GPU memory), set_tensor_address -> False and
    deserialize_cuda_engine -> None were unchecked."""
    engine = FakeEngine(tiny_model, "INT64", max_batch=4)
    fakes(engine)
    bundle = fake_bundle(tmp_path, tiny_model.cfg)
    engine.create_execution_context = lambda: None
    with pytest.raises(MAEError, match="could not create an execution context .*out of GPU memory"):
        create_engine("trt", bundle, "encoder", device="auto")
    del engine.create_execution_context
    runner = create_engine("trt", bundle, "encoder", device="auto")
    monkeypatch.setattr(FakeContext, "set_tensor_address", lambda self, name, pointer: False)
    pixels = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(MAEError, match="refused the device address of pixel_values"):
        runner.run({"pixel_values": pixels, "ids_keep": np.arange(4)[None]})
    fakes(None)  # deserialize_cuda_engine gives None
    with pytest.raises(MAEError, match="cannot load"):
        create_engine("trt", bundle, "encoder", device="auto")


def test_the_stream_handle_of_cuda_bindings_13(monkeypatch):
    """int(stream) is deprecated in cuda-bindings 13: get_cuda_native_handle gives the address where it exists."""
    import types

    assert trt_engine.stream_handle(1234) == 1234  # older bindings: int(stream)
    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda stream: 4321
    for name, module in (("cuda", types.ModuleType("cuda")), ("cuda.bindings", types.ModuleType("cuda.bindings"))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)
    assert trt_engine.stream_handle(object()) == 4321
