"""`mae search`: neighbours of query images in a `mae index`, and near-duplicate groups across the whole index.

Queries are embedded exactly as the indexed images were: `mae.runtime.embed.embed` itself runs on them (into a
temporary folder) with the bundle, engine, precision, pre-processing, pooling, normalization and dtype the index
records, after the bundle's checksum is compared with the one the embeddings were made with (a different bundle
is refused: its vectors would not be comparable). A query may also be an indexed image: `--id N`, or a path the
index holds; its own vector is used (read from its embedding folder, exact) and it is left out of its neighbours.

Near-duplicates: every indexed vector's neighbours above `threshold` (a range search; cosine for a cosine index),
as pairs (each once, a < b) and as groups (connected components of the pairs: a, b similar and b, c similar put
a, b, c in one group), largest first.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mae.core.bundle import is_bundle
from mae.core.errors import MAEError, require
from mae.core.files import atomic_write, cached_sha256, faults, make_dirs

from .embedding_runs import EmbeddingRun, open_run
from .index import (
    IDS_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    MANIFEST_FILE,
    Silent,
    faiss_module,
    normalize_rows,
    on_gpus,
    pair_scores,
    rerank,
)
from .sheets import duplicates_sheet

MAX_DUPLICATE_PAIRS = 10_000_000  # pairs held in memory by a duplicate search; a lower threshold is refused
DUPLICATE_CHUNK = 4096  # query vectors per range search (fewer for large indexes: see duplicate_pairs)
GPU_MAX_K = 2048  # the most neighbours faiss's GPU indexes select; more are searched on the CPU copy


@dataclass
class LoadedIndex:
    """An index folder, checked: the faiss index, its ids table, and what it was built from."""

    root: Path
    manifest: dict[str, Any]
    index: Any  # faiss.Index
    ids: dict[str, Any]  # columns of ids.parquet: id, source, file, row as int64 arrays; path, key as lists
    notes: list[str] = field(default_factory=list)
    _runs: dict[int, EmbeddingRun | None] = field(default_factory=dict)
    _searcher: Any = None  # the index that answers k-NN queries (a GPU copy of a flat one where possible)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    def run(self, source: int) -> EmbeddingRun | None:
        """The embedding folder `source` (None when it is gone)."""
        if source not in self._runs:
            path = self.manifest["sources"][source]["path"]
            self._runs[source] = open_run(path, verify=False) if Path(path, "run.json").is_file() else None
        return self._runs[source]

    def vector(self, row: int) -> np.ndarray:
        """float32 [D]: the vector of index id `row`, as the index compares it."""
        return self.block(row, row + 1)[0]

    def block(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop - start, D]: the vectors of ids start..stop-1, exact, read from their embedding folders
        (ids run through each folder's files in order); unit length for a cosine index."""
        parts, row = [], start
        while row < stop:
            source, number, offset = (int(self.ids[name][row]) for name in ("source", "file", "row"))
            run = self.run(source)
            end = row + 1
            while end < stop and self.ids["source"][end] == source and self.ids["file"][end] == number:
                end += 1
            if run is not None:  # only these rows are read (and widened from float16)
                parts.append(run.take(number, np.arange(offset, offset + end - row)))
            else:  # the folder is gone: what the index stores (exact for flat and ivf-flat, decoded for ivf-pq)
                _make_direct_map(self.index)
                parts.append(self.index.reconstruct_n(row, end - row))
            row = end
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.manifest["dim"]), np.float32)
        return normalize_rows(vectors) if self.metric == "cosine" else vectors

    def exact(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), D]: the exact vectors of ids `rows` (any order), memory-mapped from their embedding
        folders, file by file; unit length for a cosine index. Callers check `reranks` (every folder present)."""
        rows = np.asarray(rows, dtype=np.int64)
        vectors = np.empty((len(rows), self.manifest["dim"]), dtype=np.float32)
        sources, files, offsets = (self.ids[name][rows] for name in ("source", "file", "row"))
        keys = sources.astype(np.int64) << 32 | files.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        for group in np.split(order, bounds) if len(rows) else []:
            source = int(sources[group[0]])
            run = self.run(source)
            if run is None:
                raise MAEError(
                    f"{self.manifest['sources'][source]['path']} (embedded into this index) is gone: its exact "
                    "vectors cannot be read.",
                    hint="restore the folder, or run mae index again on what is there",
                )
            vectors[group] = run.take(int(files[group[0]]), offsets[group])
        return normalize_rows(vectors) if self.metric == "cosine" else vectors

    @property
    def reranks(self) -> int:
        """Candidates per neighbour ordered by exact scores (ivf-pq with every embedding folder present), else 0."""
        factor = int(self.manifest.get("rerank") or 0)
        if factor and all(self.run(source) is not None for source in range(len(self.manifest["sources"]))):
            return factor
        return 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]) of the k nearest indexed vectors (faiss fills missing ones with -1); an
        ivf-pq index's k x rerank candidates ordered by their exact scores (see mae.runtime.index)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.metric == "cosine":
            queries = normalize_rows(queries.copy())
        if self._searcher is None:  # exact search on GPUs where faiss has some (they have no range search: CPU)
            self._searcher = on_gpus(self.index) if self.manifest["plan"]["kind"] == "flat" else self.index
        factor = self.reranks
        width = min(self.count, k * factor) if factor else k
        searcher = self._searcher if width <= GPU_MAX_K else self.index  # faiss's GPU k-selection stops at 2048
        if not factor:
            return searcher.search(queries, k)
        _, candidates = searcher.search(queries, width)
        return rerank(queries, candidates, self.exact, k)

    def row_of_path(self) -> dict[str, int]:
        return {_resolved(path): row for row, path in enumerate(self.ids["path"])}


def _make_direct_map(index: Any) -> None:
    faiss = faiss_module()
    with contextlib.suppress(RuntimeError):  # a flat index reconstructs without one
        faiss.extract_index_ivf(index).make_direct_map()


def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return path


def load_index(path: str | os.PathLike, check_sources: bool = True) -> LoadedIndex:
    """The index in `path`, after its files are checked against index.json and (check_sources) its embedding
    folders against the checksums recorded when it was built: a changed folder is refused, a missing one noted."""
    root = Path(path)
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise MAEError(
            f"{root} is not an index folder (it has no {MANIFEST_FILE}, or its build did not finish).",
            hint="build one with: mae index EMB_DIR --out INDEX_DIR",
        ) from None
    except (OSError, ValueError) as exc:
        raise MAEError(f"{root / MANIFEST_FILE} is unreadable ({exc}).", hint="run mae index again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise MAEError(f"{root / MANIFEST_FILE} is not the manifest of a mae index.", hint="pass a mae index --out")
    for name, digest in manifest.get("files", {}).items():
        try:
            actual = cached_sha256(root / name)
        except MAEError as exc:
            raise MAEError(f"{root / name} is missing or unreadable.", hint="run mae index again") from exc
        if actual != digest:
            raise MAEError(
                f"{root / name} is not the file this index was built with (sha256 {actual[:12]}…, recorded "
                f"{digest[:12]}…).",
                hint="run mae index again to rebuild it",
            )
    notes = _check_sources(manifest) if check_sources else []
    faiss = faiss_module()
    pq = require("pyarrow.parquet", "cpu", "Reading the index's ids (parquet)")
    index = faiss.read_index(str(root / INDEX_FILE))
    if manifest.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(manifest["nprobe"])
    table = pq.read_table(root / IDS_FILE)
    ids = {
        name: table.column(name).to_numpy()
        if name in ("id", "source", "file", "row")
        else table.column(name).to_pylist()
        for name in table.column_names
    }
    return LoadedIndex(root, manifest, index, ids, notes)


def _check_sources(manifest: dict[str, Any]) -> list[str]:
    notes = []
    for source in manifest["sources"]:
        path = Path(source["path"])
        if not (path / "run.json").is_file():
            approximate = ""
            if manifest.get("rerank"):
                recall = manifest.get("recall", {})
                approximate = (
                    f"; without its exact vectors the codes alone rank neighbours (recall@{recall.get('k')} "
                    f"{recall.get('recall_codes')} instead of {recall.get('recall')}, approximate scores): restore "
                    "the folder or index again"
                )
            notes.append(
                f"note: {path} (embedded into this index) is gone; neighbours still come from the index{approximate}"
            )
            continue
        try:
            checksum = open_run(path, verify=False).checksum
        except MAEError:
            checksum = None
        if checksum != source["checksum"]:
            raise MAEError(
                f"{path} changed since this index was built (re-embedded, extended or damaged): its ids would no "
                "longer match the folder's rows.",
                hint="run mae index again on the folder",
            )
    return notes


# -------------------------------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class Query:
    label: str  # what the person gave: a path, or "id N"
    path: str | None  # the image file (None for an id whose file is gone)
    row: int | None  # its index id when the query is an indexed image


def resolve_queries(loaded: LoadedIndex, images: list[str], ids: list[int]) -> list[Query]:
    """Paths (indexed or new) and ids as queries, in the order given (ids after paths)."""
    indexed = loaded.row_of_path()
    queries = []
    for image in images:
        if not Path(image).is_file():
            raise MAEError(f"Query {image} does not exist.", hint="pass image files, or --id N for an indexed image")
        queries.append(Query(image, image, indexed.get(_resolved(image))))
    for row in ids:
        if not 0 <= row < loaded.count:
            raise MAEError(f"--id {row} is not in the index (ids 0…{loaded.count - 1}).", hint="see its ids.parquet")
        queries.append(Query(f"id {row}", loaded.ids["path"][row], row))
    if not queries:
        raise MAEError("Nothing to search for.", hint="pass query images, --id N, or --duplicates")
    return queries


def query_model(loaded: LoadedIndex, model: str | os.PathLike | None) -> str:
    """The bundle to embed new queries with: `model`, else the one the embeddings were made with; its checksum
    must be the recorded one."""
    from .embed import model_checksum  # embed's pipeline (multiprocessing, the engines) only when a query needs it

    settings = loaded.manifest["settings"]
    recorded = next((s.get("model_path") for s in loaded.manifest["sources"] if s.get("model_path")), None)
    chosen = str(model) if model is not None else recorded
    if chosen is None or not (is_bundle(Path(chosen)) or Path(chosen).exists()):
        raise MAEError(
            f"The model the index's embeddings were made with ({recorded or 'not recorded'}) is not there.",
            hint="pass it with --model (the same bundle, wherever it is now)",
        )
    actual = model_checksum(chosen, settings["engine"], settings["precision"])
    if actual != settings["model_sha256"]:
        raise MAEError(
            f"{chosen} is not the model this index was embedded with (sha256 {actual[:12]}…, the index's "
            f"{str(settings['model_sha256'])[:12]}…): its vectors would not be comparable.",
            hint="pass the bundle the embeddings were made with (--model), or embed and index again with this one",
        )
    return chosen


def embed_queries(paths: list[str], model: str, settings: dict[str, Any], dtype: str | None) -> np.ndarray:
    """float32 [Q, D]: `paths` through `mae embed` with the index's settings; an error naming undecodable files."""
    from .embed import embed  # as above: only when a query needs embedding

    with tempfile.TemporaryDirectory(prefix="mae-search-") as scratch:
        listing = Path(scratch, "queries.txt")
        listing.write_text("".join(f"{Path(path).resolve()}\n" for path in paths), encoding="utf-8")
        out = Path(scratch, "embeddings")
        embed(
            listing,
            model,
            out,
            engine=settings["engine"],
            precision=settings["precision"],
            pool=settings["pool"],
            resize=settings["resize"],
            l2_normalize=bool(settings["l2_normalize"]),
            dtype=dtype or "float32",
            workers=0,
            batch_size=min(32, len(paths)),
            progress=False,
        )
        _refuse_failures(out, paths)
        return open_run(out, verify=False).all_vectors()


