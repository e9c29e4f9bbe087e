"""`mae bench`: engine specs, interleaved timing, rows with ratios and cosines, the CLI and its JSON."""

from __future__ import annotations

import gc
import json
import re
import sys

import numpy as np
import pytest
import torch

from mae.benchmark import bench
from mae.checkpoint import save_checkpoint
from mae.core.config import get_preset
from mae.core.errors import MAEError
from mae.core.hardware import CpuInfo, GpuSummary, cpu_info
from mae.core.numerics import cosine_rows, pooled
from mae.model import MaskedAutoencoder
from mae.runtime.bench import (
    default_engines,
    describe_choice,
    parse_engines,
    peak_kind,
    peaks_line,
    summary_lines,
    timing_rounds,
)
from mae.runtime.roofline import PEAK_KINDS, Peak, encoder_flops, measure_peaks

AVX2_ONLY = CpuInfo("AMD EPYC 7B13 64-Core Processor", frozenset({"avx2", "fma"}), "x86_64", 2)
AMX = CpuInfo("Intel(R) Xeon(R) Platinum 8481C", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}))
CPU_PACKAGES = {"onnxruntime": "1.32.0", "openvino": "2026.4.1", "torch": "2.13.0", "nncf": "3.4.0"}


def test_parse_engines():
    assert parse_engines("torch, onnx-int8,onnx,torch") == ["torch", "onnx-int8", "onnx"]
    assert parse_engines(["openvino", "trt"]) == ["openvino", "trt"]
    with pytest.raises(MAEError, match="Unknown bench engine\\(s\\): onnx-int4") as info:
        parse_engines("torch,onnx-int4")
    assert "torch-bf16" in info.value.hint
    with pytest.raises(MAEError, match="No engines"):
        parse_engines(" , ")


def test_cosine_and_pooling():
    latent = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [B, 1+K, D]
    features = pooled(latent)
    np.testing.assert_array_equal(features["cls"], latent[:, 0])
    np.testing.assert_array_equal(features["mean"], latent[:, 1:].mean(1))
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_rows(a, np.array([[2.0, 0.0], [-1.0, -1.0]])), [1.0, -1.0])


def test_timing_rounds_interleave_and_settle():
    """Each round runs every engine in turn: one untimed settle call, then its timed block."""
    calls, collector_on = [], []
    runners = {"a": lambda: calls.append("a"), "b": lambda: collector_on.append(gc.isenabled()) or calls.append("b")}
    times = timing_rounds(runners, budget_s=0.0, block_s=0.0, min_rounds=3)
    assert gc.isenabled() and collector_on[0] and not any(collector_on[1:])  # no collections while timing
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}  # block of 1 when a call outlasts block_s
    # sizing call per runner, then per round: a (settle, timed), b (settle, timed)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert all(t >= 0 for t in times["a"])


def test_weights_path_runs_torch_only(tmp_path):
    config = get_preset("mae_vit_test_patch8")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", MaskedAutoencoder(config).state_dict(), config)
    peaks = {"fp32": Peak("fp32", 100.0, (8, 8, 8), "test", 1)}  # given peaks are not measured
    weights = str(tmp_path / "model.pt")
    rows = bench(weights, "torch-bf16", batch_size=2, mask_ratios=[0.5], seconds=0.0, progress=False, peaks=peaks)
    assert [r["engine"] for r in rows] == ["torch", "torch-bf16"]  # the baseline is added
    assert rows[0]["ratio_vs_torch"] == 1.0 and rows[0]["cosine_cls"] == pytest.approx(1.0)
    assert rows[0]["gflops_per_image"] == pytest.approx(encoder_flops(config, 8) / 1e9)
    assert rows[0]["effective_gflops"] == pytest.approx(rows[0]["gflops_per_image"] * rows[0]["images_per_s"])
    assert rows[0]["peak_kind"] == "fp32" and rows[0]["fraction_of_peak"] == pytest.approx(
        rows[0]["effective_gflops"] / 100.0
    )
    assert rows[1]["kept"] == 8
    if cpu_info().native_bf16:
        assert rows[1]["cosine_mean"] > 0.999
        assert rows[1]["peak_kind"] == "bf16" and rows[1]["fraction_of_peak"] is None  # no bf16 peak given
    else:  # refused (emulated bf16 is many times slower), with the reason in the row
        assert "would be emulated" in rows[1]["error"]
    with pytest.raises(MAEError, match="engines other than torch run an exported bundle"):
        bench(str(tmp_path / "model.pt"), "onnx", seconds=0.0, progress=False)
    with pytest.raises(MAEError, match="neither a bundle, weights nor a preset"):
        bench("mae_vit_nonexistent", "torch", progress=False)
    with pytest.raises(MAEError, match="mask ratio 1.0"):
        bench(str(tmp_path / "model.pt"), "torch", mask_ratios=[1.0], progress=False)


