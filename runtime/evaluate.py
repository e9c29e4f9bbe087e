"""`mae eval knn|linear`: how good an encoder's frozen features are, on folders laid out one subfolder per class.

    TRAIN/cat/001.jpg  TRAIN/dog/…        class = the first folder under TRAIN (images found recursively inside)
    VAL/cat/…          VAL/dog/…          every VAL class must be a TRAIN class; VAL may lack some

Features come through `mae.runtime.embed.embed` into EVAL_DIR/embeddings/train and EVAL_DIR/embeddings/val
(unnormalized, float32), so running again, or running the other classifier, reuses finished embeddings (embed
resumes). Images that fail to decode are in neither side of the comparison; image files directly in TRAIN or VAL
belong to no class and are left out (both with a note).

The classifiers (`mae.runtime.classify`): `knn`, DINO's weighted vote over the k most cosine-similar train images;
`linear`, a logistic-regression probe on standardized features (the torch-free form of MAE's linear probing).

The raw-pixel baseline runs the same classifier on the same images: each image pre-processed exactly as the model
sees it (the bundle's resize, crop and mean/std, `load_and_preprocess`), area-averaged (Pillow's box filter) to at
most 32 x 32 per channel and flattened (3072 values). 32 x 32 is the classic pixel baseline (CIFAR's size): small
enough for kNN and the probe to be quick, large enough to keep colour layout and coarse shape, so a model must add
more than "average colour in the same place" to beat it. These features are cached in EVAL_DIR/pixels/, keyed by
the checksum of the input list, the pre-processing and the images kept.

Output: EVAL_DIR/report-KIND.json (what `evaluate` returns) and EVAL_DIR/confusion-KIND.png (model and pixels side by
side), one pair per classifier, so that knn and linear results over the same embeddings live side by side. Default
EVAL_DIR: eval/MODEL_NAME-POOL in the current folder (a folder per model and pooling, whose embeddings a rerun
reuses). Bad input is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mae import __version__
from mae.core.errors import MAEError, require
from mae.core.files import atomic_write, atomic_write_text, make_dirs
from mae.core.preprocess import ImageError, Preprocessing, load_and_preprocess

from .classify import C_GRID, HOLDOUT_FRACTION, TOP5_CLASSES, classification_metrics, knn_classify, linear_probe
from .confusion import ConfusionPanel, save_confusion_picture
from .embed import EmbedProgress, NotesOnStderr, Silent, embed
from .embedding_runs import EmbeddingRun, check_compatible, open_run
from .inputs import keys_checksum, list_inputs
from .shards import OutputFolder

__all__ = ["evaluate", "knn_classify", "linear_probe", "scan_labelled_folder", "pixel_vector"]

KINDS = ("knn", "linear")
POOLS = ("cls", "mean", "cls+mean")  # one vector per image
REPORT_FORMAT = "mae-eval-report"
PIXEL_SIDE = 32  # the raw-pixel baseline: at most 32 x 32 per channel
PIXELS_FORMAT = "mae-eval-pixels"


# ------------------------------------------------------------------------------------------------ the folders
@dataclass(frozen=True)
class LabelledFolder:
    """TRAIN or VAL: its class folders and what `mae embed` will list in it."""

    root: Path
    split: str  # "train" | "val"
    classes: list[str]  # class folder names, sorted
    images: dict[str, int]  # class -> image files listed inside it
    unlabelled: int  # image files directly in the folder: no class, not evaluated


def _class_folders(root: Path, option: str) -> list[str]:
    """The visible subfolders of `root` (links to folders are not followed, as `mae embed` does not)."""
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as exc:
        raise MAEError(f"Cannot read {option} {root}: {exc.strerror or exc}") from exc
    return [entry.name for entry in entries if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")]


def scan_labelled_folder(path: str | os.PathLike, split: str) -> LabelledFolder:
    """Check the layout of `path` (one subfolder per class, each holding images) and count its images."""
    root, option = Path(path), f"--{split}"
    layout_hint = f"{option} DIR holds one subfolder per class: DIR/cat/1.jpg, DIR/dog/2.jpg, ..."
    if not root.is_dir():
        raise MAEError(f"{option} {root} is not a folder.", hint=layout_hint)
    classes = _class_folders(root, option)
    if not classes:
        raise MAEError(f"{option} {root} has no class subfolders.", hint=layout_hint)
    if split == "train" and len(classes) < 2:
        raise MAEError(
            f"{option} {root} has only one class ({classes[0]}): classifying needs at least two.", hint=layout_hint
        )
    images = dict.fromkeys(classes, 0)
    unlabelled = 0
    try:
        keys = list_inputs(root).keys
    except MAEError:
        keys = []  # no image at all: named class by class below
    for key in keys:
        name, _, rest = key.partition("/")
        if rest and name in images:
            images[name] += 1
        else:
            unlabelled += 1
    empty = [name for name, count in images.items() if count == 0]
    if empty:
        raise MAEError(
            f"{option}: the class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} in {root} "
            f"{'have' if len(empty) > 1 else 'has'} no images.",
            hint="put images in it (searched recursively) or remove it",
        )
    return LabelledFolder(root, split, classes, images, unlabelled)


def _check_splits(train: LabelledFolder, val: LabelledFolder, out: Path) -> None:
    unknown = [name for name in val.classes if name not in train.images]
    if unknown:
        raise MAEError(
            f"--val classes {', '.join(unknown)} have no folder in --train {train.root}: nothing could predict them.",
            hint="give every validation class a train folder of the same name (or leave it out of --val)",
        )
    for folder in (train, val):
        if out.resolve().is_relative_to(folder.root.resolve()):
            raise MAEError(
                f"--out {out} lies inside --{folder.split} {folder.root}: it would become a class.",
                hint="choose an --out outside the image folders",
            )


def default_out(model: str | os.PathLike, pool: str) -> Path:
    """eval/MODEL_NAME-POOL: a folder per model and pooling, so that comparing encoders does not mix them."""
    path = Path(model)
    name = (path.stem if path.is_file() else path.name) or "model"
    return Path("eval") / f"{name}-{pool}"


def _check_options(kind: str, pool: str, k: int, temperature: float) -> None:
    if kind not in KINDS:
        raise MAEError(f"Unknown evaluation {kind!r}.", hint="use knn or linear")
    if pool not in POOLS:
        raise MAEError(f"--pool {pool} gives several vectors per image.", hint=f"use one of: {', '.join(POOLS)}")
    if k < 1:
        raise MAEError(f"--k {k}: the vote needs at least one neighbour.", hint="DINO uses --k 20")
    if not temperature > 0:
        raise MAEError(f"--temperature {temperature} must be > 0.", hint="DINO uses 0.07")
    if kind == "linear":  # before hours of embedding, not after
        require("sklearn.linear_model", "search", "The linear probe")


# ------------------------------------------------------------------------------------------------ progress
class _Labelled:
    """An `EmbedProgress` passed to `embed` that names the split in the bar ("embed train")."""

    def __init__(self, progress: EmbedProgress, label: str) -> None:
        self.progress, self.label = progress, label

    def note(self, text: str) -> None:
        self.progress.note(f"{self.label}: {text}")

    def start(self, total: int, label: str) -> None:
        self.progress.start(total, self.label)

    def advance(self, count: int, failed: bool = False) -> None:
        self.progress.advance(count, failed)

    def close(self) -> None:
        self.progress.close()


def _progress_from(progress: EmbedProgress | bool | None) -> EmbedProgress:
    if progress is None or progress is False:
        return Silent()
    return NotesOnStderr() if progress is True else progress


# ------------------------------------------------------------------------------------------------ embeddings
@dataclass
class EmbeddedSplit:
    """One split's finished embedding run, reduced to the labelled images it embedded."""

    folder: LabelledFolder
    run: EmbeddingRun
    written_now: int  # output files embed wrote in this call (0: everything reused)
    paths: list[str]
    keys: list[str]
    labels: np.ndarray  # [n] class index (in the train classes' order)
    features: np.ndarray  # [n, D] float32, as stored
    failed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # class -> [(reason, message)]


