"""The `mae` command: a thin Typer app. Every command is a plain library call; heavy imports happen inside."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mae.runtime.bench_options import DEFAULT_BATCH_SIZE, DEFAULT_MASK_RATIOS, DEFAULT_MODEL, DEFAULT_SECONDS

from .core.engine_files import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_GIB
from .core.errors import MAEError
from .train_options import AUTOCAST_PRECISIONS, DEFAULT_PRESET, TrainOptions

app = typer.Typer(
    name="mae",
    help="Masked Autoencoders: pretrain, export to ONNX / TensorRT, reconstruct and embed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's boxed tables cut option names and values at 80 columns and label flags `<bool>`.
    rich_markup_mode=None,
)


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A string Enum of an option's choices (Typer lists and checks them); "cls+mean" is the member cls_mean."""
    return Enum(name, {value.replace("+", "_"): value for value in values}, type=str)


TRAIN = TrainOptions(data=Path())  # the defaults of `mae train`, from the library

# The library checks these again (and names them in its own errors); here they make `--help` list the choices.
Precision = choices("Precision", AUTOCAST_PRECISIONS)  # training autocast, the torch engine
ExportPrecision = choices("ExportPrecision", ("fp32", "fp16", "int8"))  # graphs in a bundle
ExportFormat = choices("ExportFormat", ("onnx", "trt", "tensorrt"))
EngineName = choices("EngineName", ("auto", "onnx", "trt", "torch", "openvino"))
Provider = choices("Provider", ("auto", "cpu", "cuda", "tensorrt"))  # ONNX Runtime execution providers
Resize = choices("Resize", ("center", "squash"))
Pool = choices("Pool", ("cls", "mean", "cls+mean", "tokens"))
DType = choices("DType", ("float32", "float16"))

# Options that reconstruct and embed share.
ModelOption = Annotated[str, typer.Option(help="Bundle directory, or weights (torch engine).")]
EngineOption = Annotated[
    EngineName, typer.Option(help="auto: the fastest accurate engine for this machine (it says which and why).")
]
ProviderOption = Annotated[Provider, typer.Option(help="ONNX Runtime execution provider.")]


