"""`mae demo`: the whole toolkit on real photos that ship inside scikit-image and scikit-learn, offline.

Steps: gather photos (a few held out) -> pretrain a CPU-sized MAE on random crops -> export encoder + decoder to ONNX
(fp32 and int8, verified) -> reconstruct the held-out photos with ONNX Runtime and PyTorch -> embed every photo ->
benchmark the engines -> a summary table (also `summary.json`).

The training budget is a number of optimizer steps derived from `--minutes` and a nominal speed measured on the
project's 2-core reference CPU (NOMINAL_IMAGES_PER_S), not a wall-clock stop, so two runs with the same seed train
exactly the same steps and give the same numbers up to floating-point noise. A slower machine takes longer; a
safety stop at max(3x the budget, 10 minutes) keeps it bounded (the summary says when it was hit; a short budget
must not make the stop, and so the numbers, depend on how busy the machine is).
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from mae.export import export_bundle
from mae.runtime.embed import embed
from mae.runtime.engines.auto import GATE
from mae.runtime.reconstruct import reconstruct, save_picture

from .benchmark import bench
from .core.errors import MAEError
from .core.files import atomic_write_bytes, atomic_write_text, make_dirs
from .core.visualize import mask_to_pixels, panels_picture
from .data import shipped_photos, split_holdout
from .reports.embed import EmbedBar
from .reports.train import RichTrainReporter
from .train import TrainOptions, TrainResult, run_training

PRESET = "mae_vit_mini_patch8"  # 64 px, 8 px patches, 6 + 2 blocks
BATCH_SIZE = 32
HELD_OUT = 4  # photos kept out of training (the trainer's preview set), reconstructed at the end
REPEAT = 64  # random crops of each photo per epoch (an epoch is then ~1000 crops)
NOMINAL_IMAGES_PER_S = 160.0  # training speed of PRESET at BATCH_SIZE on the reference CPU (see module docstring)
PEAK_LR = 1.5e-3
MASK_RATIO = 0.75
SAFETY_MINUTES = 10.0  # wall-clock stop for training only a very slow machine reaches
PHOTO_SIDE = 256  # shorter side of the photos written for training


def gather_photos(folder: Path) -> list[Path]:
    """Write the shipped photos to `folder` as PNG, shorter side at most PHOTO_SIDE; returns the sorted paths.

    The model sees 64 px crops, so smaller files lose nothing and keep decoding from bounding training speed.
    """
    make_dirs(folder)
    arrays = shipped_photos()
    paths = []
    for name, array in arrays.items():
        path = folder / f"{name}.png"
        if not path.exists():
            image = Image.fromarray(np.ascontiguousarray(array).astype(np.uint8))
            scale = PHOTO_SIDE / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())  # a kill never leaves a half photo that a rerun reuses
        paths.append(path)
    return sorted(paths)


def mean_colour_baseline_psnr(original: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """PSNR on removed patches when each removed patch is filled with the mean colour of the visible ones.

    original [N, S, S, 3] in [0, 1]; mask [N, L] (1 = removed) -> [N] dB.
    """

    removed = mask_to_pixels(mask, patch_size, original.shape[1])  # [N, S, S, 1]
    visible = 1.0 - removed
    mean_colour = (original * visible).sum(axis=(1, 2)) / np.maximum(visible.sum(axis=(1, 2)), 1.0)  # [N, 3]
    squared = (original - mean_colour[:, None, None, :]) ** 2 * removed  # [N, S, S, 3]
    mse = squared.sum(axis=(1, 2, 3)) / np.maximum(removed.sum(axis=(1, 2, 3)) * 3, 1.0)
    return (10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))).astype(np.float32)


TRAINING_FIGURES = "demo_training.json"  # in the run folder: time and speed of the sessions that trained it


def training_figures(run_dir: Path, result: TrainResult) -> dict[str, Any]:
    """Seconds, images/s and how training ended, over every session that trained this run.

    A rerun in the same folder reuses the finished training (a session of 0 s): it reports the figures of the
    sessions that did the work, recorded beside the checkpoint, and says the training was reused.
    """
    path = run_dir / TRAINING_FIGURES
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        recorded = {"seconds": 0.0, "images": 0.0, "stopped": None}
    if result.stopped != "already_complete":
        recorded = {
            "seconds": recorded["seconds"] + result.seconds,
            "images": recorded["images"] + result.images_per_s * result.seconds,
            "stopped": result.stopped,
        }
        atomic_write_text(path, json.dumps(recorded) + "\n")
    seconds = recorded["seconds"]
    return {
        "seconds": round(seconds, 1),
        "images_per_s": round(recorded["images"] / seconds, 1) if seconds > 0 else None,
        "stopped": recorded["stopped"] or result.stopped,
        "reused": result.stopped == "already_complete",
    }


def training_steps(minutes: float) -> int:
    return max(1, int(minutes * 60 * NOMINAL_IMAGES_PER_S / BATCH_SIZE))


def run_demo(out: Path = Path("mae-demo"), minutes: float = 3.0, seed: int = 0, progress: bool = True) -> dict:
    """Run every step; returns the summary (also written to OUT/summary.json and printed)."""
    if minutes <= 0:
        raise MAEError(f"--minutes must be positive, got {minutes}")
    console = Console()
    out = make_dirs(out)
    summary: dict[str, Any] = {"seed": seed, "minutes": minutes}
    started = time.perf_counter()

    console.rule("[bold]1/6 photos")
    train_paths, held_out = demo_photos(out, console)
    console.rule("[bold]2/6 pretraining")
    result, summary["training"] = pretrain(out, len(train_paths), minutes, seed, progress)
    console.rule("[bold]3/6 export to ONNX (fp32 + int8), verified against PyTorch")
    bundle_dir, summary["export"] = export_to_onnx(out, result.checkpoint)
    console.rule("[bold]4/6 reconstruction of the held-out photos")
    summary["reconstruction"] = reconstruct_held_out(out, held_out, bundle_dir, result.checkpoint, seed)
    console.rule("[bold]5/6 embedding every photo")
    summary["embedding"] = embed_photos(out, bundle_dir, progress)
    console.rule("[bold]6/6 engine benchmark (encoder, batch 8)")
    summary["bench"] = bench_engines(bundle_dir, minutes, seed, progress)

    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["summary_json"] = str(out / "summary.json")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print_summary(summary, console)
    return summary


def demo_photos(out: Path, console: Console) -> tuple[list[Path], list[Path]]:
    """Step 1: the shipped photos in OUT/photos; -> (training paths, held-out paths)."""
    photo_paths = gather_photos(out / "photos")
    train_paths, held_out = split_holdout(photo_paths, HELD_OUT)
    held_out = sorted(held_out)
    console.print(f"{len(photo_paths)} photos from scikit-image / scikit-learn; held out: {[p.name for p in held_out]}")
    return train_paths, held_out


def pretrain(out: Path, train_images: int, minutes: float, seed: int, progress: bool) -> tuple[TrainResult, dict]:
    """Step 2: train PRESET in OUT/run for the budget's steps (resumed, or reused, when the folder has a run)."""
    steps = training_steps(minutes)
    steps_per_epoch = max(1, train_images * REPEAT // BATCH_SIZE)
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    run_dir = out / "run"
    options = TrainOptions(
        data=out / "photos",
        model=PRESET,
        epochs=epochs,
        warmup_epochs=max(1, epochs // 10),
        batch_size=BATCH_SIZE,
        lr=PEAK_LR,
        mask_ratio=MASK_RATIO,
        norm_pix_loss=False,  # pixel targets: reconstructions are pictures a person can judge
        precision="fp32",
        out=run_dir,
        seed=seed,
        workers=1,
        save_every=max(1, epochs),
        max_minutes=max(3 * minutes, SAFETY_MINUTES),
        preview_images=HELD_OUT,
        repeat=REPEAT,
        resume=(run_dir / "checkpoint.pt").exists(),
        progress=progress,
    )
    result = run_training(options, RichTrainReporter())
    figures = {
        "preset": PRESET,
        "steps": result.global_step,
        "epochs": result.epochs_completed,
        **training_figures(run_dir, result),
        "final_loss": result.final_loss,
        "checkpoint": str(result.checkpoint),
        "loss_curve": str(run_dir / "loss_curve.png"),
    }
    return result, figures


def export_to_onnx(out: Path, checkpoint: Path) -> tuple[Path, dict[str, Any]]:
    """Step 3: the fp32 + int8 bundle in OUT/bundle, each graph verified against PyTorch."""
    bundle_dir = out / "bundle"
    bundle = export_bundle(checkpoint, bundle_dir, precisions=("fp32", "int8"))
    return bundle_dir, {"bundle": str(bundle_dir), "verification": bundle.manifest.get("verification", {})}


def reconstruct_held_out(out: Path, held_out: list[Path], bundle_dir: Path, checkpoint: Path, seed: int) -> dict:
    """Step 4: the held-out photos reconstructed by ONNX Runtime and by PyTorch, against a mean-colour baseline."""
    recon: dict[str, Any] = {}
    for engine, model in (("onnx", str(bundle_dir)), ("torch", str(checkpoint))):
        res = reconstruct(held_out, model, engine=engine, mask_ratio=MASK_RATIO, seed=seed)
        picture = panels_picture(res.panels, MASK_RATIO, res.norm_pix_loss, row_labels=res.row_labels())
        picture_path = out / f"reconstruction_{engine}.png"
        save_picture(picture, picture_path)
        baseline = mean_colour_baseline_psnr(res.panels.original, res.mask, res.config.patch_size)
        recon[engine] = {
            "picture": str(picture_path),
            "psnr_db": float(np.mean(res.metrics.psnr)),
            "baseline_psnr_db": float(np.mean(baseline)),
            "per_image_psnr_db": {n: float(v) for n, v in zip(res.names, res.metrics.psnr, strict=True)},
            "pred": res.pred,
        }
    recon["onnx_vs_torch_max_abs_pred"] = float(np.max(np.abs(recon["onnx"].pop("pred") - recon["torch"].pop("pred"))))
    return recon


def embed_photos(out: Path, bundle_dir: Path, progress: bool) -> dict[str, Any]:
    """Step 5: every photo embedded (class token) into OUT/embeddings."""
    embed_dir = out / "embeddings"
    embed_summary = embed(
        out / "photos", bundle_dir, embed_dir, engine="onnx", pool="cls", batch_size=8, workers=1,
        progress=EmbedBar() if progress else False,
    )  # fmt: skip
    return {"out": str(embed_dir), "summary": embed_summary}


def bench_engines(bundle_dir: Path, minutes: float, seed: int, progress: bool) -> list[dict[str, Any]]:
    """Step 6: the encoder's speed and agreement per engine, batch 8, at the training mask ratio and unmasked."""
    return bench(
        str(bundle_dir),
        engines=("torch", "onnx", "onnx-int8", "openvino"),
        batch_size=8,
        mask_ratios=(MASK_RATIO, 0.0),
        seconds=2.0 if minutes >= 1 else 0.5,  # short runs (tests) time briefly
        seed=seed,
        progress=progress,
    )


def export_parity(verification: dict[str, Any]) -> list[tuple[str, float, bool]]:
    """(precision graph, largest |diff| against PyTorch, passed) for every verified graph of the bundle."""
    rows = []
    for precision, graphs in verification.items():
        for graph, report in graphs.items():
            if isinstance(report, dict) and report.get("max_abs_diff") is not None:
                rows.append((f"{precision} {graph}", float(report["max_abs_diff"]), bool(report.get("passed"))))
    return rows


def print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"mae demo (seed {summary['seed']})", show_header=True, header_style="bold")
    table.add_column("step")
    table.add_column("result")
    train = summary["training"]
    speed = "" if train["images_per_s"] is None else f", {train['images_per_s']:.0f} img/s"
    took = f"in {train['seconds']:.0f} s{speed}" if train["seconds"] else "(time not recorded)"
    table.add_row(
        "training",
        f"{train['preset']}, {train['steps']} steps ({train['epochs']} epochs) {took}; final loss "
        f"{train['final_loss']:.4f} (mean of the last epoch)"
        + (" (stopped early by the safety time limit)" if train["stopped"] == "max_minutes" else "")
        + (" - reused: the finished training in this folder" if train.get("reused") else ""),
    )
    for name, diff, passed in export_parity(summary["export"]["verification"]):
        table.add_row(f"export {name}", f"max |ONNX - PyTorch| {diff:.2e} ({'verified' if passed else 'FAILED'})")
    recon = summary["reconstruction"]
    for engine in ("onnx", "torch"):
        table.add_row(
            f"held-out PSNR, {engine}",
            f"{recon[engine]['psnr_db']:.2f} dB on removed patches (mean-colour baseline "
            f"{recon[engine]['baseline_psnr_db']:.2f} dB)",
        )
    table.add_row("onnx vs torch", f"max |pred difference| {recon['onnx_vs_torch_max_abs_pred']:.2e}")
    emb = summary["embedding"]["summary"]
    counts = emb.get("counts", {})
    table.add_row("embedding", f"{counts.get('embedded', '?')} photos embedded, {counts.get('failed', 0)} failed")
    for row in summary["bench"]:
        label = f"bench {row['engine']}, mask {row['mask_ratio']:g}"
        if row.get("error"):
            table.add_row(label, f"not run: {row['error']}")
        else:
            table.add_row(
                label,
                f"{row['images_per_s']:.0f} img/s ({row['ratio_vs_torch']:.2f}x torch fp32), "
                f"cosine {min(row['cosine_cls'], row['cosine_mean']):.5f}"
                + (f" ! below the {GATE} gate" if row.get("below_gate") else ""),
            )
    table.add_row("reconstructions", "\n".join(recon[e]["picture"] for e in ("onnx", "torch")))
    table.add_row("loss curve", train["loss_curve"])
    table.add_row("embeddings", summary["embedding"]["out"])
    table.add_row("bundle", summary["export"]["bundle"])
    table.add_row("summary", summary["summary_json"])
    table.add_row("total time", f"{summary['seconds']:.0f} s")
    console.print(table)