def _failures(run: EmbeddingRun) -> list[dict[str, Any]]:
    """The failure rows (key, error, message) of every output file of the run."""
    pq = require("pyarrow.parquet", "cpu", "Reading embedding failures (parquet)")
    rows = []
    for number in run.files:
        table = pq.read_table(OutputFolder(run.root).path("failures", number), columns=["key", "error", "message"])
        rows.extend(table.to_pylist())
    return rows


def _embed_split(
    folder: LabelledFolder, classes: list[str], out: Path, embed_options: dict[str, Any], progress: EmbedProgress
) -> EmbeddedSplit:
    """Embed the split (or find it done) and keep the rows that have a class."""
    summary = embed(folder.root, out=out, progress=_Labelled(progress, f"embed {folder.split}"), **embed_options)
    run = open_run(out)
    metadata = run.all_metadata(("path", "key"))
    vectors = run.all_vectors()
    index_of = {name: index for index, name in enumerate(classes)}
    rows, labels = [], []
    for row, key in enumerate(metadata["key"]):
        name, _, rest = key.partition("/")
        if rest and name in index_of:
            rows.append(row)
            labels.append(index_of[name])
    failed: dict[str, list[tuple[str, str]]] = {}
    for failure in _failures(run):
        name, _, rest = str(failure["key"]).partition("/")
        if rest:
            failed.setdefault(name, []).append((str(failure["error"]), str(failure["message"])))
    return EmbeddedSplit(
        folder,
        run,
        summary["output"]["written_now"],
        [metadata["path"][row] for row in rows],
        [metadata["key"][row] for row in rows],
        np.asarray(labels, np.int64),
        np.ascontiguousarray(vectors[rows]),
        failed,
    )