@pytest.mark.slow
def test_cli_bench_on_a_preset_writes_json(tmp_path, monkeypatch, capsys):
    """A preset gets random weights and a temporary fp32 + int8 bundle; an engine that cannot run gets a reason."""
    from mae.cli import main

    args = ["mae", "bench", "--model", "mae_vit_test_patch8", "--engines", "onnx,onnx-int8,openvino,trt"]
    args += ["--batch-size", "3", "--mask-ratio", "0.75", "--mask-ratio", "0", "--seconds", "0.05"]
    monkeypatch.setattr(sys, "argv", [*args, "--json", str(tmp_path / "bench.json")])
    main()
    printed = capsys.readouterr().out
    assert "vs torch fp32" in printed and "trt: not run: " in printed
    assert "peak GEMM (1024x1024x1024" in printed and "of peak" in printed and "engines: " not in printed

    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["engine"], r["mask_ratio"]): r for r in payload["rows"]}
    assert set(rows) == {(e, m) for e in ("torch", "onnx", "onnx-int8", "openvino", "trt") for m in (0.75, 0.0)}
    assert rows["trt", 0.0]["error"]
    assert "images_per_s" not in rows["trt", 0.0]
    for mask_ratio, kept in ((0.75, 4), (0.0, 16)):
        assert rows["torch", mask_ratio]["ratio_vs_torch"] == 1.0
        assert rows["onnx", mask_ratio]["cosine_cls"] > 0.99999 and rows["onnx", mask_ratio]["kept"] == kept
        assert rows["openvino", mask_ratio]["cosine_mean"] > 0.999
        assert rows["onnx-int8", mask_ratio]["cosine_mean"] > 0.99
        assert "int8" in rows["onnx-int8", mask_ratio]["description"]
    assert rows["onnx", 0.75]["time_vs_mask0"] > 0 and "time_vs_mask0" not in rows["onnx", 0.0]
    assert all(r["images_per_s"] > 0 for r in payload["rows"] if "error" not in r)
    assert {"fp32", "int8"} <= set(payload["peaks"]) and payload["peaks"]["fp32"]["gflops"] > 0
    assert rows["onnx-int8", 0.0]["peak_kind"] == "int8" and rows["onnx", 0.0]["peak_kind"] == "fp32"
    assert all(r["fraction_of_peak"] > 0 for r in payload["rows"] if "error" not in r)
    assert payload["engines_left_out"] == {}  # the engines were named
    # Each row is printed as soon as its mask ratio is measured, before the table; the gate is applied to each.
    first_row = printed.index("onnx-int8       mask 0.75")
    assert first_row < printed.index("onnx-int8       mask 0 ") < printed.index("Encoder throughput")
    assert all(
        r["below_gate"] == (min(r["cosine_cls"], r["cosine_mean"]) < 0.999) for r in rows.values() if "error" not in r
    )


@pytest.mark.slow
def test_cli_bench_default_runs_every_engine_installed_here(tmp_path, monkeypatch, capsys):
    from mae.cli import main
    from mae.runtime.system import installed_engines

    args = ["mae", "bench", "--model", "mae_vit_test_patch8", "--batch-size", "2", "--mask-ratio", "0.5"]
    monkeypatch.setattr(sys, "argv", [*args, "--seconds", "0.02", "--json", str(tmp_path / "bench.json")])
    main()
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "bench.json").read_text())
    ran = [r["engine"] for r in payload["rows"]]
    expected, left_out = default_engines("mae_vit_test_patch8")
    assert ran == expected and payload["engines_left_out"] == left_out
    assert {"torch", "onnx", "onnx-int8"} <= set(ran) and ("openvino-int8" in ran) == (
        "openvino" in installed_engines()
    )
    assert ("torch-bf16" in ran) == cpu_info().native_bf16
    assert f"engines: {', '.join(expected)}" in printed.replace("\n", " ") and "left out: " in printed
    assert all("error" not in r for r in payload["rows"]), [r.get("error") for r in payload["rows"]]


