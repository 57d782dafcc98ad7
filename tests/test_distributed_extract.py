"""Multi-process extraction: shards (``--shard K/N`` + ``--merge``) and torchrun ranks give the same
cache as one process, resume on their own, and say which shard to rerun when chunks are missing.

Bitwise equality needs the same intra-op threads per process on CPU (oneDNN picks kernels by thread
count), so runs compared with a torchrun run (which sets OMP_NUM_THREADS=1) use one thread too.
"""

import contextlib
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
from extract.run import IncompleteExtractionError, Shard, extract, merge, torchrun_shard
from pipeline.cache import EntryWriter, find_entry
from pipeline.config import load_config
from tests.fixtures import make_flickr30k

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ("tiny-resnet", "tiny-gpt2")


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    """9 test images (5 chunks of 2 rows), one of them truncated: skipped rows must match too."""
    root = make_flickr30k(tmp_path_factory.mktemp("flickr"), n_per_split=(2, 2, 9))
    victim = Path(D.load_split("flickr30k", root, "test").items[4].image)
    victim.write_bytes(victim.read_bytes()[:100])
    return root


def _cfg(data_dir, cache, **extract_opts):
    opts = {"data.data_dir": str(data_dir), "data.cache": str(cache), "data.dataset": "flickr30k",
            "extract.encoders": ENCODERS, "extract.split": "test", "extract.workers": 0,
            "extract.batch_size": 2, "extract.chunk_rows": 2, "extract.on_error": "skip"}
    opts.update({f"extract.{k}": v for k, v in extract_opts.items()})
    return load_config(ROOT / "pipeline.toml", options=opts)


def _args(data_dir, cache) -> list[str]:
    """The CLI spelling of ``_cfg``."""
    return ["--encoder", ",".join(ENCODERS), "--data-dir", str(data_dir), "--cache", str(cache), "--split", "test",
            "--workers", "0", "--batch-size", "2", "--on-error", "skip", "--set", "extract.chunk_rows=2"]


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _assert_same_cache(a, b) -> None:
    for name in ENCODERS:
        x = find_entry(a, "flickr30k", "test", name)
        y = find_entry(b, "flickr30k", "test", name)
        assert list(x.ids) == list(y.ids) and x.skipped == y.skipped and x.key == y.key
        np.testing.assert_array_equal(x.features(), y.features())
        assert x.has_tokens == y.has_tokens
        if x.has_tokens:
            for u, v in zip(x.tokens(), y.tokens()):
                np.testing.assert_array_equal(u, v)


def test_shard_parse_and_round_robin_ownership(monkeypatch):
    assert Shard.parse(" 3/8 ") == Shard(3, 8) and str(Shard(3, 8)) == "3/8"
    owners = [[c for c in range(11) if Shard(k, 4).owns(c)] for k in range(4)]
    assert owners[1] == [1, 5, 9] and sorted(sum(owners, [])) == list(range(11))
    for bad in ("4/4", "1/0", "a/b", "2"):
        with pytest.raises(ValueError, match="K/N|0 <= K < N"):
            Shard.parse(bad)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert torchrun_shard() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert torchrun_shard() == Shard(2, 4)


def test_torchrun_ranks_share_the_cores_for_dataloader_workers(monkeypatch):
    from extract.loader import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(96)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(-1) == 8 and loader_workers(2) == 2  # min(8, 96 / 8 - 1); explicit values kept
    assert loader_workers(-1, text_on_cpu=True) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    assert loader_workers(-1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(-1) == 8  # one process: min(8, 16 - 1)


@pytest.mark.parametrize("tokens", ["none", "grid:2"])
def test_shards_then_merge_equal_one_process(flickr, tmp_path, tokens):
    single = extract(_cfg(flickr, tmp_path / "one", tokens=tokens))
    assert single[0].n == 8 and len(single[0].skipped) == 1 and single[0].has_tokens == (tokens != "none")
    cfg = _cfg(flickr, tmp_path / "sharded", tokens=tokens)
    assert extract(cfg, shard=Shard(0, 2)) == []  # chunks 0, 2, 4 staged; nothing finished yet
    missing = r"chunks 1, 3 \(rows 2-3, 6-7\).*--shard 1/2 \(never started\)"
    with pytest.raises(IncompleteExtractionError, match=missing):
        merge(cfg)
    finished = extract(cfg, shard=Shard(1, 2))  # the last shard to finish assembles the entries
    assert [e.name for e in finished] == list(ENCODERS)
    assert [e.path for e in merge(cfg)] == [e.path for e in finished]  # merge of finished entries: a no-op
    _assert_same_cache(tmp_path / "one", tmp_path / "sharded")
    shards = finished[0].provenance["shards"]
    assert [s["shard"] for s in shards] == ["0/2", "1/2"] and all(s["state"] == "done" for s in shards)
    assert sum(s["rows_computed"] for s in shards) == finished[0].provenance["rows_computed"] == 9


class _Killed(Exception):
    pass


@pytest.mark.parametrize("tokens", ["none", "grid:2"])
def test_killed_shard_resumes_and_merge_names_what_to_rerun(flickr, tmp_path, monkeypatch, tokens):
    extract(_cfg(flickr, tmp_path / "one", tokens=tokens))
    cfg = _cfg(flickr, tmp_path / "sharded", tokens=tokens)
    original = EntryWriter.write_chunk
    written = []

    def die_after_one(self, *args, **kwargs):
        if len(written) == 1:
            raise _Killed()
        written.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EntryWriter, "write_chunk", die_after_one)
    with pytest.raises(_Killed):
        extract(cfg, shard=Shard(1, 2))  # stages chunk 1 of tiny-resnet, dies before chunk 3
    monkeypatch.setattr(EntryWriter, "write_chunk", original)
    extract(cfg, shard=Shard(0, 2))
    staging = next((tmp_path / "sharded").glob("flickr30k-*/test/tiny-gpt2.h5.partial-*"))
    (staging / "chunk-0000002.npz").unlink()  # a lost chunk of the shard that finished
    with pytest.raises(IncompleteExtractionError) as err:
        merge(cfg)
    text = str(err.value)
    assert "tiny-resnet: 1 of 5 chunks missing: chunks 3 (rows 6-7); rerun extract --shard 1/2 (started on" in text
    assert "did not finish" in text
    assert "tiny-gpt2: 3 of 5 chunks missing: chunks 1-3 (rows 2-7)" in text
    assert "--shard 0/2 (finished on" in text and "its chunks are gone" in text
    extract(cfg, shard=Shard(1, 2))  # resumes: computes only its missing chunks
    with pytest.raises(IncompleteExtractionError, match="--shard 0/2"):
        merge(cfg)
    extract(cfg, shard=Shard(0, 2))
    assert len(merge(cfg)) == 2
    _assert_same_cache(tmp_path / "one", tmp_path / "sharded")


