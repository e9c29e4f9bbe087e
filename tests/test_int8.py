"""int8 that is right on every CPU class: 7-bit per-channel ONNX Runtime weights (no saturation without VNNI, shown by
emulating the AVX2 arithmetic), the NNCF OpenVINO model, calibration images, the gate, what mae.json records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from mae.checkpoint import save_random_weights
from mae.core import hardware
from mae.core.bundle import Bundle
from mae.core.errors import MAEError
from mae.core.files import sha256_file
from mae.core.masking import masking_from_noise, random_noise
from mae.export import export_bundle
from mae.export.calibration import SHIPPED, held_out_count, load_calibration
from mae.export.onnx_bundle import Int8Options
from mae.export.precision import INT8_WEIGHT_LIMIT, check_int8_weight_range
from mae.export.verify import reference_pixels
from mae.runtime.engines import base as engines_base
from mae.runtime.engines import create_engine

openvino = pytest.importorskip("openvino")
pytest.importorskip("nncf")

AMD_ZEN3 = hardware.CpuInfo("AMD EPYC 7B13 64-Core Processor", frozenset({"avx2", "fma", "sse4_2"}), "x86_64", 2)
SAPPHIRE_RAPIDS = hardware.CpuInfo(
    "Intel Xeon Platinum 8481C", frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"}), "x86_64", 2
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mae.core.config import get_preset

    # 192 wide, 6 blocks: the tiny test preset (32 wide) is too small for static int8 ranges to reach the gate.
    folder = tmp_path_factory.mktemp("int8")
    return save_random_weights(get_preset("mae_vit_mini_patch8"), folder / "model.pt", seed=3, decoder=False)


@pytest.fixture(scope="module")
def bundle(weights: Path) -> Bundle:
    return export_bundle(weights, weights.parent / "bundle", precisions=("fp32", "int8"))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def avx2_u8s8(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """u8 [M, K] x s8 [K, N] as AVX2 without VNNI computes it (VPMADDUBSW, then VPMADDWD): products of neighbouring
    k summed in pairs into int16 with saturation, then accumulated in int32."""
    a = activations.astype(np.int32)
    w = weights.astype(np.int32)
    if a.shape[1] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]  # [M, K/2, N]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def worst_case_activations(weights: np.ndarray) -> np.ndarray:
    """For each output column, the uint8 input that pushes its pair sums highest: 255 where the weight is > 0."""
    return np.where(weights.T > 0, 255, 0).astype(np.uint8)  # [N, K]: row n targets column n


def int8_weights(proto: onnx.ModelProto) -> list[np.ndarray]:
    initializers = {t.name: t for t in proto.graph.initializer}
    return [
        numpy_helper.to_array(initializers[node.input[1]])
        for node in proto.graph.node
        if node.op_type == "MatMulInteger" and node.input[1] in initializers
    ]


def test_onnx_int8_weights_are_7_bit_per_channel(bundle: Bundle) -> None:
    proto = onnx.load(str(bundle.graph("encoder", "int8")))
    ops = {node.op_type for node in proto.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "ConvInteger" not in ops
    weights = int8_weights(proto)
    assert len(weights) == 4 * bundle.config.depth  # qkv, proj, fc1, fc2 of every block
    assert check_int8_weight_range(proto) <= INT8_WEIGHT_LIMIT
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "MatMulInteger":
            columns = initializers[node.input[1]].shape[1]
            assert initializers[node.input[3]].shape == (columns,)  # one zero point (and scale) per output channel


def test_no_saturation_on_avx2_arithmetic(bundle: Bundle, weights: Path, tmp_path: Path) -> None:
    """The project's int8 weights give exact integer products under AVX2's saturating pair sums, for the worst
    input there is; the 8-bit weights of plain dynamic quantization do not (what broke int8 on AMD Zen 3)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for matrix in int8_weights(onnx.load(str(bundle.graph("encoder", "int8")))):
        inputs = worst_case_activations(matrix)
        exact = inputs.astype(np.int64) @ matrix.astype(np.int64)
        np.testing.assert_array_equal(avx2_u8s8(inputs, matrix), exact)

    eight_bit = tmp_path / "eight_bit.onnx"
    quantize_dynamic(str(bundle.graph("encoder", "fp32")), str(eight_bit), weight_type=QuantType.QInt8)
    proto = onnx.load(str(eight_bit))
    saturated = 0
    for matrix in int8_weights(proto):
        inputs = worst_case_activations(matrix)
        saturated += int((avx2_u8s8(inputs, matrix) != inputs.astype(np.int64) @ matrix.astype(np.int64)).sum())
    assert saturated > 0
    with pytest.raises(MAEError, match="saturate on CPUs without VNNI"):
        check_int8_weight_range(proto)


