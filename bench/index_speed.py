"""`mae index` / `mae search` at scale: build time, query latency and recall@10 of exact and approximate indexes.

    python bench/index_speed.py                          # 10^5 and 10^6 random 768-d vectors (several minutes)
    python bench/index_speed.py --sizes 100000 --data clustered --json index_speed.json

For each size it builds, through the library's own steps (`mae.runtime.index`: the plan, training, adding, the
recall measurement that tunes nprobe), the exact index (`flat`) and the approximate ones (`ivf-flat`, `ivf-pq` with
the codes `plan_index` picks under a budget of a quarter of the exact index's size), then times queries one at a
time (p50 and p99 latency, the interactive case) and in one batch of `--queries` (throughput). Latencies are also
given as a ratio of the exact index's in the same run, the baseline, so a shared machine's speed cancels out.
The ivf-pq index is measured twice: its codes alone (`--rerank 0`) and with `mae search`'s default re-ranking (k x
RERANK_FACTOR candidates scored by their exact vectors, read from a memory-mapped .npy as `mae search` reads the
embedding files).

`--data random`: independent Gaussian vectors, the issue's worst case (no clusters for an inverted file to exploit,
so IVF needs many lists scanned for its recall); `clustered`: points around 1000 centres, closer to real embeddings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mae.core.hardware import cpu_info
from mae.runtime.index import (
    RECALL_K,
    RERANK_FACTOR,
    Silent,
    _train_and_add,
    exact_neighbours,
    measure_recall,
    plan_index,
    recall_at,
    rerank,
)


def make_vectors(count: int, dim: int, data: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if data == "random":
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((1000, dim), dtype=np.float32)
        vectors = centres[rng.integers(0, 1000, size=count)]
        vectors += 0.5 * rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # what a cosine index holds
    return vectors


def reranked(index, stored: np.ndarray):  # noqa: ANN001, ANN201 - a faiss index; a search function
    """k-NN search as `mae search` does it on ivf-pq: k x RERANK_FACTOR candidates by exact scores from `stored`."""

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, candidates = index.search(queries, k * RERANK_FACTOR)
        return rerank(queries, candidates, lambda ids: np.asarray(stored[ids]), k)

    return search


def time_queries(search, queries: np.ndarray, singles: int) -> dict:  # noqa: ANN001 - index.search or reranked()
    latencies = []
    for row in queries[:singles]:
        started = time.perf_counter()
        search(row[None], RECALL_K)
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    _, found = search(queries, RECALL_K)
    batch_seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_ms": round(1e3 * statistics.median(latencies), 3),
        "p99_ms": round(1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "batch_queries_per_s": round(len(queries) / batch_seconds, 1),
        "found": found,
    }


def bench_size(count: int, dim: int, data: str, queries: int, singles: int, seed: int, scratch: Path) -> list[dict]:
    vectors = make_vectors(count, dim, data, seed)
    query_vectors = make_vectors(queries, dim, data, seed + 1) if data == "random" else vectors[:queries].copy()
    truth = exact_neighbours(vectors, query_vectors, RECALL_K)
    np.save(scratch / "vectors.npy", vectors)
    stored = np.load(scratch / "vectors.npy", mmap_mode="r")  # as mae search reads embedding files
    rows = []
    for kind, factor in (("flat", 0), ("ivf-flat", 0), ("ivf-pq", 0), ("ivf-pq", RERANK_FACTOR)):
        budget = count * dim * 4 // 4 if kind == "ivf-pq" else None
        plan = plan_index(count, dim, budget, kind)
        started = time.perf_counter()
        if not factor:  # the re-ranked row searches the codes index just built
            index = _train_and_add(plan, vectors, seed, Silent())
        build_seconds = time.perf_counter() - started
        recall = measure_recall(index, plan, vectors, seed, Silent(), factor)
        timing = time_queries(reranked(index, stored) if factor else index.search, query_vectors, singles)
        rows.append({
            "vectors": count, "dim": dim, "data": data, "kind": kind + (f" rerank {factor}" if factor else ""),
            "factory": plan.factory(), "memory_mib": round(plan.memory_bytes / 2**20, 1),
            "build_s": round(build_seconds, 2), "nprobe": recall["nprobe"],
            "recall_at_10_build_sample": recall["recall"],
            "recall_at_10_queries": round(recall_at(timing.pop("found"), truth), 4), **timing,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    exact = rows[0]
    for row in rows:
        row["p50_vs_exact"] = round(row["p50_ms"] / exact["p50_ms"], 3)
        row["batch_speedup_vs_exact"] = round(row["batch_queries_per_s"] / exact["batch_queries_per_s"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--data", choices=("random", "clustered"), default="random")
    parser.add_argument("--queries", type=int, default=1000, help="batch of queries (and recall@10 on them)")
    parser.add_argument("--singles", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mae-index-bench-") as scratch:
        for count in args.sizes:
            rows += bench_size(count, args.dim, args.data, args.queries, args.singles, args.seed, Path(scratch))
    print(f"\nCPU: {cpu_info().describe()}")
    print("vectors  kind               index            MiB    build s  nprobe  recall@10  p50 ms  p99 ms  x exact  "
          "batch q/s")  # fmt: skip
    for r in rows:
        print(f"{r['vectors']:>7}  {r['kind']:<17}  {r['factory']:<15} {r['memory_mib']:>7} {r['build_s']:>8}  "
              f"{str(r['nprobe']):>6}  {r['recall_at_10_queries']:>9}  {r['p50_ms']:>6}  {r['p99_ms']:>6}  "
              f"{r['p50_vs_exact']:>7}  {r['batch_queries_per_s']:>9}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"cpu": cpu_info().describe(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