# --------------------------------------------------------------------------------------------------- train
@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Folder of images, searched recursively.")],
    model: Annotated[
        str | None,
        typer.Option(help=f"Architecture preset (default: {DEFAULT_PRESET}; the run's with --resume)."),
    ] = None,
    img_size: Annotated[int | None, typer.Option(help="Input side in pixels (default: the preset's).")] = None,
    patch_size: Annotated[int | None, typer.Option(help="Patch side in pixels (default: the preset's).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = TRAIN.epochs,
    warmup_epochs: Annotated[int, typer.Option(min=0)] = TRAIN.warmup_epochs,
    batch_size: Annotated[int, typer.Option(min=1, help="Per-process batch size.")] = TRAIN.batch_size,
    accum_iter: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps.")] = TRAIN.accum_iter,
    repeat: Annotated[
        int, typer.Option(min=1, help="Passes over the images per epoch (small datasets).")
    ] = TRAIN.repeat,
    blr: Annotated[float, typer.Option(help="Base lr; lr = blr * effective batch / 256.")] = TRAIN.blr,
    lr: Annotated[float | None, typer.Option(help="Absolute lr (overrides --blr).")] = None,
    min_lr: Annotated[float, typer.Option()] = TRAIN.min_lr,
    weight_decay: Annotated[float, typer.Option()] = TRAIN.weight_decay,
    mask_ratio: Annotated[float, typer.Option(min=0.0, max=0.99)] = TRAIN.mask_ratio,
    norm_pix_loss: Annotated[bool, typer.Option("--norm-pix-loss/--no-norm-pix-loss")] = TRAIN.norm_pix_loss,
    precision: Annotated[Precision, typer.Option(help="fp32, bf16 autocast (CPU/GPU), fp16 + scaler (CUDA).")] = (
        Precision(TRAIN.precision)
    ),
    allow_emulated_bf16: Annotated[
        bool,
        typer.Option(
            "--allow-emulated-bf16",
            help="Run --precision bf16 on a CPU without bf16 instructions anyway (many times slower than fp32).",
        ),
    ] = False,
    init: Annotated[Path | None, typer.Option(help="Start from these weights (any format mae reads).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt.")] = False,
    out: Annotated[Path, typer.Option(help="Run directory.")] = TRAIN.out,
    seed: Annotated[int, typer.Option()] = TRAIN.seed,
    workers: Annotated[int, typer.Option(min=0, help="Data-loading processes.")] = TRAIN.workers,
    save_every: Annotated[int, typer.Option(min=1, help="Keep an epoch checkpoint every N epochs.")] = TRAIN.save_every,
    max_minutes: Annotated[float | None, typer.Option(help="Stop (cleanly, resumable) after this long.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop (cleanly, resumable) after N optimizer steps.")] = (
        None
    ),
    device: Annotated[str, typer.Option(help="auto (this process's GPU if any), cpu, cuda, cuda:N.")] = TRAIN.device,
    checkpoint_minutes: Annotated[
        float, typer.Option(help="Also refresh checkpoint.pt mid-epoch this often.")
    ] = TRAIN.checkpoint_minutes,
    preview_images: Annotated[
        int, typer.Option(min=0, help="Images held out and reconstructed every epoch.")
    ] = TRAIN.preview_images,
) -> None:
    """Pretrain (or continue pretraining) an MAE on a folder of images.

    Multi-GPU / multi-node: torchrun --nproc_per_node N -m mae.cli train ... (rank 0 writes).
    """
    options = plain(locals())  # before the imports below add names to locals()
    from .reports.train import RichTrainReporter
    from .train import run_training

    run_training(TrainOptions(**options), RichTrainReporter())


# -------------------------------------------------------------------------------------------------- export
@app.command()
def export(
    weights: Annotated[Path, typer.Argument(help="Checkpoint, official MAE .pth, HF ViTMAE dir, or a bundle (trt).")],
    format: Annotated[ExportFormat, typer.Option("--format", "-f")] = ExportFormat.onnx,
    out: Annotated[Path | None, typer.Option(help="Bundle directory (default: WEIGHTS' folder / 'bundle').")] = None,
    precision: Annotated[ExportPrecision, typer.Option()] = ExportPrecision.fp32,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the verified one).")] = None,
    num_heads: Annotated[int | None, typer.Option(help="Encoder heads, for official checkpoints.")] = None,
    decoder_num_heads: Annotated[int | None, typer.Option(help="Decoder heads, for official checkpoints.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="TensorRT profile: largest batch.")] = DEFAULT_MAX_BATCH,
    opt_batch: Annotated[int | None, typer.Option(help="TensorRT profile: batch to optimize for.")] = None,
    workspace: Annotated[float, typer.Option(help="TensorRT workspace, GiB.")] = DEFAULT_WORKSPACE_GIB,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="int8: images to calibrate on (folder, list file or glob; default: crops of shipped photos)."
        ),
    ] = None,
    calibration_count: Annotated[
        int | None, typer.Option(min=8, help="int8: calibration images (default 64; some more are held out).")
    ] = None,
    int8_min_cosine: Annotated[
        float | None, typer.Option(help="int8: least pooled cosine vs fp32 on held-out images (default 0.999).")
    ] = None,
) -> None:
    """Export weights to a verified ONNX bundle, or build TensorRT engines from it."""
    options = plain(locals())  # before the imports add names
    from mae.export import resolve_format, run_export

    from .reports.export import ExportSpinner, print_export_summary

    bundle = run_export(**options, progress=ExportSpinner())
    if resolve_format(format.value).name == "onnx":  # TensorRT's export ends with a line naming the engines
        print_export_summary(bundle)


# -------------------------------------------------------------------------------------------- reconstruct
@app.command()
def reconstruct(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: ModelOption,
    engine: EngineOption = EngineName.auto,
    provider: ProviderOption = Provider.auto,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Bundle graph: fp32, fp16 or int8 (trt: fp32, fp16); torch: fp32, bf16 (fp16 on CUDA). Default: "
            "auto's choice, else fp32."
        ),
    ] = None,
    mask_ratio: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.75,
    seed: Annotated[int | None, typer.Option(min=0, help="Masking seed.")] = 0,
    noise: Annotated[Path | None, typer.Option(help="Noise array [N, L] (.npy), smallest kept.")] = None,
    resize: Annotated[Resize, typer.Option()] = Resize.center,
    out: Annotated[Path, typer.Option(help="Output PNG (one image) or directory.")] = Path("reconstructions"),
    save_arrays: Annotated[Path | None, typer.Option(help="Write pred, mask, ids_restore, latent (.npz).")] = None,
    device: Annotated[str, typer.Option(help="torch engine: auto, cpu or cuda.")] = "auto",
    allow_emulated_bf16: Annotated[
        bool,
        typer.Option("--allow-emulated-bf16", help="torch bf16 on a CPU without bf16 instructions anyway (slow)."),
    ] = False,
) -> None:
    """Reconstruct masked images: original | masked | reconstruction | reconstruction + visible."""
    options = plain(locals())  # before the import adds a name
    from .reports.reconstruct import run_reconstruct

    run_reconstruct(**options)


