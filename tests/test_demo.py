"""`mae demo` end to end, through the console script as the README runs it (short training budget)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mae.demo import mean_colour_baseline_psnr


def run_demo_cli(out: Path, seed: int = 0) -> dict:
    command = [sys.executable, "-m", "mae.cli", "demo", "--out", str(out), "--minutes", "0.05", "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "mae demo" in done.stdout  # the summary table
    summary = json.loads((out / "summary.json").read_text())
    assert ("reused:" in done.stdout) == summary["training"]["reused"]  # the table may wrap the rest
    return summary


@pytest.mark.slow
def test_demo_runs_every_step_and_repeats_with_the_same_seed(tmp_path):
    first = run_demo_cli(tmp_path / "first")
    out = tmp_path / "first"

    train = first["training"]
    assert train["steps"] >= 1 and math.isfinite(train["final_loss"])
    assert (out / "run" / "checkpoint.pt").is_file() and (out / "run" / "loss_curve.png").is_file()

    verification = first["export"]["verification"]
    assert verification["fp32"]["encoder"]["passed"] and verification["fp32"]["decoder"]["passed"]
    assert verification["fp32"]["encoder"]["max_abs_diff"] <= 1e-4
    assert verification["int8"]["encoder"]["passed"]

    recon = first["reconstruction"]
    for engine in ("onnx", "torch"):
        assert Path(recon[engine]["picture"]).is_file()
        assert math.isfinite(recon[engine]["psnr_db"]) and math.isfinite(recon[engine]["baseline_psnr_db"])
    assert recon["onnx_vs_torch_max_abs_pred"] < 1e-4

    counts = first["embedding"]["summary"]["counts"]
    photos = sorted((out / "photos").iterdir())
    assert counts["embedded"] == len(photos) >= 16 and counts["failed"] == 0
    assert sum(np.load(f).shape[0] for f in (out / "embeddings" / "embeddings").glob("*.npy")) == len(photos)

    engines = {row["engine"] for row in first["bench"] if not row.get("error")}
    assert {"torch", "onnx", "onnx-int8"} <= engines

    # the same seed in a fresh folder: the same training, export parity and reconstruction numbers
    second = run_demo_cli(tmp_path / "second")
    assert second["training"]["steps"] == train["steps"]
    assert second["training"]["final_loss"] == pytest.approx(train["final_loss"], rel=1e-5)
    for engine in ("onnx", "torch"):
        assert second["reconstruction"][engine]["psnr_db"] == pytest.approx(recon[engine]["psnr_db"], abs=1e-4)

    # again in the first folder: the training is reused, and its figures are the first run's, not 0 s / 0 img/s
    assert not train["reused"] and train["seconds"] > 0 and train["images_per_s"] > 0
    again = run_demo_cli(out)
    assert again["training"]["reused"] and again["training"]["steps"] == train["steps"]
    assert (
        again["training"]["seconds"] == train["seconds"] and again["training"]["images_per_s"] == train["images_per_s"]
    )


def test_mean_colour_baseline_fills_removed_patches_with_the_visible_mean():
    # 2x2 patches of 1 px: the visible patches are 0.2 and 0.4 (mean 0.3); removed ones are 0.3 and 0.9
    original = np.array([0.2, 0.4, 0.3, 0.9], dtype=np.float32).reshape(1, 2, 2, 1).repeat(3, axis=-1)
    mask = np.array([[0, 0, 1, 1]], dtype=np.float32)
    mse = ((0.3 - 0.3) ** 2 + (0.9 - 0.3) ** 2) / 2
    assert mean_colour_baseline_psnr(original, mask, patch_size=1)[0] == pytest.approx(10 * np.log10(1 / mse))


def test_summary_flags_a_bench_row_below_the_gate():
    """As `mae bench` does: an engine whose pooled cosine is below 0.999 is marked in the demo's summary too."""
    import io

    from rich.console import Console

    from mae.demo import print_summary

    engine = {"psnr_db": 20.0, "baseline_psnr_db": 14.0, "picture": "r.png"}
    row = {"engine": "onnx-int8", "mask_ratio": 0.75, "images_per_s": 10.0, "ratio_vs_torch": 2.0}
    summary = {
        "seed": 0,
        "seconds": 1.0,
        "summary_json": "summary.json",
        "training": {
            "preset": "p",
            "steps": 1,
            "epochs": 1,
            "seconds": 1.0,
            "images_per_s": 1.0,
            "final_loss": 0.5,
            "stopped": "completed",
            "reused": False,
            "loss_curve": "loss.png",
        },  # fmt: skip
        "export": {"verification": {}, "bundle": "bundle"},
        "reconstruction": {"onnx": engine, "torch": engine, "onnx_vs_torch_max_abs_pred": 0.0},
        "embedding": {"summary": {"counts": {"embedded": 1, "failed": 0}}, "out": "emb"},
        "bench": [
            {**row, "cosine_cls": 0.99, "cosine_mean": 0.9995, "below_gate": True},
            {**row, "mask_ratio": 0.0, "cosine_cls": 0.9999, "cosine_mean": 0.9999, "below_gate": False},
        ],
    }
    console = Console(file=io.StringIO(), width=200)
    print_summary(summary, console)
    lines = [line for line in console.file.getvalue().splitlines() if "bench onnx-int8" in line]
    assert len(lines) == 2 and "below the 0.999 gate" in lines[0] and "below" not in lines[1]
    assert "mean of the last epoch" in console.file.getvalue()
