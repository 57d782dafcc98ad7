"""Tests of the small-data options: the STRUCTURE regulariser (train.structure), layer choice by
similarity (train.layers) and closed-form starts (train.init). Synthetic features only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.cache import entry_path, find_entry, write_entry
from pipeline.config import ConfigError, load_config
from pipeline.runs import aligned_name
from tests.test_train import make_cache, tiny_cfg
from train import fit as fit_mod
from train.adapters import AlignModel
from train.api import load_run
from train.data import load_data
from train.errors import ConfigValueError, TrainError
from train.evaluate import retrieval_metrics
from train.fit import fit_adapters
from train.init import apply_init
from train.layers import choose_layers
from train.structure import StructureTerm, structure_loss

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- STRUCTURE
def dense_structure(x: np.ndarray, z: np.ndarray, levels: int, tau: float) -> float:
    """The definition written out with loops in float64 (train.structure's docstring)."""
    def walk(a):
        a = a / np.sqrt((a * a).sum(1, keepdims=True))
        a = a - a.mean(0)
        b = a.shape[0]
        p = np.zeros((b, b))
        for i in range(b):
            logits = [sum(a[i, k] * a[j, k] for k in range(a.shape[1])) / tau for j in range(b)]
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            p[i] = [v / sum(e) for v in e]
        return p

    def power(p, n):
        out = np.eye(p.shape[0])
        for _ in range(n):
            out = np.array([[sum(out[i, k] * p[k, j] for k in range(p.shape[0])) for j in range(p.shape[0])]
                            for i in range(p.shape[0])])
        return out

    px, pz = walk(x), walk(z)
    total = 0.0
    for level in range(1, levels + 1):
        a, c = power(px, level), power(pz, level)
        js = 0.0
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                m = 0.5 * (a[i, j] + c[i, j])
                js += 0.5 * (a[i, j] * math.log(a[i, j] / m) + c[i, j] * math.log(c[i, j] / m))
        total += js / a.shape[0]
    return total / levels


@pytest.mark.parametrize("levels,tau", [(1, 0.05), (2, 0.1), (3, 0.5)])
def test_structure_matches_dense_definition(levels, tau):
    rng = np.random.default_rng(levels)
    x, z = rng.normal(size=(7, 5)), rng.normal(size=(7, 3))
    got = structure_loss(torch.tensor(x), torch.tensor(z, dtype=torch.float64), levels, tau)
    assert float(got) == pytest.approx(dense_structure(x, z, levels, tau), rel=1e-4, abs=1e-7)


def test_structure_zero_under_isometry_and_scale_not_under_linear_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(10, 6, generator=g, dtype=torch.float64))  # (10, 6), q^T q = I
    rotated = 3.7 * x @ q.T  # into a wider space, rotated and scaled
    assert float(structure_loss(x, rotated, levels=3, temperature=0.05)) < 1e-9
    skew = x @ torch.diag(torch.tensor([10.0, 1, 1, 0.1, 1, 1], dtype=torch.float64))
    assert float(structure_loss(x, skew, levels=3, temperature=0.05)) > 1e-3
    other = torch.randn(32, 6, generator=g, dtype=torch.float64)
    value = float(structure_loss(x, other, levels=2, temperature=0.05))
    assert 0.01 < value <= math.log(2)


def test_structure_gradient_reaches_only_the_aligned_side():
    x = torch.randn(16, 5, requires_grad=True)
    z = torch.randn(16, 4, requires_grad=True)
    structure_loss(x, z, levels=2).backward()
    assert x.grad is None and z.grad is not None and torch.isfinite(z.grad).all()


def test_structure_weight_ramp_and_unstandardisation():
    tc = tiny_cfg("unused", structure_weight=2.0, structure_warmup_epochs=2.0).train
    term = StructureTerm(tc, {"image": np.full(3, 5.0)}, {"image": np.full(3, 2.0)}, steps_per_epoch=2, device=CPU)
    weights = []
    for step in range(6):
        term.set_step(step)
        weights.append(float(term.weight))
    assert weights == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    x = torch.randn(8, 3)
    z = torch.randn(8, 4)
    expected = 2.0 * structure_loss(x * 2.0 + 5.0, z, tc.structure_levels, tc.structure_temperature)
    assert float(term(["image"], [x], [z])) == pytest.approx(float(expected))