# -------------------------------------------------------------------------------------------------- embed
@app.command()
def embed(
    input: Annotated[str, typer.Argument(help="Folder (recursive), text file of paths, or a glob.")],
    model: ModelOption,
    out: Annotated[Path, typer.Option(help="Output folder (embeddings/, metadata/, failures/, summary.json).")],
    engine: EngineOption = EngineName.auto,
    provider: ProviderOption = Provider.auto,
    precision: Annotated[
        ExportPrecision | None, typer.Option(help="Bundle graph (default: auto's choice, else fp32).")
    ] = None,
    pool: Annotated[
        Pool, typer.Option(help="Class token, mean of the patch tokens, both (2D), or every token (3-D files).")
    ] = Pool.cls,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per engine call.")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Decode processes (0: in the main process).")] = 2,
    resize: Annotated[Resize | None, typer.Option(help="Default: the bundle's (center unless exported otherwise).")] = (
        None
    ),
    dtype: Annotated[DType, typer.Option(help="Of the stored embeddings.")] = DType.float32,
    l2_normalize: Annotated[bool, typer.Option("--l2-normalize", help="Unit-length embeddings.")] = False,
    shard: Annotated[
        str | None, typer.Option(help="I/N: this worker's part (default: RANK/WORLD_SIZE or a Slurm array).")
    ] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per output file.")] = 10000,
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero if any file fails.")] = False,
) -> None:
    """Embed images into resumable, row-aligned .npy + .parquet files (embedding-reader / autofaiss layout).

    Files that cannot be embedded are listed with their reason in OUT/failures/. Run the same command again to
    resume after an interruption; run it with --shard I/N on N machines to split the work.
    """
    options = plain(locals())  # before the import adds a name
    from .reports.embed import run_embed

    run_embed(**options)


# -------------------------------------------------------------------------------------------------- bench
@app.command()
def bench(
    model: Annotated[
        str, typer.Option(help="A preset (random weights), weights (torch engines only) or a bundle directory.")
    ] = DEFAULT_MODEL,
    engines: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated, from: torch, torch-bf16, torch-cuda, torch-cuda-fp16, onnx, onnx-fp16, onnx-int8, "
            "onnx-cpu, onnx-cuda, openvino, openvino-f32, openvino-int8, trt, trt-fp16. PyTorch fp32 always runs. "
            "Default: every engine that can run here (the choice and what was left out are printed)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = DEFAULT_BATCH_SIZE,
    mask_ratio: Annotated[list[float], typer.Option(help="Repeat for several.")] = list(DEFAULT_MASK_RATIOS),  # noqa: B006, B008
    seconds: Annotated[float, typer.Option(help="Timing budget per engine and ratio.")] = DEFAULT_SECONDS,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    roofline: Annotated[
        bool, typer.Option("--roofline/--no-roofline", help="Measure peak GEMM throughput (~1-2 s), as % of peak.")
    ] = True,
) -> None:
    """Images/s per engine and mask ratio, as ratios against PyTorch eager fp32 in the same run, and as a fraction of
    this machine's peak GEMM throughput."""
    options = dict(locals())  # before the import below adds a name
    from .benchmark import run_bench

    run_bench(**options)


# -------------------------------------------------------------------------------------------------- serve
LogLevel = choices("LogLevel", ("critical", "error", "warning", "info", "debug"))  # uvicorn's


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Bundle directory (mae export).")],
    engine: EngineOption = EngineName.auto,
    provider: ProviderOption = Provider.auto,
    precision: Annotated[
        ExportPrecision | None, typer.Option(help="Bundle graph (default: auto's choice, else fp32).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="0: any free port (printed).")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per engine call.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(min=0.0, help="How long the oldest waiting image waits for more.")
    ] = 5.0,
    workers: Annotated[int, typer.Option(min=1, help="Decode threads.")] = 2,
    max_queue: Annotated[int, typer.Option(min=1, help="Images admitted at once; beyond: 503 + Retry-After.")] = 256,
    max_images: Annotated[int, typer.Option(min=1, help="Most images in one request; beyond: 413.")] = 64,
    max_request_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body; beyond: 413.")] = 32.0,
    resize: Annotated[Resize | None, typer.Option(help="Default: the bundle's (center unless exported otherwise).")] = (
        None
    ),
    drain_seconds: Annotated[
        float, typer.Option(min=0.0, help="On SIGTERM, how long in-flight requests may take.")
    ] = 30.0,
    log_level: Annotated[LogLevel, typer.Option(help="uvicorn's log level.")] = LogLevel.info,
) -> None:
    """Serve a bundle over HTTP: POST /v1/embed (batched, as mae embed computes it) and /v1/reconstruct, GET
    /healthz, /readyz, /metrics (Prometheus), /v1/model; OpenAPI at /docs. SIGTERM drains, then exits 0."""
    options = plain(locals())  # before the import adds a name
    from mae.runtime.serve import serve as run_server

    run_server(**options)


