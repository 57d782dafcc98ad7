"""search: the engines against the naive definition, the index format and its checks, galleries,
queries with hand-computable embeddings (tests/search_fixtures.py), and the bad inputs."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from extract.datasets import ImageError
from pipeline.config import PipelineConfig, with_values
from search import build
from search import engine as E
from search.build import build_index, embed_items, folder_items
from search.index import (FAISS_FILE, INDEX_JSON, VECTORS, DamagedIndexError, IndexNotFoundError, Item,
                          ModelMismatchError, ModelRef, open_index, write_index)
from search.query import QueryError, Searcher, decode_upload
from tests.browser import in_ci
from tests.fixtures import make_hf_dataset, make_imagefolder, write_bad_images
from tests.search_fixtures import COLOURS, ColourModel, make_gallery

# faiss-cpu is the optional [search] extra (make install installs it): skipped without it, except in CI,
# where these tests then fail (tests/browser.py: in_ci)
needs_faiss = pytest.mark.skipif(not E.faiss_available() and not in_ci(),
                                 reason="faiss-cpu is not installed (pip install 'platonic-align[search]')")


def _naive(gallery, queries, k):
    """Every score, sorted by (-score, row): the definition exact_topk must equal."""
    scores = queries.astype(np.float32) @ gallery.astype(np.float32).T
    order = np.stack([np.lexsort((np.arange(len(row)), -row)) for row in scores])[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- engines
@pytest.mark.parametrize("block", [1, 3, 7, 50, 10_000])
@pytest.mark.parametrize("k", [1, 4, 50, 80])
def test_exact_topk_equals_sorting_every_score(block, k):
    rng = np.random.default_rng(block * 100 + k)
    # small integers: every inner product is exact in float32 whatever the summation order, so tied
    # scores are exactly equal (many of them) and the tie rule decides
    gallery = rng.integers(-3, 4, (50, 6)).astype(np.float32)
    gallery[10] = gallery[3]  # an exact duplicate: the lower row must come first
    queries = rng.integers(-3, 4, (5, 6)).astype(np.float32)
    scores, rows = E.exact_topk(gallery, queries, k, block_rows=block)
    want_s, want_r = _naive(gallery, queries, min(k, 50))
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_allclose(scores, want_s, rtol=1e-6, atol=1e-6)
    assert rows.shape == (5, min(k, 50))


def test_exact_topk_ties_go_to_the_lower_row():
    gallery = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    scores, rows = E.exact_topk(gallery, np.array([[1, 0]], np.float32), 2, block_rows=2)
    assert rows.tolist() == [[1, 2]] and scores.tolist() == [[1.0, 1.0]]
    _, rows = E.exact_topk(gallery, np.array([[1, 0]], np.float32), 4, block_rows=4)
    assert rows.tolist() == [[1, 2, 4, 0]]


def test_exact_topk_of_an_empty_request():
    g = np.eye(3, dtype=np.float32)
    assert E.exact_topk(g, np.zeros((0, 3), np.float32), 5)[1].shape == (0, 0)
    assert E.exact_topk(np.zeros((0, 3), np.float32), g, 5)[1].shape == (3, 0)


def test_normalize():
    x = E.normalize(np.array([[3, 4], [0, -2]]))
    np.testing.assert_allclose(x, [[0.6, 0.8], [0, -1]], rtol=1e-7)
    assert x.dtype == np.float32
    for bad in ([[1, 2], [0, 0]], [[np.nan, 1]], [[np.inf, 1]]):
        with pytest.raises(E.SearchError, match="zero or not finite"):
            E.normalize(np.array(bad, float))


def test_recall_at_k_by_hand():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    found = np.array([[2, 1, 9], [-1, -1, -1]])
    assert E.recall_at_k(found, exact, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert E.recall_at_k(exact, exact, 3) == 1.0


def test_nlist_for():
    assert E.nlist_for(100) == 1  # 100 // 64 rows per list
    assert E.nlist_for(10_000) == 100
    assert E.nlist_for(1_000_000) == 1000
    assert E.nlist_for(1) == 1


@needs_faiss
def test_faiss_visiting_every_list_is_exact_search(tmp_path):
    rng = np.random.default_rng(0)
    gallery, queries = _unit(rng, 3000, 16), _unit(rng, 20, 16)
    index = E.FaissIndex.build(gallery, nprobe=10_000)
    assert index.nlist == E.nlist_for(3000) == 46
    scores, rows = index.search(queries, 10)
    want_s, want_r = E.exact_topk(gallery, queries, 10)
    np.testing.assert_array_equal(rows, want_r)  # continuous data: no ties
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    index.write(tmp_path / "f.index")
    again = E.FaissIndex.read(tmp_path / "f.index", nprobe=1)
    assert again.nlist == 46 and again.nprobe == 1
    _, rows1 = again.search(queries, 10)
    assert E.recall_at_k(rows1, want_r) < 1.0  # one list of 46 misses neighbours on unstructured data
    assert (rows1 >= -1).all()


# ----------------------------------------------------------------------------- the index format
def _items(n):
    return [Item(f"img{i}", f"/nowhere/img{i}.png", (f"caption {i}",)) for i in range(n)]


def test_index_round_trip(tmp_path):
    vectors = E.normalize(np.random.default_rng(0).standard_normal((5, 4)))
    ref = ModelRef("abc123", "run-a", {"run": "run-a", "cache": "/c"})
    write_index(tmp_path / "ix", vectors, _items(5), ref, {"kind": "folder", "folder": "/nowhere"})
    index = open_index(tmp_path / "ix", nprobe=8)
    np.testing.assert_array_equal(index.vectors, vectors)
    assert index.items == _items(5) and index.model == ref and index.engine.name == "exact"
    doc = json.loads((tmp_path / "ix" / INDEX_JSON).read_text())
    assert doc["model"]["hash"] == "abc123" and doc["n"] == 5 and doc["dim"] == 4 and doc["metric"] == "cosine"
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [INDEX_JSON, VECTORS]
    assert not list(tmp_path.glob(".ix.partial-*"))
    # rebuilding replaces it whole
    write_index(tmp_path / "ix", vectors[:2], _items(2), ref, {})
    assert open_index(tmp_path / "ix", 8).n == 2


def test_index_checks(tmp_path):
    vectors = E.normalize(np.eye(3))
    ref = ModelRef("abc123", "run-a")
    with pytest.raises(IndexNotFoundError, match="search index IMAGE_FOLDER"):
        open_index(tmp_path / "none", 8)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(E.SearchError, match="not a search index"):
        write_index(tmp_path / "mine", vectors, _items(3), ref, {})
    assert (tmp_path / "mine" / "holiday.jpg").exists()
    with pytest.raises(IndexNotFoundError):
        open_index(tmp_path / "mine", 8)
    write_index(tmp_path / "ix", vectors, _items(3), ref, {})
    index = open_index(tmp_path / "ix", 8)
    index.check_model(ModelRef("abc123", "run-a"))
    with pytest.raises(ModelMismatchError, match="was built with model 'run-a'.*not with 'run-b'"):
        index.check_model(ModelRef("def456", "run-b"))
    os.utime(tmp_path / "ix" / VECTORS, ns=(1, 1))  # touched (a copy): same bytes, checked by sha256
    assert open_index(tmp_path / "ix", 8).n == 3
    np.save(tmp_path / "ix" / VECTORS, -vectors)  # edited: same size, another sha256
    with pytest.raises(DamagedIndexError, match="vectors.npy differs"):
        open_index(tmp_path / "ix", 8)
    np.save(tmp_path / "ix" / VECTORS, vectors[:2])  # another size
    with pytest.raises(DamagedIndexError, match="vectors.npy differs"):
        open_index(tmp_path / "ix", 8)
    (tmp_path / "ix" / VECTORS).unlink()
    with pytest.raises(DamagedIndexError, match="vectors.npy is missing"):
        open_index(tmp_path / "ix", 8)
    (tmp_path / "ix" / INDEX_JSON).write_text("{not json")
    with pytest.raises(DamagedIndexError, match="not readable JSON"):
        open_index(tmp_path / "ix", 8)


# ----------------------------------------------------------------------------- galleries
def test_folder_items(tmp_path):
    root = make_gallery(tmp_path / "g", per_colour=1)
    (root / ".hidden.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    items = folder_items(root)
    assert [it.id for it in items] == sorted(f"{c}/{c}_0" for c in COLOURS)
    red = next(it for it in items if it.id == "red/red_0")
    assert red.captions == ("a red square number 0",) and red.path == str((root / "red" / "red_0.png").resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(E.SearchError, match="No image files"):
        folder_items(tmp_path / "empty")
    with pytest.raises(E.SearchError, match="not a folder"):
        folder_items(tmp_path / "missing")


def _cfg(tmp_path, **values) -> PipelineConfig:
    return with_values(PipelineConfig(), {"search.index": str(tmp_path / "ix"), **values})


def test_build_and_query_by_hand(tmp_path):
    root = make_gallery(tmp_path / "g")
    model = ColourModel()
    res = build_index(model, model.ref, folder_items(root), _cfg(tmp_path), {"kind": "folder"})
    assert res["n"] == 12 and res["engine"] == {"name": "exact"}
    searcher = Searcher(open_index(tmp_path / "ix", 8), model, model.ref)
    hits = searcher.text("a red bicycle", 3)
    assert [h.id for h in hits[:2]] == ["red/red_0", "red/red_1"] and [h.rank for h in hits] == [1, 2, 3]
    q = np.array([256.0, 1, 1])  # "red" -> (255, 0, 0) + 1
    img = np.array([256.0, 1, 1])  # red_0: mean RGB (255, 0, 0) + 1
    assert hits[0].score == pytest.approx(q @ img / np.linalg.norm(q) / np.linalg.norm(img), abs=1e-6)
    assert hits[0].captions == ("a red square number 0",)
    by_image = searcher.image(root / "blue" / "blue_1.png", 2)
    assert {h.id for h in by_image} == {"blue/blue_0", "blue/blue_1"} and by_image[0].score == pytest.approx(1.0)
    assert searcher.image(Image.new("RGB", (8, 8), (250, 250, 0)), 1)[0].id.startswith("yellow/")
    assert len(searcher.text("green", 100)) == 12  # k above the gallery size


def test_bad_queries(tmp_path):
    root = make_gallery(tmp_path / "g", per_colour=1)
    model = ColourModel()
    build_index(model, model.ref, folder_items(root), _cfg(tmp_path), {})
    searcher = Searcher(open_index(tmp_path / "ix", 8), model, model.ref)
    for empty in ("", "   ", "\n"):
        with pytest.raises(QueryError, match="The query is empty"):
            searcher.text(empty, 3)
    bad = write_bad_images(tmp_path / "bad")
    with pytest.raises(ImageError, match="cannot decode"):
        searcher.image(bad["corrupt"], 3)
    with pytest.raises(QueryError, match="does not exist"):
        searcher.image(tmp_path / "nope.png", 3)
    for name in ("corrupt", "truncated", "bomb"):
        with pytest.raises(QueryError, match="not an image that can be decoded"):
            decode_upload(bad[name].read_bytes())
    with pytest.raises(QueryError, match="empty"):
        decode_upload(b"")
    with pytest.raises(QueryError, match="top_k must be a positive integer"):
        searcher.text("red", 0)
    with pytest.raises(ModelMismatchError, match="another space"):
        Searcher(open_index(tmp_path / "ix", 8), ColourModel("other"), ColourModel("other").ref)


def test_images_that_do_not_decode(tmp_path, caplog):
    root = make_gallery(tmp_path / "g", per_colour=1)
    bad = write_bad_images(root / "bad")
    items = folder_items(root)
    assert len(items) == len(COLOURS) + len(bad)
    with pytest.raises(ImageError, match="cannot decode"):
        embed_items(ColourModel(), items, 4, 0, "error")
    with caplog.at_level(logging.WARNING):
        vectors, kept, skipped = embed_items(ColourModel(), items, 4, 0, "skip")
    broken = {"bad/corrupt", "bad/truncated", "bad/empty", "bad/bomb"}
    assert {s["id"] for s in skipped} == broken and len(kept) == len(items) - 4 == len(vectors)
    assert "skipping" in caplog.text
    cfg = _cfg(tmp_path, **{"extract.on_error": "skip"})
    res = build_index(ColourModel(), ColourModel().ref, items, cfg, {})
    assert res["n"] == len(items) - 4
    doc = json.loads((tmp_path / "ix" / INDEX_JSON).read_text())
    assert {s["id"] for s in doc["skipped"]} == broken


@needs_faiss
def test_faiss_above_exact_max(tmp_path):
    """Unstructured data (the hard case): nprobe is doubled from search.nprobe until the measured
    recall@10 reaches RECALL_TARGET; queries are the gallery's captions when it has them."""
    rng = np.random.default_rng(1)
    n = 2000
    vectors = _unit(rng, n, 3)  # ColourModel's width: its caption embeddings are the recall queries
    colours = list(COLOURS)
    items = [Item(f"img{i}", "", (f"a {colours[i % 6]} thing",)) for i in range(n)]
    model = ColourModel()
    res = build_index(model, model.ref, items, _cfg(tmp_path, **{"search.exact_max": n - 1, "search.nprobe": 1}),
                      {}, vectors=vectors)
    engine = res["engine"]
    assert engine["name"] == "faiss" and engine["nlist"] == E.nlist_for(n) == 31
    assert [t["nprobe"] for t in engine["tried"]] == [1, 2, 4, 8, 16, 31][:len(engine["tried"])]
    assert engine["nprobe"] == engine["tried"][-1]["nprobe"] and engine["recall@10"] >= build.RECALL_TARGET
    assert all(t["recall@10"] < build.RECALL_TARGET for t in engine["tried"][:-1])
    assert engine["recall_queries"] == "200 captions"
    index = open_index(tmp_path / "ix")
    assert index.engine.name == "faiss" and index.engine.nprobe == engine["nprobe"]
    assert (tmp_path / "ix" / FAISS_FILE).is_file()
    queries, own, what = build.probe_queries(model, index.vectors, index.items)
    assert what == "200 captions" and (own == -1).all()
    assert build.tune_nprobe(index.vectors, index.engine, queries, own, engine["nprobe"])[0]["recall@10"] == \
        pytest.approx(engine["recall@10"])
    full = open_index(tmp_path / "ix", nprobe=10_000)  # every list: exact
    q = _unit(rng, 3, 3)
    np.testing.assert_array_equal(full.engine.search(q, 5)[1], E.exact_topk(vectors, q, 5)[1])
    build_index(model, model.ref, items, _cfg(tmp_path, **{"search.exact_max": n}), {}, vectors=vectors)
    assert open_index(tmp_path / "ix").engine.name == "exact"