def _refuse_failures(out: Path, paths: list[str]) -> None:
    pq = require("pyarrow.parquet", "cpu", "Reading embedding failures (parquet)")
    failed = []
    for file in sorted((out / "failures").glob("*.parquet")):
        table = pq.read_table(file).to_pylist()
        failed.extend(table)
    if failed:
        listed = "; ".join(f"{paths[row['index']]}: {row['error']} ({row['message']})" for row in failed[:5])
        raise MAEError(
            f"{len(failed)} of {len(paths)} query images cannot be embedded: {listed}",
            hint="pass image files that open (the reasons are those of mae embed's failures/)",
        )


# --------------------------------------------------------------------------------------------------- search
def search(
    queries: list[str | os.PathLike] | None,
    index: str | os.PathLike | LoadedIndex,
    k: int = 10,
    ids: list[int] | None = None,
    model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The k nearest indexed images of each query: {"queries": [{"query", "path", "id", "neighbours": [{"rank",
    "id", "score", "path", "key"}]}], "index": ..., "notes": [...]}. See the module docstring."""
    loaded = index if isinstance(index, LoadedIndex) else load_index(index)
    if k < 1:
        raise MAEError(f"-k {k}: at least one neighbour is needed.", hint="use -k 1 or more")
    resolved = resolve_queries(loaded, [str(q) for q in queries or []], list(ids or []))
    own = [query for query in resolved if query.row is not None]
    wanted = k + (1 if own else 0)  # an indexed query is left out of its own neighbours
    if k > loaded.count - (1 if own else 0):
        excluded = ", the query itself excluded" if own else ""
        raise MAEError(
            f"-k {k} is more than the index holds ({loaded.count} images{excluded}).",
            hint=f"use -k {max(1, loaded.count - (1 if own else 0))} or less",
        )
    vectors = np.zeros((len(resolved), loaded.manifest["dim"]), dtype=np.float32)
    new = [i for i, query in enumerate(resolved) if query.row is None]
    if new:
        chosen = query_model(loaded, model)
        dtype = loaded.manifest["sources"][0].get("dtype")
        vectors[new] = embed_queries([resolved[i].path for i in new], chosen, loaded.manifest["settings"], dtype)
    for i, query in enumerate(resolved):
        if query.row is not None:
            vectors[i] = loaded.vector(query.row)
    scores, found = loaded.search(vectors, min(wanted, loaded.count))
    results = [_neighbours(loaded, query, scores[i], found[i], k) for i, query in enumerate(resolved)]
    return {"queries": results, "index": str(loaded.root), "k": k, "metric": loaded.metric, "notes": loaded.notes}


def _neighbours(loaded: LoadedIndex, query: Query, scores: np.ndarray, found: np.ndarray, k: int) -> dict[str, Any]:
    rows = []
    for score, row in zip(scores.tolist(), found.tolist(), strict=True):
        if row < 0 or row == query.row:
            continue
        rows.append({"rank": len(rows) + 1, "id": row, "score": round(float(score), 6),
                     "path": loaded.ids["path"][row], "key": loaded.ids["key"][row]})  # fmt: skip
        if len(rows) == k:
            break
    return {"query": query.label, "path": query.path, "id": query.row, "neighbours": rows}


# ----------------------------------------------------------------------------------------------- duplicates
def duplicate_pairs(loaded: LoadedIndex, threshold: float, progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(pairs int64 [P, 2] with a < b, scores float32 [P]) of every two indexed vectors scoring above
    `threshold`, highest first.

    Each vector's range search finds its partners; a pair counts once however many of its two searches found it
    (an inverted file scans only `nprobe` lists, and codes are not symmetric, so a may find b and not b a), with
    the higher score. An ivf-pq index with its embedding folders is searched the codes' measured score error below
    `threshold`, and its pairs kept by their exact scores (see mae.runtime.index). Queries per range search shrink
    with the index, so one search returns at most about max(MAX_DUPLICATE_PAIRS, 16 N) results: a threshold that
    passes most of the index is refused before it fills the memory."""
    report = progress or Silent()
    count = loaded.count
    exact = bool(loaded.reranks)
    margin = float(loaded.manifest["recall"].get("score_error", 0.0)) if exact else 0.0
    chunk = max(16, min(DUPLICATE_CHUNK, MAX_DUPLICATE_PAIRS // max(1, count)))
    firsts, seconds, values = [], [], []
    total = 0
    report.stage(f"pairs above {threshold}", count)
    try:
        for start in range(0, count, chunk):
            rows = range(start, min(count, start + chunk))
            block = np.ascontiguousarray(loaded.block(rows.start, rows.stop))
            limits, scores, found = loaded.index.range_search(block, float(threshold) - margin)
            owners = np.repeat(np.arange(rows.start, rows.stop), np.diff(limits.astype(np.int64)))
            keep = found != owners  # never an image with itself
            owners, found, scores = owners[keep], found[keep], scores[keep]
            if exact and len(found):
                scores = pair_scores(block, owners - rows.start, found, loaded.exact)
                keep = scores > threshold
                owners, found, scores = owners[keep], found[keep], scores[keep]
            firsts.append(np.minimum(owners, found))
            seconds.append(np.maximum(owners, found))
            values.append(scores)
            total += len(found)
            if total > 2 * MAX_DUPLICATE_PAIRS:  # each pair may be counted from both sides until the end
                raise _too_many_pairs(threshold)
            report.advance(len(rows))
    finally:
        report.close()
    pairs = np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1).astype(np.int64)
    scores = np.concatenate(values).astype(np.float32)
    order = np.lexsort((-scores, pairs[:, 1], pairs[:, 0]))  # each pair's copies together, the best first
    pairs, scores = pairs[order], scores[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    pairs, scores = pairs[first], scores[first]
    if len(pairs) > MAX_DUPLICATE_PAIRS:
        raise _too_many_pairs(threshold)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -scores))
    return pairs[order], scores[order]


def _too_many_pairs(threshold: float) -> MAEError:
    return MAEError(
        f"More than {MAX_DUPLICATE_PAIRS:,} pairs score above {threshold}: that is most of the index, not its "
        "duplicates.",
        hint="raise --threshold (cosine 0.95 or more finds near-copies)",
    )


def group_pairs(count: int, pairs: np.ndarray) -> np.ndarray:
    """int64 [count]: a group number per id (connected components of `pairs`; -1 for ids in no pair), groups
    numbered by size, largest first (ties: smallest member first)."""
    parent = np.arange(count)

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for node in np.unique(pairs).tolist():
        members.setdefault(root(node), []).append(node)
    groups = np.full(count, -1, dtype=np.int64)
    for number, (_, nodes) in enumerate(sorted(members.items(), key=lambda item: (-len(item[1]), min(item[1])))):
        groups[nodes] = number
    return groups


def _group_record(
    group: int, sizes: np.ndarray, grouped: np.ndarray, groups: np.ndarray, best: np.ndarray, paths: list[str]
) -> dict[str, Any]:
    """One group of the summary: its size and (up to 20) members, each with its best score inside the group."""
    members = grouped[groups[grouped] == group]
    members = members[np.lexsort((members, -best[members]))][:20]
    return {
        "group": group,
        "size": int(sizes[group]),
        "members": [{"id": int(i), "path": paths[i], "score": round(float(best[i]), 6)} for i in members.tolist()],
    }


def find_duplicates(
    index: str | os.PathLike | LoadedIndex, threshold: float, out: str | os.PathLike, progress: Any = None
) -> dict[str, Any]:
    """Near-duplicate pairs and groups above `threshold`, written to `out`: duplicates.parquet (id_a, id_b, score,
    path_a, path_b, group), groups.parquet (group, size, id, path) and duplicates.json (the summary, returned)."""
    loaded = index if isinstance(index, LoadedIndex) else load_index(index)
    if not np.isfinite(threshold):
        raise MAEError(f"--threshold {threshold} is not a number.", hint="use e.g. --threshold 0.95")
    pa = require("pyarrow", "cpu", "Writing duplicates (parquet)")
    pq = require("pyarrow.parquet", "cpu", "Writing duplicates (parquet)")
    pairs, scores = duplicate_pairs(loaded, threshold, progress)
    groups = group_pairs(loaded.count, pairs)
    root = make_dirs(out)
    with faults(root / "duplicates.json", "remove"):  # written last: an earlier run's never sits beside new files
        (root / "duplicates.json").unlink(missing_ok=True)
    paths = loaded.ids["path"]
    best = np.full(loaded.count, -np.inf, dtype=np.float32)  # each id's highest score with another image
    if len(pairs):
        np.maximum.at(best, pairs[:, 0], scores)
        np.maximum.at(best, pairs[:, 1], scores)
    pair_table = pa.table({
        "id_a": pairs[:, 0], "id_b": pairs[:, 1], "score": scores,
        "path_a": [paths[i] for i in pairs[:, 0].tolist()], "path_b": [paths[i] for i in pairs[:, 1].tolist()],
        "group": groups[pairs[:, 0]] if len(pairs) else np.zeros(0, np.int64),
    })  # fmt: skip
    grouped = np.flatnonzero(groups >= 0)
    grouped = grouped[np.lexsort((grouped, groups[grouped]))]
    sizes = np.bincount(groups[grouped]) if len(grouped) else np.zeros(0, np.int64)
    group_table = pa.table({
        "group": groups[grouped], "size": sizes[groups[grouped]] if len(grouped) else np.zeros(0, np.int64),
        "id": grouped, "path": [paths[i] for i in grouped.tolist()],
    })  # fmt: skip
    atomic_write(root / "duplicates.parquet", lambda handle: pq.write_table(pair_table, handle))
    atomic_write(root / "groups.parquet", lambda handle: pq.write_table(group_table, handle))
    summary = {
        "index": str(loaded.root),
        "threshold": threshold,
        "metric": loaded.metric,
        "images": loaded.count,
        "pairs": len(pairs),
        "groups": int(len(sizes)),
        "images_in_groups": int(len(grouped)),
        "largest_groups": [_group_record(g, sizes, grouped, groups, best, paths) for g in range(min(10, len(sizes)))],
        "files": {
            "pairs": str(root / "duplicates.parquet"),
            "groups": str(root / "groups.parquet"),
            "picture": str(root / "duplicates.png"),
        },
        "notes": loaded.notes,
    }
    duplicates_sheet(summary, root / "duplicates.png")
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(root / "duplicates.json", lambda handle: handle.write(text.encode()))
    return summary
