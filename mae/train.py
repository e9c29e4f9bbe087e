"""MAE pretraining with the paper's recipe, resumable to the step, on one process or under `torchrun`.

Recipe (He et al. 2021, and the original `main_pretrain.py`): AdamW with betas (0.9, 0.95); weight decay on weight
matrices and the cls/mask tokens, none on biases and norm parameters (1-D), and the fixed sin-cos position
embeddings are not trained at all; lr = blr x effective batch / 256 with effective batch = batch x accum_iter x
world size; linear warmup then a half-cycle cosine, set before every accumulation group from the fractional epoch;
RandomResizedCrop(0.2-1.0, bicubic) + horizontal flip + ImageNet normalization (see `mae.data`).

Exact resume: the checkpoint holds the model, optimizer, grad scaler, the position (epoch, batch, optimizer step)
and the RNG states of every rank. The data a step sees is a function of (seed, epoch, index) alone (`mae.data`), so
a run interrupted at any accumulation boundary and resumed ends with the weights an uninterrupted run has.

Run directory (written by rank 0 only):
    checkpoint.pt               latest state (atomic), epoch-end and on stop / interrupt / every checkpoint_minutes
    checkpoint-{epoch}.pt       after epoch `epoch` (1-based) every `save_every` epochs and after the last one
    log.jsonl                   one JSON object per line, "event": step | epoch | skipped_file | stopped | resumed
    previews/epoch_{epoch:04d}.png  reconstructions of held-out images after each epoch
    loss_curve.png              loss and learning rate against the optimizer step
    run.json                    the options and the resolved configuration of the run
    .lock                       held (flock) while a training writes the folder; a second one is refused

Every write goes through `mae.core.files`: atomic (temporary + fsync + rename), and an OS fault (no space, read-only,
permission, a file where the folder should be) stops the run with a message that names the path, the cause, the
remedy and the checkpoint that is intact. Temporaries a killed run left are removed when the folder is next used
(only those of dead processes).

Nothing here prints: what a person running the training should see (the opening lines, notes, skipped files,
progress, the end summary) goes to the `TrainReporter` that `run_training` is given; the default says nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .core import hardware
from .core.config import MAEConfig, get_preset
from .core.errors import MAEError
from .core.files import (
    FileSystemFault,
    FolderLock,
    atomic_copy,
    atomic_write_bytes,
    atomic_write_text,
    faults,
    make_dirs,
    remove_leftovers,
)
from .core.masking import masking_from_noise, random_noise
from .core.preprocess import Preprocessing
from .core.visualize import PixelSpace, build_panels, masked_metrics, panels_picture
from .data import (
    Batch,
    PretrainDataset,
    ShardedBatchSampler,
    SkippedSample,
    find_images,
    load_preview_images,
    make_loader,
    split_holdout,
)
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup, gather_objects, init_distributed
from .model import MaskedAutoencoder, count_parameters
from .plots import save_loss_curve
from .train_options import AUTOCAST_PRECISIONS, DEFAULT_PRESET, TrainOptions
from .weights import load_weights, resize_weights

ADAMW_BETAS = (0.9, 0.95)
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
LOSS_CURVE = "loss_curve.png"
PREVIEWS = "previews"
RUN_FILE = "run.json"
LOCK = ".lock"
PREVIEW_SEED = 0  # masking noise of the previews: the same patches hidden every epoch
# What decides what a run computes (options, the peak lr they give, the number of processes): resuming with other
# values would not continue the same run. Checkpoints record them under "train"; --resume compares them.
RUN_DEFINING = (
    "epochs",
    "warmup_epochs",
    "batch_size",
    "accum_iter",
    "peak_lr",
    "min_lr",
    "weight_decay",
    "seed",
    "repeat",
    "world_size",
)
MAX_SEED = 2**53  # seed * 1000 + rank still fits the int64 seeds of torch generators
# Temporaries of the run folder's files (mae.core.files names them .NAME.OWNER.RANDOM.tmp): NAME of each.
_RUN_TEMPORARY = re.compile(r"^\.(checkpoint(?:-\d+)?\.pt|log\.jsonl|run\.json|loss_curve\.png)\.")
_PREVIEW_TEMPORARY = re.compile(r"^\.(epoch_\d+\.png)\.")


class OtherSettings(MAEError):
    """--resume of a run folder written with other settings; `differences` names each ("name: the run has A, now B")."""

    def __init__(self, message: str, hint: str, differences: list[str]) -> None:
        super().__init__(message, hint=hint)
        self.differences = differences


@dataclass
class TrainResult:
    final_loss: float | None  # mean loss of the last (possibly partial) epoch trained
    epochs_completed: int  # full epochs done
    epoch_position: float  # fractional epoch reached
    global_step: int  # optimizer steps done in all
    images_per_s: float  # training images per second in this session, all ranks together
    seconds: float  # wall time of this session
    stopped: str  # completed | max_minutes | max_steps | interrupted | already_complete
    out: Path
    checkpoint: Path
    config: MAEConfig
    epoch_checkpoints: list[Path] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    log: Path | None = None
    loss_curve: Path | None = None
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), the whole run


@dataclass(frozen=True)
class TrainStart:
    """What a run is about to do (`TrainReporter.started`)."""

    name: str  # the preset, or the --init weights
    config: MAEConfig
    trainable_parameters: int
    mask_ratio: float
    data: Path
    num_images: int  # in the data folder
    train_images: int
    preview_images: int
    previews_held_out: bool  # False: the previews are training images (too few to hold any out)
    world_size: int
    device: str  # this process's
    precision: str
    batch_size: int  # per process
    accum_iter: int
    peak_lr: float
    optimizer_steps_per_epoch: int
    resumed_at: tuple[float, int] | None  # (fractional epoch, optimizer step) of a resumed run
    notes: list[str]  # what the user should know about the --init weights


@dataclass(frozen=True)
class StepReport:
    """One optimizer step (`TrainReporter.stepped`)."""

    epoch: int  # 1-based: the epoch being trained
    epochs: int
    loss: float | None  # mean over the accumulation group; None when every file of it was unreadable
    lr: float
    images_per_s: float  # all ranks, since the last "step" log line


class TrainReporter:
    """What a training tells the person running it; only rank 0's is called. This one says nothing: the app
    (`mae train`, `mae demo`) passes a reporter that prints."""

    def note(self, text: str) -> None:
        """Something the user should know."""

    def skipped(self, message: str) -> None:
        """A training file that could not be read (each file once)."""

    def started(self, start: TrainStart) -> None:
        """Training begins (or resumes)."""

    def progress(self, total: int, completed: int) -> AbstractContextManager:
        """Held around the epochs: `total` micro-batches in the run, `completed` of them done before."""
        return contextlib.nullcontext()

    def advanced(self, epoch: int, epochs: int) -> None:
        """One micro-batch of the 1-based `epoch` done."""

    def stepped(self, step: StepReport) -> None:
        """One optimizer step done."""

    def finished(self, result: TrainResult, opts: TrainOptions) -> None:
        """The session ended; `result.stopped` says how ("already_complete": there was nothing left to train)."""


SILENT = TrainReporter()


# ------------------------------------------------------------------------------------------------- recipe
def learning_rate(epoch: float, peak_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warmup from 0, then half-cycle cosine to min_lr; `epoch` is fractional (the original's
    adjust_learning_rate)."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_learning_rate(blr: float, lr: float | None, batch_size: int, accum_iter: int, world_size: int) -> float:
    """lr, or blr scaled by the effective batch (batch x accum_iter x world size) / 256."""
    return lr if lr is not None else blr * batch_size * accum_iter * world_size / 256


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[no-decay group, decay group]. Biases and 1-D parameters (norms) are not decayed; parameters that do not
    require grad (the fixed position embeddings) are left out of the optimizer altogether."""
    no_decay: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------ helpers