def test_probe_queries_without_captions_leave_their_own_row_out():
    rng = np.random.default_rng(3)
    vectors = _unit(rng, 50, 4)
    items = [Item(f"i{i}", "") for i in range(50)]
    queries, own, what = build.probe_queries(ColourModel(), vectors, items, probes=10)
    assert what == "10 gallery images" and len(set(own.tolist())) == 10
    np.testing.assert_array_equal(queries, vectors[own])
    exact = E.ExactIndex(vectors)
    exact.nlist, exact.nprobe = 1, 1  # exact search as a one-list index: recall 1 with itself
    assert build.tune_nprobe(vectors, exact, queries, own, 1) == [{"nprobe": 1, "recall@10": 1.0}]
    answers = build._without(np.array([[3, 1, 2], [5, -1, 4]]), np.array([1, -1]), 2)
    assert answers.tolist() == [[3, 2], [5, 4]]


@needs_faiss
def test_without_faiss_the_index_is_searched_exactly(tmp_path, monkeypatch, caplog):
    vectors = _unit(np.random.default_rng(2), 300, 3)
    model = ColourModel()
    build_index(model, model.ref, _items(300), _cfg(tmp_path, **{"search.exact_max": 10}), {}, vectors=vectors)
    monkeypatch.setattr("search.index.faiss_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        index = open_index(tmp_path / "ix", 4)
    assert index.engine.name == "exact" and "faiss-cpu is not installed" in caplog.text
    monkeypatch.setattr("search.build.faiss_available", lambda: False)
    res = build_index(model, model.ref, _items(300), _cfg(tmp_path, **{"search.exact_max": 10}), {}, vectors=vectors)
    assert res["engine"]["name"] == "exact" and not (tmp_path / "ix" / FAISS_FILE).exists()


@pytest.mark.parametrize("key, value", [("top_k", 0), ("exact_max", -1), ("nprobe", 0), ("port", 70000)])
def test_search_settings_out_of_range(tmp_path, key, value):
    cfg = _cfg(tmp_path, **{f"search.{key}": value})
    with pytest.raises(E.SearchError, match=f"search.{key} must be"):
        E.check_config(cfg.search)
    model = ColourModel()
    with pytest.raises(E.SearchError, match=f"search.{key} must be"):
        build_index(model, model.ref, _items(3), cfg, {}, vectors=np.eye(3))


def test_index_gallery_of_a_split_without_a_run(tmp_path, monkeypatch):
    """A model that is not a run of the cache: the split's image files are embedded; an hf dataset
    (images inside the dataset) then cannot be indexed, and says what to do."""
    monkeypatch.setattr(build, "load_model", lambda *a: (ColourModel(), ColourModel().ref))
    data = make_imagefolder(tmp_path / "data", n=3, captions_per_image=2, list_captions=True)
    cfg = _cfg(tmp_path, **{"data.dataset": "imagefolder", "data.data_dir": str(data)})
    res = build.index_gallery(cfg, split="val")
    assert res["n"] == 3 and res["source"]["cached"] is False and "does not come from a run" in res["source"]["how"]
    index = open_index(tmp_path / "ix", 8)
    assert [it.id for it in index.items] == ["sub/val_1", "val_0", "val_2"] and len(index.items[0].captions) == 2
    hf = make_hf_dataset(tmp_path / "hf")
    cfg = _cfg(tmp_path, **{"data.dataset": f"hf:{hf}", "data.data_dir": str(hf)})
    with pytest.raises(E.SearchError, match="keeps its images inside the dataset"):
        build.index_gallery(cfg, split="train")
    with pytest.raises(E.SearchError, match="not both"):
        build.index_gallery(cfg, folder=data, split="train")


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    dead = tmp_path / ".ix.partial-999999999"  # no such process
    dead.mkdir()
    (dead / VECTORS).write_bytes(b"half")
    write_index(tmp_path / "ix", E.normalize(np.eye(2)), _items(2), ModelRef("h", "m"), {})
    assert not dead.exists() and open_index(tmp_path / "ix", 8).n == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]