# --------------------------------------------------------------------------------------------------- info
@app.command()
def info(
    path: Annotated[
        Path | None, typer.Argument(help="Weights (checkpoint, official .pth, HF dir) or a bundle.")
    ] = None,
    system: Annotated[
        bool, typer.Option("--system", help="Describe this machine: CPU, ISA, bf16/int8, GPUs, installed engines.")
    ] = False,
    num_heads: Annotated[int | None, typer.Option()] = None,
    decoder_num_heads: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Describe weights or a bundle (format, architecture, parameters, decoder, norm_pix_loss), or this machine."""
    if path is None and not system:
        raise MAEError("Nothing to describe.", hint="pass weights or a bundle (mae info PATH), or mae info --system")
    if system:
        from .reports.export import print_system_report

        print_system_report()
    if path is None:
        return
    from .core.bundle import is_bundle

    if is_bundle(path):
        from .reports.export import describe_bundle

        describe_bundle(path)
    else:
        from .weights_info import describe  # safetensors folders without PyTorch

        describe(path, num_heads=num_heads, decoder_num_heads=decoder_num_heads)


# --------------------------------------------------------------------------------------------------- eval
EvalKind = choices("EvalKind", ("knn", "linear"))
EvalPool = choices("EvalPool", ("cls", "mean", "cls+mean"))  # one vector per image


@app.command(name="eval")
def eval_command(
    kind: Annotated[EvalKind, typer.Argument(help="knn: DINO's weighted k-NN vote; linear: a linear probe.")],
    train: Annotated[Path, typer.Option(help="Train images, one subfolder per class (searched recursively).")],
    val: Annotated[Path, typer.Option(help="Validation images, laid out as --train.")],
    model: ModelOption,
    out: Annotated[
        Path | None, typer.Option(help="Embeddings, pixel cache, report and picture (default: eval/MODEL-POOL).")
    ] = None,
    engine: EngineOption = EngineName.auto,
    provider: ProviderOption = Provider.auto,
    precision: Annotated[
        ExportPrecision | None, typer.Option(help="Bundle graph (default: auto's choice, else fp32).")
    ] = None,
    pool: Annotated[EvalPool, typer.Option(help="Class token, mean of the patch tokens, or both.")] = EvalPool.cls,
    k: Annotated[int, typer.Option("--k", help="knn: neighbours that vote (more than the train set: all).")] = 20,
    temperature: Annotated[float, typer.Option(help="knn: each vote weighs exp(cosine / T).")] = 0.07,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per engine call.")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Decode processes (0: in the main process).")] = 2,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Accuracy of frozen features on class folders (k-NN or linear probe), next to a raw-pixel baseline.

    Writes OUT/report-KIND.json and OUT/confusion-KIND.png; the embeddings in OUT/embeddings/ are reused by a rerun.
    """
    options = plain(locals())  # before the import adds a name
    from .reports.eval import run_eval

    run_eval(**options)


# --------------------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where everything is written.")] = Path("mae-demo"),
    steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="Pretraining budget in optimizer steps (default 1500); the expected time here is printed first."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    minutes: Annotated[
        float | None, typer.Option(hidden=True, help="Deprecated: converted to steps at the reference CPU's speed.")
    ] = None,
) -> None:
    """Pretrain, export, reconstruct, evaluate, search and benchmark on the digits shipped with scikit-learn."""
    from .demo import run_demo

    run_demo(out=out, steps=steps, seed=seed, minutes=minutes)


# -------------------------------------------------------------------------------------------------- index
IndexKind = choices("IndexKind", ("auto", "flat", "ivf-flat", "ivf-pq"))
Metric = choices("Metric", ("cosine", "ip"))