def _check_every_class_embedded(split: EmbeddedSplit, classes: list[str]) -> None:
    """A class whose images all failed would silently vanish from the evaluation: refuse it, with the reasons."""
    present = set(split.labels.tolist())
    for name in split.folder.classes:
        if classes.index(name) in present:
            continue
        reasons: dict[str, int] = {}
        for reason, _ in split.failed.get(name, []):
            reasons[reason] = reasons.get(reason, 0) + 1
        listed = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "no rows"
        first = f": {split.failed[name][0][1]}" if split.failed.get(name) else ""
        raise MAEError(
            f"--{split.folder.split}: no image of class {name} could be decoded ({listed}){first}.",
            hint=f"see {split.run.root / 'failures'}/*.parquet for every file and its error; fix or remove them",
        )


# -------------------------------------------------------------------------------------------- pixel baseline
def pixel_vector(path: str, pre: Preprocessing, resize: str | None, side: int = PIXEL_SIDE) -> np.ndarray:
    """One image's raw-pixel features: the model's pre-processed pixel_values [3, S, S], area-averaged to at most
    side x side per channel (box filter), flattened: float32 [3 * s * s]."""
    pixels, _ = load_and_preprocess(path, pre, resize)  # [3, S, S], normalized as the model sees it
    if pixels.shape[1] <= side and pixels.shape[2] <= side:
        return pixels.reshape(-1)
    target = (min(side, pixels.shape[2]), min(side, pixels.shape[1]))
    channels = [np.asarray(Image.fromarray(plane, "F").resize(target, Image.Resampling.BOX)) for plane in pixels]
    return np.stack(channels).astype(np.float32).reshape(-1)


