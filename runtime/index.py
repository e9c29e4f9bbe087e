"""`mae index`: a faiss index over finished `mae embed` folders, chosen from the data's size and a memory budget.

    INDEX_DIR/
      index.faiss    the faiss index (vectors as the metric wants them: unit length for cosine)
      ids.parquet    row i = index id i: path, key, source (which embedding folder), file, row (where its vector is)
      index.json     written last: what it was built from (each folder's checksum, bundle, pooling, engine,
                     precision, normalization, pre-processing), the index kind and its parameters, the recall
                     measured against exact search, and the sha256 of the two files above

The kind (`plan_index`): exact (`flat`, inner product) while N x D floats fit the budget and N <= FLAT_MAX_VECTORS,
where one query scans every vector in milliseconds on a CPU (see bench/index_speed.py); beyond that an inverted
file of nlist ~ sqrt(N) lists (`ivf-flat`, exact vectors, scanned `nprobe` lists at a time) when it fits, else with
product-quantized codes (`ivf-pq`: m bytes a vector, m the largest divisor of D the budget allows). Recall@k of an
approximate index is measured on a seeded sample of the indexed vectors against exact search over all of them,
and `nprobe` is the smallest power of two that reaches RECALL_TARGET (or nlist): both printed and recorded.

Re-ranking (`ivf-pq`): codes rank neighbours only roughly, so a k-NN search asks them for k x `rerank` candidates
(RERANK_FACTOR by default) and orders those by their exact scores, computed from the vectors in the embedding
folders (memory-mapped: only the candidates' rows are read, the index's memory budget is not touched). The recall
measured and recorded is that of the re-ranked search, beside the codes' own; the scores returned are exact. The
codes' score error (99th percentile of |code score - exact score| over the sampled candidates) is recorded too:
`mae search --duplicates` searches that much below its threshold, then keeps the pairs whose exact score reaches it.

Metric: `cosine` (the default; vectors scaled to unit length, the inner product is then the cosine) or `ip`
(inner product of the vectors as stored: for `--l2-normalize` embeddings the two are the same).

Determinism: the training sample and faiss's k-means take seeds, so building twice from the same folders gives a
byte-identical index.faiss. A rebuild removes index.json first and writes it last: a killed build leaves a folder
that is no index (the next `mae index` builds again), never one whose files disagree.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mae import __version__
from mae.core.errors import MAEError, require
from mae.core.files import FolderLock, atomic_write, cached_sha256, faults, make_dirs, remove_leftovers, size_text

from .embedding_runs import EmbeddingRun, check_compatible, open_run

INDEX_FORMAT = "mae-index"
FORMAT_VERSION = 1
INDEX_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "ids.parquet", "index.json"
KINDS = ("auto", "flat", "ivf-flat", "ivf-pq")
METRICS = ("cosine", "ip")
FLAT_MAX_VECTORS = 200_000  # exact search up to here: one query scans N x D floats (about 10 ms at 768-d, 2 cores)
RECALL_TARGET = 0.95
RECALL_K = 10
RECALL_SAMPLE = 1000
TRAIN_POINTS_PER_LIST = 64  # faiss warns below 39 points per centroid; more costs k-means time on small CPUs
ADD_CHUNK = 65536
PQ_CENTROIDS = 256  # 8-bit codes
PQ_MAX_M = 96  # bytes per vector of an ivf-pq index: 768-d vectors as 96 codes of 8 dimensions
ID_BYTES = 8  # an inverted list stores a 64-bit id beside each vector or code
RERANK_FACTOR = 10  # ivf-pq: candidates per neighbour wanted, ordered by their exact scores
RERANK_BYTES = 64 << 20  # per gather of exact vectors or block of candidate scores (peak about 3-4x this)


class IndexProgress(Protocol):
    """What `build_index` says while it runs (the app draws a bar; the default is silent)."""

    def note(self, text: str) -> None: ...
    def stage(self, name: str, total: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def close(self) -> None: ...


class Silent:
    def note(self, text: str) -> None:
        pass

    def stage(self, name: str, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def faiss_module():  # noqa: ANN201 - the faiss module
    return require("faiss", "search", "Building and searching vector indexes (faiss)")


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class IndexPlan:
    kind: str  # "flat" | "ivf-flat" | "ivf-pq"
    count: int  # vectors
    dim: int
    nlist: int = 0  # inverted lists (ivf-*)
    pq_m: int = 0  # bytes per vector (ivf-pq)
    memory_bytes: int = 0  # estimated size of the index in memory

    def factory(self) -> str:
        """The faiss index_factory string of this plan."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf-flat":
            return f"IVF{self.nlist},Flat"
        return f"IVF{self.nlist},PQ{self.pq_m}x8"


