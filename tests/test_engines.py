"""Engines: ONNX Runtime, OpenVINO and PyTorch agree on the same inputs; factory, options and errors."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from mae.checkpoint import save_checkpoint
from mae.core.errors import MAEError
from mae.core.masking import full_ids_keep, masking_from_noise, random_noise
from mae.model import MaskedAutoencoder
from mae.runtime.engines import create_engine
from mae.runtime.engines.base import check_inputs
from mae.runtime.engines.onnx import resolve_providers
from mae.runtime.engines.openvino import split_batch

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A random mae_vit_test_patch8 exported (fp32 + int8) by the real exporter, with its checkpoint."""
    from mae.core.config import get_preset
    from mae.export import export_bundle

    folder = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    config = get_preset("mae_vit_test_patch8")
    save_checkpoint(folder / "model.pt", MaskedAutoencoder(config).state_dict(), config)
    return export_bundle(folder / "model.pt", folder / "bundle", precisions=("fp32", "int8"), verify=False)


@pytest.fixture(scope="module")
def photo_batch(tiny_bundle, real_photos):
    """[N, 3, 32, 32] normalized real photos, through the shared preprocessing."""
    from mae.core.preprocess import preprocess_image

    return np.stack([preprocess_image(photo, tiny_bundle.preprocessing) for photo in real_photos])


def encoder_inputs(pixel_values: np.ndarray, mask_ratio: float, seed: int = 0) -> dict[str, np.ndarray]:
    noise = random_noise(len(pixel_values), 16, seed)
    return {"pixel_values": pixel_values, "ids_keep": masking_from_noise(noise, mask_ratio).ids_keep}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -------------------------------------------------------------------------------------------- pure logic
def test_auto_provider_prefers_tensorrt_then_cuda_then_cpu():
    assert resolve_providers("auto", [CPU, CUDA, TRT]) == [TRT, CUDA, CPU]
    assert resolve_providers("auto", ["AzureExecutionProvider", CPU]) == [CPU]
    assert resolve_providers("cuda", [CPU, CUDA]) == [CUDA, CPU]
    assert resolve_providers("tensorrt", [CPU, CUDA, TRT]) == [TRT, CUDA, CPU]
    assert resolve_providers("cpu", [CPU, CUDA]) == [CPU]


def test_missing_provider_is_a_clear_error():
    with pytest.raises(MAEError, match="no CUDAExecutionProvider") as info:
        resolve_providers("cuda", [CPU])
    assert "onnxruntime-gpu" in info.value.hint
    with pytest.raises(MAEError, match="Unknown ONNX Runtime provider"):
        resolve_providers("rocm", [CPU])


