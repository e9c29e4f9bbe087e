"""`mae embed`: inputs, sharding, output format, pooling, engines against the PyTorch reference, failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from images_corpus import decode_or_crash, gradient_rgb, tiny_model_files, write_corpus
from PIL import Image

from mae.core.bundle import Bundle
from mae.core.errors import MAEError
from mae.core.numerics import l2_normalize, pool_tokens
from mae.core.preprocess import load_and_preprocess
from mae.runtime.embed import Decoder, EmbedFailures, embed
from mae.runtime.embed_worker import DecodeTask
from mae.runtime.inputs import (
    WorkerPart,
    file_range,
    list_inputs,
    num_output_files,
    output_files_for,
    worker_part,
)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return tiny_model_files(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed_corpus")
    return folder, write_corpus(folder)


def read_output(out: Path) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """All embeddings, metadata and failures of an output folder, files in order."""
    files = sorted((out / "embeddings").glob("*.npy"))
    embeddings = np.concatenate([np.load(f) for f in files])
    metadata = pd.concat([pd.read_parquet(out / "metadata" / f"{f.stem}.parquet") for f in files], ignore_index=True)
    failures = pd.concat([pd.read_parquet(out / "failures" / f"{f.stem}.parquet") for f in files], ignore_index=True)
    return embeddings, metadata, failures


def reference_features(checkpoint: Path, paths: list[str], bundle: Path, pool: str) -> np.ndarray:
    """PyTorch eager MaskedAutoencoder.forward_features + pool on the same pre-processed pixels."""
    import torch

    from mae.weights import load_model

    network, _ = load_model(checkpoint, device="cpu")
    pre = Bundle.load(bundle).preprocessing
    pixels = np.stack([load_and_preprocess(path, pre)[0] for path in paths])
    with torch.inference_mode():
        tokens = network.eval().forward_features(torch.from_numpy(pixels))  # [N, 1+L, D]
        return tokens.numpy() if pool == "tokens" else network.pool(tokens, pool).numpy()


# -------------------------------------------------------------------------------------------------- inputs
def test_folder_listing_is_recursive_sorted_and_skips_hidden_output_and_non_images(tmp_path):
    root = tmp_path / "data"
    for name in ["b/2.jpg", "a.PNG", "b/1.jpeg", "c/d/e.webp", ".hidden/x.jpg", ".y.jpg", "notes.txt", "out/z.jpg"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    inputs = list_inputs(root, exclude=root / "out")
    assert inputs.kind == "folder"
    assert inputs.keys == ["a.PNG", "b/1.jpeg", "b/2.jpg", "c/d/e.webp"]
    assert inputs.paths == [str(root / key) for key in inputs.keys]
    assert inputs.skipped == 1
    # The same tree elsewhere has the same identity (mount-independent keys).
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    assert list_inputs(moved, exclude=moved / "out").fingerprint == inputs.fingerprint


def test_list_file_glob_and_single_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("b.jpg", "a.jpg", "c.png"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    listing = tmp_path / "files.txt"
    listing.write_text("# my picks\nimgs/b.jpg\n\n  imgs/a.jpg  \n/abs/missing.jpg\n")
    inputs = list_inputs(listing)
    assert inputs.kind == "list"
    assert inputs.keys == ["imgs/b.jpg", "imgs/a.jpg", "/abs/missing.jpg"]  # order kept, missing kept
    assert inputs.paths[0] == str(tmp_path / "imgs" / "b.jpg")
    matched = list_inputs(str(tmp_path / "imgs" / "*.jpg"))
    assert matched.kind == "glob" and [Path(p).name for p in matched.paths] == ["a.jpg", "b.jpg"]
    single = list_inputs(tmp_path / "imgs" / "c.png")
    assert single.kind == "file" and len(single) == 1
    with pytest.raises(MAEError, match="does not exist"):
        list_inputs(tmp_path / "nope")
    with pytest.raises(MAEError, match="No images"):
        list_inputs(str(tmp_path / "imgs" / "*.gif"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MAEError, match="No images"):
        list_inputs(tmp_path / "empty")


def test_worker_part_sources():
    assert worker_part("1/4", {}) == WorkerPart(1, 4, "--shard")
    assert worker_part(None, {"RANK": "2", "WORLD_SIZE": "3"}) == WorkerPart(2, 3, "RANK/WORLD_SIZE")
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    assert worker_part(None, slurm) == WorkerPart(2, 4, "SLURM array")
    assert worker_part(None, {}) == WorkerPart(0, 1, "single")
    assert worker_part("0/2", {"RANK": "1", "WORLD_SIZE": "2"}).index == 0  # the option wins
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(MAEError):
            worker_part(bad, {})


@pytest.mark.parametrize("total, shard_size, workers", [(23, 4, 3), (5, 10, 2), (40, 5, 8), (1, 1, 1)])
def test_sharding_partitions_the_input(total, shard_size, workers):
    assigned = [output_files_for(total, shard_size, WorkerPart(i, workers, "test")) for i in range(workers)]
    files = [number for numbers in assigned for number in numbers]
    assert sorted(files) == list(range(num_output_files(total, shard_size)))  # disjoint, complete
    positions = [i for number in files for i in file_range(number, total, shard_size)]
    assert sorted(positions) == list(range(total))


def test_pooling_and_l2():
    latent = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)  # [B, 1+L, D]
    np.testing.assert_array_equal(pool_tokens(latent, "cls"), latent[:, 0])
    np.testing.assert_allclose(pool_tokens(latent, "mean"), latent[:, 1:].mean(1), rtol=1e-6)
    assert pool_tokens(latent, "cls+mean").shape == (3, 8)
    assert pool_tokens(latent, "tokens").shape == (3, 5, 4)
    with pytest.raises(MAEError):
        pool_tokens(latent, "max")
    unit = l2_normalize(latent)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-6)
    assert np.array_equal(l2_normalize(np.zeros((2, 3), np.float32)), np.zeros((2, 3), np.float32))


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_onnx_embed_of_the_corpus_matches_pytorch_and_records_every_failure(tmp_path, model_files, corpus):
    checkpoint, bundle = model_files
    folder, cases = corpus
    out = tmp_path / "out"
    summary = embed(folder, bundle, out, engine="onnx", batch_size=4, workers=2, shard_size=7, progress=False)
    embeddings, metadata, failures = read_output(out)

    # Row alignment, file by file, as embedding-reader expects; every input exactly once.
    for npy in (out / "embeddings").glob("*.npy"):
        assert len(np.load(npy)) == len(pd.read_parquet(out / "metadata" / f"{npy.stem}.parquet"))
        assert (out / "done" / f"{npy.stem}.json").is_file()
    assert sorted(metadata["key"].tolist() + failures["key"].tolist()) == sorted(cases)
    assert metadata["index"].is_monotonic_increasing
    expected_failures = {name: case.reason for name, case in cases.items() if case.reason}
    assert dict(zip(failures["key"], failures["error"], strict=True)) == expected_failures
    assert (metadata["status"] == "ok").all() and metadata["error"].isna().all()
    assert (failures["status"] == "error").all() and failures["message"].str.len().min() > 0
    sizes = {name: case.size for name, case in cases.items() if case.reason is None}
    assert {k: (w, h) for k, w, h in zip(metadata["key"], metadata["width"], metadata["height"], strict=True)} == sizes

    # Values: the PyTorch reference on the same files, row by row.
    assert embeddings.shape == (len(metadata), 32) and embeddings.dtype == np.float32
    reference = reference_features(checkpoint, metadata["path"].tolist(), bundle, "cls")
    np.testing.assert_allclose(embeddings, reference, atol=2e-5, rtol=1e-4)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["counts"] == {
        "assigned": len(cases),
        "embedded": len(sizes),
        "failed": len(expected_failures),
        "failed_by_reason": {
            r: list(expected_failures.values()).count(r) for r in sorted(set(expected_failures.values()))
        },
    }
    assert summary["engine"]["name"] == "onnx" and "onnxruntime" in summary["engine"]["description"]
    assert summary["model"]["sha256"] == Bundle.load(bundle).manifest["graphs"]["fp32"]["encoder"]["sha256"]
    assert summary["stages"]["inference"]["batches"] > 0 and summary["this_run"]["images"] == len(cases)

    # Again with the same arguments: everything is done already, nothing is recomputed.
    again = embed(folder, bundle, out, engine="onnx", batch_size=4, workers=0, shard_size=7, progress=False)
    assert again["output"]["written_now"] == 0 and again["counts"] == summary["counts"]


def test_embedding_reader_reads_the_output(tmp_path, model_files, corpus):
    """The real consumer, when installed (pip install embedding-reader): pairs npy and parquet file by file."""
    embedding_reader = pytest.importorskip("embedding_reader")
    _, bundle = model_files
    out = tmp_path / "out"
    embed(corpus[0], bundle, out, batch_size=4, workers=0, shard_size=7, progress=False)
    embeddings, metadata, _ = read_output(out)
    reader = embedding_reader.EmbeddingReader(
        embeddings_folder=str(out / "embeddings"),
        metadata_folder=str(out / "metadata"),
        file_format="parquet_npy",
        meta_columns=["path"],
    )
    assert reader.count == len(metadata) and reader.dimension == 32
    rows, meta = next(reader(batch_size=reader.count, start=0, end=reader.count, show_progress=False))
    np.testing.assert_array_equal(rows, embeddings)
    assert meta["path"].tolist() == metadata["path"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["mean", "cls+mean", "tokens"])
def test_pools_dtype_and_l2_with_the_torch_engine(tmp_path, model_files, photo_dir, pool):
    checkpoint, bundle = model_files
    out = tmp_path / "out"
    embed(photo_dir, checkpoint, out, engine="torch", pool=pool, batch_size=4, workers=0, progress=False)
    embeddings, metadata, _ = read_output(out)
    reference = reference_features(checkpoint, metadata["path"].tolist(), bundle, pool)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5, rtol=1e-5)
    assert embeddings.shape[1:] == {"mean": (32,), "cls+mean": (64,), "tokens": (17, 32)}[pool]

    half = tmp_path / "half"
    summary = embed(
        photo_dir, bundle, half, engine="onnx", pool=pool, dtype="float16", l2_normalize=True, workers=0, progress=False
    )
    unit, _, _ = read_output(half)
    assert unit.dtype == np.float16
    np.testing.assert_allclose(unit.astype(np.float32), l2_normalize(reference), atol=2e-3)
    assert summary["embedding"]["layout"].startswith("3-D" if pool == "tokens" else "2-D")


@pytest.mark.slow
def test_shards_from_several_workers_make_the_single_run(tmp_path, model_files, photo_dir):
    _, bundle = model_files
    options = dict(engine="onnx", batch_size=2, workers=0, shard_size=2, progress=False)
    single = tmp_path / "single"
    embed(photo_dir, bundle, single, **options)
    split = tmp_path / "split"
    summaries = [embed(photo_dir, bundle, split, shard=f"{i}/3", **options) for i in range(3)]
    assert [s["output"]["files"] for s in summaries] == [1, 1, 1]
    assert sorted(p.name for p in split.glob("summary*.json")) == [f"summary-{i}-of-3.json" for i in range(3)]
    for folder in ("embeddings", "metadata", "failures", "done"):
        names = sorted(p.name for p in (single / folder).iterdir())
        assert names == sorted(p.name for p in (split / folder).iterdir())
        for name in names:
            assert (single / folder / name).read_bytes() == (split / folder / name).read_bytes(), name


def test_changed_arguments_or_inputs_are_refused(tmp_path, model_files):
    _, bundle = model_files
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(gradient_rgb(40 + i, 30)).save(images / f"{i}.png")
    out = tmp_path / "out"
    embed(images, bundle, out, workers=0, progress=False)
    with pytest.raises(MAEError, match="pool"):
        embed(images, bundle, out, pool="mean", workers=0, progress=False)
    with pytest.raises(MAEError, match="resize"):
        embed(images, bundle, out, resize="squash", workers=0, progress=False)
    Image.fromarray(gradient_rgb()).save(images / "new.png")
    with pytest.raises(MAEError, match="input changed"):
        embed(images, bundle, out, workers=0, progress=False)


def test_strict_raises_after_writing_everything(tmp_path, model_files, corpus):
    _, bundle = model_files
    folder, cases = corpus
    out = tmp_path / "out"
    with pytest.raises(EmbedFailures) as info:
        embed(folder, bundle, out, workers=0, strict=True, progress=False)
    failed = sum(1 for case in cases.values() if case.reason)
    assert f"{failed} of {len(cases)}" in info.value.message
    assert json.loads((out / "summary.json").read_text())["counts"]["failed"] == failed
    assert len(read_output(out)[1]) == len(cases) - failed


def test_decoder_survives_a_crashing_worker(tmp_path):
    """A process that dies on one file costs that file only; the other chunks in flight are decoded again."""
    names = ["0.png", "1.png", "crash.png", "3.png", "4.png", "5.png"]
    for name in names:
        Image.fromarray(gradient_rgb()).save(tmp_path / name)
    pre = {"size": 16}
    decoder = Decoder(workers=1, function=decode_or_crash)
    try:
        tasks = [
            DecodeTask([i, i + 1], [str(tmp_path / n) for n in names[i : i + 2]], pre, "center") for i in (0, 2, 4)
        ]
        handles = [decoder.submit(task) for task in tasks]
        chunks = [decoder.result(handle) for handle in handles]
    finally:
        decoder.close()
    assert [c.ok_indexes for c in chunks] == [[0, 1], [3], [4, 5]]
    assert [f[:2] for f in chunks[1].failures] == [(2, "decoder_crashed")]
    assert decoder.restarts >= 1
    assert all(c.pixel_values.shape == (len(c.ok_indexes), 3, 16, 16) for c in chunks)


def test_cli_reports_and_exit_codes(tmp_path, model_files, corpus):
    _, bundle = model_files
    folder, _ = corpus
    command = [sys.executable, "-m", "mae.cli", "embed", str(folder), "--model", str(bundle), "--workers", "0"]
    done = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "embedded" in done.stdout and "Traceback" not in done.stderr
    strict = subprocess.run(
        [*command, "--out", str(tmp_path / "b"), "--strict"], capture_output=True, text=True, timeout=120
    )
    assert strict.returncode == 2 and "could not be embedded" in strict.stderr and "Traceback" not in strict.stderr
    assert (tmp_path / "b" / "summary.json").is_file()
    bad = subprocess.run([*command, "--out", str(tmp_path / "c"), "--shard", "3/2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "out of range" in bad.stderr


def test_token_files_too_large_for_memory_are_refused_up_front(tmp_path, model_files, photo_dir):
    _, bundle = model_files
    with pytest.raises(MAEError, match="shard-size"):
        embed(photo_dir, bundle, tmp_path / "out", pool="tokens", shard_size=3_000_000, workers=0, progress=False)
    assert not (tmp_path / "out" / "run.json").exists()
