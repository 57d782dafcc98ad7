"""No silent wrong data in the cache and the data: each sequence of bad input replayed.

1. changed images under the same names, or another data folder  -> stale (names the ids) / recomputed
2. two datasets of one format in one cache                       -> own folders; joins refuse mixed data
3. a lost Zarr chunk, a flipped HDF5 byte, HDF5 external storage -> DamagedEntryError naming the entry
4. writers of different requests racing on one entry             -> never a mixed entry, only clean errors
Plus orphan staging, caches of the older format, and analyze cka with an unreadable entry.
"""

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from analyze.cli import main as analyze_cli
from extract import datasets as D
from extract.cli import main as extract_cli
from extract.datasets import content as content_mod
from extract.run import extract
from pipeline.cache import (CacheError, DamagedEntryError, EntryWriter, OldFormatError, StaleCacheError,
                            StagingLostError, cached_datasets, dataset_dir, entry_path, find_entry, open_entry,
                            staging_folders, write_entry)
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.join import JoinError, join_pairs, join_rows
from tests.fixtures import make_flickr30k, make_hf_dataset, make_imagefolder
from train.cli import main as train_cli

ROOT = Path(__file__).resolve().parents[1]
KEY = {"entry": "enc", "encoder": {"name": "enc"}, "dataset": "toy", "split": "test", "fingerprint": "fp"}


def _cfg(data_dir, cache, encoders=("tiny-resnet", "tiny-gpt2"), dataset="imagefolder", captions="longest",
         **extract_opts):
    opts = {"data.data_dir": str(data_dir), "data.cache": str(cache), "data.dataset": dataset,
            "data.captions": captions,
            "extract.encoders": tuple(encoders), "extract.split": "test", "extract.workers": 0,
            "extract.batch_size": 2, "extract.chunk_rows": 2}
    opts.update({f"extract.{k}": v for k, v in extract_opts.items()})
    return load_config(ROOT / "pipeline.toml", options=opts)


def _cli(data_dir, cache, *extra, encoders="tiny-resnet", split="test"):
    return ["--dataset", "imagefolder", "--data-dir", str(data_dir), "--cache", str(cache), "--split", split,
            "--workers", "0", "--batch-size", "2", "--encoder", encoders, *extra]


def _replace_image(path: Path, seed: int, keep_mtime: bool = False) -> None:
    """Overwrite an image with other pixels under the same name (optionally keeping its mtime, as
    cp -p / rsync -a do)."""
    st = path.stat()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ------------------------------------------------------------------ 1. changed images, other data folder

@pytest.mark.parametrize("keep_mtime", [False, True])
def test_changed_images_make_the_entry_stale_naming_them(tmp_path, keep_mtime):
    data = make_imagefolder(tmp_path / "data", n=4)
    cache = tmp_path / "cache"
    cfg = _cfg(data, cache, ("tiny-resnet",))
    old = extract(cfg)[0].features()
    _replace_image(data / "test" / "sub" / "test_1.png", 7, keep_mtime)
    with pytest.raises(StaleCacheError, match=r"1 of 4 \(first: 'sub/test_1'\).*--force|content"):
        extract(cfg)
    res = CliRunner().invoke(extract_cli, _cli(data, cache))
    assert res.exit_code == 1 and "Traceback" not in res.output and "sub/test_1" in res.output
    new = extract(cfg, force=True)[0].features()
    fresh = extract(_cfg(data, tmp_path / "fresh", ("tiny-resnet",)))[0].features()
    np.testing.assert_array_equal(new, fresh)
    changed = np.abs(new - old).max(axis=1) > 0
    assert changed.tolist() == [True, False, False, False]  # ids sorted: sub/test_1, sub/test_3, test_0, test_2


def test_other_data_folder_gets_its_own_entries(tmp_path):
    a = make_imagefolder(tmp_path / "a", n=4, seed=0)
    b = make_imagefolder(tmp_path / "b", n=4, seed=1)  # same names and layout, other pixels and captions
    shutil.copy(a / "test" / "metadata.jsonl", b / "test" / "metadata.jsonl")  # same captions too
    cache = tmp_path / "cache"
    ea = extract(_cfg(a, cache, ("tiny-resnet",)))[0]
    eb = extract(_cfg(b, cache, ("tiny-resnet",)))[0]  # exit 0, but recomputed: not A's features
    assert ea.path != eb.path and ea.path.exists()
    fresh = extract(_cfg(b, tmp_path / "fresh", ("tiny-resnet",)))[0]
    np.testing.assert_array_equal(eb.features(), fresh.features())
    assert not np.array_equal(ea.features(), eb.features())
    assert {m["data_dir"] for m in cached_datasets(cache)} == {str(a.resolve()), str(b.resolve())}


