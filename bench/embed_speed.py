"""`mae embed` against the engine alone: how much of the engine's speed survives decoding, batching and writing.

    python bench/embed_speed.py                                # ViT-B/16 (random weights), onnx fp32, batch 8
    python bench/embed_speed.py --engine openvino --images 96 --passes 4 --json embed_speed.json
    python bench/embed_speed.py --bundle path/to/bundle --workers 1

It writes `--images` JPEGs of 640x480 made from the photos shipped with scikit-image (crops and flips, so that no
two files are the same), then alternates A B A B ... A with `--passes` B's: (A) the engine alone on batches of
pre-processed images with every patch kept (what `mae bench` times at mask ratio 0), (B) the whole `mae embed`
pipeline over the folder with the same engine object, batch size and pooling. Each B is divided by the mean of the
two A's around it, which cancels a steady drift of a shared machine; the median of those ratios is the number
that travels (goal: >= 0.85). The per-stage split (decode in the workers, inference, writing, time the engine
waited for images) says where the rest went. Decode and inference share the CPU, so on a 2-core machine the
ceiling is about 1 / (1/engine + 1/decode).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mae.core.bundle import Bundle
from mae.core.masking import full_ids_keep
from mae.core.preprocess import load_and_preprocess
from mae.runtime.embed import embed
from mae.runtime.engines import create_engine

SIZE = (640, 480)


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct 640x480 JPEGs (quality 90) cut from scikit-image's photos."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry", "hubble_deep_field"]
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names if hasattr(data, name)]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        # A random crop of 60-100% of the photo, flipped half the time, resized to 640x480.
        scale = rng.uniform(0.6, 1.0)
        width, height = int(photo.width * scale), int(photo.height * scale)
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        picture = photo.crop((left, top, left + width, top + height)).resize(SIZE, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"{index:05d}.jpg"
        picture.save(path, quality=90)
        paths.append(path)
    return paths


def random_weights_bundle(preset: str, folder: Path) -> Path:
    """An encoder-only bundle of `preset` with seeded random weights (speed does not depend on the values)."""
    import torch

    from mae.checkpoint import save_checkpoint
    from mae.core.config import get_preset
    from mae.export import export_bundle
    from mae.model import MaskedAutoencoder

    bundle = folder / f"{preset}-bundle"
    if (bundle / "mae.json").is_file():
        return bundle
    torch.manual_seed(0)
    config = get_preset(preset)
    checkpoint = folder / f"{preset}-random.pt"
    save_checkpoint(checkpoint, MaskedAutoencoder(config, decoder=False).state_dict(), config)
    export_bundle(checkpoint, bundle, verify=False)
    return bundle


def engine_only(engine, pixel_values: np.ndarray, batches: int) -> float:  # noqa: ANN001 - an Engine
    """Images/s of `batches` engine calls on [B, 3, S, S] with all patches kept (after one untimed call)."""
    batch = pixel_values.shape[0]
    length = engine.config.num_patches
    inputs = {"pixel_values": pixel_values, "ids_keep": full_ids_keep(batch, length)}
    engine.run(inputs)  # settles thread pools after the pipeline ran
    started = time.perf_counter()
    for _ in range(batches):
        engine.run(inputs)
    return batch * batches / (time.perf_counter() - started)


def decode_only(paths: list[Path], bundle: Path, resize: str) -> float:
    """Images/s of decode + resize + normalize in one process (one core)."""
    pre = Bundle.load(bundle).preprocessing
    started = time.perf_counter()
    for path in paths:
        load_and_preprocess(path, pre, resize)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="An exported bundle (default: random-weight --preset).")
    parser.add_argument("--preset", default="mae_vit_base_patch16")
    parser.add_argument("--engine", default="onnx")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=48, help="JPEGs per pipeline pass.")
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--resize", default="center", choices=["center", "squash"])
    parser.add_argument("--pool", default="cls")
    parser.add_argument("--work-dir", type=Path, help="Keep the bundle and JPEGs here (default: a temporary one).")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args()

    temp = tempfile.TemporaryDirectory(prefix="mae-embed-speed-") if args.work_dir is None else None
    work = Path(temp.name) if temp else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        began = time.perf_counter()
        bundle = args.bundle or random_weights_bundle(args.preset, work)
        print(f"bundle {bundle} ready in {time.perf_counter() - began:.0f} s")
        images = work / f"jpegs-{args.images}"
        paths = sorted(images.glob("*.jpg")) if images.is_dir() else []
        if len(paths) != args.images:
            paths = make_jpegs(images, args.images)
        engine = create_engine(args.engine, str(bundle), "encoder", precision=args.precision, device="auto")
        print(f"engine: {engine.description}")
        pre = Bundle.load(bundle).preprocessing
        pixel_values = np.stack([load_and_preprocess(p, pre, args.resize)[0] for p in paths[: args.batch_size]])
        batches = max(1, args.images // args.batch_size)

        # E P E P ... E: each pipeline pass is compared with the engine measured just before and just after it,
        # which cancels a steady drift of the (shared) machine.
        engine_speeds = [engine_only(engine, pixel_values, batches)]
        pipeline_speeds, ratios, summaries = [], [], []
        for index in range(args.passes):
            out = work / f"out-{index}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run each pass, never a resumed one
            summary = embed(
                images, bundle, out, engine=engine, precision=args.precision, pool=args.pool,
                batch_size=args.batch_size, workers=args.workers, resize=args.resize, progress=False,
                shard_size=max(args.images // 2, 1),
            )  # fmt: skip
            engine_speeds.append(engine_only(engine, pixel_values, batches))
            pipeline_speeds.append(summary["this_run"]["images_per_second"])
            summaries.append(summary)
            around = (engine_speeds[-2] + engine_speeds[-1]) / 2
            ratios.append(pipeline_speeds[-1] / around)
            print(
                f"pass {index + 1}: engine alone {engine_speeds[-2]:.2f} / {engine_speeds[-1]:.2f} img/s, "
                f"embed {pipeline_speeds[-1]:.2f} img/s (ratio {ratios[-1]:.3f})"
            )
        decode_speed = decode_only(paths[: min(len(paths), 48)], bundle, args.resize)
    finally:
        if temp is not None:
            temp.cleanup()

    engine_median, pipeline_median = statistics.median(engine_speeds), statistics.median(pipeline_speeds)
    middle = summaries[ratios.index(statistics.median_low(ratios))]
    processed = middle["this_run"]["images"]
    stages = middle["stages"]
    per_image_ms = {
        "decode (in workers, CPU)": 1000 * stages["decode"]["worker_seconds"] / processed,
        "inference": 1000 * stages["inference"]["seconds"] / processed,
        "write (background thread)": 1000 * stages["write"]["seconds"] / processed,
        "engine waited for images": 1000 * stages["decode"]["main_waited_seconds"] / processed,
        "whole pipeline": 1000 * middle["this_run"]["pipeline_seconds"] / processed,
    }
    ceiling = 1 / (1 / engine_median + 1 / decode_speed)
    result = {
        "engine": engine.description,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "images": args.images,
        "resize": args.resize,
        "engine_only_images_per_s": [round(v, 2) for v in engine_speeds],
        "embed_images_per_s": [round(v, 2) for v in pipeline_speeds],
        "ratios": [round(v, 3) for v in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "decode_only_images_per_s_one_core": round(decode_speed, 1),
        "shared_cpu_ceiling_images_per_s": round(ceiling, 2),
        "ceiling_ratio": round(ceiling / engine_median, 3),
        "per_image_ms": {k: round(v, 2) for k, v in per_image_ms.items()},
        "worker_startup_s": stages["decode"]["worker_startup_seconds"],
    }
    print()
    print(f"engine alone   {engine_median:8.2f} img/s (median of {len(engine_speeds)})")
    print(f"mae embed      {pipeline_median:8.2f} img/s")
    ceiling_note = f"shared-CPU ceiling {result['ceiling_ratio']}"
    print(f"ratio          {result['median_ratio']:8.3f}   (goal >= 0.85; {ceiling_note})")
    print(f"decode alone   {decode_speed:8.1f} img/s on one core")
    print("per image (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in result["per_image_ms"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
