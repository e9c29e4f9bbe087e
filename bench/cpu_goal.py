"""The CPU goal of `--engine auto`, side by side: auto against the best independent baseline, in one process.

    python bench/cpu_goal.py                                  # ViT-B/16 random weights, batch 8, K=49 and K=196
    python bench/cpu_goal.py --seconds 4 --json cpu_goal.json
    python bench/cpu_goal.py --bundle path/to/bundle          # your own bundle (needs its int8 export for auto)

Baselines, built from the same weights by a generic route (torch.onnx.export with the TorchScript exporter,
`dynamo=False`, opset 17, of the plain `forward_encoder`; nothing of the project's export or engines):
- PyTorch eager fp32;
- ONNX Runtime fp32 on that graph (CPU provider, all graph optimizations);
- OpenVINO on that graph, static shapes, THROUGHPUT hint, 2 async requests with half the batch each, at its own
  default precision (bf16 on CPUs with AMX/AVX512-BF16, f32 elsewhere).
Against them, `create_engine("auto", bundle)`: what `mae embed` runs by default on this machine, from a bundle
exported with int8 (calibrated on the shipped photos). Every engine sees the same inputs; the timing is
`mae.runtime.bench.timing_rounds` (interleaved blocks, medians). Reported per K: images/s, the ratio of auto to
the best baseline (goal: >= 1.3 at K=49, >= 1.2 at K=196) and each engine's worst pooled cosine against PyTorch
fp32 (goal for auto: >= 0.999). Inputs are photos (pre-processed), not noise, so the cosines mean something.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from mae.checkpoint import save_random_weights
from mae.core import hardware
from mae.core.bundle import Bundle
from mae.core.config import get_preset
from mae.core.masking import masking_from_noise, random_noise
from mae.core.numerics import cosine_rows, pooled
from mae.export import export_bundle
from mae.export.verify import reference_pixels
from mae.reports.export import ExportSpinner
from mae.runtime.bench import timing_rounds
from mae.runtime.engines import create_engine
from mae.runtime.engines.openvino import split_batch

GOALS = {49: 1.3, 196: 1.2}


def generic_onnx(model: torch.nn.Module, path: Path, pixels: np.ndarray, ids_keep: np.ndarray) -> Path:
    """The encoder exported the way any user would: TorchScript exporter, dynamic batch and kept tokens."""

    class Encoder(torch.nn.Module):
        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, pixel_values: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
            return self.network.forward_encoder(pixel_values, ids_keep)

    torch.onnx.export(
        Encoder(model).eval(),
        (torch.from_numpy(pixels), torch.from_numpy(ids_keep)),
        str(path),
        input_names=["pixel_values", "ids_keep"],
        output_names=["latent"],
        dynamic_axes={"pixel_values": {0: "batch"}, "ids_keep": {0: "batch", 1: "kept"}, "latent": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def ort_runner(path: Path, threads: int):  # noqa: ANN201
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(["latent"], feeds)[0]


def openvino_runner(path: Path, feeds: dict[str, np.ndarray], requests: int = 2):  # noqa: ANN201
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    chunks = split_batch(len(feeds["pixel_values"]), requests)
    start, stop = chunks[0]
    model.reshape({name: [stop - start, *array.shape[1:]] for name, array in feeds.items()})
    # OpenVINO's own default precision (bf16 where the CPU has it, else f32), said explicitly: its automatic choice
    # ignores ONEDNN_MAX_CPU_ISA, which this script honours to take the lower-ISA paths on a bigger CPU.
    default = "bf16" if hardware.cpu_info().native_bf16 else "f32"
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": default}
    compiled = core.compile_model(model, "CPU", config)
    infer = [compiled.create_infer_request() for _ in chunks]
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        for request, (begin, end) in zip(infer, chunks, strict=True):
            request.start_async({name: array[begin:end] for name, array in batch.items()}, share_inputs=False)
        outputs = []
        for request in infer:
            request.wait()
            outputs.append(np.array(request.get_output_tensor(0).data, dtype=np.float32))
        return np.concatenate(outputs)

    return run, precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16", help="preset (random weights) when no --bundle")
    parser.add_argument("--bundle", type=Path, help="an exported bundle (with int8) instead of a preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per engine and K")
    parser.add_argument("--threads", type=int, default=hardware.cpu_info().threads)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = hardware.cpu_info()
    print(f"CPU: {cpu.describe()}; int8 class {cpu.int8_class}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mae-cpu-goal-") as temp:
        temp_dir = Path(temp)
        if args.bundle is None:
            weights = save_random_weights(get_preset(args.model), temp_dir / "weights.pt", seed=0, decoder=False)
            print("exporting a bundle with fp32 + int8 (calibrated on the shipped photos) ...", flush=True)
            bundle = export_bundle(weights, temp_dir / "bundle", precisions=("fp32", "int8"), progress=ExportSpinner())
        else:
            bundle = Bundle.load(args.bundle)
            weights = bundle.source_path()
        from mae.weights import load_model

        network, _ = load_model(weights)
        network = network.eval()
        config = bundle.config
        _, photos = reference_pixels(bundle.preprocessing)
        pixels = np.ascontiguousarray(np.resize(photos, (args.batch, *photos.shape[1:])), dtype=np.float32)
        onnx_path = generic_onnx(network, temp_dir / "generic.onnx", pixels, np.tile(np.arange(4), (args.batch, 1)))
        auto = create_engine("auto", bundle.path)
        print(auto.auto_choice.line(), flush=True)
        ours = {}  # the project's int8 engines that auto did not pick, for comparison (not baselines)
        for name in ("onnx", "openvino"):
            if (name, "int8") != (auto.auto_choice.engine, auto.auto_choice.precision):
                try:
                    ours[f"ours: {name} int8"] = create_engine(name, bundle.path, precision="int8")
                except Exception as exc:  # not installed, or no such model in this bundle
                    print(f"ours: {name} int8 not run: {exc}", flush=True)

        results = []
        for ratio in (0.75, 0.0):
            ids_keep = masking_from_noise(random_noise(args.batch, config.num_patches, 0), ratio).ids_keep
            feeds = {"pixel_values": pixels, "ids_keep": ids_keep}
            kept = int(ids_keep.shape[1])

            def eager(batch: dict[str, np.ndarray] = feeds) -> np.ndarray:
                with torch.inference_mode():
                    tensors = (torch.from_numpy(batch["pixel_values"]), torch.from_numpy(batch["ids_keep"]))
                    return network.forward_encoder(*tensors).numpy()

            ov_run, ov_precision = openvino_runner(onnx_path, feeds)
            engines = {
                "PyTorch eager fp32": eager,
                "ONNX Runtime fp32 (generic export)": ort_runner(onnx_path, args.threads),
                f"OpenVINO {ov_precision}, static, 2 requests (generic export)": ov_run,
                f"auto: {auto.auto_choice.label}": lambda batch, engine=auto: engine.run(batch)["latent"],
                **{label: (lambda batch, engine=engine: engine.run(batch)["latent"]) for label, engine in ours.items()},
            }
            reference = pooled(eager(feeds))
            cosines = {}
            for label, run in engines.items():
                features = pooled(run(feeds))
                cosines[label] = min(float(cosine_rows(features[k], reference[k]).min()) for k in ("cls", "mean"))
            times = timing_rounds({label: (lambda run=run, feeds=feeds: run(feeds)) for label, run in engines.items()},
                                  args.seconds * len(engines))  # fmt: skip
            speeds = {label: args.batch / statistics.median(values) for label, values in times.items()}
            baselines = {label: speed for label, speed in speeds.items() if not label.startswith(("auto", "ours"))}
            best = max(baselines, key=baselines.get)
            auto_label = next(label for label in speeds if label.startswith("auto"))
            ratio_to_best = speeds[auto_label] / baselines[best]
            print(f"\nK={kept} (mask {ratio:g}), batch {args.batch}:")
            for label, speed in speeds.items():
                print(f"  {label:55s} {speed:8.1f} img/s  x{speed / speeds['PyTorch eager fp32']:.2f} eager  "
                      f"cos {cosines[label]:.5f}")  # fmt: skip
            goal = GOALS.get(kept)
            verdict = "" if goal is None else (" (goal met)" if ratio_to_best >= goal else f" (goal {goal}x: missed)")
            print(f"  auto / best baseline ({best}): {ratio_to_best:.2f}x{verdict}", flush=True)
            results.append(
                {
                    "kept": kept,
                    "mask_ratio": ratio,
                    "images_per_s": speeds,
                    "cosine": cosines,
                    "best_baseline": best,
                    "auto_vs_best_baseline": ratio_to_best,
                }
            )
    if args.json:
        payload = {"cpu": cpu.to_dict(), "batch": args.batch, "auto": auto.auto_choice.line(), "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
