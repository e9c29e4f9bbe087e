"""`mae index`: the choice of index, measured recall against exact search, same folders -> same index, changes
detected, and every bad input a message. Vectors come from `tests/embedding_folders.py` (no model runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from embedding_folders import clustered_vectors, synthetic_run

from mae.core.errors import MAEError
from mae.runtime import index as index_module
from mae.runtime.index import (
    FLAT_MAX_VECTORS,
    RECALL_TARGET,
    build_index,
    parse_size,
    plan_index,
    recall_at,
    rerank,
)
from mae.runtime.search import load_index, search


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """12 000 clustered 48-d vectors in 3 output files."""
    vectors = clustered_vectors(12_000, 48, seed=1)
    return synthetic_run(tmp_path_factory.mktemp("clustered"), vectors, shard_size=5000), vectors


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine neighbours in numpy (an independent reference for faiss)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ unit.T), axis=1, kind="stable")[:, :k]


# ------------------------------------------------------------------------------------------------ the plan
def test_plan_is_exact_while_small_then_ivf_then_pq_as_the_budget_shrinks():
    assert plan_index(1000, 768).kind == "flat"
    big = plan_index(FLAT_MAX_VECTORS + 1, 768, max_memory=64 << 30)
    assert big.kind == "ivf-flat" and big.nlist == 512 and big.factory() == "IVF512,Flat"
    squeezed = plan_index(1_000_000, 768, max_memory=200 << 20)
    assert squeezed.kind == "ivf-pq" and 768 % squeezed.pq_m == 0 and squeezed.memory_bytes <= 200 << 20
    assert squeezed.factory() == f"IVF1024,PQ{squeezed.pq_m}x8"
    # A budget below even the exact index's size of a small set moves it off flat.
    assert plan_index(100_000, 768, max_memory=100 << 20).kind == "ivf-pq"
    with pytest.raises(MAEError, match="fits in --max-memory"):
        plan_index(1_000_000, 768, max_memory=1 << 20)
    with pytest.raises(MAEError, match="too few for an inverted-file index"):
        plan_index(50, 8, kind="ivf-flat")


@pytest.mark.parametrize(("text", "value"), [("4GiB", 4 << 30), ("512M", 512 << 20), ("1.5 GB", int(1.5 * 2**30)),
                                             ("1000", 1000), ("auto", None), (None, None)])  # fmt: skip
def test_memory_sizes_parse(text, value):
    assert parse_size(text) == value


def test_a_memory_size_that_is_no_size_is_refused():
    with pytest.raises(MAEError, match="is not a size"):
        parse_size("lots")


# ------------------------------------------------------------------------------------------------ recall
def test_exact_index_agrees_with_numpy_brute_force(clustered, tmp_path):
    folder, vectors = clustered
    manifest = build_index([folder], tmp_path / "flat", kind="flat")
    assert manifest["factory"] == "Flat" and manifest["recall"]["exact"]
    loaded = load_index(tmp_path / "flat")
    queries = vectors[::997]
    _, found = loaded.search(queries, 10)
    assert recall_at(found, brute_force(vectors, queries, 10)) >= 0.999  # ties at float precision only


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-pq"])
def test_approximate_index_recall_is_measured_and_holds_on_other_queries(clustered, tmp_path, kind):
    """The recall index.json reports is what an independent check (numpy brute force, another sample) finds."""
    folder, vectors = clustered
    manifest = build_index([folder], tmp_path / kind, kind=kind)
    recall = manifest["recall"]
    assert manifest["plan"]["kind"] == kind and not recall["exact"] and recall["sample"] == 1000
    assert [t["nprobe"] for t in recall["tried"]] == [2**i for i in range(len(recall["tried"]))]
    if kind == "ivf-flat":  # exact vectors: enough lists scanned reach the target
        assert recall["recall"] >= RECALL_TARGET
    loaded = load_index(tmp_path / kind)
    assert index_module.faiss_module().extract_index_ivf(loaded.index).nprobe == manifest["nprobe"]
    queries = vectors[np.random.default_rng(7).choice(len(vectors), 300, replace=False)]
    _, found = loaded.search(queries, 10)
    independent = recall_at(found, brute_force(vectors, queries, 10))
    assert abs(independent - recall["recall"]) < 0.05, (independent, recall)


def test_building_twice_gives_the_same_index_and_an_unchanged_folder_is_not_rebuilt(clustered, tmp_path):
    folder, _ = clustered
    first = build_index([folder], tmp_path / "a", kind="ivf-pq")
    second = build_index([folder], tmp_path / "b", kind="ivf-pq")
    assert (tmp_path / "a/index.faiss").read_bytes() == (tmp_path / "b/index.faiss").read_bytes()
    assert (tmp_path / "a/ids.parquet").read_bytes() == (tmp_path / "b/ids.parquet").read_bytes()
    assert first["files"] == second["files"] and not first["up_to_date"]
    stamp = (tmp_path / "a/index.faiss").stat().st_mtime_ns
    again = build_index([folder], tmp_path / "a", kind="ivf-pq")
    assert again["up_to_date"] and (tmp_path / "a/index.faiss").stat().st_mtime_ns == stamp
    other_seed = build_index([folder], tmp_path / "a", kind="ivf-pq", seed=1)
    assert not other_seed["up_to_date"]  # other options: built again


def test_ids_map_back_to_metadata_rows_across_files_and_folders(tmp_path):
    one = synthetic_run(tmp_path / "one", clustered_vectors(30, 8, seed=2), shard_size=7,
                        paths=[f"/a/{i}.jpg" for i in range(30)])  # fmt: skip
    two = synthetic_run(tmp_path / "two", clustered_vectors(12, 8, seed=3), shard_size=5,
                        paths=[f"/b/{i}.jpg" for i in range(12)])  # fmt: skip
    build_index([one, two], tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    assert loaded.count == 42 and loaded.ids["path"][:2] == ["/a/0.jpg", "/a/1.jpg"]
    assert loaded.ids["path"][30] == "/b/0.jpg" and int(loaded.ids["source"][30]) == 1
    assert int(loaded.ids["file"][29]) == 4 and int(loaded.ids["row"][29]) == 1  # 29 = 4 * 7 + 1
    expected = np.load(one / "embeddings/00004.npy")[1]
    assert np.allclose(loaded.vector(29), expected / np.linalg.norm(expected), atol=1e-6)
    result = search([], loaded, k=3, ids=[29])
    assert result["queries"][0]["neighbours"][0]["id"] != 29  # an indexed query is not its own neighbour


# --------------------------------------------------------------------------------------------- changes
def test_a_changed_embedding_folder_is_detected_by_search_and_rebuilt_by_index(tmp_path):
    vectors = clustered_vectors(40, 8, seed=4)
    folder = synthetic_run(tmp_path / "emb", vectors, shard_size=16)
    build_index([folder], tmp_path / "index")
    shutil.rmtree(folder)
    synthetic_run(folder, vectors * 2 + 1, shard_size=16)  # embedded again: other vectors, same layout
    with pytest.raises(MAEError, match="changed since this index was built"):
        load_index(tmp_path / "index")
    rebuilt = build_index([folder], tmp_path / "index")
    assert not rebuilt["up_to_date"]
    load_index(tmp_path / "index")


def test_a_damaged_index_file_is_refused(tmp_path):
    folder = synthetic_run(tmp_path / "emb", clustered_vectors(20, 8, seed=5))
    build_index([folder], tmp_path / "index")
    with open(tmp_path / "index/index.faiss", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\1")
    with pytest.raises(MAEError, match="is not the file this index was built with"):
        load_index(tmp_path / "index")


def test_a_failed_build_leaves_no_index_and_the_next_build_completes(tmp_path, monkeypatch):
    folder = synthetic_run(tmp_path / "emb", clustered_vectors(20, 8, seed=6))
    build_index([folder], tmp_path / "index")

    def broken(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(index_module, "_train_and_add", broken)
    with pytest.raises(MemoryError):
        build_index([folder], tmp_path / "index", seed=3)
    with pytest.raises(MAEError, match="is not an index folder"):
        load_index(tmp_path / "index")  # the old manifest is gone: never a manifest that disagrees with the files
    monkeypatch.undo()
    assert not build_index([folder], tmp_path / "index", seed=3)["up_to_date"]
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["ids.parquet", "index.faiss", "index.json"]


# ------------------------------------------------------------------------------------------------ bad input
def test_mixed_runs_with_other_settings_or_dimensions_are_refused(tmp_path):
    base = synthetic_run(tmp_path / "a", clustered_vectors(20, 8, seed=7))
    pooled = synthetic_run(tmp_path / "b", clustered_vectors(20, 8, seed=8), pool="mean")
    wider = synthetic_run(tmp_path / "c", clustered_vectors(20, 16, seed=9))
    with pytest.raises(MAEError, match="different pool"):
        build_index([base, pooled], tmp_path / "index")
    with pytest.raises(MAEError, match="different embedding_shape"):
        build_index([base, wider], tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_folders_that_are_not_finished_embeddings_are_refused(tmp_path):
    with pytest.raises(MAEError, match="is not an embedding output folder"):
        build_index([tmp_path], tmp_path / "index")
    folder = synthetic_run(tmp_path / "emb", clustered_vectors(20, 8, seed=10), shard_size=8)
    (folder / "done/00001.json").unlink()
    with pytest.raises(MAEError, match="is not finished: 1 of 3 output files"):
        build_index([folder], tmp_path / "index")
    tokens = synthetic_run(tmp_path / "tokens", np.zeros((4, 8), np.float32), pool="tokens")
    with pytest.raises(MAEError, match="pool=tokens"):
        build_index([tokens], tmp_path / "index")


def test_an_empty_embedding_run_is_refused(tmp_path):
    folder = synthetic_run(tmp_path / "emb", np.zeros((0, 8), np.float32))
    with pytest.raises(MAEError, match="nothing to index"):
        build_index([folder], tmp_path / "index")


def test_float16_embeddings_and_non_finite_rows(tmp_path):
    vectors = clustered_vectors(30, 8, seed=11)
    half = synthetic_run(tmp_path / "half", vectors, dtype="float16")
    build_index([half], tmp_path / "index")
    assert np.allclose(load_index(tmp_path / "index").vector(3), vectors[3] / np.linalg.norm(vectors[3]), atol=2e-3)
    vectors[5, 2] = np.nan
    broken = synthetic_run(tmp_path / "nan", vectors)
    with pytest.raises(MAEError, match="1 embedding rows hold NaN"):
        build_index([broken], tmp_path / "index2")


def test_cli_index_prints_recall_and_json(clustered, tmp_path, monkeypatch, capsys):
    folder, _ = clustered
    code, output = run_cli(monkeypatch, capsys, "index", folder, "--out", tmp_path / "index", "--kind", "ivf-flat")
    assert code == 0 and "recall@10" in output and "nprobe" in output, output
    code, output = run_cli(monkeypatch, capsys, "index", folder, "--out", tmp_path / "index", "--kind", "ivf-flat",
                           "--json")  # fmt: skip
    manifest = json.loads(output[output.index("{") :])
    assert code == 0 and manifest["up_to_date"] and manifest["count"] == 12_000
    code, output = run_cli(monkeypatch, capsys, "index", tmp_path / "nothing", "--out", tmp_path / "x")
    assert code == 2 and output.startswith("error: ") and "Traceback" not in output
    code, output = run_cli(monkeypatch, capsys, "index", folder, "--max-memory", "a lot")
    assert code == 2 and "is not a size" in output


def test_an_index_that_misses_the_recall_target_says_so_and_how_to_fix_it(tmp_path):
    """Independent random vectors have no clusters: PQ codes of 8 dimensions lose most neighbours."""
    vectors = np.random.default_rng(12).standard_normal((3000, 32)).astype(np.float32)
    folder = synthetic_run(tmp_path / "emb", vectors)
    manifest = build_index([folder], tmp_path / "index", kind="ivf-pq", rerank=0)
    assert manifest["recall"]["recall"] < RECALL_TARGET and manifest["recall"]["nprobe"] == manifest["plan"]["nlist"]
    assert "below 0.95" in manifest["warning"] and "--max-memory" in manifest["warning"]
    assert "--rerank 10" in manifest["warning"]
    # The remedy works: the same codes, their candidates re-ranked by exact scores, reach the target.
    assert build_index([folder], tmp_path / "index", kind="ivf-pq")["recall"]["recall"] >= RECALL_TARGET
    clustered_folder = synthetic_run(tmp_path / "clustered", clustered_vectors(3000, 32, seed=13))
    assert build_index([clustered_folder], tmp_path / "index2", kind="ivf-flat")["warning"] is None


def test_rerank_orders_candidates_by_exact_scores_and_puts_missing_ones_last():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    table = np.array([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9], [0.2, 0.2]], dtype=np.float32)
    candidates = np.array([[3, -1, 1, 0], [1, 2, -1, 3]], dtype=np.int64)
    scores, found = rerank(queries, candidates, lambda ids: table[ids], 4)
    assert found.tolist() == [[1, 0, 3, -1], [2, 3, 1, -1]]
    assert np.allclose(scores[:, :3], [[0.9, 0.5, 0.2], [0.9, 0.2, 0.1]]) and np.isneginf(scores[:, 3]).all()


def test_pq_search_reranked_by_exact_vectors_returns_exact_scores_and_more_true_neighbours(clustered, tmp_path):
    """Codes alone give approximate scores and lose neighbours; k x 10 candidates re-scored exactly (from the
    memory-mapped embedding files) give true cosines and a recall at least the codes'; 0 turns it off."""
    folder, vectors = clustered
    reranked = build_index([folder], tmp_path / "reranked", kind="ivf-pq", max_memory=2 << 20)
    codes = build_index([folder], tmp_path / "codes", kind="ivf-pq", max_memory=2 << 20, rerank=0)
    assert reranked["rerank"] == 10 and codes["rerank"] == 0 and "score_error" not in codes["recall"]
    measured = reranked["recall"]
    assert measured["recall"] >= measured["recall_codes"] and 0 < measured["score_error"] < 1
    assert [t["recall_codes"] for t in measured["tried"]] == [t["recall"] for t in codes["recall"]["tried"]][
        : len(measured["tried"])
    ]  # the same index: the codes' recall at each nprobe is what the index without re-ranking measures
    queries = vectors[np.random.default_rng(8).choice(len(vectors), 200, replace=False)]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = brute_force(vectors, queries, 10)
    recalls = {}
    for name in ("reranked", "codes"):
        loaded = load_index(tmp_path / name)
        scores, found = loaded.search(queries, 10)
        exact = np.einsum("qd,qkd->qk", q, unit[found])
        recalls[name] = recall_at(found, truth)
        error = np.abs(scores - exact).max()
        assert error < 1e-5 if name == "reranked" else error > 1e-3, (name, error)
        assert (np.diff(scores, axis=1) <= 1e-7).all()  # best first
    assert recalls["reranked"] > recalls["codes"], recalls
    assert abs(recalls["reranked"] - measured["recall"]) < 0.05, (recalls, measured)


