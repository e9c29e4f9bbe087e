"""`mae demo`: the whole toolkit on labelled images that ship with scikit-learn (8 x 8 handwritten digits), offline.

Steps: the digits written as PNG class folders (every 5th one held out) -> pretrain a small MAE on the training
digits -> export encoder + decoder to ONNX (fp32, and int8 where it passes its gate on this CPU), verified ->
reconstruct the held-out digits with ONNX Runtime and PyTorch, against two baselines that fill the removed patches
without a model (mean colour, Laplace fill; `mae.core.baselines`) -> `mae eval` kNN and linear probe of the encoder's
features against raw pixels -> `mae index` + `mae search` of held-out digits among the training ones (a contact
sheet) -> benchmark the engines -> a summary table (also `summary.json`).

Why digits, not photos: on 2 CPU cores a few minutes of pretraining is some 10^5 images. On ~20 photos that is not
enough to learn anything a mean colour or a smooth fill does not already give (the demo used to show 0.2 dB over the
mean colour); on 1437 aligned digits it learns strokes: several dB over both baselines. Photos still show the
engines and the embedding (`mae embed`, `mae bench`, the export's own verification).

The budget is a number of optimizer steps (`--steps`), so two runs with the same seed train exactly the same steps and
give the same numbers up to floating-point noise; the time this takes here is estimated from a few timed steps and
printed before training. `--minutes` is kept as a deprecated alias, converted to steps at the reference CPU's speed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from mae.export import export_bundle
from mae.export.onnx_bundle import Int8Options
from mae.runtime.bench import default_engines
from mae.runtime.embed import model_checksum
from mae.runtime.engines.auto import GATE
from mae.runtime.evaluate import evaluate
from mae.runtime.index import build_index
from mae.runtime.reconstruct import ReconstructionResult, reconstruct, save_picture
from mae.runtime.search import search
from mae.runtime.sheets import search_sheet

from .benchmark import bench
from .core.baselines import baseline_fills, masked_psnr
from .core.bundle import Bundle
from .core.config import get_preset
from .core.errors import MAEError, MissingDependency
from .core.files import atomic_write_bytes, atomic_write_text, make_dirs
from .core.visualize import Panels, mask_to_pixels, panels_picture, reconstruction_panels
from .data import shipped_digits
from .model import MaskedAutoencoder
from .reports.eval import EvalBar
from .reports.export import ExportSpinner
from .reports.reconstruct import BatchBar
from .reports.search import StageBar
from .reports.train import RichTrainReporter
from .train import OtherSettings, TrainOptions, TrainResult, run_training

PRESET = "mae_vit_digits_patch4"  # 32 px digits, 4 px patches (64), see mae.core.config
DIGIT_SIDE = 32  # the 8 x 8 digits enlarged (bicubic): one 4 px patch per original pixel
HELD_OUT_EVERY = 5  # digit i is held out when i % 5 == 0 (360 of 1797): never trained on, reconstructed and queried
BATCH_SIZE = 64
MASK_RATIO = 0.75  # the paper's: 16 of the 64 patches visible
PEAK_LR = 2e-3
DEFAULT_STEPS = 1500
REPEAT = 4  # passes over the training digits per epoch (fresh crops each): fewer epoch ends (checkpoint, preview)
NOMINAL_STEPS_PER_S = 8.0  # PRESET at BATCH_SIZE on the 2-core reference CPU, quiet: converts --minutes to steps
# A training step costs more than the timed forward + backward: the data worker shares the cores, epochs end with a
# checkpoint and a preview. Measured on the reference CPU: 1513 steps in 194 s against 88 ms per timed step.
LOOP_OVERHEAD = 1.45
POOL = "mean"  # the MAE loss never reaches the class token directly: the patch tokens carry what the encoder learnt
PICTURE_ROWS = 8  # held-out digits in the reconstruction pictures, spread over the classes
SEARCH_QUERIES = 6  # held-out digits searched among the training ones
SEARCH_K = 8


@dataclass(frozen=True)
class Digits:
    """The demo's data: class folders of PNGs (OUT/digits/train/3/0123.png), the held-out ones separate."""

    train: Path  # OUT/digits/train: pretraining, and the labelled train side of `mae eval` and the index
    val: Path  # OUT/digits/val: held out of pretraining; reconstructed, evaluated, queried
    val_paths: list[Path]  # sorted by class, then index

    def spread(self, count: int) -> list[Path]:
        """`count` held-out digits evenly spread over the sorted list (so over the classes)."""
        count = min(count, len(self.val_paths))
        return [self.val_paths[int((i + 0.5) * len(self.val_paths) / count)] for i in range(count)]