def test_manifest_records_method_calibration_and_cpu(bundle: Bundle) -> None:
    record = bundle.manifest["int8"]
    assert set(record["method"]) == {"onnxruntime", "openvino"} and "7-bit" in record["method"]["onnxruntime"]
    assert record["calibration"]["source"] == SHIPPED
    assert record["calibration"]["count"] == 64 and record["calibration"]["held_out"] == held_out_count(64)
    assert record["min_cosine"] == 0.999
    assert record["verified_on"]["int8_class"] == hardware.cpu_info().int8_class
    assert record["verified_on"]["model"] == hardware.cpu_info().model
    report = bundle.manifest["verification"]["int8"]["encoder"]
    assert report["passed"] and report["tolerance"] == {"min_cosine": 0.999}
    assert min(report["cosine_cls"], report["cosine_mean"]) >= 0.999
    # judged on the verification photos and the held-out crops, at both mask ratios
    images = bundle.manifest["verification"]["int8"]["inputs"]["images"]
    assert len(images) == 4 + held_out_count(64) and any("crop" in name for name in images)
    entry = bundle.manifest["openvino"]["int8"]["encoder"]
    assert entry["sha256"] == sha256_file(bundle.path / entry["file"])
    assert entry["weights"]["sha256"] == sha256_file(bundle.path / entry["weights"]["file"])
    assert entry["verification"]["passed"] and entry["verification"]["cosine_cls"] >= 0.999


def test_openvino_int8_is_a_real_int8_model(bundle: Bundle, weights: Path) -> None:
    core = openvino.Core()
    ops = {op.get_type_name() for op in core.read_model(str(bundle.path / "encoder.int8.xml")).get_ops()}
    assert "FakeQuantize" in ops  # quantized by NNCF, not the ONNX Runtime graph read back
    engine = create_engine("openvino", bundle.path, precision="int8")
    assert "encoder.int8.xml" in engine.description
    reference = create_engine("torch", weights)
    _, pixels = reference_pixels(bundle.preprocessing)
    for ratio in (0.0, 0.75):
        ids_keep = masking_from_noise(random_noise(len(pixels), bundle.config.num_patches, 5), ratio).ids_keep
        feeds = {"pixel_values": pixels, "ids_keep": ids_keep}
        want, got = reference.run(feeds)["latent"], engine.run(feeds)["latent"]
        assert cosine(want[:, 0], got[:, 0]).min() >= 0.999
        assert cosine(want[:, 1:].mean(1), got[:, 1:].mean(1)).min() >= 0.999


def test_int8_engines_on_a_capped_isa(bundle: Bundle, weights: Path) -> None:
    """ONEDNN_MAX_CPU_ISA=AVX2 takes oneDNN's (and so OpenVINO's) AVX2 paths on any x86 CPU: the OpenVINO int8 model
    then computes in f32 and stays within the gate (OpenVINO's own bf16 default would not even compile there)."""
    if hardware.cpu_info().machine not in ("x86_64", "AMD64"):
        pytest.skip("ONEDNN_MAX_CPU_ISA=AVX2 is an x86 setting")
    script = textwrap.dedent(
        f"""
        import json, numpy as np
        from mae.core import hardware
        from mae.runtime.engines import create_engine
        from mae.core.masking import masking_from_noise, random_noise
        from mae.export.verify import reference_pixels
        engine = create_engine("openvino", {str(bundle.path)!r}, precision="int8")
        reference = create_engine("torch", {str(weights)!r})
        _, pixels = reference_pixels(engine.bundle.preprocessing)
        worst = 1.0
        for ratio in (0.0, 0.75):
            ids = masking_from_noise(random_noise(len(pixels), engine.config.num_patches, 5), ratio).ids_keep
            feeds = {{"pixel_values": pixels, "ids_keep": ids}}
            a, b = reference.run(feeds)["latent"].astype(np.float64), engine.run(feeds)["latent"].astype(np.float64)
            for x, y in ((a[:, 0], b[:, 0]), (a[:, 1:].mean(1), b[:, 1:].mean(1))):
                cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
                worst = min(worst, float(cos.min()))
        print(json.dumps({{"class": hardware.cpu_info().int8_class, "description": engine.description, "cos": worst}}))
        """
    )
    environment = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["class"] == "avx2"
    assert "f32 compute" in result["description"]
    assert result["cos"] >= 0.999