def test_cli_shard_merge_and_refusals(flickr, tmp_path):
    runner = CliRunner()
    args = _args(flickr, tmp_path)
    res = runner.invoke(extract_cli, [*args, "--merge"])
    assert res.exit_code == 1 and "nothing staged" in res.output
    for k in range(3):
        res = runner.invoke(extract_cli, [*args, "--shard", f"{k}/3"])
        assert res.exit_code == 0, res.output
        assert f"shard {k}/3: its chunks are staged" in res.output
    assert "tiny-gpt2" in res.output  # shard 2/3 finished last and assembled both entries
    res = runner.invoke(extract_cli, [*args, "--merge"])
    assert res.exit_code == 0 and "tiny-resnet" in res.output and "8 x 512" in res.output
    for bad, message in ((["--shard", "3/3"], "0 <= K < N"), (["--shard", "0/2", "--force"], "discard"),
                         (["--merge", "--force"], "--merge computes nothing")):
        res = runner.invoke(extract_cli, [*args, *bad])
        assert res.exit_code != 0 and message in res.output, res.output


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", "-m", "extract.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_ranks_equal_one_process(flickr, tmp_path):
    """2 gloo ranks (torchrun, CPU) write the same cache as one process; rank 0 alone prints."""
    with _threads(1):
        extract(_cfg(flickr, tmp_path / "one"))
    res = _torchrun(_args(flickr, tmp_path / "two"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert [line.split()[0] for line in res.stdout.splitlines()] == list(ENCODERS)
    _assert_same_cache(tmp_path / "one", tmp_path / "two")
    prov = find_entry(tmp_path / "two", "flickr30k", "test", "tiny-gpt2").provenance
    assert {s["shard"]: s["rows_computed"] for s in prov["shards"]} == {"0/2": 5, "1/2": 4}


@pytest.mark.slow
def test_torchrun_ranks_resume_on_their_own(flickr, tmp_path):
    """Rank 0's chunks are already staged (an earlier run): it has nothing to do, rank 1 computes
    only its share, rank 0 assembles; the result equals one process."""
    with _threads(1):
        extract(_cfg(flickr, tmp_path / "one"))
        extract(_cfg(flickr, tmp_path / "resumed"), shard=Shard(0, 2))
    res = _torchrun(_args(flickr, tmp_path / "resumed"))
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_same_cache(tmp_path / "one", tmp_path / "resumed")
    prov = find_entry(tmp_path / "resumed", "flickr30k", "test", "tiny-resnet").provenance
    assert {s["shard"]: s["rows_computed"] for s in prov["shards"]} == {"0/2": 0, "1/2": 4}


@pytest.mark.slow
@pytest.mark.parametrize("tokens", ["none", "grid:2"])
def test_sigkilled_shard_reruns_then_merge_equals_one_process(tmp_path, tokens):
    """A real SIGKILL of one array task mid-way: merge names it, its rerun resumes, merge finishes."""
    data = make_flickr30k(tmp_path / "data", n_per_split=(2, 2, 60))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "extract.cli", "--encoder", "tiny-resnet", "--data-dir", str(data), "--split",
            "test", "--workers", "0", "--batch-size", "1", "--set", "extract.chunk_rows=1", "--tokens", tokens]
    sharded = base + ["--cache", str(tmp_path / "b")]
    staged = "flickr30k-*/test/tiny-resnet.h5.partial-*/chunk-*.npz"  # the request's staging folder
    proc = subprocess.Popen(sharded + ["--shard", "1/2"], cwd=ROOT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "b").glob(staged))) < 3:
        assert proc.poll() is None, "the shard exited before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(list((tmp_path / "b").glob(staged))) < 30, "the kill should land mid-shard"
    subprocess.run(sharded + ["--shard", "0/2"], cwd=ROOT, env=env, check=True)
    res = subprocess.run(sharded + ["--merge"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "--shard 1/2 (started on" in res.stderr and "did not finish" in res.stderr
    subprocess.run(sharded + ["--shard", "1/2"], cwd=ROOT, env=env, check=True)
    subprocess.run(sharded + ["--merge"], cwd=ROOT, env=env, check=True)
    subprocess.run(base + ["--cache", str(tmp_path / "a")], cwd=ROOT, env=env, check=True)
    a = find_entry(tmp_path / "a", "flickr30k", "test", "tiny-resnet")
    b = find_entry(tmp_path / "b", "flickr30k", "test", "tiny-resnet")
    assert list(a.ids) == list(b.ids) and a.key == b.key
    np.testing.assert_array_equal(a.features(), b.features())
    if tokens != "none":
        np.testing.assert_array_equal(a.tokens()[0], b.tokens()[0])