@app.command()
def index(
    embeddings: Annotated[list[str], typer.Argument(help="One or more finished `mae embed` output folders.")],
    out: Annotated[str, typer.Option(help="Index folder (index.faiss, ids.parquet, index.json).")] = "index",
    metric: Annotated[Metric, typer.Option(help="cosine (unit-length vectors) or ip (inner product as stored).")] = (
        Metric.cosine
    ),
    kind: Annotated[
        IndexKind, typer.Option(help="auto: exact up to 200k vectors (if they fit), else IVF, with PQ codes if needed.")
    ] = IndexKind.auto,
    max_memory: Annotated[
        str | None, typer.Option(help="Memory budget of the index, e.g. 4GiB (default: a quarter of this machine's).")
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the training sample and k-means (same seed, same index).")
    ] = 0,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Check every embedding file's sha256 against its marker (unchanged files: from the hash cache).",
        ),
    ] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print index.json instead of the table.")] = False,
    rerank: Annotated[
        int | None,
        typer.Option(min=0, max=1000, help="ivf-pq: order k x N candidates by exact scores (default 10; 0: off)."),
    ] = None,
) -> None:
    """Build a faiss index over mae embed folders; measures recall@10 against exact search and prints it.

    Building again from unchanged folders does nothing; from changed ones it builds again.
    """
    options = plain(locals())  # before the import adds a name
    from .reports.search import run_index

    run_index(**options)


# ------------------------------------------------------------------------------------------------- search
@app.command()
def search(
    queries: Annotated[list[str] | None, typer.Argument(help="Query images (new, or already indexed).")] = None,
    index: Annotated[str, typer.Option(help="Index folder (mae index --out).")] = "index",
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours per query.")] = 10,
    ids: Annotated[list[int] | None, typer.Option("--id", help="An indexed image as query (repeatable).")] = None,
    model: Annotated[
        str | None, typer.Option(help="The bundle the index was embedded with (default: the one it records).")
    ] = None,
    out: Annotated[str, typer.Option(help="Folder for the contact sheet or the duplicate files.")] = "search-results",
    duplicates: Annotated[
        bool, typer.Option("--duplicates", help="Near-duplicate pairs and groups across the whole index.")
    ] = False,
    threshold: Annotated[float, typer.Option(help="--duplicates: similarity above which two images pair.")] = 0.95,
    sheet: Annotated[bool, typer.Option("--sheet/--no-sheet", help="Write OUT/contact_sheet.png.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Nearest indexed images of each query (table, --json, contact sheet), or near-duplicates (--duplicates).

    New query images are embedded exactly as the index's images were (same bundle, engine, pre-processing,
    pooling); an indexed image is left out of its own neighbours.
    """
    options = plain(locals())  # before the import adds a name
    options["queries"], options["ids"] = options["queries"] or [], options["ids"] or []
    from .reports.search import run_search

    run_search(**options)


def main() -> None:
    """Entry point: user errors are printed plainly (no traceback) with exit status 2."""
    try:
        # Outside standalone mode Typer turns Ctrl-C (and typer.Exit) into a returned exit code.
        exit_code = app(standalone_mode=False, prog_name="mae")
        if isinstance(exit_code, int) and exit_code:
            if exit_code == 130:
                typer.secho("Interrupted.", err=True)
            sys.exit(exit_code)
    except MAEError as exc:
        show_error(exc)
        sys.exit(2)
    except OSError as exc:  # a file-system fault no writer turned into a message: the same message, never a traceback
        from .core.files import fault

        show_error(fault(exc, action="open" if isinstance(exc, FileNotFoundError) else "write"))
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.secho("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.secho("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # usage errors: an unknown option or command, a bad choice, a missing argument
        if not isinstance(exc, click_exception_types()):
            raise
        show_usage_error(exc)
        sys.exit(exc.exit_code)


def plain(options: dict[str, object]) -> dict[str, object]:
    """A command's options for the library: Typer's enums as their plain string values."""
    return {name: value.value if isinstance(value, Enum) else value for name, value in options.items()}


def show_error(exc: MAEError) -> None:
    typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
    if exc.hint:
        typer.secho(f"  hint: {exc.hint}", err=True)


def click_exception_types() -> tuple[type[Exception], ...]:
    """ClickException of every click this typer may use: typer >= 0.26 vendors its own (`typer._click`), earlier ones
    use the `click` package; catching only one lets the other's usage errors through as tracebacks."""
    import importlib

    found = []
    for module_name in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module_name).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def show_usage_error(exc: Exception) -> None:
    """One line saying what is wrong and a hint, like MAEError; `mae` alone prints the help."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: no arguments where some are needed
        exc.show()
        return
    context = getattr(exc, "ctx", None)
    command = getattr(context, "command_path", None) or "mae"
    typer.secho(f"error: {exc.format_message()}", fg=typer.colors.RED, err=True)
    listed = "the commands and options" if command == "mae" else "its options"
    typer.secho(f"  hint: `{command} --help` lists {listed}", err=True)


if __name__ == "__main__":
    main()
