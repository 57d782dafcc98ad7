"""Tests of the training stage (train/): loss, adapters, retrieval, baselines, fit, run
outputs, load_run, CLI and error cases. Synthetic features only; runs on CPU in seconds."""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.cache import entry_path, find_entry, write_entry
from pipeline.config import ConfigError, load_config
from pipeline.join import JoinError
from pipeline.runs import aligned_name
from train import fit as fit_mod
from train.adapters import ADAPTERS, AlignModel, build_adapter
from train.api import AdapterMismatchError, load_run, save_adapters
from train.baselines import FROM_MOMENTS, pair_moments
from train.cli import main
from train.errors import TrainError
from train.fit import TrainingDiverged, fit_adapters
from train.losses import info_nce, multi_info_nce
from train.retrieval import recall_at_k

D_IMG, D_TXT, D_REF = 24, 20, 12  # synthetic feature widths
SIZES = {"train": 120, "val": 30, "test": 30}  # images per split
REL = np.random.default_rng(123).normal(size=(D_IMG, D_TXT))  # the known linear relation text = img @ REL


# ----------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_cache(root, dataset="fake", policy="all", image="resnet18", text="gpt2", reference="dinov2",
               extra=None, seed=0, splits=SIZES, fmt="h5", noise=0.3):
    """Write image/text(/reference/extra) entries for train/val/test of a fake dataset.

    Text features are a known linear map of the image features plus noise; with policy
    "all" every image has 3 captions with ids "<id>#k", else one caption with the image id.
    """
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        ids = [f"{split}{i:04d}" for i in range(n)]
        x = rng.normal(size=(n, D_IMG)).astype(np.float32)
        caps = 3 if policy == "all" else 1
        y = np.stack([x @ REL + noise * rng.normal(size=(n, D_TXT)) for _ in range(caps)], axis=1)
        tids = [f"{i}#{k}" for i in ids for k in range(caps)] if policy == "all" else ids
        entries = {image: (ids, x), text: (tids, y.reshape(n * caps, D_TXT))}
        if reference:
            entries[reference] = (ids, np.tanh(x[:, :D_REF] + 0.1 * rng.normal(size=(n, D_REF))))
        for name, enc in (extra or {}).items():
            entries[enc] = (ids, x[:, ::-1] + 0.2 * rng.normal(size=x.shape))
        for name, (rows, feats) in entries.items():
            key = {"entry": name, "encoder": {"name": name}, "dataset": dataset, "split": split,
                   "fingerprint": f"fp-{split}"}
            write_entry(entry_path(root, dataset, split, name, fmt), name, rows, feats, key, {"note": "test"})
    return root


def tiny_cfg(cache, **train):
    opts = {"data.cache": str(cache), "data.dataset": "fake", "train.epochs": 4, "train.batch_size": 32,
            "train.lr": 3e-3, "train.dim": 16, "train.device": "cpu"}
    opts.update({f"train.{k}": v for k, v in train.items()})
    return load_config(None, options=opts)


@pytest.fixture(scope="module")
def cache_all(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache_all"))


@pytest.fixture(scope="module")
def trained(cache_all):
    return fit_adapters(tiny_cfg(cache_all, epochs=8, name="base"), progress=False)


# ----------------------------------------------------------------------------- loss
def test_info_nce_random_pairs_close_to_log_n():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 1024, generator=g), torch.randn(128, 1024, generator=g)
    loss = info_nce(a, b, 1.0)
    assert abs(float(loss) - math.log(128)) < 0.05


def test_info_nce_identical_pairs_low_temperature_close_to_zero():
    a = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    assert float(info_nce(a, a * 3.0, 1 / 0.01)) < 1e-3  # scale-free: rows are L2-normalised


def test_multi_info_nce_is_mean_of_pairs():
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(16, 8, generator=g) for _ in range(3))
    expected = (info_nce(a, b, 5.0) + info_nce(a, c, 5.0) + info_nce(b, c, 5.0)) / 3
    assert torch.allclose(multi_info_nce([a, b, c], 5.0), expected)


# ----------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapter_output_shape(kind):
    tc = load_config(None, options={"train.adapter": kind, "train.dim": 32, "train.hidden": 40,
                                    "train.bottleneck": 8}).train
    out = build_adapter(24, tc)(torch.randn(5, 24))
    assert out.shape == (5, 32) and torch.isfinite(out).all()


