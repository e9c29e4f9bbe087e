"""`mae eval`: the k-NN vote and the linear probe on arrays, the confusion picture, the raw-pixel baseline, and the
command on class folders of real photos (model beats pixels, reruns reuse, bad input refused)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from images_corpus import tiny_model_files
from PIL import Image

from mae.core.errors import MAEError
from mae.core.preprocess import Preprocessing, load_and_preprocess
from mae.runtime.classify import (
    classification_metrics,
    holdout_split,
    knn_classify,
    linear_probe,
    rank_classes,
    top_k_indexes,
)
from mae.runtime.confusion import (
    EMPTY_COLOUR,
    FULL_COLOUR,
    ConfusionLayout,
    ConfusionPanel,
    cell_colour,
    confusion_picture,
)
from mae.runtime.evaluate import evaluate, pixel_vector

# Classes of the labelled set: three grayscale textures of similar brightness and five colour photos.
SOURCES = ("brick", "grass", "gravel", "coffee", "chelsea", "rocket", "astronaut", "immunohistochemistry")


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """One BLAS / OpenMP thread: on a loaded 2-core machine spinning BLAS threads make lbfgs fifty times slower.
    scikit-learn (and the scipy BLAS it brings) is imported first: threadpoolctl limits only libraries loaded."""
    try:
        import sklearn.linear_model  # noqa: F401
        import threadpoolctl
    except ImportError:  # the probe's tests then say which extra is missing
        yield
        return
    with threadpoolctl.threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_model_files(tmp_path_factory.getbasetemp())[1]


def _source(name: str) -> np.ndarray:
    from skimage import data

    array = getattr(data, name)()
    return np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array[:, :, :3]


def write_crops(root: Path, per_class: dict[str, int], seed: int, sources=SOURCES) -> Path:
    """root/SPLIT/CLASS/NNN.png: square crops of each source at a random position, 20-50 % of its shorter side,
    flipped half of the time, saved at 48 x 48 (seeded)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name in sources:
            array = _source(name)
            height, width = array.shape[:2]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                side = int(rng.uniform(0.2, 0.5) * min(height, width))
                top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
                crop = array[top : top + side, left : left + side]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                picture = Image.fromarray(np.ascontiguousarray(crop)).resize((48, 48), Image.Resampling.BICUBIC)
                picture.save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    return write_crops(tmp_path_factory.mktemp("crops"), {"train": 30, "val": 15}, seed=0)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """Six classes of a few crops, one undecodable file in a class and one image outside any class."""
    root = write_crops(tmp_path_factory.mktemp("small"), {"train": 4, "val": 2}, seed=1, sources=SOURCES[:6])
    (root / "train" / "grass" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "train" / "stray.png")
    return root


