"""Training speed on this machine: images/s of a full MAE training step (forward, loss, backward, AdamW), fp32 against
bf16 autocast in the same run, and the data pipeline (decode + augmentation) for comparison.

    python bench/train_speed.py                 # mini (64 px) and ViT-B/16 (224 px, batch 8), 3 passes each
    python bench/train_speed.py --models mae_vit_mini_patch8 --passes 5 --json speed.json

The fp32 and bf16 passes alternate (A B A B ...) so that drift of the machine hits both alike; the ratio is the
number that travels (measured: ViT-B 3.6 img/s fp32, 6.3 bf16, 1.76x on the project's 2-core Sapphire Rapids class
CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mae.core.config import get_preset
from mae.model import MaskedAutoencoder
from mae.train import ADAMW_BETAS, autocast_context, weight_decay_groups

DEFAULT_BATCH = {"mae_vit_base_patch16": 8, "mae_vit_mini_patch8": 64}


def train_step_images_per_s(
    model: MaskedAutoencoder,
    optimizer: torch.optim.Optimizer,
    batch: int,
    precision: str,
    steps: int,
    mask_ratio: float,
) -> float:
    """Images/s over `steps` training steps on random images (the model and optimizer carry over between calls)."""
    config = model.cfg
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, config.img_size, config.img_size, generator=generator)  # [B, 3, S, S]
    start = time.perf_counter()
    for _ in range(steps):
        noise = torch.rand(batch, config.num_patches, generator=generator)  # [B, L]
        with autocast_context(precision, torch.device("cpu")):
            loss = model(images, mask_ratio=mask_ratio, noise=noise).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def bench_model(preset: str, batch: int, passes: int, steps: int, mask_ratio: float) -> dict:
    config = get_preset(preset)
    torch.manual_seed(0)
    model = MaskedAutoencoder(config).train()
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=1e-4, betas=ADAMW_BETAS)
    speeds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in speeds:  # warm-up: allocator, oneDNN kernels, optimizer state
        train_step_images_per_s(model, optimizer, batch, precision, 1, mask_ratio)
    for _ in range(passes):
        for precision in speeds:
            speeds[precision].append(train_step_images_per_s(model, optimizer, batch, precision, steps, mask_ratio))
    fp32, bf16 = statistics.median(speeds["fp32"]), statistics.median(speeds["bf16"])
    return {
        "model": preset,
        "img_size": config.img_size,
        "batch": batch,
        "mask_ratio": mask_ratio,
        "fp32_images_per_s": fp32,
        "bf16_images_per_s": bf16,
        "bf16_over_fp32": bf16 / fp32,
        "passes": {k: [round(v, 3) for v in vs] for k, vs in speeds.items()},
    }


def bench_data_pipeline(img_size: int, num_patches: int, seconds: float = 3.0) -> float:
    """Images/s of decode + RandomResizedCrop + flip + normalize in one process, on real photos (JPEG, ~512 px)."""
    from PIL import Image
    from skimage import data as skimage_data

    from mae.data import PretrainDataset

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"):
            path = Path(folder) / f"{name}.jpg"
            Image.fromarray(getattr(skimage_data, name)()).save(path, quality=90)
            paths.append(path)
        dataset = PretrainDataset(paths, img_size, num_patches, seed=0)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            dataset[(count % len(paths), count)]
            count += 1
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mae_vit_mini_patch8", "mae_vit_base_patch16"])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 64 for mini, 8 for base)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps per pass (default: about 5 s worth)")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--allow-emulated-bf16", action="store_true", help="time bf16 on a CPU without it anyway")
    args = parser.parse_args()

    from mae.core.errors import MAEError
    from mae.core.hardware import cpu_info, require_native_bf16

    try:  # emulated bf16 takes many times longer than fp32: this benchmark would seem to hang
        require_native_bf16("bench/train_speed.py's bf16 pass", allow_emulated=args.allow_emulated_bf16)
    except MAEError as exc:
        raise SystemExit(str(exc)) from None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_info().describe()}")
    results = []
    for preset in args.models:
        batch = args.batch or DEFAULT_BATCH.get(preset, 8)
        steps = args.steps or (2 if "base" in preset or "large" in preset or "huge" in preset else 10)
        result = bench_model(preset, batch, args.passes, steps, args.mask_ratio)
        results.append(result)
        print(
            f"{preset:24s} {result['img_size']:4d} px batch {batch:3d}: fp32 {result['fp32_images_per_s']:7.1f} img/s, "
            f"bf16 autocast {result['bf16_images_per_s']:7.1f} img/s, ratio {result['bf16_over_fp32']:.2f}x"
        )
    sizes = {get_preset(m).img_size: get_preset(m).num_patches for m in args.models}
    pipeline = {size: bench_data_pipeline(size, patches) for size, patches in sorted(sizes.items())}
    for size, speed in pipeline.items():
        print(f"data pipeline (decode + augment, 1 process) {size:4d} px: {speed:7.1f} img/s")
    if args.json:
        args.json.write_text(json.dumps({"train_step": results, "data_pipeline": pipeline}, indent=2) + "\n")


if __name__ == "__main__":
    main()