def test_unknown_adapter_suggests_close_name():
    tc = load_config(None, options={"train.adapter": "linaer"}).train
    with pytest.raises(ValueError, match="Did you mean: linear"):
        build_adapter(8, tc)


def test_learnable_temperature_is_clamped():
    tc = load_config(None, options={"train.learnable_temperature": True, "train.temperature": 0.001}).train
    model = AlignModel({"image": 4, "text": 4}, tc)
    assert model.temperature() == pytest.approx(0.01)
    model.clamp_temperature()
    assert float(model.log_scale.detach()) == pytest.approx(math.log(100.0))
    assert model.log_scale.requires_grad


# ----------------------------------------------------------------------------- retrieval
def hand_case():
    """3 images (one-hot axes) x 5 captions each; all vectors have unit norm, so cosine = dot."""
    images = np.eye(3)
    captions = np.array([
        [.8, 0, .6], [.8, .6, 0], [.6, .8, 0], [0, .6, .8], [0, 1, 0],    # image 0
        [0, 1, 0], [0, 0, 1], [.8, 0, .6], [0, .8, .6], [.6, .8, 0],     # image 1
        [.6, 0, .8], [.8, .6, 0], [.6, .8, 0], [1, 0, 0], [.8, 0, .6],   # image 2
    ])
    return images, captions, np.repeat(np.arange(3), 5)


def test_recall_at_k_by_hand():
    # Ties count against the query. Text-to-image rank of each caption = number of OTHER images scoring >= its own:
    #   image 0's captions: 0 0 1 2 2 (caption 4 scores 0 on its image and on image 2: the tie counts against it)
    #   image 1's captions: 0 2 2 0 0 (caption 6 ties image 0 at 0)
    #   image 2's captions: 0 2 2 2 1 (caption 13 ties image 1 at 0)
    #   -> R@1 = 6/15, R@2 = 8/15, R@3 = 1.
    # Image-to-text: number of OTHER images' captions scoring >= the image's best own caption:
    #   image 0: best own .8; captions 7, 11, 14 tie at .8 and 13 scores 1.0 -> rank 4
    #   image 1: best own 1.0 (caption 5); caption 4 ties -> rank 1
    #   image 2: best own .8 (caption 10); caption 3 ties, caption 6 scores 1.0 -> rank 2
    #   -> R@1 = 0, R@2 = 1/3, R@3 = 2/3.
    images, captions, t2i = hand_case()
    got = recall_at_k(images, captions, t2i, ks=(1, 2, 3))
    expected = {"i2t_R@1": 0.0, "i2t_R@2": 1 / 3, "i2t_R@3": 2 / 3,
                "t2i_R@1": 6 / 15, "t2i_R@2": 8 / 15, "t2i_R@3": 1.0}
    expected["mean_R"] = sum(expected.values()) / 6
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v), k
    default = recall_at_k(images, captions, t2i)
    assert list(default) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_R"]
    assert default["i2t_R@1"] == 0.0 and default["i2t_R@5"] == 1.0 and default["t2i_R@5"] == 1.0


def test_recall_blockwise_equals_unblocked():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(50, 8)).astype(np.float32)
    t2i = rng.permutation(np.repeat(np.arange(50), 5))
    txt = img[t2i] + 1.5 * rng.normal(size=(250, 8)).astype(np.float32)
    assert recall_at_k(img, txt, t2i, block=7) == recall_at_k(img, txt, t2i, block=100_000)
    assert recall_at_k(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(t2i)) == \
        recall_at_k(img, txt, t2i)


def test_recall_rejects_degenerate_inputs():
    img, txt, t2i = hand_case()
    with pytest.raises(ValueError, match="all zeros"):
        recall_at_k(np.zeros((3, 3)), txt, t2i)
    with pytest.raises(ValueError, match="non-finite"):
        recall_at_k(img, np.full((15, 3), np.nan), t2i)
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k(img, txt, np.zeros(15, dtype=int))


# ----------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("name", sorted(FROM_MOMENTS))
def test_baselines_beat_chance_on_linear_data(name):
    g = torch.Generator().manual_seed(4)
    n = 400
    x = torch.randn(n, D_IMG, generator=g)
    y = x @ torch.as_tensor(REL, dtype=torch.float32) + 0.3 * torch.randn(n, D_TXT, generator=g)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean(0)) / y.std(0)
    idx = torch.arange(300)
    al = FROM_MOMENTS[name](pair_moments(x, y, idx, idx), 16)
    test = torch.arange(300, n)
    res = recall_at_k(al.a(x[test]), al.b(y[test]), torch.arange(100))
    assert res["t2i_R@1"] > 10 * (1 / 100)  # chance R@1 = 1/100
    assert res["mean_R"] > 0.5


