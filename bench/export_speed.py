"""Export and CPU inference speed of a ViT-B/16 MAE encoder: PyTorch eager fp32 vs ONNX Runtime fp32 / fp16 / int8.

    python bench/export_speed.py [--batch 8] [--passes 3] [--seconds 2] [--threads 2] [--json results.json]

Random weights (the speed does not depend on them; the int8 accuracy does: random weights are harder on int8), real
photos from scikit-image as inputs. Each pass times every engine at mask ratio 0.75 (K=49) and 0 (K=196) for about
`seconds` each; images/s are medians over passes and ratios are against PyTorch fp32 *in the same pass*, because
this shared machine drifts between passes. Accuracy beside each engine: cosine of cls- and mean-pooled features and
the max absolute difference of the latent, against PyTorch fp32 on the same batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mae.checkpoint import save_checkpoint
from mae.core.config import get_preset
from mae.core.masking import masking_from_noise, random_noise
from mae.export import export_bundle
from mae.export.verify import reference_pixels
from mae.model import MaskedAutoencoder
from mae.reports.export import ExportSpinner

MASK_RATIOS = (0.75, 0.0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def images_per_second(run, batch: int, seconds: float) -> float:
    run()  # warm-up (first-call allocations, ORT's first run)
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 2:
            return count * batch / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per engine, ratio and pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    config = get_preset("mae_vit_base_patch16")
    torch.manual_seed(0)
    model = MaskedAutoencoder(config, decoder=False).eval()

    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "vit_b16_encoder.pt"
        save_checkpoint(weights, model.state_dict(), config)
        started = time.perf_counter()
        bundle = export_bundle(
            weights, Path(folder) / "bundle", precisions=("fp32", "fp16", "int8"), progress=ExportSpinner()
        )
        total_export = time.perf_counter() - started
        verification = bundle.manifest["verification"]
        files = {p: bundle.manifest["graphs"][p]["encoder"]["bytes"] for p in ("fp32", "fp16", "int8")}
        export_seconds = {p: verification[p]["encoder"]["export_seconds"] for p in files}

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions = {
            f"onnxruntime {p}": ort.InferenceSession(str(bundle.graph("encoder", p)), options, ["CPUExecutionProvider"])
            for p in files
        }

        _, photos = reference_pixels(bundle.preprocessing)
        pixels = np.ascontiguousarray(np.resize(photos, (args.batch, *photos.shape[1:])))  # real photos, repeated
        feeds, accuracy = {}, {}
        for ratio in MASK_RATIOS:
            ids_keep = masking_from_noise(random_noise(args.batch, config.num_patches, seed=0), ratio).ids_keep
            feeds[ratio] = {"pixel_values": pixels, "ids_keep": ids_keep}
            with torch.inference_mode():
                reference = model.forward_encoder(torch.from_numpy(pixels), torch.from_numpy(ids_keep)).numpy()
            for name, sess in sessions.items():
                (latent,) = sess.run(None, feeds[ratio])
                accuracy[(name, ratio)] = {
                    "cosine_cls": cosine(latent[:, 0], reference[:, 0]),
                    "cosine_mean": cosine(latent[:, 1:].mean(1), reference[:, 1:].mean(1)),
                    "max_abs_diff": float(np.abs(latent - reference).max()),
                }

        def torch_runner(ratio: float):
            pixel_tensor = torch.from_numpy(feeds[ratio]["pixel_values"])
            ids_tensor = torch.from_numpy(feeds[ratio]["ids_keep"])

            def run() -> None:
                with torch.inference_mode():
                    model.forward_encoder(pixel_tensor, ids_tensor)

            return run

        engines = ["pytorch eager fp32", *sessions]
        speeds: dict[tuple[str, float], list[float]] = {(e, r): [] for e in engines for r in MASK_RATIOS}
        ratios: dict[tuple[str, float], list[float]] = {(e, r): [] for e in engines for r in MASK_RATIOS}
        for pass_index in range(args.passes):
            for ratio in MASK_RATIOS:
                measured = {"pytorch eager fp32": images_per_second(torch_runner(ratio), args.batch, args.seconds)}
                for name, sess in sessions.items():
                    measured[name] = images_per_second(
                        lambda sess=sess, ratio=ratio: sess.run(None, feeds[ratio]), args.batch, args.seconds
                    )
                for name, value in measured.items():
                    speeds[(name, ratio)].append(value)
                    ratios[(name, ratio)].append(value / measured["pytorch eager fp32"])
            print(f"pass {pass_index + 1}/{args.passes} done", file=sys.stderr)

    kept = {ratio: config.num_kept(ratio) for ratio in MASK_RATIOS}
    results = {
        "model": "mae_vit_base_patch16 encoder, random weights",
        "batch": args.batch,
        "threads": args.threads,
        "passes": args.passes,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "export_seconds_total": round(total_export, 1),
        "export_seconds": export_seconds,
        "file_bytes": files,
        "engines": [
            {
                "engine": name,
                "mask_ratio": ratio,
                "kept": kept[ratio],
                "images_per_s": round(statistics.median(speeds[(name, ratio)]), 2),
                "ratio_vs_torch": round(statistics.median(ratios[(name, ratio)]), 3),
                **({"cosine_cls": 1.0, "cosine_mean": 1.0, "max_abs_diff": 0.0} if name.startswith("pytorch") else {}),
                **accuracy.get((name, ratio), {}),
            }
            for ratio in MASK_RATIOS
            for name in engines
        ],
    }
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    exports = Table(title="Export (ViT-B/16 encoder)", title_justify="left")
    for column in ("precision", "export s", "file MiB"):
        exports.add_column(column, justify="right" if column != "precision" else "left")
    for precision, size in results["file_bytes"].items():
        exports.add_row(precision, f"{results['export_seconds'][precision]:.1f}", f"{size / 2**20:.1f}")
    console.print(exports)
    console.print(f"whole export incl. verification: {results['export_seconds_total']} s")
    table = Table(
        title=f"Batch {results['batch']}, {results['threads']} threads, median of {results['passes']} passes",
        title_justify="left",
    )
    for column in ("engine", "K", "img/s", "x torch", "cos cls", "cos mean", "max |diff|"):
        table.add_column(column, justify="left" if column == "engine" else "right", no_wrap=True)
    for row in results["engines"]:
        table.add_row(
            row["engine"],
            str(row["kept"]),
            f"{row['images_per_s']:.1f}",
            f"{row['ratio_vs_torch']:.2f}",
            f"{row['cosine_cls']:.6f}",
            f"{row['cosine_mean']:.6f}",
            f"{row['max_abs_diff']:.2e}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
