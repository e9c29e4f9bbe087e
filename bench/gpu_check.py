"""Everything CUDA that does not need TensorRT, in one command of at most 8 minutes; one table and one JSON file.

    python bench/gpu_check.py [--out gpu_check.json] [--minutes 8]
    python bench/gpu_check.py --dry-run          # on a CPU: the same steps, tiny, on the CPU (CI runs this)

Made for a lent GPU machine where nothing can be downloaded: from a copy of the repository,
`pip install --no-deps --no-build-isolation -e .` and run it. It checks, each against the CPU fp32 reference:
1. the torch engine on CUDA in fp32, bf16 and fp16 for the encoder and the decoder (max abs diff, pooled cosine)
   on real photos (scikit-image's), and the same through `mae reconstruct` and `mae embed`;
2. `mae train` on CUDA in bf16 and in fp16 with the gradient scaler (loss finite, checkpoint written, resume to the
   same weights), and a one-process `torchrun` (nccl);
3. ONNX Runtime's CUDA provider and TensorRT where importable (else skipped, with the reason);
4. ViT-B/16 encoder throughput: images/s at batch 1, 32 and 256, mask 0 and 0.75, eager fp32 / bf16 against
   `torch.compile` and CUDA graphs (`torch.compile(mode="reduce-overhead")`) where they work, the GPU named.
A step that fails is a row with its error; the rest goes on. Steps that would overrun the budget are skipped and
say so. `--dry-run` runs every step on the CPU with the test preset and a few iterations, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = {"fp32": 1e-3, "bf16": 0.99, "fp16": 0.999}  # fp32: max abs diff; reduced: least pooled cosine


class Check:
    """Rows of results, a deadline, and the device to use (cuda, or cpu for a dry run)."""

    def __init__(self, dry_run: bool, minutes: float, work: Path) -> None:
        self.dry_run = dry_run
        self.deadline = time.monotonic() + minutes * 60
        self.work = work
        self.rows: list[dict[str, Any]] = []
        self.device = "cpu" if dry_run else "cuda"
        self.preset = "mae_vit_test_patch8" if dry_run else "mae_vit_base_patch16"
        self.train_preset = "mae_vit_test_patch8" if dry_run else "mae_vit_mini_patch8"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, name: str, status: str, detail: str = "", **numbers: Any) -> None:
        row = {"section": section, "check": name, "status": status, "detail": detail, **numbers}
        self.rows.append(row)
        print(f"  {status:5} {section}: {name} {detail}", flush=True)

    def step(self, section: str, function: Callable[[], None], needs_seconds: float) -> None:
        """Run one step unless the budget is spent; an exception is a failed row, never the end of the run."""
        if self.left() < needs_seconds:
            self.add(section, "(all)", "skip", f"time budget: {self.left():.0f} s left, needs ~{needs_seconds:.0f} s")
            return
        started = time.monotonic()
        try:
            function()
        except Exception as exc:  # a report of everything: one failure must not hide the others
            self.add(section, "(step)", "fail", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            traceback.print_exc(limit=3)
        print(f"    ({section}: {time.monotonic() - started:.1f} s)", flush=True)


# --------------------------------------------------------------------------------------------------- inputs
def photos(size: int, count: int) -> np.ndarray:
    """[count, 3, size, size] normalized pixel values of real photos shipped with scikit-image."""
    from skimage import data

    from mae.core.preprocess import Preprocessing, preprocess_image

    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry"]
    arrays = [getattr(data, name)() for name in names if hasattr(data, name)]
    pre = Preprocessing(size=size)
    batch = [preprocess_image(arrays[i % len(arrays)], pre) for i in range(count)]
    return np.stack(batch).astype(np.float32)


def photo_folder(folder: Path, count: int = 6) -> Path:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry"]):
        if i < count and hasattr(data, name):
            Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return folder


def mae_command(*args: object, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """`mae ARGS` in a child process; its output, or a RuntimeError with the end of it."""
    command = [sys.executable, "-m", "mae.cli", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"mae {args[0]} exited {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
    return done.stdout + done.stderr


# --------------------------------------------------------------------------------------------- 0. machine
def environment(check: Check) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda}
    facts["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
        facts["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        facts["onnxruntime"] = None
    try:
        import tensorrt

        facts["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        facts["tensorrt"] = None
        facts["tensorrt_reason"] = str(exc)
    if not check.dry_run and not facts["cuda_available"]:
        raise SystemExit("PyTorch sees no CUDA GPU here: run with --dry-run on a CPU machine.")
    return facts


# ------------------------------------------------------------------------------------------ 1. torch engine
def torch_engine(check: Check, weights: Path) -> None:
    """The torch engine on the device at each precision, against the CPU fp32 engine, encoder and decoder."""
    from mae.core.config import get_preset
    from mae.core.masking import masking_from_noise, random_noise
    from mae.core.numerics import cosine_rows, pooled
    from mae.runtime.engines import create_engine

    config = get_preset(check.preset)
    pixels = photos(config.img_size, 4)
    masking = masking_from_noise(random_noise(len(pixels), config.num_patches, seed=0), 0.75)
    reference_encoder = create_engine("torch", weights, "encoder", precision="fp32", device="cpu")
    reference_decoder = create_engine("torch", weights, "decoder", precision="fp32", device="cpu")
    latent = reference_encoder.run({"pixel_values": pixels, "ids_keep": masking.ids_keep})["latent"]
    pred = reference_decoder.run({"latent": latent, "ids_restore": masking.ids_restore})["pred"]
    precisions = ["fp32", "bf16"] if check.dry_run else ["fp32", "bf16", "fp16"]
    for precision in precisions:
        options = {"allow_emulated_bf16": True} if check.dry_run and precision == "bf16" else {}  # any CPU
        encoder = create_engine("torch", weights, "encoder", precision=precision, device=check.device, **options)
        decoder = create_engine("torch", weights, "decoder", precision=precision, device=check.device, **options)
        got = encoder.run({"pixel_values": pixels, "ids_keep": masking.ids_keep})["latent"]
        got_pred = decoder.run({"latent": latent, "ids_restore": masking.ids_restore})["pred"]
        cosines = {kind: float(cosine_rows(pooled(latent)[kind], pooled(got)[kind]).min()) for kind in ("cls", "mean")}
        pred_cosine = float(cosine_rows(pred.reshape(len(pred), -1), got_pred.reshape(len(pred), -1)).min())
        diff = float(np.abs(got - latent).max())
        ok = (
            diff <= TOLERANCE["fp32"]
            if precision == "fp32"
            else min(*cosines.values(), pred_cosine) >= TOLERANCE[precision]
        )
        check.add(
            "torch engine",
            f"{check.device} {precision}",
            "ok" if ok else "fail",
            encoder.description,
            max_abs_diff=diff,
            cosine_cls=cosines["cls"],
            cosine_mean=cosines["mean"],
            cosine_pred=pred_cosine,
        )


def through_the_commands(check: Check, weights: Path) -> None:
    """`mae reconstruct` and `mae embed` with the torch engine on the device against the same commands on the CPU."""
    from mae.core.numerics import cosine_rows

    folder = photo_folder(check.work / "photos", 4)
    cpu_env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    images = sorted(folder.iterdir())[:2]
    arrays = {}
    for where, env, device in (("device", None, check.device), ("cpu", cpu_env, "cpu")):
        out = check.work / f"reconstruct-{where}"
        mae_command(
            "reconstruct",
            *images,
            "--model",
            weights,
            "--engine",
            "torch",
            "--device",
            device,
            "--out",
            out,
            "--save-arrays",
            out / "arrays.npz",
            env=env,
        )
        arrays[where] = dict(np.load(out / "arrays.npz"))
    pred_cos = float(cosine_rows(arrays["device"]["pred"].reshape(2, -1), arrays["cpu"]["pred"].reshape(2, -1)).min())
    same_mask = bool(np.array_equal(arrays["device"]["mask"], arrays["cpu"]["mask"]))
    status = "ok" if same_mask and pred_cos >= 0.9999 else "fail"
    check.add("commands", "mae reconstruct --engine torch", status, f"same mask: {same_mask}", cosine_pred=pred_cos)
    embedded = {}
    for where, env in (("device", None), ("cpu", cpu_env)):
        out = check.work / f"embed-{where}"
        mae_command(
            "embed",
            folder,
            "--model",
            weights,
            "--engine",
            "torch",
            "--out",
            out,
            "--workers",
            "0",
            "--batch-size",
            "4",
            env=env,
        )
        embedded[where] = np.concatenate([np.load(p) for p in sorted((out / "embeddings").glob("*.npy"))])
    cos = float(cosine_rows(embedded["device"], embedded["cpu"]).min())
    check.add("commands", "mae embed --engine torch", "ok" if cos >= 0.9999 else "fail", cosine_cls=cos)


# --------------------------------------------------------------------------------------------------- 2. train
def training(check: Check) -> None:
    """bf16 and fp16 (+ gradient scaler) on the device: loss finite, checkpoints written, resume to the same weights;
    then one `torchrun` process (nccl on CUDA)."""
    import torch

    from mae.checkpoint import load_checkpoint

    folder = photo_folder(check.work / "train-photos")
    common = [
        "--data",
        folder,
        "--model",
        check.train_preset,
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        check.device,
        "--warmup-epochs",
        "1",
        "--save-every",
        "1",
    ]
    precisions = ["fp32"] if check.dry_run else ["bf16", "fp16"]
    for precision in precisions:
        whole, halves = check.work / f"train-{precision}-whole", check.work / f"train-{precision}-halves"
        mae_command("train", *common, "--precision", precision, "--epochs", "2", "--out", whole)
        mae_command("train", *common, "--precision", precision, "--epochs", "2", "--max-steps", "2", "--out", halves)
        mae_command("train", *common, "--precision", precision, "--epochs", "2", "--out", halves, "--resume")
        a, b = load_checkpoint(whole / "checkpoint.pt")["model"], load_checkpoint(halves / "checkpoint.pt")["model"]
        difference = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        records = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r.get("event") == "step" and r.get("loss") is not None]
        finite = bool(losses) and all(np.isfinite(losses))
        status = "ok" if finite and difference == 0.0 else ("warn" if finite and difference < 1e-3 else "fail")
        detail = f"loss {losses[-1]:.4f}; resumed vs whole: max diff {difference:.2e}" if losses else "no loss logged"
        check.add("train", f"{check.device} {precision}", status, detail, resume_max_diff=difference)
    out = check.work / "train-torchrun"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "mae.cli",
        "train",
        *map(str, common),
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    backend = "nccl" if check.device == "cuda" and torch.cuda.is_available() else "gloo"
    ok = done.returncode == 0 and (out / "checkpoint.pt").is_file()
    check.add(
        "train", f"torchrun 1 process ({backend})", "ok" if ok else "fail", (done.stderr or "")[-200:] if not ok else ""
    )


# ------------------------------------------------------------------------------- 3. ONNX Runtime, TensorRT
def other_engines(check: Check, weights: Path) -> None:
    from mae.core.config import get_preset
    from mae.core.masking import full_ids_keep
    from mae.core.numerics import cosine_rows, pooled
    from mae.runtime.engines import create_engine

    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError as exc:
        providers, reason = [], f"onnxruntime is not installed ({exc})"
    else:
        reason = f"this onnxruntime has no CUDAExecutionProvider (providers: {', '.join(providers)})"
    if "CUDAExecutionProvider" in providers or check.dry_run:
        from mae.export import export_bundle

        bundle = export_bundle(weights, check.work / "bundle", verify=False)
        provider = "cpu" if check.dry_run else "cuda"
        config = get_preset(check.preset)
        pixels = photos(config.img_size, 4)
        ids = full_ids_keep(len(pixels), config.num_patches)
        onnx = create_engine("onnx", bundle.path, "encoder", provider=provider).run(
            {"pixel_values": pixels, "ids_keep": ids}
        )
        torch_cpu = create_engine("torch", weights, "encoder", device="cpu").run(
            {"pixel_values": pixels, "ids_keep": ids}
        )
        cos = float(cosine_rows(pooled(onnx["latent"])["cls"], pooled(torch_cpu["latent"])["cls"]).min())
        check.add("engines", f"onnxruntime {provider}", "ok" if cos >= 0.9999 else "fail", cosine_cls=cos)
    else:
        check.add("engines", "onnxruntime cuda", "skip", reason)
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        check.add("engines", "tensorrt", "skip", f"not importable here ({exc})")
    else:
        check.add("engines", "tensorrt", "skip", "importable: run `python -m pytest -m tensorrt` for its real tests")


# ----------------------------------------------------------------------------------------- 4. throughput
def throughput(check: Check) -> None:
    """ViT-B/16 encoder images/s on the device: eager fp32 and bf16, torch.compile and CUDA graphs in bf16."""
    import torch

    from mae.core.config import get_preset
    from mae.model import MaskedAutoencoder

    config = get_preset(check.preset)
    model = MaskedAutoencoder(config, decoder=False).eval().to(check.device)
    batches = (1, 4) if check.dry_run else (1, 32, 256)
    modes = {"eager fp32": (None, torch.float32), "eager bf16": (None, torch.bfloat16)}
    if not check.dry_run:
        modes.update(
            {"compile bf16": ("default", torch.bfloat16), "cuda graphs bf16": ("reduce-overhead", torch.bfloat16)}
        )
    for mode_name, (compile_mode, dtype) in modes.items():
        runner = (
            model.forward_encoder
            if compile_mode is None
            else torch.compile(model.forward_encoder, mode=compile_mode, dynamic=False)
        )
        for batch in batches:
            for ratio in (0.0, 0.75):
                if check.left() < 20:
                    check.add("throughput", f"{mode_name} b{batch} mask {ratio:g}", "skip", "time budget")
                    continue
                kept = int(config.num_patches * (1 - ratio))
                images = torch.randn(batch, 3, config.img_size, config.img_size, device=check.device)
                ids = torch.arange(kept, device=check.device).expand(batch, kept).contiguous()
                try:
                    rate = _images_per_second(torch, runner, images, ids, dtype, check)
                except Exception as exc:  # compile / graphs may not work on every version: say so, go on
                    check.add(
                        "throughput",
                        f"{mode_name} b{batch} mask {ratio:g}",
                        "fail",
                        f"{type(exc).__name__}: {exc}"[:200],
                    )
                    continue
                check.add(
                    "throughput",
                    f"{mode_name} b{batch} mask {ratio:g}",
                    "ok",
                    f"{rate:.1f} img/s",
                    images_per_s=rate,
                    batch=batch,
                    mask_ratio=ratio,
                    mode=mode_name,
                )


def _images_per_second(torch, runner, images, ids, dtype, check: Check) -> float:  # noqa: ANN001
    synchronize = torch.cuda.synchronize if check.device == "cuda" else (lambda: None)
    autocast = torch.autocast(check.device, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        for _ in range(3):  # warm-up (compiles and captures here)
            runner(images, ids)
        synchronize()
        runs, started = 0, time.perf_counter()
        budget = 0.2 if check.dry_run else 1.0
        while time.perf_counter() - started < budget or runs < 3:
            runner(images, ids)
            runs += 1
        synchronize()
    return runs * len(images) / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------------ main
def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'section':14} {'check':34} {'status':6} detail"]
    for row in rows:
        numbers = ", ".join(f"{k} {v:.6g}" for k, v in row.items() if isinstance(v, float))
        lines.append(f"{row['section']:14} {row['check']:34} {row['status']:6} {row['detail'][:60]} {numbers}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole run's budget")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny: checks the script")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mae-gpu-check-") as temp:
        check = Check(args.dry_run, args.minutes, Path(temp))
        facts = environment(check)
        print(f"gpu check: {facts.get('gpu', 'no GPU (dry run on the CPU)')}, torch {facts['torch']}", flush=True)
        from mae.checkpoint import save_random_weights
        from mae.core.config import get_preset

        weights = save_random_weights(get_preset(check.preset), check.work / "weights.pt", seed=0)
        check.step("torch engine", lambda: torch_engine(check, weights), 20)
        check.step("commands", lambda: through_the_commands(check, weights), 40)
        check.step("train", lambda: training(check), 60)
        check.step("engines", lambda: other_engines(check, weights), 20)
        check.step("throughput", lambda: throughput(check), 30)
    payload = {
        "environment": facts,
        "dry_run": args.dry_run,
        "seconds": round(time.monotonic() - started, 1),
        "rows": check.rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(table(check.rows))
    print(f"{len(check.rows)} rows in {payload['seconds']} s; written to {args.out}")
    return 1 if any(row["status"] == "fail" for row in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