def test_val_cka_helper_matches_feature_space_formula():
    from train.evaluate import linear_cka

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(50, 7, generator=g), torch.randn(50, 4, generator=g)
    y[:, 0] += 2 * x[:, 0]
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    expected = (torch.linalg.matrix_norm(yc.T @ xc) ** 2
                / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)))
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-9)


# ----------------------------------------------------------------------------- fit
def test_fit_reaches_high_recall_and_beats_chance(trained):
    test = trained.metrics.test
    assert set(test) == {"infonce", "cca", "procrustes"}
    assert test["infonce"]["mean_R"] > 0.8
    assert test["infonce"]["t2i_R@1"] > 0.5  # chance: 1/30
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]
    assert 1 <= trained.best_epoch <= 8


def test_fit_writes_run_folder(trained, cache_all):
    run = trained.run_dir
    assert run == cache_all / "runs" / "base"
    for f in ("adapters.safetensors", "adapters.json", "history.csv", "metrics.json", "curves.png", "config.json"):
        assert (run / f).is_file(), f
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    for col in ("epoch", "train_loss", "lr", "temperature", "val_i2t_R@1", "val_i2t_R@5", "val_i2t_R@10",
                "val_t2i_R@1", "val_t2i_R@5", "val_t2i_R@10", "val_mean_R", "val_cka_image", "val_cka_text"):
        assert col in rows[0], col
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("best_epoch", "test", "val_best", "sizes", "reference", "run", "dataset"):
        assert key in metrics, key
    assert metrics["sizes"]["test"] == {"pairs": 90, "image": 30, "text": 90}
    doc = json.loads((run / "adapters.json").read_text())
    assert doc["modalities"]["image"]["entry"] == "resnet18" and doc["modalities"]["text"]["dim"] == D_TXT
    assert doc["modalities"]["image"]["fingerprint"] == "fp-train"
    assert len(doc["modalities"]["image"]["mean"]) == D_IMG


def test_aligned_entries_match_load_run(trained, cache_all):
    run = load_run(trained.run_dir)
    for split in ("train", "val", "test"):
        for modality, source in (("image", "resnet18"), ("text", "gpt2")):
            name = trained.entries[split][modality]
            assert name == aligned_name(source, "base")
            aligned = find_entry(cache_all, "fake", split, name)
            src = find_entry(cache_all, "fake", split, source)
            assert list(aligned.ids) == list(src.ids) and aligned.dim == 16
            assert aligned.key["source"] == src.key and aligned.key["run"] == "base"
            assert aligned.provenance["run_dir"] == str(trained.run_dir.resolve())
            np.testing.assert_allclose(run.embed_entry(src), aligned.features(), rtol=1e-4, atol=1e-5)


