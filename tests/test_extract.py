"""The extract stage end to end on generated fixtures and tiny random encoders."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract import datasets as D
from extract.cli import main as extract_cli
from extract.encoders import get_spec, image_transform, load_encoder
from extract.run import extract
from pipeline.cache import EntryWriter, StaleCacheError, find_entry
from pipeline.config import load_config
from pipeline.join import join_pairs
from tests.fixtures import BAD_IMAGE_BROKEN, make_flickr30k, make_imagefolder, write_bad_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    return make_flickr30k(tmp_path_factory.mktemp("flickr"), n_per_split=(6, 3, 5))


def _cfg(data_dir, cache, encoders=("tiny-resnet", "tiny-gpt2"), **extract_opts):
    opts = {"data.data_dir": str(data_dir), "data.cache": str(cache), "data.dataset": "flickr30k",
            "extract.encoders": tuple(encoders), "extract.split": "test", "extract.workers": 0,
            "extract.batch_size": 2, "extract.chunk_rows": 4}
    opts.update({f"extract.{k}": v for k, v in extract_opts.items()})
    return load_config(ROOT / "pipeline.toml", options=opts)


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_features_match_direct_forward_by_id(flickr, tmp_path, fmt):
    """Rows land under the right ids: each row equals the encoder run on that sample alone."""
    cfg = _cfg(flickr, tmp_path, ("tiny-resnet", "tiny-dinov2", "tiny-gpt2"), format=fmt)
    entries = {e.name: e for e in extract(cfg)}
    split = D.load_split("flickr30k", flickr, "test")
    assert list(entries["tiny-resnet"].ids) == [it.id for it in split.items]
    for name in ("tiny-resnet", "tiny-dinov2"):
        enc = load_encoder(get_spec(name))
        tf = image_transform(enc.spec.prep)
        with torch.inference_mode():
            direct = enc(torch.stack([tf(split.load_image(i)) for i in range(len(split))])).numpy()
        np.testing.assert_allclose(entries[name].features(), direct, rtol=1e-4, atol=1e-5)
    rows = split.caption_rows("longest")
    text = entries["tiny-gpt2"]
    assert list(text.ids) == [r.id for r in rows]
    enc = load_encoder(get_spec("tiny-gpt2"))
    with torch.inference_mode():
        one = enc(enc.tokenize([rows[3].text])).numpy()
    np.testing.assert_allclose(text.features()[3], one[0], rtol=1e-4, atol=1e-5)
    key = text.key
    assert key["captions"] == "longest" and key["split"] == "test" and key["fingerprint"] == split.fingerprint()
    assert text.provenance["versions"]["torch"] and text.provenance["items_per_s"] > 0


def test_image_encoders_share_one_decoding_pass(flickr, tmp_path, monkeypatch):
    calls = []
    original = D.Split.load_image

    def counting(self, i):
        calls.append(i)
        return original(self, i)

    monkeypatch.setattr(D.Split, "load_image", counting)
    extract(_cfg(flickr, tmp_path, ("tiny-resnet", "tiny-dinov2", "tiny-clip-image")))
    assert sorted(calls) == list(range(5))


def test_caption_policy_all_and_join(flickr, tmp_path):
    cfg = _cfg(flickr, tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, captions="all"))
    img, txt = extract(cfg)
    assert txt.n == 25 and txt.ids[0].endswith("#0") and txt.key["captions"] == "all"
    pairs = join_pairs(img, txt)
    assert len(pairs.image_rows) == 5 and np.bincount(pairs.text_to_image).tolist() == [5] * 5


class _Interrupt(Exception):
    pass


def _contents(entries):
    """{name: (features, tokens or None)} of finished entries."""
    return {e.name: (e.features(), e.tokens()[0] if e.has_tokens else None) for e in entries}


@pytest.mark.parametrize("tokens", ["none", "grid:2"])
def test_interrupted_extraction_resumes_to_the_same_result(flickr, tmp_path, monkeypatch, tokens):
    opts = dict(chunk_rows=2, batch_size=1, tokens=tokens)
    full = _contents(extract(_cfg(flickr, tmp_path / "a", **opts)))
    original = EntryWriter.write_chunk
    written = []

    def crash_after_two(self, *args, **kwargs):
        if len(written) == 2:
            raise _Interrupt()
        written.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EntryWriter, "write_chunk", crash_after_two)
    with pytest.raises(_Interrupt):
        extract(_cfg(flickr, tmp_path / "b", **opts))
    monkeypatch.setattr(EntryWriter, "write_chunk", original)
    resumed = _contents(extract(_cfg(flickr, tmp_path / "b", **opts)))
    for name in full:
        np.testing.assert_array_equal(resumed[name][0], full[name][0])
        assert (full[name][1] is None) == (tokens == "none")
        if tokens != "none":
            np.testing.assert_array_equal(resumed[name][1], full[name][1])


@pytest.mark.slow
@pytest.mark.parametrize("tokens", ["none", "all"])
def test_kill_9_mid_extraction_then_resume(tmp_path, tokens):
    """A real SIGKILL while chunks are being written; the rerun finishes and equals a clean run."""
    data = make_flickr30k(tmp_path / "data", n_per_split=(2, 2, 60))
    args = [sys.executable, "-m", "extract.cli", "--encoder", "tiny-resnet", "--data-dir", str(data),
            "--split", "test", "--workers", "0", "--batch-size", "1", "--set", "extract.chunk_rows=1",
            "--tokens", tokens]
    staged = "flickr30k-*/test/tiny-resnet.h5.partial-*/chunk-*.npz"  # the request's staging folder
    proc = subprocess.Popen(args + ["--cache", str(tmp_path / "b")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "b").glob(staged))) < 3:
        assert proc.poll() is None, "extraction exited before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((tmp_path / "b").glob(staged)))
    assert 3 <= done_before < 60, "the kill should land mid-extraction"
    subprocess.run(args + ["--cache", str(tmp_path / "b")], cwd=ROOT, check=True)
    subprocess.run(args + ["--cache", str(tmp_path / "a")], cwd=ROOT, check=True)
    a = find_entry(tmp_path / "a", "flickr30k", "test", "tiny-resnet")
    b = find_entry(tmp_path / "b", "flickr30k", "test", "tiny-resnet")
    assert list(a.ids) == list(b.ids) and a.key == b.key
    np.testing.assert_array_equal(a.features(), b.features())
    if tokens != "none":
        np.testing.assert_array_equal(a.tokens()[0], b.tokens()[0])


def test_stale_cache_refused_then_forced(flickr, tmp_path):
    extract(_cfg(flickr, tmp_path, ("tiny-gpt2",)))
    other = _cfg(flickr, tmp_path, ("tiny-gpt2",), encoder_options={"tiny-gpt2": {"pooling": "last"}})
    with pytest.raises(StaleCacheError, match="--force"):
        extract(other)
    (entry,) = extract(other, force=True)
    assert entry.key["encoder"]["pooling"] == "last"


def test_layers_all(flickr, tmp_path):
    (entry,) = extract(_cfg(flickr, tmp_path, ("tiny-gpt2",), layers="all"))
    enc = load_encoder(get_spec("tiny-gpt2"))
    assert len(entry.layers) == enc.num_layers and entry.features(layer=entry.layers[-1]).shape[0] == 5


def _corrupt_one(folder: Path, broken: Path | None = None) -> str:
    """Replace the second test image by ``broken``'s bytes (default: its own first 100 bytes)."""
    split = D.load_split("flickr30k", folder, "test")
    victim = Path(split.items[1].image)
    victim.write_bytes(broken.read_bytes() if broken else victim.read_bytes()[:100])
    return split.items[1].id


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_errors_or_is_skipped_and_recorded(tmp_path, workers):
    """The same ImageError (and the same skip record) whether images are decoded in this process
    or in a DataLoader worker, which must not turn it into a bare RuntimeError."""
    data = make_flickr30k(tmp_path / "data", n_per_split=(2, 2, 5))
    bad = _corrupt_one(data)
    with pytest.raises(D.ImageError, match=f"{bad}.*--on-error skip") as err:
        extract(_cfg(data, tmp_path / "c1", workers=workers))
    assert type(err.value) is D.ImageError and err.value.sample_id == bad
    img, txt = extract(_cfg(data, tmp_path / "c2", on_error="skip", workers=workers))
    assert bad not in img.ids and img.n == 4 and txt.n == 5
    assert [s["id"] for s in img.skipped] == [bad] and bad in img.skipped[0]["reason"]
    pairs = join_pairs(img, txt)  # the skip is recorded, so the join drops the caption with a warning
    assert len(pairs.text_rows) == 4


