"""Token projectors (``train.adapter = "token"``, train/tokens.py) on tiny token caches: every
Table-1 branch trains and writes pooled aligned entries, streaming equals the in-memory run,
2-process DDP equals one process, padding is masked, ``patch`` shares one set of weights, and
the bad inputs are refused."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.run import extract
from pipeline.cache import find_entry
from pipeline.config import TOKEN_DEFAULTS, load_config
from train.api import load_run
from train.errors import ConfigValueError, TrainError
import train.fit as fit_mod
from train.data import load_data
from train.fit import fit_adapters
from train.tokens import build_token_adapters, pad_tokens, token_settings
from tests.fixtures import make_flickr30k

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = {k: "identity" for k in TOKEN_DEFAULTS if k != "pooling"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Token entries (grid:2) of tiny-dinov2 (CLS + 4 tokens) and tiny-gpt2 (ragged captions), and a
    pooled tiny-resnet entry, for 16/4/4 images."""
    root = tmp_path_factory.mktemp("tokcache")
    data = make_flickr30k(root / "data", n_per_split=(16, 4, 4))
    base = {"data.data_dir": str(data), "data.cache": str(root / "cache"), "data.dataset": "flickr30k",
            "extract.split": "all", "extract.workers": 0}
    extract(load_config(ROOT / "pipeline.toml", options={**base, "extract.encoders": ("tiny-dinov2", "tiny-gpt2"),
                                                            "extract.tokens": "grid:2"}))
    extract(load_config(ROOT / "pipeline.toml", options={**base, "extract.encoders": ("tiny-resnet",)}))
    return base


def _cfg(base, **train):
    opts = {"train.image": "tiny-dinov2", "train.text": "tiny-gpt2", "train.adapter": "token", "train.epochs": 3,
            "train.batch_size": 4, "train.reference": "", "train.dim": 16, "train.hidden": 32, "train.device": "cpu",
            "train.track_metrics": (), "train.name": "tok"}
    opts.update({f"train.{k}": v for k, v in train.items()})
    return load_config(ROOT / "pipeline.toml", options={**base, **opts})


def _aligned(cfg, result, split="test"):
    return {m: find_entry(cfg.data.cache, "flickr30k", split, name).features()
            for m, name in result.entries[split].items()}


@pytest.mark.parametrize("branches", [
    {},  # the defaults: token, token, token, mlp (the slides' best row)
    {"vision_cls": "identity", "text_local": "identity", "text_global": "identity"},
    {"vision_cls": "identity", "text_local": "identity", "text_global": "mlp"},
    {"vision_cls": "identity", "text_local": "patch", "text_global": "identity"},
    {"vision_local": "mlp", "vision_cls": "mlp", "text_local": "mlp", "text_global": "token"},
    {**IDENTITY, "pooling": "mean"},
    {"pooling": "attention"},
], ids=["default", "vtoken-tid", "vtoken-tmlp", "patch", "all-mlp", "identity", "attention"])
def test_every_branch_trains_and_writes_pooled_entries(cache, branches):
    cfg = _cfg(cache, token=branches, name=f"tok-{len(branches)}-{'-'.join(branches.values())}")
    res = fit_adapters(cfg, progress=False)
    assert np.isfinite(res.history[-1]["train_loss"])
    aligned = _aligned(cfg, res)
    assert aligned["image"].shape == (4, 16) and aligned["text"].shape == (4, 16)
    run = load_run(res.run_dir)  # the run rebuilds from its files and gives its aligned entries again
    for m, entry in (("image", "tiny-dinov2"), ("text", "tiny-gpt2")):
        again = run.embed_entry(find_entry(cfg.data.cache, "flickr30k", "test", entry), m)
        np.testing.assert_allclose(again, aligned[m], rtol=1e-5, atol=1e-6)


def test_patch_shares_the_vision_projector(cache):
    res = fit_adapters(_cfg(cache, token={"text_local": "patch"}, name="patch"), progress=False)
    model = load_run(res.run_dir).model
    keys = list(model.state_dict())
    assert any(k.startswith("adapters.image.local.") for k in keys)
    assert not any(k.startswith("adapters.text.local.") for k in keys)
    assert model.adapters["text"]._shared[0] is model.adapters["image"].local