def test_content_hashes_are_cached_by_path_size_and_times(tmp_path, monkeypatch):
    data = make_imagefolder(tmp_path / "data", n=4, splits=("test",))
    split = D.load_split("imagefolder", data, "test")
    side = tmp_path / "side.json"
    calls = []
    real = content_mod.file_digest
    monkeypatch.setattr(content_mod, "file_digest", lambda p: calls.append(p) or real(p))
    first = D.content_hashes(split, side)
    assert len(calls) == 4 and first == [real(it.image) for it in split.items]
    assert D.content_hashes(split, side) == first and len(calls) == 4  # rerun: stat only
    _replace_image(Path(split.items[2].image), 3, keep_mtime=True)
    again = D.content_hashes(split, side)
    assert len(calls) == 5 and again[2] != first[2] and again[:2] == first[:2]
    side.write_text("{not json")  # a corrupt side file is only a lost cache
    assert D.content_hashes(split, side) == again


def test_hf_rows_are_hashed_and_cached_under_the_arrow_files(tmp_path, monkeypatch):
    path = make_hf_dataset(tmp_path / "hf")
    split = D.load_split(f"hf:{path}", tmp_path, "train")
    side = tmp_path / "side.json"
    first = D.content_hashes(split, side)
    assert len(set(first)) == len(split) and "no-image" not in first
    monkeypatch.setattr(content_mod, "_hf_row_digest", lambda *a: pytest.fail("rehashed"))
    assert D.content_hashes(split, side) == first  # the Arrow files did not change: from the side file


# ------------------------------------------------------------------ 2. two datasets, one cache

def test_two_datasets_of_one_format_never_mix(tmp_path):
    a = make_imagefolder(tmp_path / "a", n=4, seed=0)
    b = make_imagefolder(tmp_path / "b", n=4, seed=1)
    cache = tmp_path / "cache"
    runner = CliRunner()
    assert runner.invoke(extract_cli, _cli(a, cache, encoders="tiny-resnet,tiny-gpt2", split="all")).exit_code == 0
    res = runner.invoke(extract_cli, _cli(b, cache, "--force", encoders="tiny-gpt2", split="all"))
    assert res.exit_code == 0, res.output
    assert len(cached_datasets(cache)) == 2  # B went to its own folder: A's entries are untouched
    fit = ["--cache", str(cache), "--dataset", "imagefolder", "--image", "tiny-resnet", "--text", "tiny-gpt2",
           "--epochs", "1", "--dim", "8", "--device", "cpu", "--reference", ""]
    for extra, expected in (([], "holds 2 imagefolder dataset"), (["--set", f"data.data_dir={b}"], "tiny-resnet")):
        res = runner.invoke(train_cli, fit + extra)
        assert res.exit_code == 1 and "Traceback" not in res.output and expected in res.output, res.output
    res = runner.invoke(analyze_cli, ["cka", "--cache", str(cache), "--dataset", "imagefolder", "--out",
                                      str(tmp_path / "rep")])
    assert res.exit_code == 1 and "holds 2 imagefolder dataset" in res.output, res.output
    # the pair that would have been wrong (A's images, B's captions), joined by hand: refused
    img = find_entry(cache, "imagefolder", "test", "tiny-resnet", a)
    txt = find_entry(cache, "imagefolder", "test", "tiny-gpt2", b)
    with pytest.raises(JoinError, match=r"different data.*tiny-resnet.*tiny-gpt2|tiny-resnet.*tiny-gpt2.*different"):
        join_pairs(img, txt)
    with pytest.raises(JoinError, match=str(a.resolve())):
        join_rows([img, txt])
    # with A's folder named, A's own pair trains (exit 0, and correctly)
    res = runner.invoke(train_cli, fit + ["--set", f"data.data_dir={a}"])
    assert res.exit_code == 0, res.output
    # the report of that run works in the two-dataset cache, and its saved outputs name their data folder
    rep = ["--cache", str(cache), "--dataset", "imagefolder", "--out", str(tmp_path / "rep"), "--set",
           f"data.data_dir={a}"]
    res = runner.invoke(analyze_cli, ["cka", "--entries", "tiny-resnet,tiny-gpt2", "--metric", "cka", *rep])
    assert res.exit_code == 0, res.output
    res = runner.invoke(analyze_cli, ["report", "--run", "tiny-resnet__tiny-gpt2", *rep])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    saved = json.loads(next((tmp_path / "rep").rglob("scores.json")).read_text())
    assert saved["data_dir"] == str(a.resolve())


