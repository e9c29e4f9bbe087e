"""`mae bench`: engine specs, interleaved timing, rows with ratios and cosines, the CLI and its JSON."""

from __future__ import annotations

import gc
import json
import sys

import numpy as np
import pytest
import torch

from mae.checkpoint import save_checkpoint
from mae.config import get_preset
from mae.errors import MAEError
from mae.model import MaskedAutoencoder
from mae.runtime.bench import bench, cosine_rows, parse_engines, pooled, summary_lines, timing_rounds
from mae.runtime.hardware import cpu_info


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
    rows = bench(str(tmp_path / "model.pt"), "torch-bf16", batch_size=2, mask_ratios=[0.5], seconds=0.0, progress=False)
    assert [r["engine"] for r in rows] == ["torch", "torch-bf16"]  # the baseline is added
    assert rows[0]["ratio_vs_torch"] == 1.0 and rows[0]["cosine_cls"] == pytest.approx(1.0)
    assert rows[1]["kept"] == 8
    if cpu_info().native_bf16:
        assert rows[1]["cosine_mean"] > 0.999
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


def test_cli_help_lists_every_engine():
    from typer.testing import CliRunner

    from mae.cli import app
    from mae.runtime.bench import ENGINE_SPECS

    result = CliRunner().invoke(app, ["bench", "--help"], terminal_width=200)
    assert result.exit_code == 0
    listed = {word.strip(",.") for word in result.output.split()}
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