def run_cli_split(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `mae ARGS...` through the real entry point."""
    from mae import cli

    monkeypatch.setattr(sys, "argv", ["mae", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------- k-NN
def brute_force_knn(train_x, train_y, query_x, k, temperature, num_classes):
    """DINO's vote written out: cosine to every train row, the k best, exp(s / T) summed per class."""
    scores = np.zeros((len(query_x), num_classes))
    for q, query in enumerate(query_x):
        cosines = [float(query @ t / np.linalg.norm(query) / np.linalg.norm(t)) for t in train_x]
        for j in sorted(range(len(train_x)), key=lambda j: (-cosines[j], j))[:k]:
            scores[q, train_y[j]] += np.exp(cosines[j] / temperature)
    return scores


def test_knn_scores_are_dinos_vote_up_to_one_factor_per_query():
    rng = np.random.default_rng(0)
    train_x, query_x = rng.normal(size=(40, 6)), rng.normal(size=(9, 6))
    train_y = rng.integers(0, 4, 40)
    expected = brute_force_knn(train_x, train_y, query_x, 7, 0.1, 4)
    # Rows scaled by any positive numbers: cosine similarity, so the same vote.
    scores = knn_classify(train_x * rng.uniform(0.1, 9, (40, 1)), train_y, query_x * 3.0, 7, 0.1, 4)
    normalized = expected / expected.sum(1, keepdims=True)
    np.testing.assert_allclose(scores / scores.sum(1, keepdims=True), normalized, rtol=1e-5)  # float32 cosines
    assert (rank_classes(scores) == rank_classes(expected)).all()
    # A tiny temperature neither overflows nor changes the winner (the nearest neighbour's class).
    sharp = knn_classify(train_x, train_y, query_x, 7, 1e-4, 4)
    assert np.isfinite(sharp).all()
    assert (rank_classes(sharp)[:, 0] == rank_classes(brute_force_knn(train_x, train_y, query_x, 1, 1, 4))[:, 0]).all()


def test_knn_ties_go_to_the_lower_index():
    # Two classes with the same score: the lower class index wins, not the class of the first neighbour.
    scores = knn_classify(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 0]), np.array([[1.0, 1.0]]), 2, 0.07, 2)
    assert scores[0, 0] == scores[0, 1]
    assert rank_classes(scores)[0].tolist() == [0, 1]
    # Equal similarities at the k-th place: the neighbour with the lower train index is taken.
    train_x = np.array([[-1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    scores = knn_classify(train_x, np.array([0, 2, 0, 1]), np.array([[1.0, 0.0]]), 1, 0.07, 3)
    assert scores[0].tolist() == [0.0, 0.0, 1.0]
    assert sorted(top_k_indexes(np.array([[0.5, 0.9, 0.5, 0.5, 0.1]]), 2)[0].tolist()) == [0, 1]


def test_knn_refuses_bad_k_and_temperature():
    train_x, train_y = np.eye(3), np.arange(3)
    for k, temperature in ((0, 0.07), (4, 0.07), (2, 0.0)):
        with pytest.raises(MAEError):
            knn_classify(train_x, train_y, train_x, k, temperature, 3)


# ------------------------------------------------------------------------------------------- linear probe
def test_linear_probe_separates_blobs_whatever_the_feature_scales():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=6.0, size=(4, 10))
    scale = np.logspace(-3, 3, 10)  # features six orders of magnitude apart: standardized away
    train_y, query_y = np.repeat(np.arange(4), 25), np.repeat(np.arange(4), 10)
    train_x = (centres[train_y] + rng.normal(size=(100, 10))) * scale
    query_x = (centres[query_y] + rng.normal(size=(40, 10))) * scale
    probe = linear_probe(train_x, train_y, query_x, num_classes=5)  # class 4 has no train image
    assert probe.scores.shape == (40, 5) and (probe.scores[:, 4] == 0).all()
    assert classification_metrics(probe.scores, query_y, list("abcde"))["top1"] == 1.0
    assert probe.c in probe.held_out and probe.held_out_images == 20 and probe.converged
    again = linear_probe(train_x, train_y, query_x, num_classes=5)
    assert again.c == probe.c and np.array_equal(again.scores, probe.scores)  # deterministic


def test_holdout_keeps_every_class_on_the_fitting_side():
    labels = np.array([0] * 10 + [1] * 3 + [2])
    fit, held = holdout_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(14))
    assert set(labels[fit]) == {0, 1, 2} and len(held) == 2 + 1
    assert np.array_equal(holdout_split(labels, 0.2, seed=0)[1], held)


def test_metrics_top5_per_class_and_confusion():
    labels = np.array([0, 0, 1, 2])
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0], [0.5, 0.5, 0.0]])
    metrics = classification_metrics(scores, labels, ["a", "b", "c"])
    assert metrics["top1"] == 0.5 and metrics["top5"] is None  # 3 classes: top-5 would always be 100 %
    assert metrics["per_class"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert metrics["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]  # the tie in the last row went to "a"
    six = classification_metrics(np.eye(6)[[1, 0]], np.array([0, 5]), list("abcdef"))
    assert six["top1"] == 0.0 and six["top5"] == 0.5  # class 5 ranks last of the zero scores: outside the top 5


# ------------------------------------------------------------------------------------------------ pictures
def test_confusion_picture_layout_and_colours():
    names = ["cat", "dog", "a rather long class name that is cut"]
    perfect = np.diag([5, 3, 2])
    muddled = np.array([[1, 4, 0], [3, 0, 0], [0, 0, 2]])
    picture = confusion_picture([ConfusionPanel("model", perfect), ConfusionPanel("pixels", muddled)], names)
    layout = ConfusionLayout.of(names, 2, ["model", "pixels"])
    assert picture.size == layout.size and layout.name_width > 0
    pixels = np.asarray(picture)

    def corner(panel: int, row: int, column: int) -> tuple[int, ...]:
        left, top, _, _ = layout.cell_box(panel, row, column)
        return tuple(int(v) for v in pixels[top + 2, left + 2])

    assert corner(0, 1, 1) == FULL_COLOUR and corner(0, 0, 1) == EMPTY_COLOUR
    assert corner(1, 0, 1) == cell_colour(4 / 5) and corner(1, 1, 0) == FULL_COLOUR
    many = ConfusionLayout.of([f"class {i}" for i in range(300)], 2)
    assert many.name_width == 0 and many.cell >= 1  # too small for names: cells only


def test_panel_titles_never_run_into_the_next_panel_with_few_classes():
    """Two classes make a narrow matrix; the panel grows to its title so the model's top-1 stays readable."""
    from PIL import ImageDraw, ImageFont

    titles = ["model (cls+mean pool, openvino): top-1 81.7%", "raw pixels (32 x 32): top-1 60.0%"]
    names = ["cat", "dog"]
    picture = confusion_picture([ConfusionPanel(titles[0], np.eye(2)), ConfusionPanel(titles[1], np.eye(2))], names)
    layout = ConfusionLayout.of(names, 2, titles)
    assert picture.size == layout.size
    first_title_end = ImageDraw.Draw(picture).textbbox((16, 16), titles[0], font=ImageFont.load_default(size=15))[2]
    second_title_start = layout.matrix_left(1) - layout.name_width
    assert first_title_end < second_title_start, (first_title_end, second_title_start)


def test_pixel_baseline_is_an_area_average_of_the_models_input(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    pre = Preprocessing(size=64, resize="squash")
    pixel_values, _ = load_and_preprocess(path, pre)  # [3, 64, 64]
    expected = pixel_values.reshape(3, 32, 2, 32, 2).mean(axis=(2, 4)).reshape(-1)
    np.testing.assert_allclose(pixel_vector(str(path), pre, None), expected, atol=1e-5)
    small = Preprocessing(size=32, resize="squash")
    assert np.array_equal(pixel_vector(str(path), small, None), load_and_preprocess(path, small)[0].reshape(-1))


# ------------------------------------------------------------------------------------- model against pixels
@pytest.mark.slow
def test_model_features_beat_raw_pixels_on_crops_of_real_photos(crops, bundle, tmp_path):
    """Eight classes, each made of random crops (random position, 20-50 % of the side, random flips) of one
    scikit-image picture: three grayscale textures of similar brightness (brick, grass, gravel) and five colour
    photos. Raw pixels compare two images position by position, and two crops of one texture or photo taken at
    different places agree there on little more than their average colour. The encoder's mean-pooled patch tokens
    average one function of each patch (and its context) over all patches: a bag of local features that hardly
    depends on where the crop was taken. That is a property of the architecture and the pooling, so it holds for
    the tiny seeded, untrained bundle too: kNN and the linear probe on its features beat the same classifiers on
    pixels by a wide margin (measured: kNN 76 % vs 45 %, linear 82 % vs 60 %; chance 12.5 %)."""
    out = tmp_path / "eval"
    options = {"engine": "onnx", "pool": "mean", "workers": 0, "progress": False}
    knn = evaluate("knn", crops / "train", crops / "val", bundle, out=out, **options)
    linear = evaluate("linear", crops / "train", crops / "val", bundle, out=out, **options)
    for report in (knn, linear):
        assert report["model"]["top1"] > report["pixels"]["top1"] + 0.1, (report["kind"], report["model"]["top1"])
        assert report["model"]["top1"] > 0.6 and report["counts"]["val"]["images"] == 8 * 15
        assert report["model"]["top5"] is not None and report["notes"] == []
    assert knn["k"] == 20 and knn["temperature"] == 0.07 and set(linear["C"]) == {"model", "pixels"}
    # The linear probe reused the embeddings kNN made: embed wrote no file.
    assert all(split["files_written_now"] == 0 for split in linear["embeddings"].values())
    assert linear["embeddings"] == {
        name: {**split, "files_written_now": 0} for name, split in knn["embeddings"].items()
    }
    assert (out / "report-knn.json").is_file() and (out / "confusion-linear.png").is_file()


# -------------------------------------------------------------------------------------------------- command
def test_command_json_picture_rerun_and_left_out_images(small_set, bundle, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    args = ["eval", "knn", "--train", small_set / "train", "--val", small_set / "val", "--model", bundle]
    args += ["--out", out, "--engine", "onnx", "--pool", "mean", "--workers", "0", "--k", "500", "--json"]
    code, stdout, stderr = run_cli_split(monkeypatch, capsys, *args)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report == json.loads((out / "report-knn.json").read_text())
    assert report["k"] == 6 * 4  # clamped to the train images (the broken one left out), with a note
    assert any("k = 500" in note for note in report["notes"])
    assert report["counts"]["train"]["failed"] == 1 and report["counts"]["train"]["unlabelled"] == 1
    assert report["counts"]["train"]["per_class"]["grass"] == 4
    for side in ("model", "pixels"):  # the same images on both sides
        assert np.asarray(report[side]["confusion"]).sum() == 6 * 2
    picture = Image.open(out / "confusion-knn.png")
    layout = ConfusionLayout.of(report["classes"], 2)  # without titles: the panels can only be wider with them
    assert picture.size[1] == layout.size[1] and picture.size[0] >= layout.size[0]
    # Run again: the embeddings and the pixel features are reused, the files untouched.
    watched = [*sorted((out / "embeddings").rglob("*.npy")), *sorted((out / "pixels").glob("*.npz"))]
    before = [path.stat().st_mtime_ns for path in watched]
    code, stdout, stderr = run_cli_split(monkeypatch, capsys, *args[:-1])  # the table this time
    assert code == 0, stderr
    assert "raw pixels" in stdout and "top-1" in stdout and "reusing" in stderr
    assert [path.stat().st_mtime_ns for path in watched] == before
    assert json.loads((out / "report-knn.json").read_text())["embeddings"]["train"]["files_written_now"] == 0


def _layout(root: Path, files: dict[str, bytes | None]) -> Path:
    """Files (None: a folder) under root, for the bad-input cases."""
    for name, content in files.items():
        path = root / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def _png(colour: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, "PNG")
    return buffer.getvalue()


GOOD_VAL = {"a/1.png": _png(), "b/1.png": _png((200, 10, 10))}
GOOD_TRAIN = {"a/1.png": _png(), "a/2.png": _png(), "b/1.png": _png((200, 10, 10))}
BAD_INPUTS = {
    "train missing": ({}, GOOD_VAL, [], "is not a folder"),
    "val missing": (GOOD_TRAIN, {}, [], "is not a folder"),
    "train a file": ({"x.png": _png()}, GOOD_VAL, ["--train-file"], "is not a folder"),
    "no class folders": ({"1.png": _png()}, GOOD_VAL, [], "has no class subfolders"),
    "one class": ({"a/1.png": _png()}, GOOD_VAL, [], "only one class (a)"),
    "empty class": ({**GOOD_TRAIN, "c/notes.txt": b"no image here"}, GOOD_VAL, [], "class folder c in"),
    "val class unknown": (GOOD_TRAIN, {**GOOD_VAL, "zebra/1.png": _png()}, [], "--val classes zebra have no folder"),
    "k below one": (GOOD_TRAIN, GOOD_VAL, ["--k", "0"], "--k 0"),
    "tokens": (GOOD_TRAIN, GOOD_VAL, ["--pool", "tokens"], "'tokens' is not one of"),
    "out inside train": (GOOD_TRAIN, GOOD_VAL, ["--out-inside"], "lies inside --train"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_nothing_written(case, bundle, tmp_path, monkeypatch, capsys):
    train_files, val_files, extra, expected = BAD_INPUTS[case]
    train = _layout(tmp_path / "train", train_files) if train_files else tmp_path / "train"
    val = _layout(tmp_path / "val", val_files) if val_files else tmp_path / "val"
    out = tmp_path / "eval"
    if "--train-file" in extra:
        train, extra = train / "x.png", []
    if "--out-inside" in extra:
        out, extra = train / "eval", []
    args = ["eval", "knn", "--train", train, "--val", val, "--model", bundle, "--out", out, "--engine", "onnx"]
    code, stdout, stderr = run_cli_split(monkeypatch, capsys, *args, *extra)
    text = stdout + stderr
    assert code == 2, text
    assert [line for line in text.splitlines() if line.startswith("error:")] == [text.splitlines()[0]]
    assert expected in text.splitlines()[0] and "Traceback" not in text
    assert not out.exists()


def test_a_class_without_one_decodable_image_is_named_with_its_reasons(bundle, tmp_path, monkeypatch, capsys):
    train = _layout(tmp_path / "train", {**GOOD_TRAIN, "c/1.jpg": b"\xff\xd8\xff\xe0 garbage", "c/2.png": b""})
    val = _layout(tmp_path / "val", GOOD_VAL)
    out = tmp_path / "eval"
    args = ["eval", "linear", "--train", train, "--val", val, "--model", bundle, "--out", out, "--engine", "onnx"]
    code, stdout, stderr = run_cli_split(monkeypatch, capsys, *args, "--workers", "0")
    errors = [line for line in (stdout + stderr).splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stdout + stderr and len(errors) == 1
    first = errors[0]
    assert first.startswith("error: --train: no image of class c could be decoded (1 corrupt, 1 empty)"), first
    assert not list(out.glob("report-*.json")) and not list(out.glob("*.png"))  # the finished embeddings stay