def test_an_entry_never_lives_in_two_formats(tmp_path):
    """An h5 entry made stale by new images must not shadow (or be shadowed by) a fresh zarr copy."""
    data = make_imagefolder(tmp_path / "data", n=4)
    extract(_cfg(data, tmp_path / "c", ("tiny-resnet",)))
    _replace_image(data / "test" / "sub" / "test_1.png", 5)
    with pytest.raises(StaleCacheError, match="another format.*--force"):
        extract(_cfg(data, tmp_path / "c", ("tiny-resnet",), format="zarr"))
    (fresh,) = extract(_cfg(data, tmp_path / "c", ("tiny-resnet",), format="zarr"), force=True)
    assert fresh.path.suffix == ".zarr" and not fresh.path.with_suffix(".h5").exists()
    assert find_entry(tmp_path / "c", "imagefolder", "test", "tiny-resnet", data).path == fresh.path
    shutil.copytree(fresh.path, fresh.path.with_suffix(".h5"))  # a second copy put there by hand
    with pytest.raises(CacheError, match="exists in two formats"):
        find_entry(tmp_path / "c", "imagefolder", "test", "tiny-resnet", data)


def test_aligned_entries_carry_their_source_data(tmp_path):
    src = write_entry(entry_path(tmp_path, "toy", "test", "enc"), "enc", ["a", "b"], np.ones((2, 2)), KEY, {})
    other = {**KEY, "entry": "txt", "fingerprint": "other"}
    txt = write_entry(entry_path(tmp_path, "toy", "test", "txt"), "txt", ["a", "b"], np.ones((2, 2)), other, {})
    aligned_key = {"entry": "enc@run", "run": "run", "source": src.key, "dataset": "toy", "split": "test"}
    al = write_entry(entry_path(tmp_path, "toy", "test", "enc@run"), "enc@run", ["a", "b"], np.ones((2, 2)),
                     aligned_key, {})
    assert al.data == src.data
    join_rows([src, al])  # same data: fine
    with pytest.raises(JoinError, match="different data"):
        join_rows([al, txt])


# ------------------------------------------------------------------ 3. integrity of finished entries