def test_warns_once_on_another_cpu_class(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    other = SAPPHIRE_RAPIDS if hardware.cpu_info().int8_class == "avx2" else AMD_ZEN3  # a class the export was not on
    monkeypatch.setattr(hardware, "cpu_info", lambda: other)
    monkeypatch.setattr(engines_base, "_INT8_WARNED", set())
    with pytest.warns(RuntimeWarning, match=rf"verified on .*; this CPU is {other.model} \({other.int8_class}\)"):
        create_engine("onnx", bundle.path, precision="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_engine("onnx", bundle.path, precision="int8")  # once is enough
        create_engine("onnx", bundle.path, precision="fp32")  # fp32 has nothing to say


def test_openvino_int8_missing_says_how_to_make_it(bundle: Bundle, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    manifest = json.loads((copy / "mae.json").read_text())
    del manifest["openvino"]
    (copy / "mae.json").write_text(json.dumps(manifest))
    with pytest.raises(MAEError, match="no OpenVINO int8 encoder model") as info:
        create_engine("openvino", copy, precision="int8")
    assert "--precision int8" in info.value.hint


def write_photos(folder: Path, count: int) -> Path:
    from mae.data import shipped_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(shipped_photos().values())
    rng = np.random.default_rng(0)
    for index in range(count):
        photo = photos[index % len(photos)]
        top, left = (int(rng.integers(0, side // 3)) for side in photo.shape[:2])
        Image.fromarray(photo[top:, left:]).save(folder / f"photo_{index:02d}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_calibration_from_a_folder(tmp_path: Path, bundle: Bundle) -> None:
    folder = write_photos(tmp_path / "mine", 14)
    calibration = load_calibration(folder, bundle.preprocessing, count=8, seed=0)
    assert calibration.source == str(folder) and len(calibration.pixels) == 8
    assert len(calibration.held_out) == held_out_count(8) == 4
    assert calibration.pixels.shape[1:] == (3, 64, 64) and calibration.skipped <= 1
    assert not set(calibration.names) & set(calibration.held_out_names)  # held out means held out
    feeds = calibration.feeds(bundle.config.num_patches)
    assert [f["ids_keep"].shape[1] for f in feeds] == [64, 16]  # both mask ratios, one batch of 8
    with pytest.raises(MAEError, match="int8 calibration needs at least 12"):
        load_calibration(write_photos(tmp_path / "few", 9), bundle.preprocessing, count=8)


def test_export_with_user_calibration_and_gate(tmp_path: Path, weights: Path) -> None:
    folder = write_photos(tmp_path / "mine", 14)
    exported = export_bundle(
        weights,
        tmp_path / "bundle",
        precisions=("fp32", "int8"),
        int8=Int8Options(calibration=folder, calibration_count=8, openvino=False),
    )
    record = exported.manifest["int8"]
    assert record["calibration"]["source"] == str(folder) and record["calibration"]["count"] == 8
    assert "openvino" not in exported.manifest and set(record["method"]) == {"onnxruntime"}
    with pytest.raises(MAEError, match=r"must be in \(0, 1\]"):
        export_bundle(weights, tmp_path / "other", precisions=("int8",), int8=Int8Options(min_cosine=1.5))
    assert not (tmp_path / "other").exists()


def test_cli_gate_refuses_and_leaves_nothing(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture) -> None:
    from mae.cli import main

    out = tmp_path / "bundle"
    for args, message in (
        (["--precision", "int8", "--int8-min-cosine", "0.9999999999"], "lowest pooled-feature cosine"),
        (["--calibration", str(tmp_path)], "only apply to --precision int8"),
        (["--precision", "int8", "--calibration", str(tmp_path / "nowhere")], "does not exist"),
    ):
        argv = ["mae", "export", str(weights), "--out", str(out), *args]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", argv)
            with pytest.raises(SystemExit) as exit_info:
                main()
        text = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in text and "Traceback" not in text, text
        assert not out.exists()


QEMU_SCRIPT = """
import sys
import numpy as np
import onnxruntime as ort

options = ort.SessionOptions()
options.intra_op_num_threads = 1
arrays = np.load(sys.argv[1])
for index, graph in enumerate(sys.argv[3:]):
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": arrays["pixel_values"], "ids_keep": arrays["ids_keep"]}
    np.save(f"{sys.argv[2]}.{index}.npy", session.run(["latent"], feeds)[0])
"""


def test_onnx_int8_is_exact_on_real_avx2_kernels(tmp_path: Path) -> None:
    """ONNX Runtime's own AVX2 int8 kernels (MLAS), run under QEMU emulating a Haswell CPU (AVX2, no AVX-512, no
    VNNI) whatever this CPU is: our int8 graph gives exactly the outputs it gives natively; plain 8-bit weights
    saturate there and drift (the AMD Zen 3 failure, reproduced on any x86 machine)."""
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from mae.core.config import get_preset

    qemu = shutil.which("qemu-x86_64")
    if qemu is None or hardware.cpu_info().machine != "x86_64":
        pytest.skip("needs qemu-x86_64 on x86_64 (Debian: apt-get install qemu-user) to run AVX2 kernels")
    weights = save_random_weights(get_preset("mae_vit_test_patch8"), tmp_path / "tiny.pt", seed=0, decoder=False)
    tiny = export_bundle(weights, tmp_path / "bundle", ("fp32", "int8"), int8=Int8Options(openvino=False))
    eight_bit = tmp_path / "eight_bit.onnx"
    quantize_dynamic(str(tiny.graph("encoder", "fp32")), str(eight_bit), weight_type=QuantType.QInt8)
    _, pixels = reference_pixels(tiny.preprocessing)
    pixels = np.concatenate([pixels] * 4)  # 16 images
    ids_keep = masking_from_noise(random_noise(len(pixels), tiny.config.num_patches, 1), 0.0).ids_keep
    np.savez(tmp_path / "inputs.npz", pixel_values=pixels, ids_keep=ids_keep)
    (tmp_path / "run.py").write_text(QEMU_SCRIPT)
    graphs = [str(tiny.graph("encoder", "fp32")), str(tiny.graph("encoder", "int8")), str(eight_bit)]
    args = [str(tmp_path / "run.py"), str(tmp_path / "inputs.npz")]
    native = subprocess.run([sys.executable, *args, str(tmp_path / "native"), *graphs], capture_output=True, text=True)
    assert native.returncode == 0, native.stderr[-2000:]
    emulated = subprocess.run(
        [qemu, "-cpu", "Haswell", os.path.realpath(sys.executable), *args, str(tmp_path / "haswell"), *graphs],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    load = lambda prefix, index: np.load(tmp_path / f"{prefix}.{index}.npy")  # noqa: E731
    fp32 = load("native", 0)
    ours_native, ours_avx2 = load("native", 1), load("haswell", 1)
    np.testing.assert_allclose(ours_avx2, ours_native, rtol=0, atol=1e-5 * float(np.abs(fp32).max()))
    for latent in (ours_native, ours_avx2):
        assert cosine(latent[:, 0], fp32[:, 0]).min() >= 0.999
    plain_native, plain_avx2 = load("native", 2), load("haswell", 2)
    assert np.abs(plain_avx2 - plain_native).max() > 1e-2 * np.abs(fp32).max()  # saturated on AVX2


def test_openvino_model_below_the_gate(tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built only because OpenVINO is installed: left out (no file, a note in mae.json), the ONNX Runtime graph
    stands. Asked for by name: the export fails and leaves nothing."""
    from mae.export import onnx_bundle
    from mae.export.verify import VerificationError

    def refuse(*_: object, **__: object) -> None:
        raise VerificationError("The int8 encoder (encoder.int8.xml) does not match PyTorch: cosine 0.5 < 0.999")

    monkeypatch.setattr(onnx_bundle, "verify_openvino_model", refuse)
    kept = export_bundle(weights, tmp_path / "kept", ("fp32", "int8"), int8=Int8Options(calibration_count=8))
    assert sorted(p.name for p in kept.path.iterdir()) == ["encoder.int8.onnx", "encoder.onnx", "mae.json"]
    assert "cosine 0.5" in kept.manifest["int8"]["openvino_refused"] and "openvino" not in kept.manifest
    assert kept.manifest["verification"]["int8"]["encoder"]["passed"]
    with pytest.raises(VerificationError, match="cosine 0.5"):
        asked = Int8Options(calibration_count=8, openvino=True)
        export_bundle(weights, tmp_path / "asked", ("fp32", "int8"), int8=asked)
    assert not (tmp_path / "asked").exists() and [p.name for p in tmp_path.iterdir()] == ["kept"]