def test_split_batch_covers_every_row_once():
    assert split_batch(8, 2) == [(0, 4), (4, 8)]
    assert split_batch(5, 2) == [(0, 3), (3, 5)]
    assert split_batch(1, 2) == [(0, 1)]
    assert split_batch(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_check_inputs_says_what_is_wrong():
    pixels = np.zeros((2, 3, 32, 32), np.float64)
    ids = np.zeros((2, 4), np.int32)
    checked = check_inputs("encoder", {"pixel_values": pixels, "ids_keep": ids})
    assert checked["pixel_values"].dtype == np.float32 and checked["ids_keep"].dtype == np.int64
    with pytest.raises(MAEError, match="missing: ids_keep"):
        check_inputs("encoder", {"pixel_values": pixels})
    with pytest.raises(MAEError, match="2 images but ids_keep has 3"):
        check_inputs("encoder", {"pixel_values": pixels, "ids_keep": np.zeros((3, 4), np.int64)})
    with pytest.raises(MAEError, match="integer patch indices"):
        check_inputs("encoder", {"pixel_values": pixels, "ids_keep": ids.astype(np.float32)})
    with pytest.raises(MAEError, match="batch of 0"):
        check_inputs("encoder", {"pixel_values": pixels[:0], "ids_keep": ids[:0]})
    with pytest.raises(MAEError, match="must be 3-D"):
        check_inputs("decoder", {"latent": pixels, "ids_restore": ids})


def test_unknown_engine_and_graph():
    with pytest.raises(MAEError, match="Unknown engine 'tflite'") as info:
        create_engine("tflite", "x")
    assert "onnx" in info.value.hint
    with pytest.raises(MAEError, match="Unknown graph"):
        create_engine("onnx", "x", part="head")


# --------------------------------------------------------------------------------------- engines agree
@pytest.mark.parametrize("mask_ratio", [0.75, 0.0])
def test_onnx_and_openvino_match_torch(tiny_bundle, photo_batch, mask_ratio):
    inputs = encoder_inputs(photo_batch, mask_ratio)
    torch_encoder = create_engine("torch", tiny_bundle.path, "encoder")  # loads the bundle's source weights
    reference = torch_encoder.run(inputs)["latent"]  # [N, 1+K, D]
    assert reference.shape == (len(photo_batch), 1 + inputs["ids_keep"].shape[1], 32)
    for name, options in (("onnx", {"provider": "cpu"}), ("openvino", {"inference_precision": "f32"})):
        latent = create_engine(name, tiny_bundle.path, "encoder", **options).run(inputs)["latent"]
        assert latent.dtype == np.float32
        np.testing.assert_allclose(latent, reference, atol=2e-5, err_msg=name)

    masking = masking_from_noise(random_noise(len(photo_batch), 16, 0), mask_ratio)
    decoder_inputs = {"latent": reference, "ids_restore": masking.ids_restore}
    pred = create_engine("torch", tiny_bundle.path, "decoder").run(decoder_inputs)["pred"]
    assert pred.shape == (len(photo_batch), 16, 8 * 8 * 3)
    for name, options in (("onnx", {}), ("openvino", {"inference_precision": "f32"})):
        other = create_engine(name, tiny_bundle.path, "decoder", **options).run(decoder_inputs)["pred"]
        np.testing.assert_allclose(other, pred, atol=2e-5, err_msg=name)


def test_torch_engine_equals_the_model(tiny_bundle, photo_batch):
    """The engine is MaskedAutoencoder.forward_encoder on the same weights, to the last digit."""
    from mae.weights import load_model

    model, _ = load_model(tiny_bundle.manifest["source"]["path"])
    ids_keep = full_ids_keep(len(photo_batch), 16)
    with torch.no_grad():
        expected = model.forward_features(torch.from_numpy(photo_batch)).numpy()
    latent = create_engine("torch", model, "encoder").run({"pixel_values": photo_batch, "ids_keep": ids_keep})
    np.testing.assert_array_equal(latent["latent"], expected)


def test_reduced_precisions_stay_close(tiny_bundle, photo_batch):
    """bf16 (torch, OpenVINO's default on AMX CPUs) and int8 keep pooled features within cosine 0.999 / 0.99.

    The tiny model is cheap to emulate, so torch bf16 is checked on CPUs without bf16 instructions too."""
    inputs = encoder_inputs(photo_batch, 0.0)
    reference = create_engine("torch", tiny_bundle.path).run(inputs)["latent"]
    bf16 = {"precision": "bf16", "allow_emulated_bf16": True}
    cases = [("torch", bf16, 0.999), ("openvino", {}, 0.999), ("onnx", {"precision": "int8"}, 0.99)]
    for name, options, floor in cases:
        engine = create_engine(name, tiny_bundle.path, **options)
        latent = engine.run(inputs)["latent"]
        assert latent.dtype == np.float32, name
        for pooled, expected in ((latent[:, 0], reference[:, 0]), (latent[:, 1:].mean(1), reference[:, 1:].mean(1))):
            assert cosine(pooled, expected).min() >= floor, engine.description
    assert "int8" in create_engine("onnx", tiny_bundle.path, precision="int8").description


def test_openvino_batches_of_any_size_agree(tiny_bundle, photo_batch):
    """Odd batches are split unevenly across the infer requests; each new shape compiles once and is cached."""
    engine = create_engine("openvino", tiny_bundle.path, inference_precision="f32")
    inputs = encoder_inputs(photo_batch[:5], 0.5)
    whole = engine.run(inputs)["latent"]
    rows = [engine.run({k: v[i : i + 1] for k, v in inputs.items()})["latent"] for i in range(5)]
    np.testing.assert_allclose(whole, np.concatenate(rows), atol=1e-5)
    assert len(engine._compiled) == 3  # shapes [3, ...], [2, ...], [1, ...]
    engine.run(inputs)
    assert len(engine._compiled) == 3
    assert "f32 compute" in engine.description and "2 streams" in engine.description


def test_bf16_engine_leaves_the_callers_model_alone(tiny_bundle):
    from mae.weights import load_model

    model, _ = load_model(tiny_bundle.manifest["source"]["path"])
    engine = create_engine("torch", model, "encoder", precision="bf16", allow_emulated_bf16=True)  # tiny: cheap
    assert next(model.parameters()).dtype == torch.float32
    assert next(engine.network.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- options
def test_options_an_engine_lacks_are_dropped(tiny_bundle):
    """One set of CLI options feeds every engine: provider means nothing to torch, device nothing to onnx."""
    engine = create_engine("torch", tiny_bundle.path, provider="cuda", device="cpu", num_threads=None)
    assert engine.device == "cpu"
    engine = create_engine("onnx", tiny_bundle.path, device="cuda", provider="cpu", num_threads=1)
    assert "CPUExecutionProvider" in engine.description and "1 threads" in engine.description


def test_an_option_no_engine_has_is_refused(tiny_bundle):
    """A misspelt option used to vanish silently (it was dropped like an option another engine has)."""
    for name in ("onnx", "torch", "auto"):
        with pytest.raises(MAEError, match="No engine has the option.*num_thread\\b") as info:
            create_engine(name, tiny_bundle.path, num_thread=2)
        assert "num_threads" in info.value.hint


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_provider_fallback_is_reported(tiny_bundle, monkeypatch):
    """When ONNX Runtime cannot start the asked-for provider it runs on CPU; the engine warns and says so."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.warns(RuntimeWarning, match="could not start CUDAExecutionProvider"):
        engine = create_engine("onnx", tiny_bundle.path, provider="cuda")
    assert engine.providers == [CPU] and CPU in engine.description


# ----------------------------------------------------------------------------------------------- errors
def test_weights_need_a_bundle_except_for_torch(tiny_bundle):
    weights = tiny_bundle.manifest["source"]["path"]
    for name in ("onnx", "openvino"):
        with pytest.raises(MAEError, match="not one \\(no mae.json\\)") as info:
            create_engine(name, weights)
        assert "--engine torch" in info.value.hint
    assert create_engine("torch", weights).config.img_size == 32


def test_missing_precision_names_what_the_bundle_has(tiny_bundle):
    with pytest.raises(MAEError, match="no fp16 encoder \\(it has: fp32, int8\\)") as info:
        create_engine("onnx", tiny_bundle.path, precision="fp16")
    assert "--precision fp16" in info.value.hint
    for name in ("onnx", "openvino"):
        with pytest.raises(MAEError, match="graphs, not bf16") as info:
            create_engine(name, tiny_bundle.path, precision="bf16")
        assert "--engine torch --precision bf16" in info.value.hint
    with pytest.raises(MAEError, match="fp32, bf16 or fp16"):
        create_engine("torch", tiny_bundle.path, precision="int8")
    with pytest.raises(MAEError, match="needs CUDA"):
        create_engine("torch", tiny_bundle.path, precision="fp16", device="cpu")


def test_encoder_only_bundle_refuses_the_decoder(tiny_bundle, tmp_path):
    copy = tmp_path / "encoder_only"
    shutil.copytree(tiny_bundle.path, copy)
    manifest = json.loads((copy / "mae.json").read_text())
    del manifest["graphs"]["fp32"]["decoder"]
    (copy / "mae.json").write_text(json.dumps(manifest))
    for name in ("onnx", "openvino"):
        with pytest.raises(MAEError, match="reconstruction needs the full \\(decoder\\) weights"):
            create_engine(name, copy, "decoder")


def test_bundle_source_gone_is_a_clear_error_for_torch(tiny_bundle, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(tiny_bundle.path, copy)
    manifest = json.loads((copy / "mae.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone.pt")
    (copy / "mae.json").write_text(json.dumps(manifest))
    with pytest.raises(MAEError, match="weights that bundle .* was exported from") as info:
        create_engine("torch", copy)
    assert "--model" in info.value.hint


def test_bad_inputs_are_errors_not_tracebacks(tiny_bundle, photo_batch):
    engine = create_engine("torch", tiny_bundle.path)
    with pytest.raises(MAEError, match="patch indices must be in \\[0, 16\\)"):
        engine.run({"pixel_values": photo_batch[:1], "ids_keep": np.array([[0, 16]])})
    with pytest.raises(MAEError, match="must be \\[B, 3, 32, 32\\]"):
        engine.run({"pixel_values": np.zeros((1, 3, 64, 64), np.float32), "ids_keep": np.array([[0, 1]])})


def test_onnx_and_openvino_paths_never_import_torch(tiny_bundle, photo_dir):
    """A deployment needs numpy, Pillow and an engine: reconstruct and run engines with torch unimportable."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.modules["torch"] = None  # any import of torch now fails
        from mae.runtime.bench import parse_engines
        from mae.runtime.engines import create_engine
        from mae.runtime.reconstruct import reconstruct
        photos = sorted(Path({str(photo_dir)!r}).iterdir())[:2]
        result = reconstruct(photos, {str(tiny_bundle.path)!r})
        assert result.pred.shape == (2, 16, 192)
        create_engine("openvino", {str(tiny_bundle.path)!r})
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_ctrl_c_after_an_openvino_engine_is_gone_raises_instead_of_crashing(tiny_bundle, photo_dir):
    """OpenVINO's CPU plugin swaps the loading thread's signal stack and frees it with the plugin: without the
    engine's guard a later Ctrl-C (SIGINT) killed the process with a segmentation fault."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from mae.runtime.reconstruct import reconstruct
        photos = sorted(Path({str(photo_dir)!r}).iterdir())[:2]
        reconstruct(photos, {str(tiny_bundle.path)!r}, engine="openvino")  # its engines are freed on return
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            print("interrupted")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "interrupted", (done.returncode, done.stderr[-2000:])


def test_a_negative_masking_seed_is_a_message_not_a_numpy_error():
    from mae.core.errors import MAEError

    with pytest.raises(MAEError, match="whole number >= 0"):
        random_noise(1, 16, -1)
    assert random_noise(1, 16, 0).shape == (1, 16)
