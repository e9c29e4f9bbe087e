"""Embedding output folders written with `mae embed`'s own writer, from vectors a test chooses (no model runs).

`synthetic_run(root, vectors)` lays out run.json, embeddings/, metadata/, failures/ and done/ exactly as `mae embed`
does (through `mae.runtime.shards.OutputFolder`), so indexes of 10^4 vectors cost no inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mae.runtime.inputs import file_range, keys_checksum, num_output_files
from mae.runtime.shards import FAILURE_COLUMNS, METADATA_COLUMNS, FileRows, OutputFolder, params_checksum


def clustered_vectors(count: int, dim: int, clusters: int = 64, spread: float = 0.15, seed: int = 0) -> np.ndarray:
    """float32 [count, dim]: points around `clusters` random centres (the structure real embeddings have)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, size=count)
    return (centres[labels] + spread * rng.standard_normal((count, dim))).astype(np.float32)


def synthetic_run(
    root: Path, vectors: np.ndarray, shard_size: int = 4096, paths: list[str] | None = None, **params: Any
) -> Path:
    """A finished embedding folder holding `vectors` (row i: image `paths[i]`, default img_i.jpg)."""
    count, dim = vectors.shape
    paths = paths or [f"/images/img_{i:06d}.jpg" for i in range(count)]
    keys = [Path(path).name for path in paths]
    record = {
        "model_sha256": "0" * 64,
        "engine": "onnx",
        "precision": "fp32",
        "pool": "cls",
        "resize": "center",
        "dtype": "float32",
        "l2_normalize": False,
        "shard_size": shard_size,
        "preprocessing": {"size": 32},
        "embedding_shape": [dim],
        "inputs": count,
        "inputs_sha256": keys_checksum(keys),
        **params,
    }
    folder = OutputFolder(root)
    files = num_output_files(count, shard_size)
    folder.claim(record, {"workers": 1, "files": files, "shard_size": shard_size, "inputs": count,
                          "inputs_sha256": record["inputs_sha256"]})  # fmt: skip
    dtype = np.float16 if record["dtype"] == "float16" else np.float32
    for number in range(files):
        indexes = file_range(number, count, shard_size)
        metadata = {name: [] for name in METADATA_COLUMNS}
        for index in indexes:
            row = {"path": paths[index], "key": keys[index], "index": index, "status": "ok", "error": None,
                   "width": 32, "height": 32}  # fmt: skip
            for name in METADATA_COLUMNS:
                metadata[name].append(row[name])
        rows = FileRows(vectors[indexes.start : indexes.stop].astype(dtype), metadata, {n: [] for n in FAILURE_COLUMNS})
        keys_sha256 = keys_checksum([f"{i}\0{keys[i]}" for i in indexes])
        folder.write_file(number, rows, params_checksum(record), keys_sha256, indexes, record["model_sha256"])
    return root