def test_cli_help_lists_every_engine():
    from typer.testing import CliRunner

    from mae.cli import app
    from mae.runtime.engines.labels import ENGINE_SPECS

    result = CliRunner().invoke(app, ["bench", "--help"], terminal_width=200)
    assert result.exit_code == 0
    listed = {word.strip(",.") for word in re.sub(r"-\s+", "-", result.output).split()}  # help wraps at hyphens
    assert set(ENGINE_SPECS) <= listed


def test_summary_names_the_fastest_accurate_torch_free_engine():
    def row(engine, ratio, speed, cos):
        return {
            "engine": engine,
            "mask_ratio": ratio,
            "images_per_s": speed,
            "ratio_vs_torch": speed / 10,
            "cosine_cls": cos,
            "cosine_mean": cos,
        }

    rows = [
        row("torch", 0.75, 10, 1.0),
        row("torch-bf16", 0.75, 90, 1.0),
        row("onnx", 0.75, 11, 1.0),
        row("onnx-int8", 0.75, 60, 0.998),
        row("openvino", 0.75, 40, 0.9999),
        {"engine": "trt", "mask_ratio": 0.75, "kept": 49, "error": "no GPU"},
    ]
    rows[4]["time_vs_mask0"] = 0.25
    (line,) = summary_lines(rows)
    assert "openvino, 4.00x PyTorch eager fp32, t/t(mask 0) 0.25" in line  # int8 is faster but below 0.999


def test_rows_below_the_gate_are_flagged():
    """As `mae export` refuses int8 below 0.999, the bench marks such a row wherever it shows it."""
    from rich.console import Console

    from mae.benchmark import results_table
    from mae.runtime.bench import row_line

    good = {"engine": "onnx", "mask_ratio": 0.0, "kept": 16, "images_per_s": 50.0, "ratio_vs_torch": 2.0}
    good.update(cosine_cls=1.0, cosine_mean=1.0, below_gate=False)
    bad = {**good, "engine": "onnx-int8", "cosine_cls": 0.954, "below_gate": True}
    assert "never picked" in row_line(bad) and "never picked" not in row_line(good)
    console = Console(width=200, record=True)
    console.print(results_table([good, bad], "t"))
    text = console.export_text()
    assert "! 0.954000" in text and "pooled cosine below 0.999" in text
    console = Console(width=200, record=True)
    console.print(results_table([good], "t"))
    assert "below 0.999" not in console.export_text()


def test_timing_rounds_report_progress():
    seen = []
    timing_rounds({"a": lambda: None}, budget_s=0.0, block_s=0.0, min_rounds=4, on_round=lambda n, s: seen.append(n))
    assert seen == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------------------- roofline
def test_encoder_flops_of_vit_b16():
    config = get_preset("mae_vit_base_patch16")
    assert encoder_flops(config, 196) / 1e9 == pytest.approx(35.1, abs=0.1)  # T = 197, no masking
    assert encoder_flops(config, 49) / 1e9 == pytest.approx(8.8, abs=0.05)  # T = 50, mask 0.75
    patch_embed = 2 * 196 * (16 * 16 * 3) * 768  # every patch is embedded before the kept ones are gathered
    one_token = 12 * (2 * 768 * 3 * 768 + 2 * 2 * 768 + 2 * 768 * 768 + 2 * 2 * 768 * 3072)
    assert encoder_flops(config, 0) == patch_embed + one_token


def test_measure_peaks_tiny():
    peaks, missing = measure_peaks(size=32, runs=1, cpu=AVX2_ONLY)
    assert set(peaks) == {"fp32", "int8"} and missing == {"bf16": "no bf16 instructions on this CPU"}
    for kind, peak in peaks.items():
        assert peak.kind == kind and peak.gflops > 0 and peak.shape == (32, 32, 32) and peak.runs == 1
        assert "onnxruntime" in peak.source and peak.to_dict()["unit"] in ("GFLOP/s", "GOP/s")
    # A CPU with bf16 instructions gets a bf16 peak (emulated here on CPUs without them: tiny, so cheap).
    bf16, _ = measure_peaks(size=32, runs=1, kinds=["bf16"], cpu=AMX)
    assert bf16["bf16"].gflops > 0 and bf16["bf16"].unit == "GFLOP/s"
    line = peaks_line(peaks, missing)
    assert line.startswith("peak GEMM (32x32x32, best of 1): fp32 ") and "bf16 not measured (no bf16" in line
    with pytest.raises(ValueError, match="fp4"):
        measure_peaks(kinds=["fp4"])
    assert PEAK_KINDS == ("fp32", "bf16", "int8")