def _pixel_cache_path(out: Path, split: EmbeddedSplit, side: int) -> Path:
    identity = {
        "inputs_sha256": split.run.params.get("inputs_sha256"),
        "preprocessing": split.run.params.get("preprocessing"),
        "resize": split.run.params.get("resize"),
        "side": side,
        "keys_sha256": keys_checksum(split.keys),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return out / "pixels" / f"{split.folder.split}-{digest[:20]}.npz"


def _read_pixel_cache(path: Path, keys: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["format"]) != PIXELS_FORMAT or cached["keys"].tolist() != keys:
                return None
            return cached["features"], cached["ok"]
    except (OSError, ValueError, KeyError):
        return None  # missing or damaged: computed again


def pixel_features(
    split: EmbeddedSplit, out: Path, workers: int, progress: EmbedProgress, side: int = PIXEL_SIDE
) -> tuple[np.ndarray, np.ndarray]:
    """([n, F] float32 raw-pixel features, [n] bool decoded) of the split's embedded images, from the cache in
    out/pixels/ when it holds them; computed in `workers` threads (Pillow decodes without the GIL) otherwise."""
    path = _pixel_cache_path(out, split, side)
    cached = _read_pixel_cache(path, split.keys)
    if cached is not None:
        progress.note(f"pixels {split.folder.split}: reusing {path}")
        return cached
    pre = Preprocessing.from_dict(split.run.params["preprocessing"])
    resize = split.run.params.get("resize")

    def one(image_path: str) -> np.ndarray | None:
        try:
            return pixel_vector(image_path, pre, resize, side)
        except ImageError:
            return None  # decoded for the model, not now (changed since): left out of both sides

    progress.start(len(split.paths), f"pixels {split.folder.split}")
    vectors = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for vector in pool.map(one, split.paths):
                vectors.append(vector)
                progress.advance(1, failed=vector is None)
    finally:
        progress.close()
    width = next((len(v) for v in vectors if v is not None), 3 * side * side)
    ok = np.asarray([v is not None for v in vectors], bool)
    features = np.stack([v if v is not None else np.zeros(width, np.float32) for v in vectors]).astype(np.float32)
    make_dirs(path.parent)
    for stale in path.parent.glob(f"{split.folder.split}-*.npz"):
        stale.unlink(missing_ok=True)  # other inputs or settings: never read again
    keys = np.asarray(split.keys)
    atomic_write(path, lambda handle: np.savez(handle, format=PIXELS_FORMAT, keys=keys, features=features, ok=ok))
    return features, ok


# ------------------------------------------------------------------------------------------------ classifiers
@dataclass(frozen=True)
class ClassifierSettings:
    """How `evaluate` classifies (the same for the model's features and for the pixels)."""

    kind: str  # "knn" | "linear"
    k: int = 20  # knn: neighbours (clamped to the train images)
    temperature: float = 0.07  # knn: the vote's temperature
    c_grid: tuple[float, ...] = C_GRID  # linear: inverse L2 strengths to choose from
    holdout: float = HOLDOUT_FRACTION  # linear: share of each train class held out to choose C


def _classify(
    settings: ClassifierSettings,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    num_classes: int,
    label: str,
    progress: EmbedProgress,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(class scores [Q, C], what the classifier did), with a progress bar named `label`."""
    advance: Callable[..., None] = progress.advance
    if settings.kind == "knn":
        k = min(settings.k, len(train_x))
        progress.start(len(val_x), f"knn {label}")
        try:
            scores = knn_classify(train_x, train_y, val_x, k, settings.temperature, num_classes, on_chunk=advance)
        finally:
            progress.close()
        return scores, {"k": k, "temperature": settings.temperature}
    progress.start(len(settings.c_grid) + 1, f"linear probe {label}")
    try:
        probe = linear_probe(
            train_x, train_y, val_x, num_classes, settings.c_grid, settings.holdout, on_fit=lambda: advance(1)
        )
    finally:
        progress.close()
    return probe.scores, probe.summary()


def _side_report(
    scores: np.ndarray, labels: np.ndarray, classes: list[str], classifier: dict[str, Any], features: str
) -> dict[str, Any]:
    return {"features": features, "classifier": classifier, **classification_metrics(scores, labels, classes)}


# ------------------------------------------------------------------------------------------------ the report
def _notes(
    settings: ClassifierSettings, classes: list[str], splits: list[EmbeddedSplit], sides: list[dict[str, Any]]
) -> list[str]:
    """What a reader of the numbers should know: k clamped, top-5 left out, images left out, a probe that stopped
    before converging."""
    notes = []
    train_images = len(splits[0].labels)
    if settings.kind == "knn" and settings.k > train_images:
        notes.append(f"k = {settings.k} is more than the {train_images} train images: k = {train_images} used.")
    if splits[0].folder.root.resolve() == splits[1].folder.root.resolve():
        notes.append("--train and --val are the same folder: every image finds itself (an upper bound, not a score).")
    if len(classes) <= TOP5_CLASSES:
        notes.append(f"top-5 is not reported: with {len(classes)} classes every label is among the top 5.")
    for split in splits:
        failed = sum(len(rows) for rows in split.failed.values())
        if failed:
            notes.append(f"{split.folder.split}: {failed} images could not be decoded; left out of both sides.")
        if split.folder.unlabelled:
            notes.append(
                f"{split.folder.split}: {split.folder.unlabelled} images lie directly in {split.folder.root} "
                "(no class folder); left out."
            )
    for name, side in zip(("model", "pixels"), sides, strict=True):
        if side["classifier"].get("converged") is False:
            notes.append(f"{name}: the linear probe stopped at lbfgs's iteration limit before converging.")
    return notes


def _counts(splits: list[EmbeddedSplit], classes: list[str]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for split in splits:
        per_class = np.bincount(split.labels, minlength=len(classes))
        counts[split.folder.split] = {
            "images": int(len(split.labels)),
            "per_class": {name: int(count) for name, count in zip(classes, per_class, strict=True)},
            "failed": sum(len(rows) for rows in split.failed.values()),
            "unlabelled": split.folder.unlabelled,
        }
    return counts


def _report(
    settings: ClassifierSettings,
    model: str,
    classes: list[str],
    splits: list[EmbeddedSplit],
    sides: list[dict[str, Any]],
    picture: Path,
) -> dict[str, Any]:
    params = splits[0].run.params
    report = {
        "format": REPORT_FORMAT,
        "toolkit_version": __version__,
        "kind": settings.kind,
        "classes": classes,
        "counts": _counts(splits, classes),
        "model": sides[0],
        "pixels": sides[1],
        "notes": _notes(settings, classes, splits, sides),
        "bundle": model,
        "model_sha256": params["model_sha256"],
        "engine": params["engine"],
        "precision": params["precision"],
        "pool": params["pool"],
        "embeddings": {
            split.folder.split: {
                "folder": str(split.run.root),
                "checksum": split.run.checksum,
                "files_written_now": split.written_now,
            }
            for split in splits
        },
        "picture": str(picture),
    }
    if settings.kind == "knn":
        report["k"], report["temperature"] = sides[0]["classifier"]["k"], settings.temperature
    else:
        report["C"] = {"model": sides[0]["classifier"]["C"], "pixels": sides[1]["classifier"]["C"]}
    return report


def _panel_title(name: str, side: dict[str, Any]) -> str:
    top5 = f", top-5 {side['top5']:.1%}" if side["top5"] is not None else ""
    return f"{name}: top-1 {side['top1']:.1%}{top5}"


def _compare(
    settings: ClassifierSettings,
    splits: list[EmbeddedSplit],
    pixels: list[tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    progress: EmbedProgress,
) -> list[dict[str, Any]]:
    """The classifier on the model's features, then on the pixels, over the same images (those both decoded)."""
    kept = [ok for _, ok in pixels]
    train_y, val_y = splits[0].labels[kept[0]], splits[1].labels[kept[1]]
    sides = []
    for name, train_x, val_x in (
        ("model", splits[0].features[kept[0]], splits[1].features[kept[1]]),
        ("pixels", pixels[0][0][kept[0]], pixels[1][0][kept[1]]),
    ):
        scores, classifier = _classify(settings, train_x, train_y, val_x, len(classes), name, progress)
        if name == "model":
            described = f"{splits[0].run.params['pool']} pooling, {train_x.shape[1]} values"
        else:
            described = (
                f"pre-processed pixels area-averaged to at most {PIXEL_SIDE}x{PIXEL_SIDE}, {train_x.shape[1]} values"
            )
        sides.append(_side_report(scores, val_y, classes, classifier, described))
    return sides


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate(
    kind: str,
    train: str | os.PathLike,
    val: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    engine: str | Any = "auto",
    provider: str = "auto",
    precision: str | None = None,
    pool: str = "cls",
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 32,
    workers: int = 2,
    progress: EmbedProgress | bool | None = True,
) -> dict[str, Any]:
    """Classify VAL with `kind` ("knn" or "linear") on `model`'s features of TRAIN, and on raw pixels; returns the
    report (also written to OUT/report-KIND.json, with OUT/confusion-KIND.png). See the module docstring.

    engine, provider, precision, pool, batch_size, workers: as `mae.runtime.embed.embed` takes them.
    progress: an `EmbedProgress` (every stage reports through it: embedding, pixels, the classifiers); True shows
    its notes on stderr, False or None nothing.
    """
    _check_options(kind, pool, k, temperature)
    settings = ClassifierSettings(kind, k, temperature)
    out_dir = Path(out) if out is not None else default_out(model, pool)
    report_progress = _progress_from(progress)
    folders = (scan_labelled_folder(train, "train"), scan_labelled_folder(val, "val"))
    _check_splits(*folders, out_dir)
    classes = folders[0].classes
    embed_options = {
        "model": str(model),
        "engine": engine,
        "provider": provider,
        "precision": precision,
        "pool": pool,
        "batch_size": batch_size,
        "workers": workers,
    }
    splits = [
        _embed_split(folder, classes, out_dir / "embeddings" / folder.split, embed_options, report_progress)
        for folder in folders
    ]
    check_compatible([split.run for split in splits])
    for split in splits:
        _check_every_class_embedded(split, classes)
    pixels = [pixel_features(split, out_dir, workers, report_progress) for split in splits]
    sides = _compare(settings, splits, pixels, classes, report_progress)
    picture = out_dir / f"confusion-{kind}.png"
    titles = (f"model ({pool} pool, {splits[0].run.params['engine']})", "raw pixels (same classifier)")
    panels = [
        ConfusionPanel(_panel_title(t, s), np.asarray(s["confusion"])) for t, s in zip(titles, sides, strict=True)
    ]
    save_confusion_picture(picture, panels, classes)
    report = _report(settings, str(model), classes, splits, sides, picture)
    atomic_write_text(out_dir / f"report-{kind}.json", json.dumps(report, indent=2) + "\n")
    return report