def test_streamed_token_rows_equal_in_memory(cache, monkeypatch):
    """The streaming path moves token rows like pooled ones: one window of the whole split gives the
    in-memory run's numbers."""
    mem_cfg = _cfg(cache, name="mem", stream_block=16)
    mem = fit_adapters(mem_cfg, progress=False)
    whole = _cfg(cache, name="whole", max_rows_in_memory=64, stream_block=16)  # one window: the whole split
    monkeypatch.setattr(fit_mod, "load_data", functools.partial(load_data, stream=True))
    st = fit_adapters(whole, progress=False)
    monkeypatch.undo()
    assert [r["train_loss"] for r in mem.history] == [r["train_loss"] for r in st.history]
    assert st.metrics.streamed and not mem.metrics.streamed
    a, b = _aligned(mem_cfg, mem), _aligned(whole, st)
    for m in ("image", "text"):
        np.testing.assert_allclose(a[m], b[m], rtol=1e-5, atol=1e-6)
    small = fit_adapters(_cfg(cache, name="small", max_rows_in_memory=8, stream_block=4), progress=False)
    assert small.metrics.streamed and np.isfinite(small.history[-1]["train_loss"])


@pytest.mark.parametrize("extra", [{"loss": "vsepp"}, {"mixup": 0.4}, {"structure_weight": 1.0},
                                   {"learnable_temperature": True, "schedule": "cosine"}])
def test_token_adapters_with_other_losses_and_options(cache, extra):
    res = fit_adapters(_cfg(cache, name="opt-" + "-".join(extra), epochs=2, **extra), progress=False)
    assert np.isfinite(res.history[-1]["train_loss"])


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_padding_is_masked(pool):
    """A row's output does not depend on how much padding follows it."""
    cfg = _cfg({"data.cache": "unused"}, token={"pooling": pool}).train
    from train.adapters import AlignModel

    torch.manual_seed(0)
    model = AlignModel({"image": 5 * 9, "text": 6 * 9}, cfg,
                       {"image": {"width": 8, "layout": "cls+patches"}, "text": {"width": 8, "layout": "text"}})
    rng = np.random.default_rng(0)
    flat, lengths = rng.normal(size=(7, 8)).astype(np.float32), np.array([3, 4])
    short, long = pad_tokens(flat, lengths, 4), pad_tokens(flat, lengths, 9)
    if pool == "attention":  # a query away from 0, so that the weights are not uniform
        torch.nn.init.normal_(model.adapters["text"].pool.query)
    with torch.no_grad():
        a = model("text", torch.from_numpy(short))
        b = model("text", torch.from_numpy(long))
    torch.testing.assert_close(a, b)


def test_bad_inputs_are_refused(cache):
    with pytest.raises(TrainError, match="'tiny-resnet' holds pooled features only.*--tokens grid:4"):
        fit_adapters(_cfg(cache, image="tiny-resnet", name="pooled"), progress=False)
    for bad, message in (({"vision_lokal": "token"}, "Unknown key train.token.vision_lokal"),
                         ({"vision_cls": "patch"}, "vision_cls = 'patch' must be one of identity, mlp, token"),
                         ({"text_global": "attention"}, "must be one of")):
        with pytest.raises(ConfigValueError, match=message):
            token_settings(_cfg(cache, token=bad).train)
        with pytest.raises(ConfigValueError, match=message):
            fit_adapters(_cfg(cache, token=bad), progress=False)
    with pytest.raises(ConfigValueError, match="vision_local, which is identity"):
        fit_adapters(_cfg(cache, token={"text_local": "patch", "vision_local": "identity"}), progress=False)
    with pytest.raises(ConfigValueError, match="needs train.adapter"):
        fit_adapters(_cfg(cache, init="procrustes"), progress=False)
    with pytest.raises(ConfigValueError, match="image tokens are 512-wide, text tokens 32-wide"):
        build_token_adapters({"image": 513, "text": 33}, _cfg(cache, token={"text_local": "patch"}).train,
                             {"image": {"width": 512, "layout": "positions"}, "text": {"width": 32, "layout": "text"}})


def _ddp_worker(rank: int, world: int, init: str, base: dict) -> None:
    """One rank of the 2-process token run (spawned; gloo over a file:// rendezvous)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = fit_adapters(_cfg(base, name="ddp-tok", batch_size=8, mixup=0.5), progress=False)
        assert res.metrics.processes == world
        dist.barrier()  # both ranks are done with the group before either tears it down
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(cache, tmp_path):
    """Token projectors under 2-process DDP (gloo, CPU) train the weights one process trains."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", cache), nprocs=2)
    one = fit_adapters(_cfg(cache, name="one-tok", batch_size=8, mixup=0.5), progress=False)
    runs = Path(cache["data.cache"]) / "runs"
    w1, w2 = (load_file(str(runs / name / "adapters.safetensors")) for name in ("one-tok", "ddp-tok"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
