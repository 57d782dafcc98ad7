import multiprocessing as mp

import numpy as np
import pytest

from pipeline.cache import (CacheError, DamagedEntryError, EntryWriter, StaleCacheError, TokenData, entry_path,
                            find_entry, list_entries, open_entry, write_entry)
from pipeline.join import JoinError, join_pairs, join_rows

KEY = {"entry": "enc", "encoder": {"name": "enc"}, "dataset": "toy", "split": "test"}


def _ids(n, suffix=""):
    return [f"{1000 + i}{suffix}" for i in range(n)]


def _row_tokens(n, width=3, seed=2):
    """Ragged token vectors of n rows: row r has r % 4 tokens (some rows none), float16."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(r % 4, width)).astype(np.float16) for r in range(n)]


def _flat(rows):
    return (np.concatenate(rows) if rows else np.zeros((0, 3), np.float16)), np.array([len(r) for r in rows])


def _write_all(path, ids, X, chunk_rows, skipped=None, layers=False, key=KEY, tokens=None):
    w = EntryWriter(path, "enc", ids, key, chunk_rows=chunk_rows)
    for c in w.pending():
        rows = list(w.rows(c))
        skip = {ids[r]: "bad" for r in rows if skipped and ids[r] in skipped}
        keep = [r for r in rows if ids[r] not in skip]
        w.write_chunk(c, X[keep], [X[keep] * 2] if layers else [], skip,
                      _flat([tokens[r] for r in keep]) if tokens else None)
    return w.finalize({"note": "test"})


def _check_tokens(entry, rows):
    assert entry.has_tokens and entry.token_dtype == "float16" and entry.token_width == 3
    flat, lengths = entry.tokens()
    np.testing.assert_array_equal(lengths, [len(r) for r in rows])
    np.testing.assert_array_equal(flat, _flat(rows)[0])
    part, part_lengths = entry.tokens(slice(3, 7))
    np.testing.assert_array_equal(part, _flat(rows[3:7])[0])
    np.testing.assert_array_equal(part_lengths, [len(r) for r in rows[3:7]])


@pytest.mark.parametrize("tokens", [False, True], ids=["pooled", "tokens"])
@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_round_trip(tmp_path, fmt, tokens):
    ids = _ids(10, "#0") + ["é/ünïcode#1"]
    X = np.random.default_rng(0).normal(size=(11, 5)).astype(np.float32)
    path = entry_path(tmp_path, "toy", "test", "hf-text:org/model", fmt)
    rows = _row_tokens(11)
    e = write_entry(path, "hf-text:org/model", ids, X, KEY, {"p": 1}, layers=[X[:, :2], X], skipped=[{"id": "x", "reason": "r"}],
                    chunk_rows=4, tokens=TokenData.of(*_flat(rows)) if tokens else None)
    e2 = find_entry(tmp_path, "toy", "test", "hf-text:org/model")
    assert e2.name == "hf-text:org/model" and e2.path.name == f"hf-text--org--model.{fmt}"
    assert list(e2.ids) == ids and e2.dim == 5 and e2.layers == (0, 1)
    np.testing.assert_array_equal(e2.features(), X)
    np.testing.assert_array_equal(e2.features(layer=0), X[:, :2])
    np.testing.assert_array_equal(e2.features(rows=slice(2, 4)), X[2:4])
    assert e2.key == KEY and e2.provenance["p"] == 1 and e2.skipped == ({"id": "x", "reason": "r"},)
    assert list_entries(tmp_path, "toy", "test") == ["hf-text:org/model"]
    blocks = [b for _, b in e.iter_rows(4)]
    np.testing.assert_array_equal(np.concatenate(blocks), X)
    if tokens:
        _check_tokens(e2, rows)
        e2.verify()
    else:
        assert not e2.has_tokens
        with pytest.raises(CacheError, match="pooled features only.*--tokens grid:4"):
            e2.tokens()


@pytest.mark.parametrize("tokens", [False, True], ids=["pooled", "tokens"])
@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, fmt, tokens):
    ids = _ids(23)
    X = np.random.default_rng(1).normal(size=(23, 4)).astype(np.float32)
    rows = _row_tokens(23) if tokens else None
    tok = (lambda r: _flat(rows[r])) if tokens else (lambda r: None)
    full = _write_all(entry_path(tmp_path / "a", "toy", "test", "enc", fmt), ids, X, 5, {"1007"}, True, tokens=rows)
    path = entry_path(tmp_path / "b", "toy", "test", "enc", fmt)
    w = EntryWriter(path, "enc", ids, KEY, chunk_rows=5)
    w.write_chunk(0, X[0:5], [X[0:5] * 2], tokens=tok(slice(0, 5)))
    w.write_chunk(3, X[15:20], [X[15:20] * 2], tokens=tok(slice(15, 20)))
    assert w.finalize({}) is None and not path.exists()  # interrupted here
    # a half-written temporary file from a killed process must not count as a chunk
    (w.staging / ".chunk-garbage.npz").write_bytes(b"\x00" * 10)
    w2 = EntryWriter(path, "enc", ids, KEY, chunk_rows=5)
    assert w2.pending() == [1, 2, 4]
    resumed = _write_all(path, ids, X, 5, {"1007"}, True, tokens=rows)
    assert list(resumed.ids) == list(full.ids) and "1007" not in resumed.ids
    np.testing.assert_array_equal(resumed.features(), full.features())
    if tokens:
        kept = [rows[i] for i in range(23) if ids[i] != "1007"]
        _check_tokens(resumed, kept)
        np.testing.assert_array_equal(resumed.tokens()[0], full.tokens()[0])
    np.testing.assert_array_equal(resumed.features(layer=0), full.features(layer=0))
    assert resumed.skipped == full.skipped == ({"id": "1007", "reason": "bad"},)
    assert not w.staging.exists()


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_damaged_tokens_are_refused(tmp_path, fmt):
    """A changed byte in the stored tokens gives DamagedEntryError for the rows it covers, not wrong numbers."""
    import h5py
    import zarr

    ids, rows = _ids(12), _row_tokens(12)
    path = entry_path(tmp_path, "toy", "test", "enc", fmt)
    write_entry(path, "enc", ids, np.zeros((12, 2)), KEY, {}, tokens=TokenData.of(*_flat(rows)))
    if fmt == "h5":
        with h5py.File(path, "r+") as f:
            f["tokens"][-1, 0] += 1
    else:
        g = zarr.open_group(str(path), mode="r+")
        g["tokens"][-1, 0] = g["tokens"][-1, 0] + 1
    e = open_entry(path)
    with pytest.raises(DamagedEntryError, match="tokens of rows"):
        e.tokens()
    with pytest.raises(DamagedEntryError):
        e.verify()


def test_token_chunks_must_match_their_rows(tmp_path):
    w = EntryWriter(entry_path(tmp_path, "toy", "test", "enc"), "enc", _ids(4), KEY, chunk_rows=4)
    with pytest.raises(CacheError, match="one length per kept row"):
        w.write_chunk(0, np.zeros((4, 2)), tokens=(np.zeros((3, 2), np.float16), np.array([1, 1, 1])))
    with pytest.raises(CacheError, match="non-finite token"):
        w.write_chunk(0, np.zeros((4, 2)), tokens=(np.full((4, 2), np.inf, np.float16), np.array([1, 1, 1, 1])))


def test_stale_entry_is_refused_unless_forced(tmp_path):
    ids = _ids(6)
    X = np.ones((6, 2), np.float32)
    path = entry_path(tmp_path, "toy", "test", "enc")
    _write_all(path, ids, X, 4)
    assert EntryWriter(path, "enc", ids, KEY).pending() == []  # same request: reused
    other = {**KEY, "encoder": {"name": "enc", "pooling": "last"}}
    with pytest.raises(StaleCacheError, match="encoder: cached .* vs requested .*--force"):
        EntryWriter(path, "enc", ids, other)
    w = EntryWriter(path, "enc", ids, other, force=True)
    assert w.pending() == [0] and not path.exists()


def test_stale_partial_is_refused(tmp_path):
    path = entry_path(tmp_path, "toy", "test", "enc")
    w = EntryWriter(path, "enc", _ids(6), KEY, chunk_rows=2)
    w.write_chunk(0, np.ones((2, 2)))
    with pytest.raises(StaleCacheError, match="partial extraction"):
        EntryWriter(path, "enc", _ids(7), KEY, chunk_rows=2)


def test_write_chunk_validation(tmp_path):
    w = EntryWriter(entry_path(tmp_path, "toy", "test", "enc"), "enc", _ids(4), KEY, chunk_rows=2)
    with pytest.raises(CacheError, match="expected 2 feature rows"):
        w.write_chunk(0, np.ones((3, 2)))
    with pytest.raises(CacheError, match="non-finite features for id '1001'"):
        w.write_chunk(0, np.array([[1, 1], [np.nan, 1]]))
    with pytest.raises(CacheError, match="not in chunk"):
        w.write_chunk(0, np.ones((2, 2)), skipped={"1003": "x"})


def test_duplicate_ids_and_bad_shapes(tmp_path):
    path = entry_path(tmp_path, "toy", "test", "enc")
    with pytest.raises(CacheError, match="Duplicate ids"):
        write_entry(path, "enc", ["a", "a"], np.ones((2, 1)), KEY, {})
    with pytest.raises(CacheError, match=r"\(n, d\)"):
        write_entry(path, "enc", ["a", "b"], np.ones((3, 1)), KEY, {})


def test_missing_entry_errors_are_helpful(tmp_path):
    with pytest.raises(CacheError, match="No cache entries .* Run `extract"):
        find_entry(tmp_path, "toy", "test", "resnet18")
    write_entry(entry_path(tmp_path, "toy", "test", "resnet18"), "resnet18", ["a"], np.ones((1, 1)), KEY, {})
    with pytest.raises(CacheError, match="Did you mean: resnet18"):
        find_entry(tmp_path, "toy", "test", "resnet-18")
    with pytest.raises(CacheError, match="does not exist"):
        open_entry(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="Cannot open"):
        open_entry(tmp_path / "junk.h5")


def _worker(args):
    path, ids, chunks = args
    X = np.arange(len(ids) * 3, dtype=np.float32).reshape(-1, 3)
    w = EntryWriter(path, "enc", ids, KEY, chunk_rows=4)
    for c in chunks:
        if c in w.pending():
            w.write_chunk(c, X[list(w.rows(c))])
    e = w.finalize({})
    return None if e is None else e.n


def test_concurrent_writers_of_one_entry(tmp_path):
    """Two processes writing overlapping/disjoint chunks of one entry leave one valid entry."""
    ids = _ids(40)
    path = entry_path(tmp_path, "toy", "test", "enc")
    jobs = [(path, ids, list(range(10))), (path, ids, list(range(9, -1, -1))), (path, ids, [0, 2, 4])]
    with mp.get_context("spawn").Pool(3) as pool:
        pool.map(_worker, jobs)
    e = open_entry(path)
    np.testing.assert_array_equal(e.features(), np.arange(120, dtype=np.float32).reshape(-1, 3))
    assert list(e.ids) == ids


def _entry(tmp_path, name, ids, skipped=()):
    return write_entry(entry_path(tmp_path, "toy", "test", name), name, ids,
                       np.zeros((len(ids), 1)), {**KEY, "entry": name}, {}, skipped=list(skipped))


def test_join_pairs_by_id_not_position(tmp_path):
    img = _entry(tmp_path, "img", ["b", "a", "c"])
    txt = _entry(tmp_path, "txt", ["a#0", "c#1", "a#1", "b#0", "c#0"])
    p = join_pairs(img, txt)
    assert [img.ids[p.image_rows[p.text_to_image[t]]] for t in range(5)] == ["a", "c", "a", "b", "c"]
    assert [txt.ids[p.text_rows[f]] for f in p.first_caption] == ["b#0", "a#0", "c#1"]


def test_join_errors_name_missing_ids_unless_skipped(tmp_path):
    img = _entry(tmp_path, "img", ["a", "b"])
    with pytest.raises(JoinError, match="1 of 3 captions' images are missing .*'z#0'"):
        join_pairs(img, _entry(tmp_path, "t1", ["a#0", "b#0", "z#0"]))
    with pytest.raises(JoinError, match="images' captions are missing .*'b'"):
        join_pairs(img, _entry(tmp_path, "t2", ["a#0"]))
    p = join_pairs(img, _entry(tmp_path, "t3", ["a#0"], [{"id": "b", "reason": "empty caption"}]))
    assert list(p.image_rows) == [0]
    img2 = _entry(tmp_path, "img2", ["a"], [{"id": "b", "reason": "corrupt"}])
    assert len(join_pairs(img2, _entry(tmp_path, "t4", ["a#0", "b#0"])).text_rows) == 1


def test_join_rows_one_row_per_image(tmp_path):
    a = _entry(tmp_path, "a", ["x", "y", "z"])
    b = _entry(tmp_path, "b", ["z#0", "y#0", "x#0", "x#1"])
    ids, (ra, rb) = join_rows([a, b])
    assert ids == ["x", "y", "z"] and list(ra) == [0, 1, 2] and list(rb) == [2, 1, 0]
    with pytest.raises(JoinError, match="missing"):
        join_rows([a, _entry(tmp_path, "c", ["x", "y"])])