def test_load_run_detects_other_encoder(trained, cache_all, tmp_path):
    run = load_run(trained.run_dir)
    with pytest.raises(AdapterMismatchError, match="dimension 24"):
        run.embed("image", np.zeros((3, D_TXT)))
    ref = find_entry(cache_all, "fake", "test", "dinov2")
    with pytest.raises(AdapterMismatchError, match="no adapter for entry 'dinov2'"):
        run.embed_entry(ref)
    with pytest.raises(AdapterMismatchError, match="not the encoder"):
        run.embed_entry(ref, modality="image")
    # weights of another run (other input dims) next to this run's description
    other = make_cache(tmp_path / "c", policy="one")
    cfg = tiny_cfg(other, epochs=1, name="other", image="dinov2", reference="")
    res = fit_adapters(cfg, progress=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    doc = json.loads((trained.run_dir / "adapters.json").read_text())
    doc["sha256"] = json.loads((res.run_dir / "adapters.json").read_text())["sha256"]  # past the hash check
    (mixed / "adapters.json").write_text(json.dumps(doc))
    (mixed / "adapters.safetensors").write_bytes((res.run_dir / "adapters.safetensors").read_bytes())
    with pytest.raises(AdapterMismatchError, match="another run or encoder"):
        load_run(mixed)


def _sources(dims):
    """adapters.json "modalities" for features of the given widths (no cache needed)."""
    return {m: {"entry": f"enc-{m}", "dim": d, "key": {"encoder": f"enc-{m}"}, "fingerprint": None,
                "mean": [0.5] * d, "std": [2.0] * d} for m, d in dims.items()}


def test_adapter_settings_round_trip_without_a_key_list(tmp_path):
    """Every [train] setting is stored with the run and the model is rebuilt from it: a residual
    adapter with non-default width, depth, dropout and a learnable temperature loads back exactly."""
    tc = load_config(None, options={"train.adapter": "residual", "train.hidden": 7, "train.depth": 3,
                                    "train.dropout": 0.25, "train.dim": 6, "train.learnable_temperature": True,
                                    "train.temperature": 0.2}).train
    dims = {"image": 5, "text": 4}
    torch.manual_seed(0)
    model = AlignModel(dims, tc)
    save_adapters(tmp_path, model, tc, _sources(dims), {"run": "r"})
    run = load_run(tmp_path)
    assert run.train == tc
    assert len(run.model.adapters["image"]) == 1 + 3 and run.model.adapters["image"][1].mlp[0].out_features == 7
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    with torch.no_grad():
        want = model.eval()("image", (torch.from_numpy(x) - 0.5) / 2.0).numpy()
    np.testing.assert_allclose(run.embed("image", x), want, rtol=1e-6)


def test_runs_written_by_format_1_still_load(tmp_path):
    """adapters.json of format 1 held a "model" dict of selected settings instead of "train"."""
    tc = load_config(None, options={"train.adapter": "mlp", "train.hidden": 9, "train.dim": 6}).train
    dims = {"image": 5, "text": 4}
    save_adapters(tmp_path, AlignModel(dims, tc), tc, _sources(dims), {})
    doc = json.loads((tmp_path / "adapters.json").read_text())
    old_keys = ("adapter", "dim", "hidden", "bottleneck", "depth", "dropout", "temperature",
                "learnable_temperature", "standardize")
    doc["format"], doc["model"] = 1, {k: doc["train"].pop(k) for k in old_keys}
    del doc["train"]
    (tmp_path / "adapters.json").write_text(json.dumps(doc))
    run = load_run(tmp_path)
    assert run.train.hidden == 9 and run.embed("text", np.ones((2, 4))).shape == (2, 6)


@pytest.mark.parametrize("setting, message", [("train.adapter=cnn", "Unknown adapter train.adapter = 'cnn'"),
                                              ("train.adapter=linaer", "Did you mean: linear"),
                                              ("train.device=tpu", "Unknown device 'tpu'"),
                                              ("train.schedule=cosin", "Did you mean: cosine")])
def test_cli_bad_names_in_config_are_one_line_errors_before_any_work(tmp_path, setting, message):
    result = CliRunner().invoke(main, ["--cache", str(tmp_path / "none"), "--set", setting, "--no-progress"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()  # checked before reading the cache or creating the run folder


def test_same_seed_same_adapters_on_cpu(cache_all):
    w = [load_file(str(fit_adapters(tiny_cfg(cache_all, epochs=2, name=f"det{i}", mixup=0.5),
                                    progress=False).run_dir / "adapters.safetensors")) for i in range(2)]
    assert w[0].keys() == w[1].keys()
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    w2 = load_file(str(fit_adapters(tiny_cfg(cache_all, epochs=2, name="det2", mixup=0.5, seed=1),
                                    progress=False).run_dir / "adapters.safetensors"))
    assert not torch.equal(w[0]["adapters.image.weight"], w2["adapters.image.weight"])


def test_mixup_learnable_temperature_cosine_and_adapters_run(cache_all):
    res = fit_adapters(tiny_cfg(cache_all, epochs=3, name="opts", mixup=1.0, learnable_temperature=True,
                                schedule="cosine", warmup_epochs=1.0, adapter="residual", eval_every=2),
                       progress=False)
    temps = [r["temperature"] for r in res.history]
    assert temps[-1] != pytest.approx(0.07) and all(0.01 <= t <= 1 for t in temps)
    assert math.isnan(res.history[0]["val_mean_R"]) and not math.isnan(res.history[1]["val_mean_R"])
    assert res.best_epoch in (2, 3)
    assert res.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at 0


def test_more_than_two_modalities(tmp_path):
    cache = make_cache(tmp_path, extra={"audio": "clap"})
    res = fit_adapters(tiny_cfg(cache, epochs=2, name="three", modalities={"audio": "clap"}), progress=False)
    assert set(res.entries["test"]) == {"image", "text", "audio"}
    assert res.metrics.sizes["train"]["pairs"] == SIZES["train"]  # one row per image
    assert "val_image-audio/mean_R" in res.history[0] and "text-audio/t2i_R@1" in res.metrics.test["infonce"]
    assert load_run(res.run_dir).modalities == ["image", "text", "audio"]


def test_missing_default_reference_warns_and_skips(tmp_path, caplog):
    cache = make_cache(tmp_path, reference=None, policy="one", fmt="zarr")
    with caplog.at_level(logging.WARNING):
        res = fit_adapters(tiny_cfg(cache, epochs=1), progress=False)
    assert sum("reference entry 'dinov2'" in r.message for r in caplog.records) == 1
    assert not any(k.startswith("val_cka") for k in res.history[0]) and res.metrics.reference is None
    assert find_entry(cache, "fake", "val", aligned_name("gpt2", "resnet18-gpt2-linear")).path.suffix == ".zarr"
    with pytest.raises(TrainError, match="Reference entry 'dinov2'"):
        fit_adapters(tiny_cfg(cache, epochs=1), require_reference=True, progress=False)


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("policy", ["all", "one"])
def test_cli_end_to_end(tmp_path, policy):
    cache = make_cache(tmp_path / "cache", policy=policy)
    result = CliRunner().invoke(main, ["--cache", str(cache), "--dataset", "fake", "--epochs", "3", "--dim", "16",
                                       "--batch-size", "32", "--lr", "3e-3", "--device", "cpu", "--name", "cli",
                                       "--set", "train.weight_decay=0.01", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "infonce" in result.output and "procrustes" in result.output and "run folder" in result.output
    run = cache / "runs" / "cli"
    assert json.loads((run / "config.json").read_text())["train"]["weight_decay"] == 0.01
    assert json.loads((run / "metrics.json").read_text())["test"]["cca"]["mean_R"] > 0.3
    for split, n in SIZES.items():
        text = find_entry(cache, "fake", split, aligned_name("gpt2", "cli"))
        assert text.n == (3 * n if policy == "all" else n)
        assert list(text.ids) == list(find_entry(cache, "fake", split, "gpt2").ids)


def test_cli_defaults_run_configured_experiment(tmp_path, monkeypatch):
    """`fit-adapters --cache DIR` alone: dataset flickr30k, resnet18 + gpt2, 50 epochs, dim 768."""
    cache = make_cache(tmp_path / "cache", dataset="flickr30k", splits={"train": 64, "val": 12, "test": 12},
                       policy="one")
    monkeypatch.chdir(tmp_path)  # no ./pipeline.toml here: the built-in defaults apply
    result = CliRunner().invoke(main, ["--cache", str(cache)])
    assert result.exit_code == 0, result.output
    run = cache / "runs" / "resnet18-gpt2-linear"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 50 and find_entry(cache, "flickr30k", "test", aligned_name("resnet18", "resnet18-gpt2-linear")).dim == 768


def test_cli_help_documents_every_option():
    out = CliRunner().invoke(main, ["--help"]).output
    for opt in ("--cache", "--dataset", "--image", "--text", "--modality", "--adapter", "--dim", "--epochs",
                "--batch-size", "--lr", "--temperature", "--learnable-temperature", "--mixup", "--seed",
                "--device", "--name", "--reference", "--config", "--set"):
        assert opt in out, opt


def test_cli_explicit_missing_reference_is_an_error(tmp_path):
    cache = make_cache(tmp_path, policy="one")
    result = CliRunner().invoke(main, ["--cache", str(cache), "--dataset", "fake", "--epochs", "1", "--dim", "8",
                                       "--reference", "clip", "--device", "cpu"])
    assert result.exit_code != 0 and "Reference entry 'clip'" in result.output


# ----------------------------------------------------------------------------- errors
def _cli(cache, *extra):
    return CliRunner().invoke(main, ["--cache", str(cache), "--dataset", "fake", "--epochs", "1", "--dim", "8",
                                     "--device", "cpu", "--reference", "", *extra])


def test_error_ids_do_not_join(tmp_path):
    cache = make_cache(tmp_path, policy="one")
    ids = [f"other{i}" for i in range(SIZES["val"])]
    write_entry(entry_path(cache, "fake", "val", "gpt2"), "gpt2", ids, np.ones((len(ids), D_TXT)), {"entry": "gpt2"}, {})
    result = _cli(cache)
    assert result.exit_code == 1 and "missing from cache entry" in result.output and "'other0'" in result.output
    with pytest.raises(JoinError):
        fit_adapters(tiny_cfg(cache, reference=""), progress=False)


def test_error_missing_split(tmp_path):
    cache = make_cache(tmp_path, policy="one", splits={"train": 40, "test": 10})
    result = _cli(cache)
    assert result.exit_code == 1
    assert "'val' split" in result.output and "extract --cache" in result.output and "--split val" in result.output


def test_error_nan_features(tmp_path):
    cache = make_cache(tmp_path, policy="one")
    entry = find_entry(cache, "fake", "train", "resnet18")
    x = entry.features()
    x[7, 3] = np.nan
    write_entry(entry.path, "resnet18", entry.ids, x, entry.key, {})
    result = _cli(cache)
    assert result.exit_code == 1 and "'resnet18'" in result.output and "'train0007'" in result.output


def test_error_empty_split(tmp_path):
    cache = make_cache(tmp_path, policy="one")
    for name, d in (("resnet18", D_IMG), ("gpt2", D_TXT)):
        write_entry(entry_path(cache, "fake", "test", name), name, [], np.zeros((0, d)), {"entry": name}, {})
    result = _cli(cache)
    assert result.exit_code == 1 and "empty" in result.output and "'test'" in result.output


def test_error_diverging_loss_keeps_last_good_checkpoint(cache_all, monkeypatch):
    real = fit_mod.Trainer.epoch
    calls = []

    def flaky(self, *args):
        calls.append(1)
        return real(self, *args) if len(calls) < 3 else torch.tensor(float("nan"))

    monkeypatch.setattr(fit_mod.Trainer, "epoch", flaky)
    with pytest.raises(TrainingDiverged, match="epoch 3.*last good checkpoint \\(epoch [12]\\)"):
        fit_adapters(tiny_cfg(cache_all, epochs=5, name="diverge"), progress=False)
    run = cache_all / "runs" / "diverge"
    assert json.loads((run / "adapters.json").read_text())["best_epoch"] in (1, 2)
    assert load_run(run).embed("image", np.ones((2, D_IMG))).shape == (2, 16)
    assert len(list(csv.DictReader(open(run / "history.csv")))) == 3


def test_exploding_loss_detected():
    assert fit_mod._diverged(float("inf"), None, 64)
    assert fit_mod._diverged(100.0, 4.2, 64)
    assert not fit_mod._diverged(4.3, 4.2, 64)


def test_error_bad_config_values(cache_all):
    with pytest.raises(ConfigError, match="Did you mean: cosine"):  # refused when the config is built
        tiny_cfg(cache_all, schedule="cosin")
    with pytest.raises(TrainError, match="train.batch_size = 1"):
        fit_adapters(tiny_cfg(cache_all, batch_size=1), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("opts", [{}, {"mixup": 1.0, "learnable_temperature": True, "schedule": "cosine",
                                       "warmup_epochs": 0.5, "adapter": "residual"}])
def test_cuda_graph_step_matches_eager(cache_all, opts):
    from train.data import load_data

    cfg = tiny_cfg(cache_all, device="cuda", epochs=2, **opts)
    data = load_data(cfg, torch.device("cuda"))
    weights = []
    for graph in (True, False):
        torch.manual_seed(0)
        model = AlignModel(data.dims, cfg.train).cuda()
        trainer = fit_mod.Trainer(model, data.splits["train"], cfg.train, graph=graph)
        gen, rng = torch.Generator(device="cuda").manual_seed(0), np.random.default_rng(0)
        losses = [float(trainer.epoch(gen, rng)) for _ in range(2)]
        weights.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (l_graph, w_graph), (l_eager, w_eager) = weights
    assert l_graph == pytest.approx(l_eager, rel=1e-4)
    for k in w_eager:
        torch.testing.assert_close(w_graph[k], w_eager[k], rtol=1e-4, atol=1e-5)


def test_high_but_finite_first_epoch_is_not_divergence():
    from train.fit import _diverged

    assert not _diverged(20.0, None, 16)  # epoch 1 sets the scale (low temperature, random init)
    assert _diverged(float("nan"), None, 16)
    assert _diverged(100.0, 20.0, 16) and not _diverged(30.0, 20.0, 16)