def parse_size(text: str | int | None) -> int | None:
    """'2GiB', '512M', '1.5 GB', a byte count, or None/'auto' (None)."""
    if text is None or isinstance(text, int):
        return text
    value = str(text).strip()
    if value.lower() in ("", "auto"):
        return None
    match = re.fullmatch(r"(?i)([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)", value)
    if not match:
        raise MAEError(f"--max-memory {text!r} is not a size.", hint="use e.g. 512MiB, 4GiB, 2GB or a byte count")
    number, unit, _ = match.groups()
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit.lower()]
    return int(float(number) * scale)


def default_memory_budget() -> int:
    """A quarter of this machine's memory (the index is one of the things it holds)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _nlist(count: int) -> int:
    """A power of two near sqrt(N), with at least TRAIN_POINTS_PER_LIST vectors per list to train on."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(count)))))
    while nlist > 1 and count < TRAIN_POINTS_PER_LIST * nlist:
        nlist //= 2
    return nlist


def plan_index(count: int, dim: int, max_memory: int | None = None, kind: str = "auto") -> IndexPlan:
    """The index for `count` vectors of `dim` floats within `max_memory` bytes (see the module docstring)."""
    if kind not in KINDS:
        raise MAEError(f"Unknown index kind {kind!r}.", hint=f"use one of: {', '.join(KINDS)}")
    budget = max_memory if max_memory is not None else default_memory_budget()
    flat_bytes = count * dim * 4
    if kind == "flat" or (kind == "auto" and count <= FLAT_MAX_VECTORS and flat_bytes <= budget):
        return IndexPlan("flat", count, dim, memory_bytes=flat_bytes)
    nlist = _nlist(count)
    if nlist < 2:
        raise MAEError(
            f"{count} vectors are too few for an inverted-file index (it needs {2 * TRAIN_POINTS_PER_LIST} or more).",
            hint="use --kind flat (exact search)",
        )
    centroids = nlist * dim * 4
    ivf_flat = centroids + count * (dim * 4 + ID_BYTES)
    if kind == "ivf-flat" or (kind == "auto" and ivf_flat <= budget):
        return IndexPlan("ivf-flat", count, dim, nlist=nlist, memory_bytes=ivf_flat)
    if count < PQ_CENTROIDS:  # each sub-quantizer's k-means needs a training vector per centroid
        wanted = "--kind ivf-pq" if kind == "ivf-pq" else f"an index within --max-memory {size_text(budget)}"
        raise MAEError(
            f"{count} vectors are too few for {wanted}: product-quantized codes train {PQ_CENTROIDS} centroids.",
            hint="use --kind flat (exact search; it is fast at this size)",
        )
    # Product quantization: m one-byte codes a vector, m a divisor of dim (faiss needs it); the largest that fits,
    # of at least 4 dimensions per code (finer ones cost training time for little recall) and at most PQ_MAX_M.
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and (m <= dim // 4 or m == 1) and m <= PQ_MAX_M]
    fitting = [m for m in divisors if centroids + count * (m + ID_BYTES) + m * 256 * (dim // m) * 4 <= budget]
    if kind == "ivf-pq" and not fitting:
        fitting = divisors[:1]
    if not fitting:
        least = centroids + count * (1 + ID_BYTES)
        raise MAEError(
            f"No index of {count} vectors of {dim} floats fits in --max-memory {size_text(budget)} "
            f"(the smallest, 1-byte codes, needs about {size_text(least)}).",
            hint=f"raise --max-memory to {size_text(least * 1.2)} or more",
        )
    m = max(fitting)
    memory = centroids + count * (m + ID_BYTES) + m * 256 * (dim // m) * 4
    return IndexPlan("ivf-pq", count, dim, nlist=nlist, pq_m=m, memory_bytes=memory)


# ------------------------------------------------------------------------------------------ the vectors
def load_vectors(runs: list[EmbeddingRun], metric: str, progress: IndexProgress) -> np.ndarray:
    """float32 [N, D], C order: every run's vectors in order; unit length for cosine (zero vectors stay zero)."""
    total = sum(run.rows for run in runs)
    dim = runs[0].dim
    vectors = np.empty((total, dim), dtype=np.float32)
    progress.stage("read embeddings", total)
    row = 0
    for run in runs:
        for number in run.files:
            part = np.asarray(run.vectors(number), dtype=np.float32)
            vectors[row : row + len(part)] = part
            row += len(part)
            progress.advance(len(part))
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors).all(axis=1)).sum())
        raise MAEError(
            f"{bad} embedding rows hold NaN or infinity: an index of them would return nonsense.",
            hint="check the model (mae export verifies it) and embed again",
        )
    if metric == "cosine":
        normalize_rows(vectors)
    return vectors


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """In place: each row to unit length (rows of zeros stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def _id_table(runs: list[EmbeddingRun]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {"id": [], "path": [], "key": [], "source": [], "file": [], "row": []}
    next_id = 0
    for source, run in enumerate(runs):
        for number in run.files:
            metadata = run.metadata(number)
            count = len(metadata["path"])
            columns["id"].extend(range(next_id, next_id + count))
            columns["path"].extend(metadata["path"])
            columns["key"].extend(metadata["key"])
            columns["source"].extend([source] * count)
            columns["file"].extend([number] * count)
            columns["row"].extend(range(count))
            next_id += count
    return columns


# ----------------------------------------------------------------------------------------------- the build
def _train_and_add(plan: IndexPlan, vectors: np.ndarray, seed: int, progress: IndexProgress) -> Any:
    faiss = faiss_module()
    index = faiss.index_factory(plan.dim, plan.factory(), faiss.METRIC_INNER_PRODUCT)
    if plan.kind != "flat":
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed  # k-means of the coarse quantizer
        ivf.cp.niter = 20
        if plan.kind == "ivf-pq":
            index.pq.cp.seed = seed  # k-means of each sub-quantizer
            index.do_polysemous_training = False  # codes for Hamming pre-filters we never use: 5x the training time
        count = min(len(vectors), max(TRAIN_POINTS_PER_LIST * plan.nlist, 256 * 40 if plan.kind == "ivf-pq" else 0))
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=count, replace=False))
        progress.stage(f"train {plan.factory()} on {count} vectors", 1)
        index.train(np.ascontiguousarray(vectors[rows]))
        progress.advance(1)
    progress.stage("add vectors", len(vectors))
    for start in range(0, len(vectors), ADD_CHUNK):
        chunk = vectors[start : start + ADD_CHUNK]
        index.add(chunk)
        progress.advance(len(chunk))
    return index


def gpu_count() -> int:
    """GPUs a GPU build of faiss (faiss-gpu) sees; 0 for faiss-cpu."""
    faiss = faiss_module()
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except RuntimeError:  # a GPU build on a machine without a usable driver
        return 0


def on_gpus(index: Any) -> Any:
    """A flat index copied to every GPU when faiss has some (exact search is where GPUs pay most), else `index`.

    Written against faiss's documented `index_cpu_to_all_gpus`; not run on a GPU by this project yet.
    """
    if gpu_count() == 0:
        return index
    faiss = faiss_module()
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):  # out of GPU memory, or an index type without a GPU version
        return index


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """int64 [Q, k]: ids of the k largest inner products over all `vectors` (faiss flat search, on GPUs if any)."""
    faiss = faiss_module()
    if gpu_count() == 0:  # searches `vectors` where they are (an IndexFlatIP would copy all of them)
        _, ids = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        return ids
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, ids = on_gpus(exact).search(queries, k)
    return ids


def pair_scores(
    queries: np.ndarray, owners: np.ndarray, ids: np.ndarray, exact: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """float32 [P]: the inner product of queries[owners[i]] with the exact vector of id ids[i] (`exact(ids)` ->
    float32 [len(ids), D], as the index compares them). Vectors are gathered RERANK_BYTES at a time, so memory stays
    bounded whatever P and D are."""
    scores = np.empty(len(ids), dtype=np.float32)
    step = max(1, RERANK_BYTES // (4 * queries.shape[1]))
    for start in range(0, len(ids), step):
        part = slice(start, start + step)
        scores[part] = np.einsum("nd,nd->n", queries[owners[part]], exact(ids[part]))
    return scores


def candidate_scores(
    queries: np.ndarray, candidates: np.ndarray, exact: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """float32 [Q, C]: `pair_scores` of each query with its candidates ([Q, C] ids); -inf where a candidate is -1."""
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    owners, columns = np.nonzero(candidates >= 0)
    scores[owners, columns] = pair_scores(queries, owners, candidates[owners, columns], exact)
    return scores


def rerank(
    queries: np.ndarray, candidates: np.ndarray, exact: Callable[[np.ndarray], np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]): the k best of each query's `candidates` ([Q, C] ids, -1 for none) by their exact
    scores (`candidate_scores`). Ties keep the candidates' order; missing ones (-1) come last with score -inf and
    id -1, as faiss fills them. Queries go RERANK_BYTES of [rows, C] scores and sort keys at a time."""
    count, width = candidates.shape
    k = min(k, width)
    scores = np.full((count, k), -np.inf, dtype=np.float32)
    found = np.full((count, k), -1, dtype=np.int64)
    step = max(1, RERANK_BYTES // (12 * max(1, width)))  # float32 scores + int64 order per candidate
    for start in range(0, count, step):
        rows = slice(start, min(count, start + step))
        ids = candidates[rows]
        exact_scores = candidate_scores(queries[rows], ids, exact)
        order = np.argsort(-exact_scores, axis=1, kind="stable")[:, :k]
        scores[rows] = np.take_along_axis(exact_scores, order, axis=1)
        chosen = np.take_along_axis(ids, order, axis=1)
        found[rows] = np.where(np.isfinite(scores[rows]), chosen, -1)
    return scores, found


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true k neighbours that `found` has (both [Q, k])."""
    hits = [len(set(mine.tolist()) & set(true.tolist())) for mine, true in zip(found, truth, strict=True)]
    return float(np.sum(hits) / truth.size) if truth.size else 1.0


def measure_recall(
    index: Any, plan: IndexPlan, vectors: np.ndarray, seed: int, progress: IndexProgress, factor: int = 0
) -> dict:
    """Recall@k against exact search on a seeded sample of the indexed vectors, and the nprobe it was reached at;
    with `factor` (ivf-pq re-ranking) the recall of k x factor candidates ordered by exact scores, beside the codes'
    own (`recall_codes`), and the codes' score error (see the module docstring)."""
    k = min(RECALL_K, len(vectors))
    sample = min(RECALL_SAMPLE, len(vectors))
    rows = np.sort(np.random.default_rng(seed + 1).choice(len(vectors), size=sample, replace=False))
    queries = np.ascontiguousarray(vectors[rows])
    if plan.kind == "flat":
        return {"k": k, "sample": sample, "recall": 1.0, "nprobe": None, "exact": True, "tried": [], "rerank": 0}
    faiss = faiss_module()
    progress.stage(f"recall@{k} on {sample} queries", 1)
    truth = exact_neighbours(vectors, queries, k)
    ivf = faiss.extract_index_ivf(index)
    tried, error = [], 0.0
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        entry, error = _trial(index, queries, vectors, truth, factor)
        tried.append({"nprobe": nprobe, **entry})
        if entry["recall"] >= RECALL_TARGET or nprobe >= plan.nlist:
            break
        nprobe = min(plan.nlist, nprobe * 2)
    progress.advance(1)
    best_entry = tried[-1]
    ivf.nprobe = best_entry["nprobe"]
    measured = {
        "k": k,
        "sample": sample,
        "recall": best_entry["recall"],
        "nprobe": best_entry["nprobe"],
        "exact": False,
        "tried": tried,
        "rerank": factor,
    }
    if factor:
        measured["recall_codes"] = best_entry["recall_codes"]
        measured["score_error"] = round(error, 6)
    return measured


def _trial(
    index: Any, queries: np.ndarray, vectors: np.ndarray, truth: np.ndarray, factor: int
) -> tuple[dict[str, float], float]:
    """One nprobe of `measure_recall`: ({recall, [recall_codes,] ms_per_query}, the codes' score error)."""
    k = truth.shape[1]
    started = time.perf_counter()
    coded, found = index.search(queries, min(len(vectors), k * factor) if factor else k)
    if not factor:
        seconds = time.perf_counter() - started
        entry = {"recall": round(recall_at(found, truth), 4), "ms_per_query": round(1e3 * seconds / len(queries), 4)}
        return entry, 0.0
    _, best = rerank(queries, found, lambda ids: vectors[ids], k)
    seconds = time.perf_counter() - started
    valid = found >= 0
    spread = np.abs(coded[valid] - candidate_scores(queries, found, lambda ids: vectors[ids])[valid])
    entry = {
        "recall": round(recall_at(best, truth), 4),
        "recall_codes": round(recall_at(found[:, :k], truth), 4),
        "ms_per_query": round(1e3 * seconds / len(queries), 4),
    }
    return entry, float(np.percentile(spread, 99)) if len(spread) else 0.0


def _recall_warning(plan: IndexPlan, recall: dict[str, Any]) -> str | None:
    """What to say when the approximate index misses the recall target even scanning every list."""
    if recall["exact"] or recall["recall"] >= RECALL_TARGET:
        return None
    if plan.kind == "ivf-pq":
        exact_size = size_text(plan.count * (plan.dim * 4 + ID_BYTES) + plan.nlist * plan.dim * 4)
        remedy = f"give --max-memory {exact_size} or more for exact vectors (ivf-flat)"
        if recall.get("rerank", 0) < 100:
            remedy += f", or re-rank more candidates (--rerank {max(2 * recall.get('rerank', 0), RERANK_FACTOR)})"
    else:
        remedy = "these vectors have little cluster structure; --kind flat searches exactly"
    return (
        f"warning: recall@{recall['k']} is {recall['recall']:.3f} at nprobe {recall['nprobe']} (of {plan.nlist} "
        f"lists), below {RECALL_TARGET}: {remedy}."
    )


def _source_record(run: EmbeddingRun) -> dict[str, Any]:
    return {
        "path": str(run.root.resolve()),
        "checksum": run.checksum,
        "rows": run.rows,
        "files": len(run.files),
        "model_path": run.model_path,
        "dtype": run.params.get("dtype"),
    }


def _options_record(metric: str, kind: str, max_memory: int | None, seed: int, rerank: int) -> dict[str, Any]:
    return {"metric": metric, "kind": kind, "max_memory": max_memory, "seed": seed, "rerank": rerank}


def up_to_date(out: Path, runs: list[EmbeddingRun], options: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an index in `out` built from exactly these folders (and options) whose files are intact."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        return None
    recorded = {"rerank": 0, **(manifest.get("options") or {})}  # indexes from before re-ranking: flat ones stay
    if recorded != options or [s.get("checksum") for s in manifest.get("sources", [])] != [
        run.checksum for run in runs
    ]:
        return None
    for name, digest in (manifest.get("files") or {}).items():
        try:
            if cached_sha256(out / name) != digest:
                return None
        except (OSError, MAEError):
            return None
    return manifest


def _refuse_foreign(root: Path) -> None:
    """`out` must be new, empty or an index folder (perhaps of a killed build): never overwrite someone's files."""
    if root.exists() and not root.is_dir():
        raise MAEError(f"--out {root} is a file.", hint="choose a folder for the index")
    if not root.is_dir():
        return
    ours = {INDEX_FILE, IDS_FILE, MANIFEST_FILE, ".lock"}
    foreign = sorted(
        entry.name
        for entry in root.iterdir()
        if entry.name not in ours and not any(entry.name.startswith(f".{name}.") for name in ours)
    )
    manifest = root / MANIFEST_FILE
    if not foreign and manifest.is_file():
        try:
            foreign = [] if json.loads(manifest.read_text()).get("format") == INDEX_FORMAT else [MANIFEST_FILE]
        except (OSError, ValueError, AttributeError):
            foreign = [MANIFEST_FILE]
    if foreign:
        raise MAEError(
            f"--out {root} holds files that are not a mae index ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): building there would overwrite or mix with them.",
            hint="choose a new or empty folder for --out",
        )


def build_index(
    embeddings: list[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    metric: str = "cosine",
    kind: str = "auto",
    max_memory: str | int | None = None,
    seed: int = 0,
    verify: bool = True,
    progress: IndexProgress | None = None,
    rerank: int | None = None,
) -> dict[str, Any]:
    """Index every vector of the finished embedding folders `embeddings` into `out`; returns index.json's content
    (with "up_to_date": True when an identical index was there already and nothing was built).

    verify: check every embedding file against its done marker's sha256 first (through the hash cache: a file
    unchanged since it was hashed, by inode, size, mtime and ctime, is not read again).
    rerank: for ivf-pq, candidates per neighbour ordered by exact scores at search time (None: RERANK_FACTOR;
    0: the codes' order).
    """
    report = progress or Silent()
    if metric not in METRICS:
        raise MAEError(f"Unknown metric {metric!r}.", hint="use cosine or ip")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MAEError(f"--seed {seed!r} is not a whole number >= 0.", hint="e.g. --seed 0")
    rerank = RERANK_FACTOR if rerank is None else rerank
    if isinstance(rerank, bool) or not isinstance(rerank, int) or not 0 <= rerank <= 1000:
        raise MAEError(f"--rerank {rerank!r} is not a whole number from 0 to 1000.", hint="e.g. --rerank 10 (0: off)")
    sources = [embeddings] if isinstance(embeddings, (str, os.PathLike)) else list(embeddings)
    runs = [open_run(path, verify=verify) for path in sources]
    settings = check_compatible(runs)
    count = sum(run.rows for run in runs)
    if count == 0:
        raise MAEError(
            "The embedding folders hold no vectors (every input failed): there is nothing to index.",
            hint="see failures/*.parquet in each folder for why",
        )
    budget = parse_size(max_memory)
    plan = plan_index(count, runs[0].dim, budget, kind)
    options = _options_record(metric, kind, budget, seed, rerank if plan.kind == "ivf-pq" else 0)
    root = Path(out)
    existing = up_to_date(root, runs, options) if root.is_dir() else None
    if existing is not None:
        return {**existing, "up_to_date": True}
    _refuse_foreign(root)
    make_dirs(root)
    hint = "wait for the other mae index to finish, or choose another --out"
    with FolderLock(root / ".lock", f"{root} (being indexed)", hint):
        return _build(runs, settings, plan, root, options, seed, report)


def _build(
    runs: list[EmbeddingRun],
    settings: dict[str, Any],
    plan: IndexPlan,
    root: Path,
    options: dict[str, Any],
    seed: int,
    progress: IndexProgress,
) -> dict[str, Any]:
    faiss = faiss_module()
    pa = require("pyarrow", "cpu", "Writing the index's ids (parquet)")
    pq = require("pyarrow.parquet", "cpu", "Writing the index's ids (parquet)")
    started = time.perf_counter()
    with faults(root / MANIFEST_FILE, "remove"):
        (root / MANIFEST_FILE).unlink(missing_ok=True)  # from here on the folder is no index until it is complete
    remove_leftovers(root, [INDEX_FILE, IDS_FILE, MANIFEST_FILE])
    try:
        vectors = load_vectors(runs, options["metric"], progress)
        index = _train_and_add(plan, vectors, seed, progress)
        build_seconds = time.perf_counter() - started
        recall = measure_recall(index, plan, vectors, seed, progress, options["rerank"])
        warning = _recall_warning(plan, recall)
        if warning:
            progress.note(warning)
        progress.stage("write the index", 1)
        atomic_write(root / INDEX_FILE, lambda handle: faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write)))
        table = pa.table(_id_table(runs))
        atomic_write(root / IDS_FILE, lambda handle: pq.write_table(table, handle))
        progress.advance(1)
    finally:
        progress.close()
    manifest = {
        "format": INDEX_FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "faiss_version": getattr(faiss, "__version__", None),
        "options": options,
        "metric": options["metric"],
        "plan": asdict(plan),
        "factory": plan.factory(),
        "nprobe": recall["nprobe"],
        "rerank": options["rerank"],
        "recall": recall,
        "count": plan.count,
        "dim": plan.dim,
        "settings": settings,
        "sources": [_source_record(run) for run in runs],
        # Hashed in full now; the cache then answers every later check of these files until they change.
        "files": {name: cached_sha256(root / name, fresh=True) for name in (INDEX_FILE, IDS_FILE)},
        "build_seconds": round(build_seconds, 3),
        "warning": warning,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(root / MANIFEST_FILE, lambda handle: handle.write(text.encode()))
    return {**manifest, "up_to_date": False}