def _zarr_chunk_files(entry_path_: Path, array: str) -> list[Path]:
    return sorted(p for p in (entry_path_ / array).rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("array", ["features", "ids"])
def test_lost_zarr_chunk_is_an_error_not_zeros(tmp_path, array):
    data = make_imagefolder(tmp_path / "data", n=4)
    cache = tmp_path / "cache"
    cfg = _cfg(data, cache, ("tiny-resnet", "tiny-gpt2"), format="zarr", chunk_rows=2, split="all")
    entries = {(e.path.parent.name, e.name): e for e in extract(cfg)}
    path = entries["test", "tiny-resnet"].path
    stamp = {k: (e.path / "zarr.json").stat().st_ctime_ns for k, e in entries.items()}
    chunks = _zarr_chunk_files(path, array)
    assert len(chunks) >= (2 if array == "features" else 1)
    chunks[-1].unlink()
    with pytest.raises(DamagedEntryError, match=r"tiny-resnet.*damaged.*--repair"):
        find_entry(cache, "imagefolder", "test", "tiny-resnet", data).features()
    with pytest.raises(DamagedEntryError, match="damaged"):
        extract(cfg)  # a rerun verifies the entries it would reuse
    res = CliRunner().invoke(analyze_cli, ["cka", "--cache", str(cache), "--dataset", "imagefolder", "--set",
                                           f"data.data_dir={data}", "--out", str(tmp_path / "rep")])
    assert res.exit_code == 1 and "damaged" in res.output and "Traceback" not in res.output, res.output
    res = CliRunner().invoke(train_cli, ["--cache", str(cache), "--dataset", "imagefolder", "--image", "tiny-resnet",
                                         "--text", "tiny-gpt2", "--epochs", "1", "--dim", "8", "--device", "cpu",
                                         "--reference", "", "--set", f"data.data_dir={data}"])
    assert res.exit_code == 1 and "damaged" in res.output and "Traceback" not in res.output, res.output
    repaired = {(e.path.parent.name, e.name): e for e in extract(cfg, repair=True)}
    fresh = extract(_cfg(data, tmp_path / "fresh", ("tiny-resnet",), format="zarr"))[0]
    np.testing.assert_array_equal(repaired["test", "tiny-resnet"].features(), fresh.features())
    rewritten = {k for k, e in repaired.items() if (e.path / "zarr.json").stat().st_ctime_ns != stamp[k]}
    assert rewritten == {("test", "tiny-resnet")}  # only the damaged entry


def test_flipped_h5_byte_is_an_error(tmp_path):
    X = np.random.default_rng(0).normal(size=(3000, 4)).astype(np.float32)
    path = entry_path(tmp_path, "toy", "test", "enc")
    write_entry(path, "enc", [str(i) for i in range(3000)], X, KEY, {}, chunk_rows=512)
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_chunk_info(3).byte_offset + 100
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))
    e = open_entry(path)  # metadata is fine
    np.testing.assert_array_equal(e.features(rows=slice(0, 1024)), X[:1024])  # intact blocks still read
    with pytest.raises(DamagedEntryError, match=r"rows 1024-2047 of 'features'"):
        e.features()
    with pytest.raises(DamagedEntryError):
        list(e.iter_rows(700))
    with pytest.raises(DamagedEntryError):
        e.verify()


def test_truncated_entry_is_damaged(tmp_path):
    path = entry_path(tmp_path, "toy", "test", "enc")
    write_entry(path, "enc", ["a", "b"], np.ones((2, 3)), KEY, {})
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(DamagedEntryError, match="damaged.*Re-extract"):
        open_entry(path)


def _craft(path: Path, src: Path, features_kwargs: dict) -> None:
    """Copy entry ``src`` to ``path`` with ``features`` re-created by ``features_kwargs`` (all
    attributes and datasets copied, so only the storage differs)."""
    with h5py.File(src, "r") as s, h5py.File(path, "w") as d:
        for name in s:
            if name != "features":
                s.copy(name, d)
        d.attrs.update(dict(s.attrs))
        features_kwargs(d)


def test_h5_external_storage_and_links_are_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    X = np.arange(8, dtype=np.float32).reshape(2, 4)
    secret.write_bytes(X.tobytes())
    src = write_entry(tmp_path / "src.h5", "enc", ["a", "b"], X, KEY, {}).path  # checksums of the secret's bytes
    cases = {
        "external": lambda d: d.create_dataset("features", shape=(2, 4), dtype="<f4",
                                               external=[(str(secret), 0, X.nbytes)]),
        "link": lambda d: d.__setitem__("features", h5py.ExternalLink(str(src), "/features")),
        "soft": lambda d: (d.create_dataset("hidden", data=X), d.__setitem__("features", h5py.SoftLink("/hidden"))),
    }
    layout = h5py.VirtualLayout(shape=(2, 4), dtype="<f4")
    layout[:] = h5py.VirtualSource(str(src), "features", shape=(2, 4))
    cases["virtual"] = lambda d: d.create_virtual_dataset("features", layout)
    for kind, make in cases.items():
        path = tmp_path / f"{kind}.h5"
        _craft(path, src, make)
        with pytest.raises(DamagedEntryError, match="refused"):
            open_entry(path)


def test_zarr_symlinks_are_refused(tmp_path):
    path = write_entry(tmp_path / "e.zarr", "enc", ["a", "b"], np.ones((2, 2)), KEY, {}).path
    chunk = _zarr_chunk_files(path, "features")[0]
    target = tmp_path / "elsewhere"
    shutil.copy(chunk, target)
    chunk.unlink()
    chunk.symlink_to(target)
    with pytest.raises(DamagedEntryError, match="symbolic link"):
        open_entry(path)