def test_pq_search_without_its_embedding_folder_falls_back_to_the_codes_and_says_so(tmp_path):
    vectors = clustered_vectors(3000, 16, seed=16)
    folder = synthetic_run(tmp_path / "emb", vectors, shard_size=1000)
    build_index([folder], tmp_path / "index", kind="ivf-pq")
    shutil.rmtree(folder)
    loaded = load_index(tmp_path / "index")
    assert loaded.reranks == 0, loaded.notes
    manifest = loaded.manifest["recall"]
    said = f"recall@10 {manifest['recall_codes']} instead of {manifest['recall']}"
    assert any(said in note and "restore the folder" in note for note in loaded.notes), loaded.notes
    result = search([], loaded, k=5, ids=[7])
    assert len(result["queries"][0]["neighbours"]) == 5


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "ivf-pq"])
def test_duplicates_across_files_of_an_index(tmp_path, kind):
    """Rows copied elsewhere in the set (another output file) are found as groups, each pair once."""
    vectors = clustered_vectors(3000, 16, seed=14)
    vectors[2500] = vectors[10]  # a pair across files
    vectors[[2900, 2901]] = vectors[20] * 1.5  # a group of three (cosine ignores the length)
    folder = synthetic_run(tmp_path / "emb", vectors, shard_size=1000)
    build_index([folder], tmp_path / "index", kind=kind)
    from mae.runtime.search import find_duplicates

    summary = find_duplicates(tmp_path / "index", 0.99999, tmp_path / "dups")
    groups = [sorted(m["id"] for m in group["members"]) for group in summary["largest_groups"]]
    assert groups[:2] == [[20, 2900, 2901], [10, 2500]] and summary["pairs"] >= 4
    # Scores are exact cosines (PQ codes alone would score these copies below 1), each above the threshold.
    scores = [m["score"] for group in summary["largest_groups"][:2] for m in group["members"]]
    assert all(score > 0.99999 for score in scores), scores