@pytest.mark.parametrize("kind", BAD_IMAGE_BROKEN)
def test_broken_image_in_a_worker_is_one_line_on_the_cli(tmp_path, kind):
    """Corrupt, truncated, empty and decompression-bomb files, decoded in a DataLoader worker."""
    data = make_flickr30k(tmp_path / "data", n_per_split=(2, 2, 5))
    bad = _corrupt_one(data, write_bad_images(tmp_path / "bad")[kind])
    res = CliRunner().invoke(extract_cli, ["--encoder", "tiny-resnet", "--data-dir", str(data), "--cache",
                                           str(tmp_path / "c"), "--split", "test", "--workers", "1"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"Error: cannot decode the image of sample '{bad}'" in res.output and "--on-error skip" in res.output


@pytest.mark.parametrize("option, words", [
    (["--set", "extract.device=tpu"], ["'tpu'", "cpu, cuda"]),
    (["--set", "extract.precision=fp64"], ["extract.precision", "fp32, bf16, fp16", "'fp64'"]),
    (["--set", "extract.precision=fp16", "--device", "cpu"], ["fp16 autocast is not supported on CPU"]),
    (["--set", "extract.format=hdf5"], ["extract.format", "h5, zarr", "'hdf5'", "Did you mean: h5?"]),
    (["--workers", "-2"], ["extract.workers must be >= 0, or -1"]),
    (["--batch-size", "0"], ["extract.batch_size must be >= 1"]),
    (["--set", "extract.chunk_rows=0"], ["extract.chunk_rows must be >= 1"]),
    (["--set", "extract.layers=every"], ["extract.layers", "last, all", "'every'"]),
])
def test_bad_extract_values_are_refused_before_any_work(flickr, tmp_path, option, words):
    """One line, no traceback, nothing written: the corrected rerun is not refused as stale."""
    base = ["--encoder", "tiny-resnet", "--data-dir", str(flickr), "--cache", str(tmp_path), "--split", "val",
            "--workers", "0"]
    res = CliRunner().invoke(extract_cli, [*base, *option])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert all(w in res.output for w in words) and "Traceback" not in res.output, res.output
    assert not any(tmp_path.iterdir()), "a refused request must leave nothing in the cache"
    res = CliRunner().invoke(extract_cli, base)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("weights", ["missing", "not-a-checkpoint"])
def test_a_failed_model_load_leaves_no_staging_so_the_fix_is_not_refused(flickr, tmp_path, weights):
    """Staging is created once the encoders have loaded; the documented fix
    (another ``NAME.weights``) then runs instead of being refused as "made for a different request"."""
    bad = tmp_path / "gpt2"
    if weights == "not-a-checkpoint":
        bad.mkdir()
        (bad / "config.json").write_text("{")
    base = ["--encoder", "tiny-gpt2", "--data-dir", str(flickr), "--cache", str(tmp_path / "cache"), "--split", "val",
            "--workers", "0", "--device", "cpu"]
    res = CliRunner().invoke(extract_cli, [*base, "--encoder-option", f"tiny-gpt2.weights={bad}"])
    assert res.exit_code == 1 and str(bad) in res.output and "Traceback" not in res.output, res.output
    assert not list((tmp_path / "cache").rglob("*.partial*"))
    res = CliRunner().invoke(extract_cli, base)  # the fix: other (here: the built-in) weights
    assert res.exit_code == 0 and "different request" not in res.output, res.output


def test_empty_caption_error_and_skip(tmp_path):
    data = make_imagefolder(tmp_path / "data", splits=("test",), n=4)
    meta = data / "test" / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    import json
    row = json.loads(lines[2])
    row["caption"] = "   "
    lines[2] = json.dumps(row)
    meta.write_text("\n".join(lines) + "\n")
    base = {"data.dataset": "imagefolder", "data.data_dir": str(data), "extract.split": "test",
            "extract.encoders": ("tiny-resnet", "tiny-bert"), "extract.workers": 0}
    with pytest.raises(D.DatasetError, match="empty"):
        extract(load_config(ROOT / "pipeline.toml", options={**base, "data.cache": str(tmp_path / "c1")}))
    img, txt = extract(load_config(ROOT / "pipeline.toml", options={
        **base, "data.cache": str(tmp_path / "c2"), "data.on_empty": "skip"}))
    assert txt.n == 3 and len(txt.skipped) == 1 and len(join_pairs(img, txt).image_rows) == 3


def test_cli_end_to_end_and_errors(flickr, tmp_path):
    runner = CliRunner()
    base = ["--data-dir", str(flickr), "--cache", str(tmp_path), "--split", "val", "--workers", "0"]
    res = runner.invoke(extract_cli, ["--encoder", "tiny-resnet,tiny-bert", *base])
    assert res.exit_code == 0, res.output
    assert "tiny-resnet" in res.output and find_entry(tmp_path, "flickr30k", "val", "tiny-bert").n == 3
    res = runner.invoke(extract_cli, ["--encoder", "resnet-18", *base])
    assert res.exit_code != 0 and "resnet18" in res.output
    res = runner.invoke(extract_cli, ["--encoder", "tiny-resnet", "--set", "extract.batchsize=3", *base])
    assert res.exit_code != 0 and "extract.batch_size" in res.output
    res = runner.invoke(extract_cli, ["--list-encoders"])
    assert res.exit_code == 0 and "dinov2-base" in res.output and "gpt2" in res.output
    res = runner.invoke(extract_cli, ["--help"])
    assert "--encoder" in res.output and "--precision" in res.output


def test_split_takes_any_split_the_dataset_has(tmp_path):
    data = make_imagefolder(tmp_path / "data", splits=("train", "extra"), n=2)
    base = ["--dataset", "imagefolder", "--data-dir", str(data), "--cache", str(tmp_path / "c"), "--workers", "0",
            "--encoder", "tiny-resnet"]
    res = CliRunner().invoke(extract_cli, [*base, "--split", "extra"])
    assert res.exit_code == 0, res.output
    assert find_entry(tmp_path / "c", "imagefolder", "extra", "tiny-resnet").n == 2
    res = CliRunner().invoke(extract_cli, [*base, "--split", "test"])
    assert res.exit_code == 1 and "split 'test' is not a split of imagefolder" in res.output
    assert "it holds: train, extra (or use all)" in res.output


def test_split_all_extracts_every_split(flickr, tmp_path):
    cfg = _cfg(flickr, tmp_path, ("tiny-resnet",), split="all")
    names = sorted((e.key["split"], e.n) for e in extract(cfg))
    assert names == [("test", 5), ("train", 6), ("val", 3)]


def test_bf16_features_agree_with_fp32(flickr, tmp_path):
    from analyze.metrics import cka

    a = extract(_cfg(flickr, tmp_path / "a", ("tiny-resnet",)))[0].features()
    b = extract(_cfg(flickr, tmp_path / "b", ("tiny-resnet",), precision="bf16"))[0].features()
    assert cka(a, b) > 0.95


def test_alias_keeps_the_requested_name_as_entry(flickr, tmp_path, monkeypatch):
    """`extract --encoder dinov2` is cached as `dinov2`, so `--reference dinov2` finds it later."""
    from extract import encoders as E

    monkeypatch.setitem(E.ALIASES, "tiny-alias", "tiny-resnet")
    (entry,) = extract(_cfg(flickr, tmp_path, ("tiny-alias",)))
    assert entry.name == "tiny-alias" and entry.path.name == "tiny-alias.h5"
    assert entry.key["encoder"]["weights"] == E.REGISTRY["tiny-resnet"].weights
    assert find_entry(tmp_path, "flickr30k", "test", "tiny-alias").n == 5


def test_values_set_in_code_are_checked_too(flickr, tmp_path):
    """A config changed with dataclasses.replace skips the loader's checks; extract() still refuses
    it before writing anything."""
    from pipeline.errors import PipelineError

    cfg = _cfg(flickr, tmp_path, ("tiny-resnet",))
    for change in ({"precision": "fp64"}, {"on_error": "ignore"}, {"workers": -3}, {"device": "tpu"}):
        bad = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, **change))
        with pytest.raises(PipelineError, match=str(next(iter(change.values())))):
            extract(bad)
    assert not any(tmp_path.iterdir())
    assert extract(cfg)[0].key["precision"] == "fp32"
