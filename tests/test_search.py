"""`mae search` on real photos: copies and light re-encodings come back as their original's top neighbour, queries
are embedded as the index's images were (and a different bundle is refused), near-duplicate groups, contact
sheets, bad input as messages, and no torch anywhere on the path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_runner import run_cli
from conftest import photos
from images_corpus import tiny_model_files
from PIL import Image

from mae.core.errors import MAEError
from mae.runtime.embed import embed
from mae.runtime.index import build_index
from mae.runtime.search import find_duplicates, group_pairs, load_index, search

TILE = 128


def _crops() -> list[np.ndarray]:
    """12 different pictures: each scikit-image photo, and its top-left and bottom-right thirds."""
    pictures = []
    for array in photos():
        h, w = array.shape[:2]
        pictures += [array, array[: h // 2, : w // 2], array[h // 2 :, w // 2 :]]
    return pictures[:12]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """(bundle, originals folder, variants folder, index folder): the originals embedded and indexed."""
    base = tmp_path_factory.mktemp("search")
    _, bundle = tiny_model_files(tmp_path_factory.getbasetemp())
    originals, variants = base / "originals", base / "variants"
    originals.mkdir()
    variants.mkdir()
    for i, array in enumerate(_crops()):
        image = Image.fromarray(array)
        image.save(originals / f"img_{i:02d}.jpg", quality=95)
        shutil.copyfile(originals / f"img_{i:02d}.jpg", variants / f"copy_{i:02d}.jpg")  # the same bytes
        image.save(variants / f"q40_{i:02d}.jpg", quality=40)  # re-encoded harder
        image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.Resampling.BICUBIC).save(
            variants / f"small_{i:02d}.png"
        )  # 10 % smaller
    embed(originals, bundle, base / "emb", engine="onnx", workers=0, progress=False)
    build_index([base / "emb"], base / "index")
    return bundle, originals, variants, base / "index"


def test_copies_and_reencodings_come_back_as_their_original_first(indexed, tmp_path):
    bundle, originals, variants, index = indexed
    queries = sorted(variants.iterdir())
    result = search(queries, index, k=3)
    assert len(result["queries"]) == 36
    for query in result["queries"]:
        number = Path(query["query"]).stem.split("_")[1]
        top = query["neighbours"][0]
        assert Path(top["path"]).name == f"img_{number}.jpg", (query["query"], query["neighbours"])
        assert top["rank"] == 1 and top["score"] > 0.99 and query["id"] is None
        if query["query"].endswith(f"copy_{number}.jpg"):
            assert top["score"] == pytest.approx(1.0, abs=1e-5)  # the same bytes: the same vector


def test_query_vectors_are_the_embed_vectors_of_the_same_files(indexed, tmp_path):
    """A new query is embedded exactly as `mae embed` embeds it: its score with its own copy in the index is the
    cosine of two identical vectors, and an indexed path used as query reads its stored vector."""
    bundle, originals, variants, index = indexed
    result = search([variants / "copy_03.jpg", originals / "img_03.jpg"], index, k=2)
    new, own = result["queries"]
    assert new["neighbours"][0]["score"] >= 0.999999
    assert own["id"] == 3 and all(item["id"] != 3 for item in own["neighbours"])  # not its own neighbour
    assert [n["id"] for n in own["neighbours"]] == [n["id"] for n in search([], index, k=2, ids=[3])["queries"][0][
        "neighbours"]]  # fmt: skip


def test_near_duplicates_group_each_original_with_its_variants(indexed, tmp_path):
    bundle, originals, variants, _ = indexed
    embed(variants, bundle, tmp_path / "emb_variants", engine="onnx", workers=0, progress=False)
    emb_originals = Path(load_index(indexed[3]).manifest["sources"][0]["path"])
    build_index([emb_originals, tmp_path / "emb_variants"], tmp_path / "index")
    summary = find_duplicates(tmp_path / "index", 0.99, tmp_path / "dups")
    groups = pd.read_parquet(tmp_path / "dups/groups.parquet")
    pairs = pd.read_parquet(tmp_path / "dups/duplicates.parquet")
    assert summary["images"] == 48 and summary["groups"] == 12 and summary["images_in_groups"] == 48
    for _, members in groups.groupby("group"):
        numbers = {Path(path).stem.split("_")[1] for path in members["path"]}
        assert len(numbers) == 1 and len(members) == 4, members["path"].tolist()
    assert (pairs["id_a"] < pairs["id_b"]).all() and (pairs["score"] > 0.99).all()
    assert list(pairs["score"]) == sorted(pairs["score"], reverse=True)
    with Image.open(tmp_path / "dups/duplicates.png") as picture:
        assert picture.width > 4 * 112 and picture.height > 10 * 112


def test_group_pairs_are_connected_components_largest_first():
    pairs = np.array([[0, 1], [5, 6], [1, 2], [6, 7], [7, 8], [3, 9]])
    groups = group_pairs(10, pairs)
    assert groups.tolist() == [1, 1, 1, 2, -1, 0, 0, 0, 0, 2]


def test_contact_sheet_has_a_row_per_query_and_a_tile_per_neighbour(indexed, tmp_path, monkeypatch, capsys):
    bundle, originals, variants, index = indexed
    monkeypatch.setenv("COLUMNS", "250")  # rich folds long paths at the terminal's width
    code, output = run_cli(monkeypatch, capsys, "search", variants / "q40_01.jpg", variants / "small_02.png",
                           "--index", index, "-k", "4", "--out", tmp_path / "out")  # fmt: skip
    assert code == 0 and "img_01.jpg" in output and "contact sheet" in output, output
    with Image.open(tmp_path / "out/contact_sheet.png") as sheet:
        assert sheet.width == 8 + 5 * (TILE + 8)  # the query and 4 neighbours
        assert sheet.height > 2 * TILE
        pixels = np.asarray(sheet.convert("RGB"))
    assert pixels[40 + 8 : 40 + TILE, 8 + TILE + 20].std() > 5  # a photo in the first neighbour's tile, not blank
    code, output = run_cli(monkeypatch, capsys, "search", "--index", index, "--id", "5", "-k", "2", "--json",
                           "--no-sheet")  # fmt: skip
    result = json.loads(output)
    assert code == 0 and result["queries"][0]["id"] == 5 and len(result["queries"][0]["neighbours"]) == 2


def test_a_different_bundle_is_refused_and_a_moved_one_is_accepted(indexed, tmp_path):
    bundle, originals, variants, index = indexed
    import torch

    from mae.checkpoint import save_checkpoint
    from mae.core.config import get_preset
    from mae.export import export_bundle
    from mae.model import MaskedAutoencoder

    torch.manual_seed(1)
    config = get_preset("mae_vit_test_patch8")
    save_checkpoint(tmp_path / "other.pt", MaskedAutoencoder(config).state_dict(), config)
    export_bundle(tmp_path / "other.pt", tmp_path / "other", verify=False)
    with pytest.raises(MAEError, match="is not the model this index was embedded with"):
        search([variants / "q40_00.jpg"], index, k=1, model=tmp_path / "other")
    shutil.copytree(bundle, tmp_path / "moved")
    result = search([variants / "q40_00.jpg"], index, k=1, model=tmp_path / "moved")
    assert Path(result["queries"][0]["neighbours"][0]["path"]).name == "img_00.jpg"


def test_bad_queries_are_messages(indexed, tmp_path, monkeypatch, capsys):
    bundle, originals, variants, index = indexed
    monkeypatch.chdir(tmp_path)  # where the default --out (search-results) would appear
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [
        (["search", broken, "--index", index], "cannot be embedded: " + str(broken.resolve())),
        (["search", tmp_path / "missing.jpg", "--index", index], "does not exist"),
        (["search", variants / "q40_00.jpg", "--index", index, "-k", "13"], "-k 13 is more than the index holds"),
        (["search", "--index", index, "--id", "99"], "--id 99 is not in the index"),
        (["search", "--index", index], "Nothing to search for"),
        (["search", "--index", tmp_path, "--id", "0"], "is not an index folder"),
        (["search", variants / "q40_00.jpg", "--index", index, "--duplicates"], "takes no queries"),
    ]
    for args, message in cases:
        code, output = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and output.startswith("error: ") and message in output, (args, output)
        assert "Traceback" not in output
    assert not (tmp_path / "search-results").exists()


def test_index_and_search_never_import_torch(indexed, tmp_path):
    bundle, originals, variants, index = indexed
    source = str(Path(load_index(index).manifest["sources"][0]["path"]))
    for split, numbers in (("train", range(0, 12, 2)), ("val", range(1, 12, 2))):
        for number in numbers:  # two classes: whole photos and their crops
            label = "whole" if number % 3 == 0 else "crop"
            (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(originals / f"img_{number:02d}.jpg", tmp_path / split / label / f"{number:02d}.jpg")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from mae.runtime.index import build_index
        from mae.runtime.search import find_duplicates, search
        from mae.runtime.sheets import search_sheet
        manifest = build_index([{source!r}], {str(tmp_path / "i")!r})
        result = search([{str(variants / "q40_04.jpg")!r}], {str(tmp_path / "i")!r}, k=2)
        search_sheet(result, {str(tmp_path / "sheet.png")!r})
        find_duplicates({str(tmp_path / "i")!r}, 0.99, {str(tmp_path / "d")!r})
        from mae.runtime.evaluate import evaluate
        report = evaluate("knn", {str(tmp_path / "train")!r}, {str(tmp_path / "val")!r}, {str(bundle)!r},
                          out={str(tmp_path / "eval")!r}, engine="onnx", workers=0, progress=False)
        assert report["model"]["top1"] is not None, report
        print(result["queries"][0]["neighbours"][0]["path"].rsplit("/", 1)[1])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "img_04.jpg", done.stderr[-2000:]


def test_pairs_found_from_either_side_count_once_and_a_low_threshold_is_refused_early(tmp_path, monkeypatch):
    """An approximate index may find b from a's search but not a from b's: the pair still counts (once). And each
    range search is small enough that a threshold passing most pairs is refused before memory runs out."""
    from embedding_folders import clustered_vectors, synthetic_run

    from mae.runtime import search as search_module
    from mae.runtime.index import build_index
    from mae.runtime.search import duplicate_pairs, load_index

    vectors = clustered_vectors(600, 16, seed=19)
    vectors[[300, 450]] = vectors[[3, 40]]  # two exact copies
    folder = synthetic_run(tmp_path / "emb", vectors, shard_size=200)
    build_index([folder], tmp_path / "index", kind="flat")
    loaded = load_index(tmp_path / "index")
    real = loaded.index

    class Wrapped:  # the real index, seen through `answer` (queries come in id order, block after block)
        ntotal = real.ntotal

        def __init__(self, one_sided: bool) -> None:
            self.one_sided, self.next_id, self.sizes = one_sided, 0, []

        def range_search(self, block, radius):
            self.sizes.append(len(block))
            limits, scores, found = real.range_search(block, radius)
            first = self.next_id
            owners = np.repeat(np.arange(first, first + len(block)), np.diff(limits.astype(np.int64)))
            self.next_id += len(block)
            if not self.one_sided:
                return limits, scores, found
            keep = found < owners  # only partners with a smaller id, as an inverted file probing other lists may
            counts = np.bincount(owners[keep] - first, minlength=len(block))
            return np.concatenate([[0], np.cumsum(counts)]), scores[keep], found[keep]

    loaded.index = Wrapped(one_sided=True)
    pairs, scores = duplicate_pairs(loaded, 0.99999)
    assert sorted(pairs.tolist()) == [[3, 300], [40, 450]] and (scores > 0.99999).all()
    loaded.index = Wrapped(one_sided=False)
    both, _ = duplicate_pairs(loaded, 0.99999)
    assert sorted(both.tolist()) == [[3, 300], [40, 450]]  # found from both sides: still once each

    monkeypatch.setattr(search_module, "MAX_DUPLICATE_PAIRS", 1000)
    loaded.index = Wrapped(one_sided=False)
    with pytest.raises(MAEError, match="More than 1,000 pairs"):
        duplicate_pairs(loaded, -1.0)
    assert max(loaded.index.sizes) == 16  # queries per range search shrink with the index: 16 x 600 results at most


def test_a_damaged_image_gets_a_cannot_open_tile_not_a_traceback(tmp_path):
    """Pillow raises SyntaxError for a PNG with a broken chunk: the sheet shows a tile for it, like a missing file."""
    import struct
    import zlib

    from PIL import Image

    from mae.runtime.sheets import thumbnail

    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(good, compress_level=0)
    data = good.read_bytes()
    at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    pixels = data[at + 4 : at + 4 + length]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    # The pixels split in two chunks, the second one's type damaged (valid CRC): Pillow says SyntaxError.
    broken = tmp_path / "broken.png"
    broken.write_bytes(
        data[: at - 4] + chunk(b"IDAT", pixels[: length // 2]) + chunk(b"ID@T", pixels[length // 2 :])
        + data[at + 8 + length :]
    )  # fmt: skip
    for path in (broken, tmp_path / "missing.png"):
        tile = np.asarray(thumbnail(str(path), 64))
        assert tile.shape == (64, 64, 3) and (tile != tile[0, 0]).any()  # the words drawn on the tile
    assert tuple(np.asarray(thumbnail(str(good), 64))[32, 32]) == (200, 10, 10)
