"""The options of `mae train` and their defaults, in one place that the CLI can import without PyTorch.

`mae.train.run_training(TrainOptions(...))` is the command; the CLI takes every default from `TrainOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PRESET = "mae_vit_base_patch16"
AUTOCAST_PRECISIONS = ("fp32", "bf16", "fp16")  # --precision of training: autocast modes (not a bundle's graphs)


@dataclass
class TrainOptions:
    """The options of `mae train` (same names); `run_training(TrainOptions(...))` is the command."""

    data: Path  # folder of images, searched recursively
    model: str | None = None  # preset; None: mae_vit_base_patch16, or the run's (--resume), or the weights' (--init)
    img_size: int | None = None  # None: the preset's / the weights'
    patch_size: int | None = None
    epochs: int = 400
    warmup_epochs: int = 40
    batch_size: int = 64  # per process
    accum_iter: int = 1  # gradient accumulation steps per optimizer step
    repeat: int = 1  # passes over the training images per epoch, each with its own random crops (small datasets)
    blr: float = 1.5e-4  # base lr: lr = blr * effective batch / 256
    lr: float | None = None  # absolute peak lr; overrides blr
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # the paper's better target (per-patch normalized pixels)
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU or CUDA) | fp16 (autocast + GradScaler, CUDA)
    allow_emulated_bf16: bool = False  # bf16 on a CPU without bf16 instructions (many times slower than fp32)
    init: Path | None = None  # start from these weights (any format mae.weights reads); architecture from them
    resume: bool = False  # continue OUT/checkpoint.pt
    out: Path = Path("runs/mae")
    seed: int = 0
    workers: int = 2  # data-loading processes per rank
    save_every: int = 20  # keep checkpoint-{epoch}.pt every N epochs (and the last)
    max_minutes: float | None = None  # stop cleanly (checkpoint written, resumable) after this long
    max_steps: int | None = None  # stop cleanly after this many optimizer steps in all (resumable)
    device: str = "auto"  # auto: this rank's GPU if any, else CPU
    checkpoint_minutes: float = 10.0  # also refresh checkpoint.pt mid-epoch this often
    log_every: int = 1  # optimizer steps between "step" lines in log.jsonl
    preview_images: int = 4  # held out of training and reconstructed after every epoch
    progress: bool = True  # a progress bar (rank 0), when the reporter draws one