def write_digits(folder: Path, side: int = DIGIT_SIDE) -> Digits:
    """Write scikit-learn's digits as RGB PNGs of `side` px into FOLDER/train/<label>/ and FOLDER/val/<label>/.

    Written once (a rerun reuses the files); each file atomically, so a killed run never leaves half a digit.
    """
    images, labels = shipped_digits()
    val_paths = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        split = "val" if index % HELD_OUT_EVERY == 0 else "train"
        path = folder / split / str(int(label)) / f"{index:04d}.png"
        if split == "val":
            val_paths.append(path)
        if path.exists():
            continue
        enlarged = Image.fromarray(image, "L").resize((side, side), Image.Resampling.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        enlarged.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
    return Digits(folder / "train", folder / "val", sorted(val_paths))


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


def budget_steps(steps: int | None, minutes: float | None) -> tuple[int, str | None]:
    """(optimizer steps, a deprecation note or None) from --steps or the deprecated --minutes."""
    if steps is not None and minutes is not None:
        raise MAEError("--steps and --minutes both given.", hint="use --steps (--minutes is deprecated)")
    if minutes is not None:
        if not minutes > 0:
            raise MAEError(f"--minutes must be positive, got {minutes}")
        converted = max(1, int(minutes * 60 * NOMINAL_STEPS_PER_S))
        return converted, (
            f"--minutes is deprecated: {minutes:g} min is {converted} steps at the reference CPU's "
            f"{NOMINAL_STEPS_PER_S:g} steps/s (not a wall-clock limit); use --steps {converted}"
        )
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        raise MAEError(f"--steps must be at least 1, got {steps}")
    return steps, None


def training_schedule(steps: int, train_images: int) -> tuple[int, int]:
    """(repeat, epochs) for about `steps` optimizer steps; the trainer trains whole epochs, so steps round up.

    A budget too small for REPEAT passes per epoch uses fewer (a test's few steps stay a few steps)."""
    per_pass = max(1, train_images // BATCH_SIZE)
    repeat = max(1, min(REPEAT, steps // (per_pass * 4)))
    return repeat, max(1, math.ceil(steps / (train_images * repeat // BATCH_SIZE)))


def seconds_per_step(preset: str, timed: int = 3) -> float:
    """Forward + backward + AdamW of one batch of PRESET, timed here on random data (one untimed step first).

    Runs on a throwaway model inside a forked RNG, so the seeded training that follows is unchanged."""
    config = get_preset(preset)
    with torch.random.fork_rng():
        model = MaskedAutoencoder(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(BATCH_SIZE, config.in_chans, config.img_size, config.img_size)
        for index in range(timed + 1):
            if index == 1:
                started = time.perf_counter()
            model(images, mask_ratio=MASK_RATIO).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / timed


class _Stages:
    """`with stage("export", "export to ONNX ..."):` draws the stage's numbered rule and records its seconds in
    summary["stage_seconds"][key]."""

    def __init__(self, console: Console, summary: dict[str, Any]) -> None:
        self.console = console
        self.seconds: dict[str, float] = summary.setdefault("stage_seconds", {})

    @contextlib.contextmanager
    def __call__(self, key: str, title: str) -> Iterator[None]:
        self.console.rule(f"[bold]{len(self.seconds) + 1}/7 {title}")
        started = time.perf_counter()
        yield
        self.seconds[key] = round(time.perf_counter() - started, 1)


def run_demo(
    out: Path = Path("mae-demo"),
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    minutes: float | None = None,
) -> dict:
    """Run every step; returns the summary (also written to OUT/summary.json and printed).

    steps: optimizer steps of pretraining (default DEFAULT_STEPS); minutes: deprecated, converted to steps."""
    steps, deprecation = budget_steps(steps, minutes)
    console = Console()
    if deprecation:
        console.print(f"[yellow]note:[/] {deprecation}")
    out = make_dirs(out)
    summary: dict[str, Any] = {"seed": seed, "steps_asked": steps}
    started = time.perf_counter()

    stage = _Stages(console, summary)
    with stage("digits", "digits"):
        digits = demo_digits(out, console)
    with stage("pretraining", "pretraining"):
        result, summary["training"] = pretrain(out, digits, steps, seed, progress, console)
    with stage("export", "export to ONNX (fp32 + int8), verified against PyTorch"):
        bundle_dir, summary["export"] = export_to_onnx(out, result.checkpoint, digits, progress, console)
    with stage("reconstruction", "reconstruction of the held-out digits, against two baselines"):
        summary["reconstruction"] = reconstruct_held_out(out, digits, bundle_dir, result.checkpoint, seed, progress)
    with stage("eval", f"mae eval: kNN and linear probe ({POOL} pool) against raw pixels"):
        summary["eval"] = evaluate_embeddings(out, digits, bundle_dir, progress)
    with stage("search", "mae index + mae search: held-out digits among the training ones"):
        summary["search"] = search_digits(out, digits, bundle_dir, summary["eval"], progress)
    with stage("bench", "engine benchmark (encoder, batch 8)"):
        summary["bench"] = bench_engines(bundle_dir, steps, seed, progress, console)

    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["summary_json"] = str(out / "summary.json")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print_summary(summary, console)
    return summary


def demo_digits(out: Path, console: Console) -> Digits:
    """Step 1: the shipped digits in OUT/digits/{train,val}/<label>/."""
    with console.status("writing the digits as PNG class folders"):
        digits = write_digits(out / "digits")
    train_count = sum(1 for _ in digits.train.rglob("*.png"))
    console.print(
        f"{train_count + len(digits.val_paths)} handwritten digits from scikit-learn (8 x 8, enlarged to "
        f"{DIGIT_SIDE} px): {train_count} to train on, {len(digits.val_paths)} held out (every {HELD_OUT_EVERY}th)"
    )
    return digits


def pretrain(
    out: Path, digits: Digits, steps: int, seed: int, progress: bool, console: Console
) -> tuple[TrainResult, dict]:
    """Step 2: train PRESET on the training digits for about `steps` steps (resumed, or reused, when OUT/run has a
    run). The trainer holds 4 of them out for its per-epoch previews."""
    run_dir = out / "run"
    train_images = sum(1 for _ in digits.train.rglob("*.png")) - 4
    repeat, epochs = training_schedule(steps, train_images)
    planned = epochs * (train_images * repeat // BATCH_SIZE)
    if not (run_dir / TRAINING_FIGURES).exists() or not (run_dir / "checkpoint.pt").exists():
        per_step = seconds_per_step(PRESET) * LOOP_OVERHEAD
        console.print(
            f"{planned} steps of {BATCH_SIZE} ({epochs} epochs of {repeat} pass(es)); expected about "
            f"{planned * per_step:.0f} s here ({per_step * 1000:.0f} ms per step: 3 steps timed now, plus data "
            f"loading), {planned / NOMINAL_STEPS_PER_S:.0f} s on the 2-core reference CPU"
        )
    options = TrainOptions(
        data=digits.train, model=PRESET, epochs=epochs, warmup_epochs=max(1, round(epochs / 20)) if epochs > 1 else 0,
        batch_size=BATCH_SIZE, lr=PEAK_LR, mask_ratio=MASK_RATIO,
        norm_pix_loss=False,  # pixel targets: reconstructions are pictures a person can judge
        precision="fp32", out=run_dir, seed=seed, workers=1, save_every=max(1, epochs), preview_images=4,
        repeat=repeat, resume=(run_dir / "checkpoint.pt").exists(), progress=progress,
    )  # fmt: skip
    try:
        result = run_training(options, RichTrainReporter())
    except OtherSettings as exc:  # the trainer's hint names --resume, which the demo has no option for
        raise MAEError(
            f"{out} holds a demo trained with other settings ({'; '.join(exc.differences)}).",
            hint=f"rerun with that run's --steps and --seed, choose another --out, or delete {run_dir}",
        ) from exc
    if result.stopped == "interrupted":  # the trainer saved a checkpoint: the next run continues from it
        console.print(
            f"[yellow]Pretraining stopped at step {result.global_step} of {planned}; its checkpoint is saved.[/] "
            f"Run mae demo --out {out} --steps {steps} --seed {seed} again to continue (the later steps need the "
            "finished model)."
        )
        raise KeyboardInterrupt
    figures = {
        "preset": PRESET,
        "steps": result.global_step,
        "epochs": result.epochs_completed,
        "batch_size": BATCH_SIZE,
        "peak_lr": PEAK_LR,
        "mask_ratio": MASK_RATIO,
        **training_figures(run_dir, result),
        "final_loss": result.final_loss,
        "checkpoint": str(result.checkpoint),
        "loss_curve": str(run_dir / "loss_curve.png"),
    }
    return result, figures


def export_to_onnx(
    out: Path, checkpoint: Path, digits: Digits, progress: bool, console: Console
) -> tuple[Path, dict[str, Any]]:
    """Step 3: the fp32 bundle in OUT/bundle, then its int8 encoder calibrated on training digits; each graph
    verified against PyTorch. An int8 encoder that misses its gate on this CPU is left out (with a note), not an
    error: the rest of the demo runs on fp32."""
    bundle_dir = out / "bundle"
    spinner = ExportSpinner() if progress else None
    bundle = export_bundle(checkpoint, bundle_dir, precisions=("fp32",), resize="squash", progress=spinner)
    int8_note = None
    try:
        int8 = Int8Options(calibration=str(digits.train))
        bundle = export_bundle(checkpoint, bundle_dir, precisions=("int8",), progress=spinner, int8=int8)
    except MAEError as exc:
        int8_note = f"int8 encoder left out: {exc.message}"
        console.print(f"[yellow]note:[/] {int8_note}")
    figures = {"bundle": str(bundle_dir), "verification": bundle.manifest.get("verification", {})}
    return bundle_dir, {**figures, "int8_note": int8_note}


def reconstruct_held_out(
    out: Path, digits: Digits, bundle_dir: Path, checkpoint: Path, seed: int, progress: bool
) -> dict[str, Any]:
    """Step 4: every held-out digit reconstructed by ONNX Runtime and by PyTorch with the same masks; PSNR on the
    removed patches against the mean-colour and Laplace fills of the same masks; the pictures of a few."""
    recon: dict[str, Any] = {}
    for engine, model in (("onnx", str(bundle_dir)), ("torch", str(checkpoint))):
        res = reconstruct(
            digits.val_paths, model, engine=engine, precision="fp32", mask_ratio=MASK_RATIO, seed=seed,
            resize="squash", batch_size=64, progress=BatchBar() if progress else None,
        )  # fmt: skip
        recon[engine] = {"psnr_db": float(np.mean(res.metrics.psnr)), "pred": res.pred, "result": res}
    res = recon["onnx"]["result"]
    fills = baseline_fills(res.panels.original, res.mask, res.config.patch_size)
    removed = mask_to_pixels(res.mask, res.config.patch_size, res.config.img_size)
    baselines = {name: masked_psnr(res.panels.original, fill, removed) for name, fill in fills.items()}
    recon["baselines_db"] = {name: float(np.mean(values)) for name, values in baselines.items()}
    for engine in ("onnx", "torch"):
        recon[engine]["margin_db"] = recon[engine]["psnr_db"] - max(recon["baselines_db"].values())
    recon["images"] = len(digits.val_paths)
    recon["onnx_vs_torch_max_abs_pred"] = float(np.max(np.abs(recon["onnx"]["pred"] - recon["torch"]["pred"])))
    chosen = [digits.val_paths.index(path) for path in digits.spread(PICTURE_ROWS)]
    results = {engine: recon[engine]["result"] for engine in ("onnx", "torch")}
    recon["pictures"] = reconstruction_pictures(out, results, fills["laplace"], baselines, chosen, digits.val_paths)
    for engine in ("onnx", "torch"):
        del recon[engine]["pred"], recon[engine]["result"]
    return recon


def reconstruction_pictures(
    out: Path,
    results: dict[str, ReconstructionResult],
    laplace: np.ndarray,
    baselines: dict[str, np.ndarray],
    chosen: list[int],
    paths: list[Path],
) -> dict[str, str]:
    """The 4-panel pictures of the chosen held-out digits per engine, and the MAE beside the Laplace fill."""
    names = [f"{paths[i].parent.name}/{paths[i].name}" for i in chosen]
    pictures = {}
    for engine, res in results.items():
        labels = [
            f"{name}: MAE {res.metrics.psnr[i]:.1f} dB, Laplace fill {baselines['laplace'][i]:.1f} dB, "
            f"mean colour {baselines['mean_colour'][i]:.1f} dB"
            for name, i in zip(names, chosen, strict=True)
        ]
        panels = Panels(*(panel[chosen] for panel in res.panels))
        path = out / f"reconstruction_{engine}.png"
        save_picture(panels_picture(panels, MASK_RATIO, res.norm_pix_loss, row_labels=labels), path)
        pictures[engine] = str(path)
    panels = results["onnx"].panels
    titles = ("original", f"masked {MASK_RATIO:.0%}", "Laplace fill (baseline)", "MAE (+ visible)")
    picture = reconstruction_panels(
        panels.original[chosen], panels.masked[chosen], laplace[chosen], panels.reconstruction_visible[chosen],
        titles=titles, row_labels=names,
    )  # fmt: skip
    path = out / "reconstruction_vs_laplace.png"
    save_picture(picture, path)
    pictures["vs_laplace"] = str(path)
    return pictures


def evaluate_embeddings(out: Path, digits: Digits, bundle_dir: Path, progress: bool) -> dict[str, Any]:
    """Step 5: `mae eval knn` and `mae eval linear` of the encoder's features (ONNX Runtime fp32: the same numbers on
    every CPU) on the training digits -> the held-out ones, each beside raw pixels; the second reuses the
    embeddings of the first."""
    results: dict[str, Any] = {"out": str(out / "eval"), "pool": POOL}
    drop_stale_embeddings(out / "eval", bundle_dir)
    for kind in ("knn", "linear"):
        report = evaluate(
            kind, digits.train, digits.val, bundle_dir, out=out / "eval", engine="onnx", precision="fp32", pool=POOL,
            workers=1, progress=EvalBar() if progress else False,
        )  # fmt: skip
        results[kind] = {
            "model_top1": report["model"]["top1"],
            "pixels_top1": report["pixels"]["top1"],
            "model_mean_per_class": report["model"]["mean_per_class"],
            "pixels_mean_per_class": report["pixels"]["mean_per_class"],
            "picture": report["picture"],
            "report": str(out / "eval" / f"report-{kind}.json"),
        }
    results["train_embeddings"] = str(out / "eval" / "embeddings" / "train")
    return results


def drop_stale_embeddings(folder: Path, bundle_dir: Path) -> None:
    """Remove the demo's own `mae eval` folder when its embeddings were made by another model than `bundle_dir`'s
    (a rerun that trained further, e.g. after an interrupted one): `mae eval` rightly refuses to mix models in one
    folder, and this one holds nothing but what the demo derives again."""
    runs = sorted(folder.glob("embeddings/*/run.json"))
    if not runs:
        return
    current = model_checksum(str(bundle_dir), "onnx", "fp32")
    for run in runs:
        try:
            recorded = json.loads(run.read_text()).get("params", {}).get("model_sha256")
        except (OSError, ValueError):
            recorded = None
        if recorded != current:
            shutil.rmtree(folder)
            return


def search_digits(
    out: Path, digits: Digits, bundle_dir: Path, evaluation: dict[str, Any], progress: bool
) -> dict[str, Any]:
    """Step 6: an exact index of the training digits' embeddings (those `mae eval` made), held-out digits as queries
    (embedded as the index's were), and the contact sheet; the share of neighbours of the query's class says
    whether the features group digits. Without faiss the step is left out with the reason, not an error."""
    queries = digits.spread(SEARCH_QUERIES)
    try:
        manifest = build_index(evaluation["train_embeddings"], out / "index", progress=StageBar() if progress else None)
        result = search([str(path) for path in queries], out / "index", k=SEARCH_K, model=bundle_dir)
    except MissingDependency as exc:
        return {"error": exc.message}
    same = [
        sum(Path(item["path"]).parent.name == Path(query["path"]).parent.name for item in query["neighbours"])
        for query in result["queries"]
    ]
    sheet = search_sheet(result, out / "search" / "contact_sheet.png", tile=96)
    return {
        "index": str(out / "index"),
        "index_kind": manifest.get("kind"),
        "queries": len(queries),
        "k": SEARCH_K,
        "same_class_share": sum(same) / (len(queries) * SEARCH_K),
        "contact_sheet": str(sheet),
    }


def int8_left_out(bundle_dir: Path) -> dict[str, str]:
    """{bench label: why} for the int8 engines whose int8 model did not pass its gate when exported on this machine
    (the gate `--engine auto` trusts): their rows would measure a model nobody should deploy here."""
    bundle = Bundle.load(bundle_dir)
    onnx_report = ((bundle.manifest.get("verification") or {}).get("int8") or {}).get("encoder") or {}
    openvino = (((bundle.manifest.get("openvino") or {}).get("int8") or {}).get("encoder") or {}).get("verification")
    left = {}
    if not onnx_report.get("passed"):
        left["onnx-int8"] = "the bundle has no int8 encoder that passed its gate here"
    if not (openvino or {}).get("passed"):
        refused = (bundle.manifest.get("int8") or {}).get("openvino_refused")
        left["openvino-int8"] = refused or "no OpenVINO int8 model passed its gate here"
    return left


def bench_engines(bundle_dir: Path, steps: int, seed: int, progress: bool, console: Console) -> list[dict[str, Any]]:
    """Step 7: the encoder's speed and agreement per engine, batch 8, at the training mask ratio and unmasked: the
    engines `mae bench` picks for this bundle on this machine (CPU class, packages), minus int8 models that failed
    their gate here."""
    labels, _ = default_engines(str(bundle_dir))
    left_out = {label: why for label, why in int8_left_out(bundle_dir).items() if label in labels}
    for label, why in left_out.items():
        console.print(f"{label} left out: {why}")
    rows = bench(
        str(bundle_dir),
        engines=[label for label in labels if label not in left_out],
        batch_size=8,
        mask_ratios=(MASK_RATIO, 0.0),
        seconds=1.0 if steps >= 200 else 0.25,  # short runs (tests) time briefly
        seed=seed,
        progress=progress,
        roofline=False,
    )
    return rows + [{"engine": label, "left_out": why} for label, why in left_out.items()]


def export_parity(verification: dict[str, Any]) -> list[tuple[str, float, bool]]:
    """(precision graph, largest |diff| against PyTorch, passed) for every verified graph of the bundle."""
    rows = []
    for precision, graphs in verification.items():
        for graph, report in graphs.items():
            if isinstance(report, dict) and report.get("max_abs_diff") is not None:
                rows.append((f"{precision} {graph}", float(report["max_abs_diff"]), bool(report.get("passed"))))
    return rows


def _percent(value: float | None) -> str:
    return "?" if value is None else f"{value:.1%}"


def _training_row(train: dict[str, Any]) -> str:
    speed = "" if train["images_per_s"] is None else f", {train['images_per_s']:.0f} img/s"
    took = f"in {train['seconds']:.0f} s{speed}" if train["seconds"] else "(time not recorded)"
    return (
        f"{train['preset']}, {train['steps']} steps of {train['batch_size']} ({train['epochs']} epochs) {took}; "
        f"mask {train['mask_ratio']:g}, lr {train['peak_lr']:g}; final loss {train['final_loss']:.4f} (mean of the "
        "last epoch)" + (" - reused: the finished training in this folder" if train.get("reused") else "")
    )


def _quality_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows that say whether the model learnt: PSNR against both baselines, eval, search."""
    recon = summary["reconstruction"]
    base = recon["baselines_db"]
    rows = [
        (
            f"held-out PSNR, {engine}",
            f"{recon[engine]['psnr_db']:.2f} dB on removed patches of {recon['images']} held-out digits; "
            f"Laplace fill {base['laplace']:.2f} dB, mean colour {base['mean_colour']:.2f} dB: "
            f"{recon[engine]['margin_db']:+.2f} dB over the better baseline",
        )
        for engine in ("onnx", "torch")
    ]
    rows.append(("onnx vs torch", f"max |pred difference| {recon['onnx_vs_torch_max_abs_pred']:.2e}"))
    evaluation = summary["eval"]
    for kind, name in (("knn", "kNN (k=20)"), ("linear", "linear probe")):
        side = evaluation[kind]
        rows.append(
            (
                f"eval {kind}",
                f"{name}, {evaluation['pool']} pool: model top-1 {_percent(side['model_top1'])}, raw pixels "
                f"{_percent(side['pixels_top1'])} ({side['picture']})",
            )
        )
    found = summary["search"]
    if "error" in found:
        rows.append(("search", f"not run: {found['error']}"))
    else:
        rows.append(
            (
                "search",
                f"{found['queries']} held-out digits, {found['k']} neighbours each: "
                f"{_percent(found['same_class_share'])} of the same digit; {found['contact_sheet']}",
            )
        )
    return rows


def _bench_rows(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for row in rows:
        if "left_out" in row:
            out.append((f"bench {row['engine']}", f"left out: {row['left_out']}"))
            continue
        label = f"bench {row['engine']}, mask {row['mask_ratio']:g}"
        if row.get("error"):
            out.append((label, f"not run: {row['error']}"))
            continue
        out.append(
            (
                label,
                f"{row['images_per_s']:.0f} img/s ({row['ratio_vs_torch']:.2f}x torch fp32), "
                f"cosine {min(row['cosine_cls'], row['cosine_mean']):.5f}"
                + (f" ! below the {GATE} gate" if row.get("below_gate") else ""),
            )
        )
    return out


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The demo's table: what was trained, whether it learnt (against the baselines), what the features are worth,
    the engines, and where every file is."""
    table = Table(title=f"mae demo (seed {summary['seed']})", show_header=True, header_style="bold")
    table.add_column("step")
    table.add_column("result")
    train = summary["training"]
    table.add_row("training", _training_row(train))
    export = summary["export"]
    for name, diff, passed in export_parity(export["verification"]):
        table.add_row(f"export {name}", f"max |ONNX - PyTorch| {diff:.2e} ({'verified' if passed else 'FAILED'})")
    if export.get("int8_note"):
        table.add_row("export int8", export["int8_note"])
    for row in _quality_rows(summary) + _bench_rows(summary["bench"]):
        table.add_row(*row)
    pictures = summary["reconstruction"]["pictures"]
    table.add_row("reconstructions", "\n".join(pictures[key] for key in ("onnx", "torch", "vs_laplace")))
    table.add_row("loss curve", train["loss_curve"])
    table.add_row("bundle", export["bundle"])
    table.add_row("summary", summary["summary_json"])
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary.get("stage_seconds", {}).items())
    table.add_row("total time", f"{summary['seconds']:.0f} s ({stages})")
    console.print(table)