def test_fit_with_structure_runs_and_rejects_bad_values(tmp_path):
    cache = make_cache(tmp_path, reference=None)
    result = fit_adapters(tiny_cfg(cache, epochs=2, reference="", structure_weight=10.0, structure_levels=2,
                                   mixup=1.0), progress=False)
    assert math.isfinite(result.history[-1]["train_loss"])
    for key, value in (("structure_weight", -1.0), ("structure_levels", 0), ("structure_temperature", 0.0)):
        with pytest.raises(ConfigValueError, match=f"train.{key}"):
            fit_adapters(tiny_cfg(cache, **{key: value}), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_with_structure_matches_eager(tmp_path):
    cache = make_cache(tmp_path, reference=None)
    cfg = tiny_cfg(cache, device="cuda", epochs=2, structure_weight=5.0, structure_levels=2,
                   structure_warmup_epochs=1.0, mixup=1.0)
    data = load_data(cfg, torch.device("cuda"))
    out = []
    for graph in (True, False):
        torch.manual_seed(0)
        model = AlignModel(data.dims, cfg.train).cuda()
        trainer = fit_mod.Trainer(model, data.splits["train"], cfg.train, graph=graph, stats=data.stats)
        gen, rng = torch.Generator(device="cuda").manual_seed(0), np.random.default_rng(0)
        out.append(([float(trainer.epoch(gen, rng)) for _ in range(2)],
                    {k: v.detach().clone() for k, v in model.state_dict().items()}))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-4)
    for k in out[1][1]:
        torch.testing.assert_close(out[0][1][k], out[1][1][k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- layer choice
IMG_LAYERS, TXT_LAYERS, PLANT = (8, 10, 12, 14), (6, 9, 11), (2, 1)  # widths; the related pair


def make_layer_cache(root, n=(90, 30, 30), seed=0):
    """Entries "img" and "txt" with hidden layers; only image layer 2 and text layer 1 are related
    (text layer 1 = a linear map of image layer 2 plus small noise); the final features are
    unrelated noise, so "last" does poorly."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(IMG_LAYERS[PLANT[0]], TXT_LAYERS[PLANT[1]]))
    for split, rows in zip(("train", "val", "test"), n):
        ids = [f"{split}{i:03d}" for i in range(rows)]
        img = [rng.normal(size=(rows, d)) for d in IMG_LAYERS]
        txt = [rng.normal(size=(rows, d)) for d in TXT_LAYERS]
        txt[PLANT[1]] = img[PLANT[0]] @ maps + 0.05 * rng.normal(size=(rows, TXT_LAYERS[PLANT[1]]))
        last = {"img": rng.normal(size=(rows, 16)), "txt": rng.normal(size=(rows, 7))}  # unrelated final features
        for name, feats, layers in (("img", last["img"], img), ("txt", last["txt"], txt)):
            key = {"entry": name, "encoder": {"name": name}, "dataset": "fake", "split": split}
            write_entry(entry_path(root, "fake", split, name, "h5"), name, ids, feats, key, {}, layers=layers)
    return root


def layer_cfg(cache, **train):
    return tiny_cfg(cache, image="img", text="txt", reference="", **train)


def _train_entries(cfg):
    return {m: find_entry(cfg.data.cache, "fake", "train", e) for m, e in (("image", "img"), ("text", "txt"))}


@pytest.fixture(scope="module")
def layer_cache(tmp_path_factory):
    return make_layer_cache(tmp_path_factory.mktemp("layers"))


def test_auto_layers_pick_the_planted_pair(layer_cache):
    cfg = layer_cfg(layer_cache, image_layer="auto", text_layer="auto")
    choice = choose_layers(cfg, _train_entries(cfg))
    assert (choice.layers["image"], choice.layers["text"]) == PLANT
    scores = np.array(choice.table["scores"])
    assert scores.shape == (len(IMG_LAYERS), len(TXT_LAYERS))
    assert scores[PLANT] > 2 * np.delete(scores.ravel(), np.ravel_multi_index(PLANT, scores.shape)).max()
    one_side = choose_layers(layer_cfg(layer_cache, image_layer="auto", text_layer=1), _train_entries(cfg))
    assert one_side.layers == {"image": 2, "text": 1} and np.array(one_side.table["scores"]).shape == (4, 1)
    other_metric = choose_layers(layer_cfg(layer_cache, image_layer="auto", text_layer="auto", layer_metric="cka",
                                           layer_rows=40), _train_entries(cfg))
    assert (other_metric.layers["image"], other_metric.layers["text"]) == PLANT
    assert other_metric.table["rows"] == 40


def test_fixed_and_default_layers_need_no_table(layer_cache):
    cfg = layer_cfg(layer_cache, image_layer=3)
    choice = choose_layers(cfg, _train_entries(cfg))
    assert choice.layers == {"image": 3, "text": None} and choice.table is None


def test_fit_on_auto_layers_records_choice_and_embeds_that_layer(layer_cache):
    result = fit_adapters(layer_cfg(layer_cache, image_layer="auto", text_layer="auto", epochs=10, name="auto"),
                          progress=False)
    doc = json.loads((result.run_dir / "adapters.json").read_text())
    assert doc["layers"]["layers"] == {"image": 2, "text": 1}
    assert doc["modalities"]["image"]["layer"] == 2 and doc["modalities"]["image"]["dim"] == IMG_LAYERS[2]
    assert result.metrics.test["infonce"]["mean_R"] > 0.5  # the planted pair is learnable; "last" is noise
    run = load_run(result.run_dir)
    test_img = find_entry(layer_cache, "fake", "test", "img")
    aligned = find_entry(layer_cache, "fake", "test", aligned_name("img", "auto"))
    np.testing.assert_allclose(run.embed_entry(test_img, "image"), aligned.features(), rtol=1e-5, atol=1e-5)
    assert aligned.provenance["layer"] == 2


def test_layer_errors_are_clear(layer_cache, tmp_path):
    cfg = layer_cfg(layer_cache, image_layer=9)
    with pytest.raises(TrainError, match="stores layers 0..3"):
        choose_layers(cfg, _train_entries(cfg))
    no_layers = make_cache(tmp_path, reference=None)
    with pytest.raises(TrainError, match="--layers all"):
        fit_adapters(tiny_cfg(no_layers, image_layer="auto"), progress=False)
    for value, match in (("deep", "use \"last\""), ("3", "write the layer as a number"), (-1, "numbered from 0")):
        with pytest.raises(ConfigValueError, match=match):
            fit_adapters(layer_cfg(layer_cache, image_layer=value), progress=False)
    with pytest.raises(ConfigValueError, match="Did you mean"):
        fit_adapters(layer_cfg(layer_cache, image_layer="auto", layer_metric="mutual_kn"), progress=False)
    with pytest.raises(TrainError, match="streamed train split"):
        fit_adapters(layer_cfg(layer_cache, image_layer=1, max_rows_in_memory=40), progress=False)


def test_layer_keys_parse_from_the_command_line():
    assert load_config(None, ["train.image_layer=3", "train.text_layer=auto"]).train.image_layer == 3
    assert load_config(None, ["train.text_layer=auto"]).train.text_layer == "auto"
    with pytest.raises(ConfigError, match="expects str or int"):
        load_config(None, ["train.image_layer=1.5"])


# ----------------------------------------------------------------------------- closed-form starts
@pytest.fixture(scope="module")
def init_cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("init"), reference=None, noise=1.0)


@pytest.mark.parametrize("method", ["procrustes", "cca"])
def test_closed_form_start_equals_the_baseline(init_cache, method):
    cfg = tiny_cfg(init_cache, reference="", init=method, dim=16)
    data = load_data(cfg, CPU)
    torch.manual_seed(0)
    model = AlignModel(data.dims, cfg.train)
    apply_init(model, data, cfg.train)
    start = retrieval_metrics(model, data.splits["test"])
    baseline = fit_mod.baseline_metrics(data, cfg.train.dim)[method]
    assert start == pytest.approx(baseline, abs=1e-12)
    random = AlignModel(data.dims, cfg.train)
    assert retrieval_metrics(random, data.splits["test"]) != pytest.approx(baseline, abs=1e-12)


def test_fit_keeps_the_start_when_training_does_not_beat_it(init_cache):
    result = fit_adapters(tiny_cfg(init_cache, reference="", init="procrustes", epochs=1, lr=1e-12, name="start"),
                          progress=False)
    assert result.best_epoch == 0
    assert result.metrics.test["infonce"] == pytest.approx(result.metrics.test["procrustes"], abs=1e-12)


def test_closed_form_start_refuses_non_linear_adapters_and_extra_modalities(init_cache):
    with pytest.raises(ConfigValueError, match="needs train.adapter = \"linear\""):
        fit_adapters(tiny_cfg(init_cache, init="cca", adapter="mlp"), progress=False)
    with pytest.raises(ConfigValueError, match="cannot start extra modalities"):
        fit_adapters(tiny_cfg(init_cache, init="cca", modalities={"audio": "x"}), progress=False)
    with pytest.raises(ConfigError, match="train.init"):
        tiny_cfg(init_cache, init="pca")


def test_recommended_small_data_config_loads_and_passes_the_checks():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(configs / "small-data.toml")
    assert cfg.train.init == "procrustes" and cfg.train.adapter == "linear"
    fit_mod.check_config(cfg.train)
    # it is exactly the recipe the studies chose ("all"), apart from what names the data and the run
    from study.grid import expand

    for study_file in ("study-small-data.toml", "study-small-data-pair2.toml"):
        cells = expand(load_config(configs / study_file))
        chosen = next(c for c in cells if c.values["variant"] == "all").config
        ignore = {"image", "text", "reference", "name", "seed", "train_fraction"}
        theirs, ours = chosen.to_dict()["train"], cfg.to_dict()["train"]
        assert {k: v for k, v in theirs.items() if k not in ignore} == {k: v for k, v in ours.items() if k not in ignore}
        assert chosen.extract.layers == cfg.extract.layers == "all"