def test_older_cache_format_says_re_extract(tmp_path):
    path = entry_path(tmp_path, "toy", "test", "enc")
    write_entry(path, "enc", ["a", "b"], np.ones((2, 2)), KEY, {})
    with h5py.File(path, "a") as f:  # what cache format 1 wrote: no checksums, no format attribute
        del f["checksums"]
        del f.attrs["cache_format"]
    with pytest.raises(OldFormatError, match="older version.*extract --force"):
        open_entry(path)
    with pytest.raises(StaleCacheError, match="older version"):
        EntryWriter(path, "enc", ["a", "b"], {**KEY, "cache_format": 2})
    w = EntryWriter(path, "enc", ["a", "b"], {**KEY, "cache_format": 2}, force=True)
    assert w.pending() == [0]


def test_legacy_layout_says_re_extract(tmp_path):
    path = entry_path(tmp_path, "imagefolder", "test", "tiny-resnet")  # cache/<dataset>/<split>: format 1
    write_entry(path, "tiny-resnet", ["a"], np.ones((1, 2)), KEY, {})
    with h5py.File(path, "a") as f:
        del f["checksums"]
        del f.attrs["cache_format"]
    with pytest.raises(OldFormatError, match="older version.*extract --force"):
        find_entry(tmp_path, "imagefolder", "test", "tiny-resnet", tmp_path / "nowhere")
    dataset_dir(tmp_path, "imagefolder", tmp_path / "data", write=True)  # a re-extraction began: new layout
    with pytest.raises(CacheError, match="nothing is cached.*older version.*extract --force"):
        find_entry(tmp_path, "imagefolder", "test", "tiny-resnet")