def test_an_out_folder_holding_other_files_is_left_alone(tmp_path):
    folder = synthetic_run(tmp_path / "emb", clustered_vectors(20, 8, seed=15))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/index.json").write_text('{"my": "notes"}')
    with pytest.raises(MAEError, match="holds files that are not a mae index"):
        build_index([folder], tmp_path / "mine")
    assert (tmp_path / "mine/index.json").read_text() == '{"my": "notes"}'
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos/cat.jpg").write_bytes(b"x")
    with pytest.raises(MAEError, match=r"\(cat.jpg\)"):
        build_index([folder], tmp_path / "photos")
    with pytest.raises(MAEError, match="is a file"):
        build_index([folder], tmp_path / "photos/cat.jpg")


def test_rerank_memory_stays_within_its_working_budget(monkeypatch):
    """16 queries x 20 000 candidates x 512 floats would be 655 MB as one block; re-ranking gathers a budget's
    worth at a time (here 1 MiB) and gives the same answer as the unbounded computation."""
    import tracemalloc

    rng = np.random.default_rng(3)
    table = rng.standard_normal((20_000, 512), dtype=np.float32)
    queries = rng.standard_normal((16, 512), dtype=np.float32)
    candidates = np.tile(np.arange(20_000), (16, 1))
    candidates[:, 5] = -1
    monkeypatch.setattr(index_module, "RERANK_BYTES", 1 << 20)
    tracemalloc.start()
    scores, found = rerank(queries, candidates, lambda ids: table[ids], 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24 << 20, peak  # the table's own gathers, the score rows and the sort keys
    expected = queries @ table.T
    expected[:, 5] = -np.inf
    best = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    assert np.array_equal(found, best)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, best, axis=1), rtol=1e-5)