def test_peak_kind_follows_the_compute_precision():
    assert [peak_kind(label, cpu=AMX) for label in ("torch", "onnx", "onnx-int8", "openvino-int8")] == [
        "fp32",
        "fp32",
        "int8",
        "int8",
    ]
    assert peak_kind("torch-bf16", cpu=AVX2_ONLY) == "bf16"
    assert peak_kind("openvino", cpu=AMX) == "bf16" and peak_kind("openvino", cpu=AVX2_ONLY) == "fp32"
    assert peak_kind("openvino-f32", cpu=AMX) == "fp32"
    assert peak_kind("onnx", on_cpu=False) is None  # a GPU row has no CPU peak


# ----------------------------------------------------------------------------------------- default engines
def test_default_engines_on_cpus_without_gpus():
    no_gpu = dict(gpus=[], packages=CPU_PACKAGES, onnx_providers=["CPUExecutionProvider"], torch_cuda=False)
    labels, left_out = default_engines("mae_vit_test_patch8", cpu=AVX2_ONLY, **no_gpu)
    assert labels == ["torch", "onnx", "onnx-int8", "openvino", "openvino-int8"]
    assert left_out["torch-bf16"] == "no bf16 instructions on this CPU"
    assert all(left_out[label] == "no CUDA GPU" for label in ("torch-cuda", "onnx-cuda", "trt", "trt-fp16"))
    assert left_out["onnx-fp16"] == left_out["openvino-f32"] == "only on request: --engines"
    labels, _ = default_engines("mae_vit_test_patch8", cpu=AMX, **no_gpu)
    assert labels == ["torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-int8"]

    without_openvino = {**no_gpu, "packages": {"onnxruntime": "1.32.0", "torch": "2.13.0"}}
    labels, left_out = default_engines("mae_vit_test_patch8", cpu=AVX2_ONLY, **without_openvino)
    assert labels == ["torch", "onnx", "onnx-int8"] and left_out["openvino-int8"] == "openvino is not installed"
    line = describe_choice(labels, left_out)
    assert line.startswith("engines: torch, onnx, onnx-int8; left out: torch-bf16 (no bf16 instructions")
    assert "openvino, openvino-int8 (openvino is not installed)" in line
    assert "torch-cuda, torch-cuda-fp16, onnx-cuda, trt, trt-fp16 (no CUDA GPU)" in line


def test_default_engines_follow_the_model(tmp_path):
    from mae.export import export_bundle

    config = get_preset("mae_vit_test_patch8")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", MaskedAutoencoder(config, decoder=False).state_dict(), config)
    facts = dict(cpu=AMX, gpus=[], packages=CPU_PACKAGES, onnx_providers=["CPUExecutionProvider"], torch_cuda=False)
    labels, left_out = default_engines(str(tmp_path / "model.pt"), **facts)
    assert labels == ["torch", "torch-bf16"] and "weights run on torch only" in left_out["onnx"]
    export_bundle(tmp_path / "model.pt", tmp_path / "bundle", precisions=["fp32"], verify=False)
    labels, left_out = default_engines(str(tmp_path / "bundle"), **facts)
    assert labels == ["torch", "torch-bf16", "onnx", "openvino"]
    assert left_out["onnx-int8"] == left_out["openvino-int8"] == "the bundle has no int8 graph"


def test_default_engines_with_a_gpu():
    gpu = dict(
        gpus=[GpuSummary("NVIDIA H200", "nvidia-smi")],
        packages={**CPU_PACKAGES, "tensorrt": "10.13", "cuda-python": "12.9"},
        onnx_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        torch_cuda=True,
    )
    labels, left_out = default_engines("mae_vit_test_patch8", cpu=AVX2_ONLY, **gpu)
    assert labels == [
        "torch",
        "onnx-cpu",
        "onnx-int8",
        "openvino",
        "openvino-int8",
        "torch-cuda",
        "torch-cuda-fp16",
    ] + ["onnx-cuda"]
    assert "onnx-cpu and onnx-cuda instead" in left_out["onnx"]  # "onnx" would pick the GPU by itself
    assert "built into a bundle" in left_out["trt"]  # a preset's temporary bundle has no TensorRT engines
    labels, left_out = default_engines("mae_vit_test_patch8", cpu=AVX2_ONLY, **{**gpu, "torch_cuda": False})
    assert "torch-cuda" not in labels and left_out["torch-cuda"] == "PyTorch here has no CUDA"