def _is_whole(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _option_problems(opts: TrainOptions) -> list[str]:
    """What is wrong with the hyper-parameters (each named as its command-line option, with the value given)."""
    problems = []

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def check(name: str, ok: bool, wanted: str) -> None:
        if not ok:
            problems.append(f"{flag(name)} must be {wanted}, got {getattr(opts, name)!r}")

    if opts.precision not in AUTOCAST_PRECISIONS:
        problems.append(f"--precision {opts.precision!r} must be one of {', '.join(AUTOCAST_PRECISIONS)}")
    for name, least in (
        ("epochs", 1),
        ("batch_size", 1),
        ("accum_iter", 1),
        ("repeat", 1),
        ("save_every", 1),
        ("log_every", 1),
        ("warmup_epochs", 0),
        ("workers", 0),
        ("preview_images", 0),
    ):
        value = getattr(opts, name)
        check(name, _is_whole(value) and value >= least, f"a whole number, at least {least}")
    check("seed", _is_whole(opts.seed) and 0 <= opts.seed <= MAX_SEED, f"a whole number from 0 to {MAX_SEED}")
    if opts.max_steps is not None:
        check("max_steps", _is_whole(opts.max_steps) and opts.max_steps >= 1, "a whole number, at least 1")

    def finite(value: Any) -> bool:
        return _is_number(value) and math.isfinite(value)

    check("blr", finite(opts.blr) and opts.blr > 0, "a finite number above 0")
    if opts.lr is not None:
        check("lr", finite(opts.lr) and opts.lr > 0, "a finite number above 0")
    check("min_lr", finite(opts.min_lr) and opts.min_lr >= 0, "a finite number, 0 or more")
    check("weight_decay", finite(opts.weight_decay) and opts.weight_decay >= 0, "a finite number, 0 or more")
    check("mask_ratio", finite(opts.mask_ratio) and 0.0 <= opts.mask_ratio < 1.0, "a number in [0, 1)")
    # inf is allowed for the two durations: it means never
    check(
        "checkpoint_minutes",
        _is_number(opts.checkpoint_minutes) and opts.checkpoint_minutes >= 0,  # NaN compares False
        "a number of minutes, 0 or more (0: after every optimizer step)",
    )
    if opts.max_minutes is not None:
        check("max_minutes", _is_number(opts.max_minutes) and opts.max_minutes > 0, "a number of minutes above 0")
    return problems


def _check_options(opts: TrainOptions, device: torch.device) -> None:
    problems = _option_problems(opts)
    if problems:
        raise MAEError("Invalid training options: " + "; ".join(problems) + ".", hint="`mae train --help` lists them")
    if opts.precision == "fp16" and device.type != "cuda":
        raise MAEError(
            "fp16 training needs a CUDA GPU (fp16 autocast with a gradient scaler); this run is on the "
            f"{device.type.upper()}.",
            hint="use --precision fp32, or bf16 on a CPU with bf16 instructions (AMX / AVX512-BF16)",
        )
    if opts.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MAEError("This GPU does not support bf16.", hint="use --precision fp16 or fp32")
    if opts.precision == "bf16" and device.type == "cpu":
        # Emulated bf16 (AVX2-only CPUs) runs many times slower than fp32: stop now, not after hours.
        hardware.require_native_bf16("--precision bf16 (training)", allow_emulated=opts.allow_emulated_bf16)


def _options_dict(opts: TrainOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}


def _rng_state() -> dict[str, Any]:
    """RNG states as plain tensors / containers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    has_gauss, cached = state["numpy_gauss"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy_state["kind"], keys, numpy_state["pos"], has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopRequests:
    """First SIGINT / SIGTERM: finish the current step, checkpoint, stop. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class _Session:
    """What this process's call of `train` counts, besides the run's position (which the checkpoint holds)."""

    started: float  # time.monotonic()
    stopped: str = "completed"  # or why the session stops: a TrainResult.stopped
    images: int = 0  # trained in this session, all ranks together
    last_checkpoint: float = 0.0  # when checkpoint.pt was last written (for --checkpoint-minutes)
    interval_images: int = 0  # images since the last "step" log line (its images_per_s)
    interval_start: float = 0.0
    epoch_checkpoints: list[Path] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)

    def add_outputs(self, outputs: tuple[Path | None, Path | None]) -> None:
        """An epoch end's (checkpoint-{epoch}.pt, preview), each None when that epoch wrote none."""
        checkpoint, preview = outputs
        self.epoch_checkpoints += [checkpoint] if checkpoint else []
        self.previews += [preview] if preview else []