def test_pq_needs_256_vectors_and_says_so(tmp_path):
    with pytest.raises(MAEError, match="too few for --kind ivf-pq"):
        plan_index(200, 16, kind="ivf-pq")
    with pytest.raises(MAEError, match="too few for an index within --max-memory"):
        plan_index(200, 16, max_memory=10_000)
    folder = synthetic_run(tmp_path / "emb", clustered_vectors(200, 16, seed=17))
    with pytest.raises(MAEError, match="use --kind flat"):
        build_index([folder], tmp_path / "index", kind="ivf-pq")


def test_an_index_from_before_reranking_is_still_up_to_date(tmp_path):
    """index.json written before --rerank existed has no "rerank" option: an unchanged flat index is not rebuilt."""
    folder = synthetic_run(tmp_path / "emb", clustered_vectors(500, 16, seed=18))
    build_index([folder], tmp_path / "index")
    manifest_path = tmp_path / "index/index.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["options"]["rerank"], manifest["rerank"]
    manifest_path.write_text(json.dumps(manifest))
    assert build_index([folder], tmp_path / "index")["up_to_date"]
    assert search([], tmp_path / "index", k=3, ids=[0])["queries"][0]["neighbours"]


def test_finished_folders_are_verified_through_the_hash_cache_and_a_changed_file_is_still_caught(tmp_path, monkeypatch):
    """`mae embed` remembers each embeddings file's hash as it writes it: opening the finished folder reads none of
    them again, while a byte changed in place (same size, the old mtime put back) changes the ctime and is caught."""
    import os

    from mae.core import files as files_module
    from mae.runtime import shards as shards_module
    from mae.runtime.embedding_runs import open_run

    folder = synthetic_run(tmp_path / "emb", clustered_vectors(300, 8, seed=20), shard_size=100)
    read = []
    real = files_module.sha256_file

    def counting(path):
        if Path(path).suffix == ".npy":
            read.append(Path(path))
        return real(path)

    monkeypatch.setattr(files_module, "sha256_file", counting)
    monkeypatch.setattr(shards_module, "sha256_file", counting)
    assert open_run(folder, verify=True).rows == 300 and read == []
    data = folder / "embeddings/00001.npy"
    before = data.stat()
    content = bytearray(data.read_bytes())
    content[-1] ^= 0xFF
    data.write_bytes(bytes(content))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(MAEError, match="1 of 3 output files have no valid done marker"):
        open_run(folder, verify=True)
    assert read == [data]