@pytest.mark.parametrize("command", ["cka", "pairs"])
def test_analyze_refuses_an_unreadable_entry(tmp_path, command):
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(30)]
    for name in ("a", "b", "c"):
        write_entry(entry_path(tmp_path, "toy", "test", name), name, ids, rng.normal(size=(30, 4)),
                    {**KEY, "entry": name}, {})
    bad = entry_path(tmp_path, "toy", "test", "c")
    bad.write_bytes(bad.read_bytes()[:700])  # truncated
    args = [command, "--cache", str(tmp_path), "--dataset", "toy", "--metric", "cka", "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(analyze_cli, args)
    assert res.exit_code == 1 and "c.h5" in res.output and "--entries a,b" in res.output, res.output
    if command == "cka":
        res = CliRunner().invoke(analyze_cli, args + ["--entries", "a,b"])
        assert res.exit_code == 0, res.output


# ------------------------------------------------------------------ 4. writers that cannot interleave

def test_staging_is_keyed_by_request_and_a_discarded_writer_stops(tmp_path):
    path = entry_path(tmp_path, "toy", "test", "enc")
    ids = [str(i) for i in range(6)]
    a = EntryWriter(path, "enc", ids, KEY, chunk_rows=2)
    a.write_chunk(0, np.zeros((2, 2)))
    other = {**KEY, "encoder": {"name": "enc", "pooling": "last"}}
    with pytest.raises(StaleCacheError, match="partial extraction.*running now"):
        EntryWriter(path, "enc", ids, other, chunk_rows=2)
    b = EntryWriter(path, "enc", ids, other, chunk_rows=2, force=True)  # discards A's staging
    assert a.staging != b.staging and not a.staging.exists()
    with pytest.raises(StagingLostError, match="discarded by another process"):
        a.write_chunk(1, np.zeros((2, 2)))
    with pytest.raises(StagingLostError):
        a.finalize({})
    assert not a.staging.exists() and staging_folders(path) == []  # b stages from its first chunk on
    for c in b.pending():
        b.write_chunk(c, np.ones((2, 2)))
    e = b.finalize({})
    assert e.key["encoder"]["pooling"] == "last" and (e.features() == 1).all()


def test_orphans_of_killed_writers_are_removed_or_reported(tmp_path, caplog):
    path = entry_path(tmp_path, "toy", "test", "enc")
    ids = ["a", "b"]
    w = EntryWriter(path, "enc", ids, KEY, chunk_rows=2)
    w.write_chunk(0, np.ones((2, 2)))
    kept = tmp_path / "kept"
    shutil.copytree(w.staging, kept)
    w.finalize({})
    shutil.copytree(kept, w.staging)  # as a kill between the rename and the staging removal leaves it
    temp = path.parent / f".{path.name}.x1y2"  # and a kill inside write_entry
    temp.mkdir()
    other = EntryWriter(path.with_name("x.h5"), "enc", ids, {**KEY, "precision": "bf16"}, chunk_rows=2)
    other.open()
    foreign = path.with_name(path.name + ".partial-0123456789ab")
    shutil.copytree(other.staging, foreign)  # a staging of another request beside the finished entry
    again = EntryWriter(path, "enc", ids, KEY, chunk_rows=2)
    assert again.done and not w.staging.exists() and not temp.exists()
    assert foreign.exists() and "different request" in caplog.text
    EntryWriter(path, "enc", ids, KEY, chunk_rows=2, force=True)
    assert not foreign.exists()


def _race(args):
    """Extract tiny-gpt2 with one pooling (``force`` or not), chunk writes slowed down; returns
    "ok" or the PipelineError's class and text; any other exception propagates (a test failure)."""
    data, cache, pooling, force, start = args
    import pipeline.staging as staging

    slow = staging.Staging.write_chunk

    def write_chunk(self, chunk, staged):
        time.sleep(0.02)
        slow(self, chunk, staged)

    staging.Staging.write_chunk = write_chunk
    cfg = _cfg(data, cache, ("tiny-gpt2",), dataset="flickr30k", captions="all", chunk_rows=1, batch_size=1,
               encoder_options={"tiny-gpt2": {"pooling": pooling}})
    start.wait()
    try:
        extract(cfg, force=force)
        return "ok"
    except PipelineError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_racing_force_with_another_request_never_mixes(tmp_path):
    data = make_flickr30k(tmp_path / "flickr", n_per_split=(2, 2, 8))  # 40 caption rows
    assert _race((data, tmp_path / "clean", "last", False, _Go())) == "ok"
    clean = find_entry(tmp_path / "clean", "flickr30k", "test", "tiny-gpt2").features()
    ctx = mp.get_context("spawn")
    for trial in range(1):  # one trial interleaves (A's staging is discarded mid-run); more cost minutes
        cache = tmp_path / f"race{trial}"
        with ctx.Manager() as manager, ctx.Pool(2) as pool:
            start = manager.Event()
            jobs = pool.map_async(_race, [(data, cache, "mean", False, start), (data, cache, "last", True, start)])
            time.sleep(0.5)
            start.set()
            outcomes = jobs.get(timeout=300)
        # the --force run always wins; the other finished first, or stopped with a one-line error
        assert outcomes[1] == "ok", outcomes
        assert outcomes[0] == "ok" or outcomes[0].startswith(("StagingLostError", "StaleCacheError")), outcomes
        e = find_entry(cache, "flickr30k", "test", "tiny-gpt2")
        assert e.key["encoder"]["pooling"] == "last"
        np.testing.assert_array_equal(e.features(), clean)  # every row from the request it names
        assert staging_folders(e.path) == []


class _Go:
    def wait(self):
        return True


def test_training_refuses_text_entries_of_another_caption_policy(tmp_path):
    """fit-adapters --set data.captions=first on entries extracted with "all" would train on every
    caption while recording "first": refused, naming both policies and the fix."""
    data = make_imagefolder(tmp_path / "data", n=4)
    cache = tmp_path / "cache"
    extract(_cfg(data, cache, captions="all", split="all"))
    fit = ["--cache", str(cache), "--dataset", "imagefolder", "--image", "tiny-resnet", "--text", "tiny-gpt2",
           "--epochs", "1", "--dim", "8", "--device", "cpu", "--reference", "", "--set", f"data.data_dir={data}"]
    res = CliRunner().invoke(train_cli, [*fit, "--set", "data.captions=first"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "data.captions = 'all'" in res.output and "--captions first --force" in res.output
    assert CliRunner().invoke(train_cli, [*fit, "--set", "data.captions=all"]).exit_code == 0