def _json_line(path: Path, record: dict[str, Any]) -> None:
    """Append one record. A line cut short (full disk, kill) is dropped when the run resumes (`_read_log`)."""
    with faults(path, "append to"), open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _read_log(path: Path, upto_step: int | None = None) -> list[dict[str, Any]]:
    """log.jsonl records; with upto_step, records written after that step are dropped (and the file rewritten):
    the resumed run writes them again."""
    with faults(path, "read"):
        if not path.is_file():
            return []
        text = path.read_text(encoding="utf-8", errors="replace")
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    if upto_step is not None:
        records = [r for r in records if r.get("step", 0) <= upto_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _remove_leftovers(out: Path) -> int:
    """Remove the temporaries of run-folder files that dead processes left (a SIGKILLed run); -> how many."""

    def names(folder: Path, pattern: re.Pattern) -> set[str]:
        try:
            return {m.group(1) for entry in os.listdir(folder) if (m := pattern.match(entry))}
        except OSError:
            return set()

    removed = 0
    for folder, pattern in ((out, _RUN_TEMPORARY), (out / PREVIEWS, _PREVIEW_TEMPORARY)):
        found = names(folder, pattern)
        removed += remove_leftovers(folder, found) if found else 0
    return removed


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def unreadable_data_message(train_files: int, tried: int) -> str:
    """Why a run stops when no training image could be read: `tried` of the `train_files` files were reached (an
    epoch drops its incomplete last batch, so a few may not be) and every one of them was unreadable."""
    if tried >= train_files:
        if train_files == 1:
            return "The only training file could not be read as an image."
        return f"None of the {train_files} training files could be read as an image."
    rest = train_files - tried
    head = (
        "The one training file tried could not be read as an image"
        if tried == 1
        else f"None of the {tried} training files tried could be read as an image"
    )
    others = "the other one was" if rest == 1 else f"the other {rest} were"
    return f"{head} (of {train_files}; {others} not reached: an epoch drops its incomplete last batch)."


# ------------------------------------------------------------------------------------------------ trainer
class _Trainer:
    def __init__(self, opts: TrainOptions, dist_info: DistInfo, reporter: TrainReporter = SILENT) -> None:
        self.opts = opts
        self.dist = dist_info
        self.device = dist_info.device
        self.out = Path(opts.out)
        self.checkpoint_path = self.out / CHECKPOINT
        self.log_path = self.out / LOG
        self.is_main = dist_info.is_main
        self.lock: FolderLock | None = None  # held by rank 0 from setup until the run ends (`close`)
        self.last_saved: dict[str, Any] | None = None  # the position in checkpoint.pt as last written, if any
        self.pending_epoch_outputs = False  # resumed at an epoch end whose outputs were not all written
        self.training = False  # True once `train` has begun (setup is over)
        self.report = reporter if self.is_main else SILENT  # rank 0 speaks for the run
        self.bar = self.report if opts.progress else SILENT  # the progress calls

    # ----------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check the options and the folder, find the data, build the model and the optimizer, restore a resumed
        run's position (or prepare a new run's folder)."""
        opts = self.opts
        _check_options(opts, self.device)
        self._check_folder()
        self._find_data()
        resume_payload = load_checkpoint(self.checkpoint_path) if opts.resume else None
        self.peak_lr = peak_learning_rate(opts.blr, opts.lr, opts.batch_size, opts.accum_iter, self.dist.world_size)
        self.config, self.preset, initial_state, self.init_notes = self._resolve_model(resume_payload)
        self.num_kept = self.config.num_kept(opts.mask_ratio)
        if self.num_kept < 1:
            raise MAEError(
                f"--mask-ratio {opts.mask_ratio} keeps no patch of the {self.config.num_patches}.",
                hint="lower --mask-ratio",
            )
        self._make_loader()
        self._make_model(initial_state)
        self._start_position(resume_payload)
        barrier(self.dist)  # rank 0 has prepared the folder before anyone goes on

    def _check_folder(self) -> None:
        """Claim an existing run folder; --resume needs a checkpoint in it, a new run needs none."""
        opts = self.opts
        with faults(self.out, "read"):
            out_exists = self.out.exists() or self.out.is_symlink()
        if out_exists and self.is_main:
            self._claim_folder()  # before anything else: a folder a live training writes is in use, whatever it holds
        if opts.resume and not self.checkpoint_path.is_file():
            raise MAEError(
                f"--resume: there is no {CHECKPOINT} in {self.out} to continue.",
                hint="check --out, or start a new run without --resume",
            )
        if not opts.resume and self.checkpoint_path.exists():
            raise self._run_exists()
        if opts.resume and opts.init is not None:
            self.report.note("--init is ignored with --resume (the weights come from the run)")

    def _run_exists(self) -> MAEError:
        return MAEError(
            f"{self.out} already holds a run ({CHECKPOINT}); it would be overwritten.",
            hint="pass --resume to continue it, or choose another --out",
        )

    def _find_data(self) -> None:
        """The images, the training ones and the previews (held out when there are enough)."""
        all_paths = find_images(self.opts.data)
        self.train_paths, held_out = split_holdout(all_paths, self.opts.preview_images)
        self.preview_paths = held_out or self.train_paths[: self.opts.preview_images]
        self.previews_held_out = bool(held_out)
        self.num_images = len(all_paths)

    def _make_loader(self) -> None:
        """This rank's batches; refused when an epoch would give no batch or no optimizer step."""
        opts = self.opts
        self.sampler = ShardedBatchSampler(
            len(self.train_paths) * opts.repeat, opts.batch_size, opts.seed, self.dist.rank, self.dist.world_size
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch()  # batches per rank per epoch
        if self.steps_per_epoch == 0:
            raise MAEError(
                f"{len(self.train_paths)} training images x --repeat {opts.repeat} make no full batch of"
                f" {opts.batch_size} per process"
                f" ({self.dist.world_size} process(es)); incomplete batches are dropped.",
                hint="lower --batch-size or add images",
            )
        if opts.accum_iter > self.steps_per_epoch:
            raise MAEError(
                f"--accum-iter {opts.accum_iter} is more than the {self.steps_per_epoch} batches of an epoch"
                f" ({len(self.train_paths)} training images x --repeat {opts.repeat}, batches of {opts.batch_size}"
                f" per process): no optimizer step would ever be taken.",
                hint="lower --accum-iter or --batch-size, or add images (or --repeat)",
            )
        self.dataset = PretrainDataset(
            self.train_paths, self.config.img_size, self.config.num_patches, opts.seed, repeat=opts.repeat
        )
        self.loader = make_loader(self.dataset, self.sampler, opts.workers, pin_memory=self.device.type == "cuda")

    def _make_model(self, initial_state: dict[str, torch.Tensor] | None) -> None:
        """The model (DDP-wrapped under torchrun), AdamW with the recipe's groups, the fp16 grad scaler."""
        torch.manual_seed(self.opts.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = MaskedAutoencoder(self.config).to(self.device)
        if initial_state is not None:
            self._load_initial_state(initial_state)
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = torch.optim.AdamW(
            weight_decay_groups(self.model, self.opts.weight_decay), lr=self.peak_lr, betas=ADAMW_BETAS
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.opts.precision == "fp16")

    def _start_position(self, resume_payload: dict[str, Any] | None) -> None:
        """The position a resumed run restores, or the start of a new run (whose folder rank 0 prepares)."""
        # position: the next batch to train is batch `batch` of epoch `epoch`; `step` optimizer steps are done
        self.epoch, self.batch, self.step, self.images_seen = 0, 0, 0, 0
        self.skipped: dict[str, str] = {}  # path -> reason, the whole run
        self.epoch_losses: list[float] = []  # step losses of the current epoch
        self.last_epoch_loss: float | None = None
        self.history: list[dict[str, Any]] = []  # "step" log records, for the loss curve
        if resume_payload is not None:
            self._restore(resume_payload)
        elif self.is_main:
            if self.lock is None:  # a new folder: made only now that the data and the options are known good
                self._claim_folder()
                if self.checkpoint_path.exists():  # another run got here first
                    raise self._run_exists()
            with faults(self.log_path, "remove"):
                self.log_path.unlink(missing_ok=True)  # a log without a checkpoint belongs to no resumable run
            self._write_run_file()

    def _claim_folder(self) -> None:
        """Make the run folder, lock it for this process, remove the temporaries killed runs left in it."""
        make_dirs(self.out)
        self.lock = FolderLock(
            self.out / LOCK,
            f"The run folder {self.out}",
            hint="wait until that training ends (or stop it), or choose another --out",
        ).acquire()
        removed = _remove_leftovers(self.out)
        if removed:
            self.report.note(
                f"removed {_plural(removed, 'unfinished temporary file')} that a killed run left in {self.out} "
                "(nothing in them was ever used)"
            )

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _resolve_model(self, payload: dict[str, Any] | None):
        """(config, preset name or None, state dict to load or None, notes)."""
        opts = self.opts
        overrides = {"norm_pix_loss": opts.norm_pix_loss, "mask_ratio": opts.mask_ratio}
        if payload is not None:
            config: MAEConfig = payload["config"]
            run = payload.get("train", {})
            preset = run.get("preset")
            wanted = config
            if opts.model is not None:
                wanted = get_preset(opts.model).replace(img_size=config.img_size, patch_size=config.patch_size)
            wanted = wanted.replace(
                **{k: v for k, v in (("img_size", opts.img_size), ("patch_size", opts.patch_size)) if v is not None},
                **overrides,
            )
            self._check_same_run(config, wanted, run)
            return config, preset, payload["model"], []
        if opts.init is not None:
            if opts.model is not None:
                raise MAEError(
                    "--init takes the architecture from the weights, so --model cannot choose another one.",
                    hint="leave out --model (or --init)",
                )
            loaded = load_weights(opts.init)
            if opts.patch_size is not None and opts.patch_size != loaded.config.patch_size:
                raise MAEError(
                    f"--patch-size {opts.patch_size} differs from the weights' {loaded.config.patch_size}; the patch "
                    "embedding cannot be reused.",
                    hint="leave out --patch-size",
                )
            if opts.img_size is not None and opts.img_size != loaded.config.img_size:
                loaded = resize_weights(loaded, opts.img_size)
            notes = list(loaded.notes)
            if not loaded.has_decoder:
                notes.append("the weights have no decoder: it starts from a fresh initialization")
            return loaded.config.replace(**overrides), None, loaded.state_dict, notes
        preset = opts.model or DEFAULT_PRESET
        config = get_preset(preset, img_size=opts.img_size, patch_size=opts.patch_size).replace(**overrides)
        return config, preset, None, []

    def _run_defining(self) -> dict[str, Any]:
        """The RUN_DEFINING values of this run, in that order."""
        given = {"peak_lr": self.peak_lr, "world_size": self.dist.world_size}
        return {name: given[name] if name in given else getattr(self.opts, name) for name in RUN_DEFINING}

    def _check_same_run(self, config: MAEConfig, wanted: MAEConfig, run: dict[str, Any]) -> None:
        differences = [
            f"{name}: the run has {value!r}, now {getattr(wanted, name)!r}"
            for name, value in config.to_dict().items()
            if getattr(wanted, name) != value
        ]
        for name, after in self._run_defining().items():
            before = run.get(name)
            same = math.isclose(before, after, rel_tol=1e-12) if isinstance(after, float) else before == after
            if not same:
                differences.append(f"{name}: the run has {before!r}, now {after!r}")
        if differences:
            raise OtherSettings(
                f"--resume: {self.checkpoint_path} was written by a run with other settings: " + "; ".join(differences),
                hint=f"resume with the run's options (see {self.out / RUN_FILE}), or start a new run in another --out",
                differences=differences,
            )

    def _load_initial_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.startswith(("decoder_", "mask_token"))]
        if missing or unexpected:
            raise MAEError(
                "The weights do not fit the model: "
                + (f"missing {', '.join(missing[:5])}" if missing else "")
                + (f" unexpected {', '.join(unexpected[:5])}" if unexpected else ""),
                hint="is this an MAE checkpoint?",
            )

    def _restore(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        position = payload["position"]
        self.epoch, self.batch, self.step = position["epoch"], position["batch"], position["step"]
        self.images_seen = position["images_seen"]
        self.epoch_losses = list(payload.get("epoch_losses", []))
        self.last_epoch_loss = payload.get("last_epoch_loss")
        self.skipped = {item["path"]: item["reason"] for item in payload.get("skipped_files", [])}
        rng_states = payload.get("rng", [])
        if len(rng_states) == self.dist.world_size:
            _set_rng_state(rng_states[self.dist.rank])
        data = payload.get("data", {})
        if data.get("num_images") not in (None, self.num_images):
            self.report.note(
                f"the data folder now has {self.num_images} images, the run started with {data['num_images']}: the "
                "resumed run does not see the data an uninterrupted one would"
            )
        self.last_saved = dict(position)
        if self.is_main:
            records = _read_log(self.log_path, upto_step=self.step)
            self.history = [r for r in records if r.get("event") == "step" and r.get("loss") is not None]
            # An epoch end's outputs are written after its checkpoint, the "epoch" line last: without that line
            # (a full disk, a kill) they are not all there, and this run writes them again before going on.
            self.pending_epoch_outputs = (
                self.batch == 0
                and self.epoch > 0
                and not any(r.get("event") == "epoch" and r.get("epoch") == self.epoch for r in records)
            )

    def _write_run_file(self) -> None:
        record = {
            "options": _options_dict(self.opts),
            "config": self.config.to_dict(),
            "preset": self.preset,
            "world_size": self.dist.world_size,
            "effective_batch": self.opts.batch_size * self.opts.accum_iter * self.dist.world_size,
            "peak_lr": self.peak_lr,
            "num_images": self.num_images,
            "train_images": len(self.train_paths),
            "preview_images": [str(p) for p in self.preview_paths],
            "previews_held_out": self.previews_held_out,
        }
        atomic_write_text(self.out / RUN_FILE, json.dumps(record, indent=2) + "\n")

    # ------------------------------------------------------------------------------------- checkpoints
    def _epoch_float(self) -> float:
        return self.epoch + self.batch / self.steps_per_epoch

    def _save(self) -> None:
        """checkpoint.pt for the current position. Collective (RNG states are gathered); rank 0 writes."""
        rng_states = gather_objects(_rng_state(), self.dist)
        position = {"epoch": self.epoch, "batch": self.batch, "step": self.step, "images_seen": self.images_seen}
        if not self.is_main:
            self.last_saved = position
            return
        opts = self.opts
        save_checkpoint(
            self.checkpoint_path,
            self.model.state_dict(),
            self.config,
            epoch=self.epoch,  # epochs completed (a mid-epoch checkpoint has `batch` > 0 as well)
            position=position,
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng_states,
            train={"preset": self.preset, **self._run_defining(), "precision": opts.precision},
            data={"num_images": self.num_images, "train_images": len(self.train_paths)},
            epoch_losses=list(self.epoch_losses),
            last_epoch_loss=self.last_epoch_loss,
            skipped_files=[{"path": p, "reason": r} for p, r in sorted(self.skipped.items())],
        )
        self.last_saved = position

    def _saved_text(self, path: bool = True) -> str | None:
        """What the last checkpoint written holds, as "RUN/checkpoint.pt (epoch 1.500, optimizer step 9)"; None if
        none was written."""
        if self.last_saved is None:
            return None
        saved = self.last_saved
        epoch = saved["epoch"] + saved["batch"] / self.steps_per_epoch
        return f"{self.checkpoint_path if path else CHECKPOINT} (epoch {epoch:.3f}, optimizer step {saved['step']})"

    def with_run_state(self, exc: FileSystemFault) -> FileSystemFault:
        """The fault, plus what of the run is safe: the last checkpoint written (intact: writes are atomic)."""
        saved = self._saved_text()
        if saved is None and not self.training:
            return exc  # set up before a checkpoint was read: nothing to add
        if saved is None:
            return FileSystemFault(
                f"{exc.message} No checkpoint was written yet.", hint=exc.hint, path=exc.path, errno_=exc.errno
            )
        name = Path(exc.path).name
        if name == CHECKPOINT or name.startswith(f".{CHECKPOINT}."):  # the file itself or its temporary
            state = f"The previous {self._saved_text(path=False)} is intact: --resume continues from it."
        else:
            state = f"The last checkpoint, {saved}, is intact: --resume continues from it."
        hint = f"{exc.hint}, with --resume" if exc.hint and "run" in exc.hint else exc.hint
        return FileSystemFault(f"{exc.message} {state}", hint=hint, path=exc.path, errno_=exc.errno)

    # ------------------------------------------------------------------------------------------ training
    def _forward_backward(self, batch: Batch, sync: bool) -> tuple[float | None, int]:
        """One micro-batch: forward, loss, backward (gradient pre-divided by accum_iter).
        -> (mean loss over all ranks, images over all ranks); the loss is None when there were no images.

        A batch whose files were all unreadable still runs a zero-weight step on one blank image: under DDP every
        rank must take part in each gradient all-reduce."""
        images, noise, count = batch.images, batch.noise, batch.images.shape[0]
        if count == 0:
            size = self.config.img_size
            images = torch.zeros(1, self.config.in_chans, size, size)
            noise = torch.rand(1, self.config.num_patches, generator=torch.Generator().manual_seed(0))
        images = images.to(self.device, non_blocking=True)  # [B, 3, S, S]
        noise = noise.to(self.device, non_blocking=True)  # [B, L]
        no_sync = self.ddp_model.no_sync() if self.dist.enabled and not sync else contextlib.nullcontext()
        with no_sync:
            with autocast_context(self.opts.precision, self.device):
                output = self.ddp_model(images, mask_ratio=self.opts.mask_ratio, noise=noise)
            loss = output.loss  # [] float32 (forward_loss works in float32)
            local = loss.item() if count else 0.0
            # every rank learns every rank's loss before any weight changes: a non-finite loss stops all of them
            loss_sum, images_sum = all_reduce_sum([local * count, float(count)], self.dist)
            mean_loss = loss_sum / images_sum if images_sum else None
            if mean_loss is not None and not math.isfinite(mean_loss):
                self._diverged(mean_loss)
            weight = 1.0 if count else 0.0
            self.scaler.scale(loss * (weight / self.opts.accum_iter)).backward()
        return mean_loss, int(images_sum)

    def _diverged(self, value: float) -> None:
        saved = self._saved_text()
        if self.is_main:
            with contextlib.suppress(FileSystemFault):  # the loss is the news; a full disk would be next
                _json_line(self.log_path, {"event": "stopped", "reason": "non_finite_loss", "step": self.step})
        new_run = "a lower --blr / --lr or a longer --warmup-epochs"
        if saved is None:
            last = "no checkpoint was written"
            fp32 = ", or --precision fp32" if self.opts.precision != "fp32" else ""
            hint = f"start again with {new_run}{fp32} (there is no checkpoint to --resume)"
        else:
            last = f"the last good checkpoint, {saved}, is kept"
            hint = f"start a new run (another --out) with {new_run}"
            if self.opts.precision != "fp32":
                hint += "; or continue this one in fp32: --resume --precision fp32"
            else:
                hint += " (--resume with the same options would likely meet the same loss)"
        raise MAEError(
            f"The loss became {value} at epoch {self._epoch_float():.3f} (optimizer step {self.step + 1}); "
            f"training stopped and {last}.",
            hint=hint,
        )

    def _stop_reason(self, started: float, signals: _StopRequests) -> str | None:
        """Why to stop after this optimizer step, agreed by every rank."""
        opts = self.opts
        reasons = [
            ("max_steps", opts.max_steps is not None and self.step >= opts.max_steps),
            ("max_minutes", opts.max_minutes is not None and time.monotonic() - started >= opts.max_minutes * 60),
            ("interrupted", signals.requested),
        ]
        flags = all_reduce_sum([float(flag) for _, flag in reasons], self.dist)
        return next((name for (name, _), flag in zip(reasons, flags, strict=True) if flag > 0), None)

    def _epoch_batches(self) -> Iterator[tuple[int, Batch]]:
        self.sampler.set_epoch(self.epoch, self.batch)
        yield from enumerate(self.loader, start=self.batch)

    def train(self) -> TrainResult:
        """Train from the position set up to the last epoch, or until a stop (a limit, a signal)."""
        self.training = True
        session = _Session(started=time.monotonic())
        if self.pending_epoch_outputs:
            session.add_outputs(self._epoch_outputs(self.last_epoch_loss, set(self.skipped)))
        if self.epoch >= self.opts.epochs:
            session.stopped = "already_complete"
            return self._result(session, time.monotonic() - session.started)
        self._announce()
        if self.opts.resume and self.is_main:
            _json_line(self.log_path, {"event": "resumed", "step": self.step, "epoch": self._epoch_float()})
        session.last_checkpoint = session.interval_start = time.monotonic()
        total = self.opts.epochs * self.steps_per_epoch
        self.model.train()
        with self.bar.progress(total, self._micro_done()), _StopRequests() as signals:
            while self.epoch < self.opts.epochs and session.stopped == "completed":
                if not self._train_epoch(session, signals):
                    break  # left mid-epoch
            if session.stopped != "completed" and self.is_main:
                record = {"event": "stopped", "reason": session.stopped, "step": self.step}
                _json_line(self.log_path, {**record, "epoch": self._epoch_float()})
        seconds = time.monotonic() - session.started
        self._draw_loss_curve()
        barrier(self.dist)
        return self._result(session, seconds)

    def _train_epoch(self, session: _Session, signals: _StopRequests) -> bool:
        """The rest of the current epoch, then its end (checkpoint and outputs). False: the run stopped mid-epoch
        (its position checkpointed)."""
        self.optimizer.zero_grad(set_to_none=True)  # a partial accumulation group never crosses epochs
        group_losses: list[float] = []
        for batch_index, batch in self._epoch_batches():
            if not self._micro_step(batch_index, batch, session, group_losses):
                continue
            step_loss = self._optimizer_step(batch_index, group_losses)
            if not self._after_step(step_loss, session, signals):
                return False
        # the epoch ran to its end (also when a stop was asked at its last optimizer step)
        session.add_outputs(self._end_epoch())
        session.last_checkpoint = time.monotonic()
        if session.stopped == "completed" and self.epoch < self.opts.epochs:
            session.stopped = self._stop_reason(session.started, signals) or session.stopped
        return True

    def _micro_step(self, batch_index: int, batch: Batch, session: _Session, group_losses: list[float]) -> bool:
        """One micro-batch: the learning rate at the start of an accumulation group, forward and backward.
        -> whether it ends the group (an optimizer step is due)."""
        opts = self.opts
        self._note_skipped(batch.skipped)
        if batch_index % opts.accum_iter == 0:
            epoch = batch_index / self.steps_per_epoch + self.epoch
            lr = learning_rate(epoch, self.peak_lr, opts.min_lr, opts.warmup_epochs, opts.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        update = (batch_index + 1) % opts.accum_iter == 0
        loss, images = self._forward_backward(batch, sync=update)
        if loss is not None:
            group_losses.append(loss)
        session.images += images
        session.interval_images += images
        self.images_seen += images
        self.bar.advanced(self.epoch + 1, opts.epochs)
        return update

    def _optimizer_step(self, batch_index: int, group_losses: list[float]) -> float | None:
        """Apply the accumulated gradients; -> the group's mean loss (None when it saw no image)."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batch = batch_index + 1
        step_loss = sum(group_losses) / len(group_losses) if group_losses else None
        group_losses.clear()
        if step_loss is not None:
            self.epoch_losses.append(step_loss)
        return step_loss

    def _after_step(self, step_loss: float | None, session: _Session, signals: _StopRequests) -> bool:
        """Log and report the step, then stop or checkpoint when due. False: leave the epoch (stopped mid-epoch)."""
        opts = self.opts
        now = time.monotonic()
        lr = self.optimizer.param_groups[0]["lr"]
        images_per_s = session.interval_images / max(now - session.interval_start, 1e-9)
        if self.step % opts.log_every == 0:
            self._log_step(step_loss, lr, images_per_s)
            session.interval_images, session.interval_start = 0, now
        self.bar.stepped(StepReport(self.epoch + 1, opts.epochs, step_loss, lr, images_per_s))
        reason = self._stop_reason(session.started, signals)
        mid_epoch = self.batch < self.steps_per_epoch
        if reason is not None:
            session.stopped = reason
            if mid_epoch:  # checkpoint this position and leave
                self._save()
                return False
        elif mid_epoch and now - session.last_checkpoint >= opts.checkpoint_minutes * 60:
            self._save()
            session.last_checkpoint = time.monotonic()
        return True

    def _micro_done(self) -> int:
        return self.epoch * self.steps_per_epoch + self.batch

    def _note_skipped(self, skipped: list[SkippedSample]) -> None:
        for sample in skipped:
            if sample.path not in self.skipped:
                self.skipped[sample.path] = sample.reason
                if self.is_main:
                    self.report.skipped(sample.message)
                    self._log_skipped(sample.path)

    def _log_skipped(self, path: str) -> None:
        record = {"event": "skipped_file", "step": self.step, "path": path, "reason": self.skipped[path]}
        _json_line(self.log_path, record)

    def _log_step(self, loss: float | None, lr: float, images_per_s: float) -> None:
        if not self.is_main:
            return
        record = {
            "event": "step",
            "step": self.step,
            "epoch": round(self._epoch_float(), 6),
            "loss": loss,
            "lr": lr,
            "images_per_s": round(images_per_s, 3),
            "images": self.images_seen,
        }
        _json_line(self.log_path, record)
        if loss is not None:
            self.history.append(record)

    def _end_epoch(self) -> tuple[Path | None, Path | None]:
        """Gather skipped files, checkpoint, then the epoch's outputs."""
        before = set(self.skipped)
        for rank_skipped in gather_objects(dict(self.skipped), self.dist):
            for path, reason in rank_skipped.items():
                self.skipped.setdefault(path, reason)
        if self.images_seen == 0:
            # every file reached so far was unreadable, and each is in `skipped` (all ranks')
            first, reason = sorted(self.skipped.items())[0] if self.skipped else ("", "")
            example = f" ({Path(first).name}: {reason.replace('_', ' ')})" if first else ""
            raise MAEError(
                unreadable_data_message(len(self.train_paths), len(self.skipped)),
                hint=f"check the --data folder: open a few of its files with an image viewer{example}",
            )
        self.last_epoch_loss = sum(self.epoch_losses) / len(self.epoch_losses) if self.epoch_losses else None
        self.epoch += 1
        self.batch = 0
        epoch_loss = self.last_epoch_loss
        self.epoch_losses = []
        self._save()
        return self._epoch_outputs(epoch_loss, before)

    def _epoch_outputs(self, epoch_loss: float | None, before: set[str]) -> tuple[Path | None, Path | None]:
        """After an epoch's checkpoint (rank 0): the epoch checkpoint, preview, loss curve and, last, the "epoch"
        log line, which says they are all written (a resumed run writes them again when it is missing)."""
        opts = self.opts
        epoch_path = preview = None
        if self.is_main:
            for path in sorted(set(self.skipped) - before):  # files only other ranks met
                self._log_skipped(path)
            if self.epoch % opts.save_every == 0 or self.epoch == opts.epochs:
                epoch_path = self.out / f"checkpoint-{self.epoch}.pt"
                atomic_copy(self.checkpoint_path, epoch_path)
            preview = self._write_preview()
            self._draw_loss_curve()
            _json_line(
                self.log_path,
                {
                    "event": "epoch",
                    "epoch": self.epoch,
                    "step": self.step,
                    "loss": epoch_loss,
                    "images": self.images_seen,
                    "skipped_files": len(self.skipped),
                },
            )
        return epoch_path, preview

    # ------------------------------------------------------------------------------------------ outputs
    def _write_preview(self) -> Path | None:
        """Reconstructions of the preview images as `mae reconstruct` makes them: its preprocessing, masking from
        seeded noise (the same patches hidden every epoch) and the pictures and metrics of mae.core.visualize."""
        pre = Preprocessing(size=self.config.img_size)
        pixel_values, used, _ = load_preview_images(self.preview_paths, pre)
        if not used:
            return None
        noise = random_noise(len(used), self.config.num_patches, seed=PREVIEW_SEED)  # [N, L]
        masking = masking_from_noise(noise, self.opts.mask_ratio)
        pred = self._predict(pixel_values, masking.ids_keep, masking.ids_restore)  # [N, L, p*p*3]
        space = PixelSpace(self.config.patch_size, pre.mean, pre.std, self.config.norm_pix_loss)
        panels = build_panels(pixel_values, pred, masking.mask, space)
        metrics = masked_metrics(pixel_values, pred, masking.mask, space, panels=panels)
        origin = "held out" if self.previews_held_out else "trained on"
        labels = [
            f"epoch {self.epoch} · {path.name} ({origin}) · loss {loss:.4f} · PSNR {psnr:.1f} dB"
            for path, loss, psnr in zip(used, metrics.loss, metrics.psnr, strict=True)
        ]
        picture = panels_picture(panels, self.opts.mask_ratio, self.config.norm_pix_loss, row_labels=labels)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        path = self.out / PREVIEWS / f"epoch_{self.epoch:04d}.png"
        atomic_write_bytes(path, buffer.getvalue())
        return path

    @torch.no_grad()
    def _predict(self, pixel_values: np.ndarray, ids_keep: np.ndarray, ids_restore: np.ndarray) -> np.ndarray:
        """The decoder's prediction [N, L, p*p*3] for the kept patches, in eval mode (fp32)."""
        was_training = self.model.training
        self.model.eval()
        latent = self.model.forward_encoder(
            torch.from_numpy(pixel_values).to(self.device), torch.from_numpy(ids_keep).to(self.device)
        )  # [N, 1+K, D]
        pred = self.model.forward_decoder(latent, torch.from_numpy(ids_restore).to(self.device))
        self.model.train(was_training)
        return pred.float().cpu().numpy()

    def _draw_loss_curve(self) -> None:
        if not self.is_main or not self.history:
            return

        save_loss_curve(
            self.out / LOSS_CURVE,
            [r["step"] for r in self.history],
            [r["loss"] for r in self.history],
            [r["lr"] for r in self.history],
            title=f"MAE pretraining, {self.preset or 'from ' + str(self.opts.init)}",
        )

    def _announce(self) -> None:
        opts = self.opts
        start = TrainStart(
            name=str(self.preset or opts.init),
            config=self.config,
            trainable_parameters=count_parameters(self.model, trainable_only=True),
            mask_ratio=opts.mask_ratio,
            data=Path(opts.data),
            num_images=self.num_images,
            train_images=len(self.train_paths),
            preview_images=len(self.preview_paths),
            previews_held_out=self.previews_held_out,
            world_size=self.dist.world_size,
            device=str(self.device),
            precision=opts.precision,
            batch_size=opts.batch_size,
            accum_iter=opts.accum_iter,
            peak_lr=self.peak_lr,
            optimizer_steps_per_epoch=self.steps_per_epoch // opts.accum_iter,
            resumed_at=(self._epoch_float(), self.step) if opts.resume else None,
            notes=list(self.init_notes),
        )
        self.report.started(start)

    def _result(self, session: _Session, seconds: float) -> TrainResult:
        loss_curve = self.out / LOSS_CURVE
        result = TrainResult(
            final_loss=self._final_loss(),
            epochs_completed=self.epoch,
            epoch_position=self._epoch_float(),
            global_step=self.step,
            images_per_s=session.images / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            stopped=session.stopped,
            out=self.out,
            checkpoint=self.checkpoint_path,
            config=self.config,
            epoch_checkpoints=session.epoch_checkpoints,
            previews=session.previews,
            log=self.log_path,
            loss_curve=loss_curve if loss_curve.is_file() else None,
            skipped_files=sorted(self.skipped.items()),
        )
        self.report.finished(result, self.opts)
        return result

    def _final_loss(self) -> float | None:
        """Mean loss of the current (partial) epoch, else of the last finished one."""
        return sum(self.epoch_losses) / len(self.epoch_losses) if self.epoch_losses else self.last_epoch_loss


def run_training(opts: TrainOptions, reporter: TrainReporter = SILENT) -> TrainResult:
    """Train (or resume) an MAE as `opts` say; see the module docstring for what is written. `reporter` hears what
    a person running it should see (progress, notes, the end); the default says nothing."""
    dist_info = init_distributed(opts.device)
    try:
        trainer = _Trainer(opts, dist_info, reporter)
        try:
            trainer.setup()
            return trainer.train()
        except FileSystemFault as exc:
            raise trainer.with_run_state(exc) from exc
        finally:
            trainer.close()
    finally:
        cleanup(dist_info)
