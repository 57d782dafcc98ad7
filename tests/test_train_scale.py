"""Tests of fit-adapters at scale: streaming a train split larger than memory from the cache
(train/stream.py) and multi-process training with DistributedDataParallel (train/distributed.py).

What "matches" means here:
* streaming with one window that holds the whole split (one block) and the in-memory path draw
  the same batches from the same generator: the adapters are bit-identical (torch.equal);
* with small windows the batches differ (a different, window-local shuffle), so the claim is
  only that it trains as well: high test recall on synthetic linear data;
* 2 processes (gloo, CPU) vs 1 process with the same global batch and seed: the loss of a
  batch and the gradients agree to float32 rounding, and the adapters after training agree
  within 1e-5 (the matmuls of a half batch may round differently).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from safetensors.torch import load_file

import train.fit as fit_mod
import train.stream as stream_mod
from pipeline.cache import find_entry, write_entry
from pipeline.runs import aligned_name
from tests.test_train import SIZES, make_cache, tiny_cfg
from train.adapters import AlignModel
from train.api import load_run
from train.cli import main
from train.data import load_data
from train.distributed import Dist
from train.errors import TrainError
from train.fit import Trainer, fit_adapters
from train.stream import RunningMoments, StreamSplit, plan_stream

ROOT = Path(__file__).resolve().parents[1]
N_PAIRS = 3 * SIZES["train"]  # train pairs of make_cache(policy="all"): 3 captions per image


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("scale"))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapters.safetensors"))


def streamed(monkeypatch) -> None:
    """Force fit_adapters onto the streaming path even when the split fits in the cap."""
    monkeypatch.setattr(fit_mod, "load_data", functools.partial(load_data, stream=True))


# ----------------------------------------------------------------------------- planning, statistics
def test_plan_rounds_blocks_to_batches_and_halves_the_cap():
    tc = tiny_cfg("x", batch_size=32, max_rows_in_memory=1000, stream_block=100).train
    plan = plan_stream(tc, 5000)
    assert plan.block == 128 and plan.window == 3 and plan.window_pairs == 384 <= 1000 // 2
    small = plan_stream(tiny_cfg("x", batch_size=32, max_rows_in_memory=100, stream_block=1024).train, 5000)
    assert small.block == 32 and small.window == 1  # block shrunk to fit half the cap
    with pytest.raises(TrainError, match="max_rows_in_memory = 50 is too small.*2 x batch_size = 64"):
        plan_stream(tiny_cfg("x", batch_size=32, max_rows_in_memory=50).train, 5000)


def test_running_moments_exact_over_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=1e4, scale=3.0, size=(1000, 5))  # a large mean: naive sum of squares would cancel
    acc = RunningMoments(5)
    for lo, hi in ((0, 7), (7, 300), (300, 301), (301, 999), (999, 1000)):
        acc.add(x[lo:hi])
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(acc.std, x.std(0), rtol=1e-10)


def test_streamed_statistics_equal_in_memory(cache):
    cfg = tiny_cfg(cache, max_rows_in_memory=64, stream_block=50)
    mem, st = load_data(cfg, torch.device("cpu"), stream=False), load_data(cfg, torch.device("cpu"), stream=True)
    assert not mem.streaming and st.streaming and isinstance(st.splits["train"], StreamSplit)
    for m in ("image", "text"):
        assert np.array_equal(mem.stats.mean[m], st.stats.mean[m]) and np.array_equal(mem.stats.std[m], st.stats.std[m])
        x = find_entry(cache, "fake", "train", "resnet18" if m == "image" else "gpt2").features().astype(np.float64)
        np.testing.assert_allclose(mem.stats.mean[m], x.mean(0), rtol=1e-5, atol=1e-6)
    assert st.splits["val"].features["image"].shape[0] == SIZES["val"]  # val/test stay in memory


def test_stream_is_chosen_only_above_the_cap(cache):
    assert load_data(tiny_cfg(cache, max_rows_in_memory=N_PAIRS), torch.device("cpu")).streaming is False
    assert load_data(tiny_cfg(cache, max_rows_in_memory=N_PAIRS - 1), torch.device("cpu")).streaming is True
    with pytest.raises(TrainError, match="max_rows_in_memory > 0"):
        load_data(tiny_cfg(cache), torch.device("cpu"), stream=True)


def test_every_pair_once_per_epoch_and_same_step_count(cache):
    cfg = tiny_cfg(cache, max_rows_in_memory=200, stream_block=40)
    split = load_data(cfg, torch.device("cpu"), stream=True).splits["train"]
    seq = split._window_sequence()
    for _ in range(2):
        seen = []
        while (item := next(seq)) is not stream_mod.END:
            assert len(item) <= split.plan.window_pairs
            seen.append(item)
        assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(N_PAIRS))
    torch.manual_seed(0)
    trainer = Trainer(AlignModel({"image": 24, "text": 20}, cfg.train), split, cfg.train)
    trainer.epoch(torch.Generator().manual_seed(0), np.random.default_rng(0))
    assert trainer.step_count == N_PAIRS // 32 == trainer.steps_per_epoch  # as many steps as in memory
    split.close()


# ----------------------------------------------------------------------------- streaming vs in memory
def test_whole_split_window_is_bit_identical_to_in_memory(cache, monkeypatch):
    opts = dict(epochs=3, mixup=0.5, learnable_temperature=True, schedule="cosine", warmup_epochs=0.5)
    mem = fit_adapters(tiny_cfg(cache, name="mem", **opts), progress=False)
    streamed(monkeypatch)
    cfg = tiny_cfg(cache, name="st", max_rows_in_memory=4 * N_PAIRS, stream_block=N_PAIRS, **opts)
    plan = plan_stream(cfg.train, N_PAIRS)
    assert plan.block >= N_PAIRS and plan.window == 1  # one block, one window: the whole split in its order
    st = fit_adapters(cfg, progress=False)
    assert st.metrics.streamed and not mem.metrics.streamed
    wm, ws = weights(mem.run_dir), weights(st.run_dir)
    assert all(torch.equal(wm[k], ws[k]) for k in wm)
    assert [r["train_loss"] for r in mem.history] == [r["train_loss"] for r in st.history]
    assert mem.metrics.test["infonce"] == st.metrics.test["infonce"]
    for base in ("cca", "procrustes"):  # moments summed over other blocks: float64 rounding only
        assert mem.metrics.test[base] == pytest.approx(st.metrics.test[base], abs=1e-9)
    assert mem.metrics.sizes == st.metrics.sizes
    for m in ("resnet18", "gpt2"):  # the streamed train split's aligned entries are written block by block
        a, b = (find_entry(cache, "fake", "train", aligned_name(m, run)) for run in ("mem", "st"))
        assert list(a.ids) == list(b.ids)
        np.testing.assert_allclose(a.features(), b.features(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_streaming_matches_in_memory(cache):
    """On CUDA the streamed window lives in a static device buffer, so the captured step still works."""
    cfg = tiny_cfg(cache, device="cuda", mixup=0.5, max_rows_in_memory=4 * N_PAIRS, stream_block=N_PAIRS)
    out = []
    for stream in (False, True):
        data = load_data(cfg, torch.device("cuda"), stream=stream)
        torch.manual_seed(0)
        model = AlignModel(data.dims, cfg.train).cuda()
        trainer = Trainer(model, data.splits["train"], cfg.train)
        assert trainer.graph
        gen, rng = torch.Generator(device="cuda").manual_seed(0), np.random.default_rng(0)
        losses = [float(trainer.epoch(gen, rng)) for _ in range(2)]
        data.close()
        out.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (l_mem, w_mem), (l_st, w_st) = out
    assert l_st == pytest.approx(l_mem, rel=1e-5)
    for k in w_mem:
        torch.testing.assert_close(w_st[k], w_mem[k], rtol=1e-4, atol=1e-5)


def test_small_windows_still_train_to_high_recall(cache, monkeypatch):
    # windows of 64 pairs (2 blocks of 32) out of 360: ~6 windows per epoch, each shuffled inside
    res = fit_adapters(tiny_cfg(cache, epochs=8, name="small", max_rows_in_memory=128, stream_block=32),
                       progress=False)
    assert res.metrics.streamed
    assert res.metrics.test["infonce"]["mean_R"] > 0.8 and res.metrics.test["infonce"]["t2i_R@1"] > 0.4
    assert res.history[-1]["train_loss"] < 0.5 * res.history[0]["train_loss"]
    run = load_run(res.run_dir)
    src, al = find_entry(cache, "fake", "train", "gpt2"), find_entry(cache, "fake", "train", aligned_name("gpt2", "small"))
    np.testing.assert_allclose(run.embed_entry(src), al.features(), rtol=1e-4, atol=1e-5)


def test_rows_held_never_exceed_the_cap(tmp_path, monkeypatch):
    """An instrumented reader: every cache read is at most one block, and the rows alive (training
    buffer + window being read, counted by weak-reference finalisers) never exceed the cap."""
    cache = make_cache(tmp_path, splits={"train": 400, "val": 20, "test": 20}, reference=None)  # 1200 pairs
    cap, block = 200, 32
    cfg = tiny_cfg(cache, max_rows_in_memory=cap, stream_block=block, epochs=2, reference="")
    data = load_data(cfg, torch.device("cpu"))
    split = data.splits["train"]
    reads: list[tuple[int, int]] = []
    real = stream_mod.read_rows

    def counting(entry, lo, hi):
        reads.append((hi - lo, split.held.now))
        return real(entry, lo, hi)

    monkeypatch.setattr(stream_mod, "read_rows", counting)
    torch.manual_seed(0)
    trainer = Trainer(AlignModel(data.dims, cfg.train), split, cfg.train)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for _ in range(3):
        trainer.epoch(gen, rng)
    split.close()
    assert len(reads) > 3 * 1200 / block  # streamed: many small reads, no full load
    assert max(r for r, _ in reads) <= block
    assert max(held + r for r, held in reads) <= cap + block  # buffer + window being read + one read block
    assert split.held.peak <= cap
    assert split.held.now == 0  # everything released after close()


def test_stream_more_modalities_zarr_and_one_caption(tmp_path, monkeypatch):
    cache = make_cache(tmp_path, policy="one", fmt="zarr", extra={"audio": "clap"})
    res = fit_adapters(tiny_cfg(cache, epochs=2, name="z", modalities={"audio": "clap"}, max_rows_in_memory=64,
                                stream_block=32), progress=False)
    assert res.metrics.streamed and res.metrics.sizes["train"]["pairs"] == SIZES["train"]
    assert find_entry(cache, "fake", "train", aligned_name("clap", "z")).path.suffix == ".zarr"


def test_stream_nan_names_the_row(tmp_path):
    cache = make_cache(tmp_path, policy="one")
    e = find_entry(cache, "fake", "train", "resnet18")
    x = e.features()
    x[77, 1] = np.inf
    write_entry(e.path, "resnet18", e.ids, x, e.key, {})
    with pytest.raises(TrainError, match="'train0077'"):
        fit_adapters(tiny_cfg(cache, max_rows_in_memory=64, stream_block=16, reference=""), progress=False)


def test_cli_max_rows_in_memory(tmp_path):
    cache = make_cache(tmp_path / "c", policy="one")
    out = CliRunner().invoke(main, ["--cache", str(cache), "--dataset", "fake", "--epochs", "2", "--dim", "8",
                                    "--batch-size", "32", "--lr", "3e-3", "--device", "cpu", "--name", "cli",
                                    "--max-rows-in-memory", "64", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert json.loads((cache / "runs" / "cli" / "metrics.json").read_text())["streamed"] is True
    assert "--max-rows-in-memory" in CliRunner().invoke(main, ["--help"]).output


# ----------------------------------------------------------------------------- DistributedDataParallel
def test_global_batch_must_split_evenly(cache):
    cfg = tiny_cfg(cache, batch_size=32)
    data = load_data(cfg, torch.device("cpu"))
    with pytest.raises(TrainError, match="not divisible by the 3 processes"):
        Trainer(AlignModel(data.dims, cfg.train), data.splits["train"], cfg.train, dist=Dist(rank=0, world_size=3))


DDP_RUNS = {  # name -> train options, each run in 1 and in 2 processes
    "mem": dict(epochs=3, mixup=0.5, learnable_temperature=True),
    "stream": dict(epochs=3, max_rows_in_memory=128, stream_block=32),
    "sigmoid": dict(epochs=2, loss="sigmoid"),  # the learnt bias is used outside DDP's forward: still reduced
}


def batch_gradients(cache, dist: Dist) -> dict[str, torch.Tensor]:
    """Loss and gradients of one fixed mixed global batch (no optimizer step)."""
    cfg = tiny_cfg(cache, mixup=0.5, learnable_temperature=True)
    data = load_data(cfg, torch.device("cpu"), splits=("train",))
    torch.manual_seed(0)
    model = AlignModel(data.dims, cfg.train)
    trainer = Trainer(model, data.splits["train"], cfg.train, dist=dist)
    trainer.rows.copy_(data.splits["train"].pairs[torch.randperm(N_PAIRS, generator=torch.Generator().manual_seed(1))[:32]])
    trainer.lam.fill_(0.7)
    trainer.perm.copy_(torch.randperm(32, generator=torch.Generator().manual_seed(2)))
    loss = trainer.batch_loss()
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


def _ddp_worker(rank: int, world: int, init: str, cache: str, out: str) -> None:
    """One rank of the 2-process runs (spawned; gloo over a file:// rendezvous)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for name, opts in DDP_RUNS.items():
            res = fit_adapters(tiny_cfg(Path(cache), name=f"ddp-{name}", **opts), progress=False)
            assert res.name == f"ddp-{name}" and res.metrics.processes == world  # rank 0's result on every rank
        grads = batch_gradients(Path(cache), Dist(rank, world))
        if rank == 0:
            torch.save(grads, Path(out) / "grads.pt")
        dist.barrier()  # both ranks are done with the group before either tears it down
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(cache, tmp_path):
    """2-process DDP vs 1 process: gradients of a batch (this catches a wrong world-size factor,
    which AdamW's scale invariance would hide from the weights) and trained adapters, in memory
    and streamed."""
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(cache), str(tmp_path)), nprocs=2)
    single = batch_gradients(cache, Dist())
    multi = torch.load(tmp_path / "grads.pt")
    assert float(multi["loss"]) == pytest.approx(float(single["loss"]), rel=1e-6)
    for k, g in single.items():
        torch.testing.assert_close(multi[k], g, rtol=1e-5, atol=1e-7)
    for name, opts in DDP_RUNS.items():
        one = fit_adapters(tiny_cfg(cache, name=f"one-{name}", **opts), progress=False)
        w1, w2 = weights(one.run_dir), weights(cache / "runs" / f"ddp-{name}")
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
        hist = [r["train_loss"] for r in one.history]
        ddp_hist = [float(r["train_loss"]) for r in _read_history(cache / "runs" / f"ddp-{name}")]
        assert ddp_hist == pytest.approx(hist, rel=1e-5)


def _read_history(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "history.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_torchrun_cli_matches_single_process(tmp_path):
    """The real launcher: torchrun --nproc-per-node 2 -m train.cli (env:// rendezvous, gloo)."""
    cache = make_cache(tmp_path / "c")
    args = ["--cache", str(cache), "--dataset", "fake", "--epochs", "3", "--dim", "16", "--batch-size", "32",
            "--lr", "3e-3", "--device", "cpu", "--reference", "", "--no-progress", "--max-rows-in-memory", "128",
            "--set", "train.stream_block=32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "train.cli", *args, "--name", "tr"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("run folder:") == 1  # only rank 0 reports
    one = CliRunner().invoke(main, [*args, "--name", "one"])
    assert one.exit_code == 0, one.output
    w1, w2 = weights(cache / "runs" / "one"), weights(cache / "runs" / "tr")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
    assert find_entry(cache, "fake", "test", aligned_name("resnet18", "tr")).n == SIZES["test"]
