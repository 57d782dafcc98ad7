"""The Platonic criterion tracked during training, and optional Weights & Biases logging."""

from __future__ import annotations

import csv
import json
from pathlib import Path
import sys
import types

import pytest

from analyze.platonic import platonic_test
from pipeline.config import load_config
from tests.test_train import make_cache
from train.data import TrainError
from train.fit import fit_adapters
from train.tracking import columns

TRACKED = ("cka", "unbiased_cka", "mutual_knn")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("tracking") / "cache", policy="all",
                      splits={"train": 96, "val": 40, "test": 20})


def _cfg(cache, **options):
    opts = {"data.cache": str(cache), "data.dataset": "fake", "train.epochs": 3, "train.batch_size": 32,
            "train.lr": 3e-3, "train.dim": 16, "train.device": "cpu", "analyze.k": 5,
            "analyze.out": str(cache.parent / "reports")}
    return load_config(None, options={**opts, **options})


@pytest.fixture(scope="module")
def tracked(cache):
    cfg = _cfg(cache, **{"train.name": "tracked", "train.eval_every": 2})
    return cfg, fit_adapters(cfg, progress=False)


def test_history_and_metrics_carry_the_tracked_criterion(tracked):
    cfg, res = tracked
    rows = list(csv.DictReader(open(res.run_dir / "history.csv")))
    for m in TRACKED:
        for col in columns(m):
            assert col in rows[0]
            assert rows[0][col] == "nan" and rows[1][col] != "nan"  # eval_every = 2: epochs 2 and 3 evaluated
    doc = json.loads((res.run_dir / "metrics.json").read_text())["tracking"]
    assert doc["split"] == "val" and doc["reference"] == "dinov2" and doc["n"] == 40 and doc["k"] == 5
    for m in TRACKED:
        before = doc["before"][m]
        best = doc["best"][m]
        assert best[f"val_{m}_delta_image"] == pytest.approx(
            best[f"val_{m}_after_image"] - (before["image"] + before["text"]) / 2)
    assert (res.run_dir / "curves.png").stat().st_size > 1000


def test_tracked_values_equal_analyze_platonic_on_the_val_split(tracked):
    """The tracked best-epoch values are the Platonic test's point estimates on the same split."""
    cfg, res = tracked
    cfg = load_config(None, options={**{k: v for k, v in _flat(cfg).items()}, "analyze.split": "val",
                                     "analyze.bootstrap": 0, "analyze.permutations": 0, "analyze.controls": [],
                                     "analyze.metrics": list(TRACKED)})
    out = platonic_test(cfg, "tracked", kernels=False)
    best = res.metrics.tracking["best"]
    for m in TRACKED:
        r = out["results"][m]
        for side in ("image", "text"):
            assert best[m][f"val_{m}_after_{side}"] == pytest.approx(r["terms"][f"after_{side}"]["score"], abs=1e-4)
            assert best[m][f"val_{m}_delta_{side}"] == pytest.approx(r["delta"][side]["delta"], abs=1e-4)
        assert res.metrics.tracking["before"][m]["image"] == pytest.approx(r["terms"]["before_image"]["score"],
                                                                             abs=1e-5)


def _flat(cfg):
    return {"data.cache": cfg.data.cache, "data.dataset": cfg.data.dataset, "analyze.k": cfg.analyze.k,
            "analyze.out": cfg.analyze.out, "train.name": "tracked"}


def test_tracking_off_and_unknown_metrics(cache):
    res = fit_adapters(_cfg(cache, **{"train.name": "untracked", "train.track_metrics": [], "train.epochs": 1}),
                       progress=False)
    assert not any("_delta_" in k for k in res.history[0]) and res.metrics.tracking is None
    with pytest.raises(TrainError, match="Did you mean: cka"):
        fit_adapters(_cfg(cache, **{"train.track_metrics": ["ckaa"]}), progress=False)


# ----------------------------------------------------------------------------- Weights & Biases
class FakeWandb(types.ModuleType):
    """Records every call a run makes; ``fail_online`` makes init(mode="online") raise."""

    def __init__(self, fail_online=False):
        super().__init__("wandb")
        self.calls, self.fail_online = [], fail_online
        fake = self

        class Run:
            summary = types.SimpleNamespace(update=lambda d: fake.calls.append(("summary", dict(d))))

            def log(self, data, step=None):
                fake.calls.append(("log", dict(data), step))

            def finish(self):
                fake.calls.append(("finish",))

        self._run = Run()

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        if self.fail_online and kwargs["mode"] == "online":
            raise RuntimeError("no network")
        return self._run

    def Table(self, columns, data):  # noqa: N802  (wandb's names)
        self.calls.append(("Table", list(columns), len(data)))
        return ("table", tuple(columns))

    def Image(self, path):  # noqa: N802
        self.calls.append(("Image", path))
        return ("image", path)


def test_no_wandb_import_with_tracking_off(cache, monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)  # whatever imported it before
    fit_adapters(_cfg(cache, **{"train.name": "quiet", "train.epochs": 1}), progress=False)
    assert "wandb" not in sys.modules


def test_wandb_logs_config_history_tables_and_figures(cache, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _cfg(cache, **{"train.name": "logged", "train.wandb": True, "train.wandb_group": "study-x",
                         "train.track_metrics": ["cka"]})
    res = fit_adapters(cfg, progress=False)
    init = [c for c in fake.calls if c[0] == "init"]
    assert len(init) == 1
    kw = init[0][1]
    assert kw["mode"] == "offline" and kw["group"] == "study-x" and kw["project"] == "platonic-align"
    # wandb writes into the run's staging folder, which becomes the run folder when the run commits
    staging = Path(kw["dir"])
    assert kw["name"] == "logged" and staging.parent == res.run_dir.parent and kw["config"]["train"]["wandb"] is True
    assert staging.name.startswith(".logged.partial") and not staging.exists()
    steps = [c for c in fake.calls if c[0] == "log" and c[2] is not None]
    assert [c[2] for c in steps] == [1, 2, 3] and "train_loss" in steps[0][1] and "val_cka_delta_image" in steps[0][1]
    final = next(c for c in fake.calls if c[0] == "log" and c[2] is None)[1]
    assert {"test_retrieval", "history", "curves"} <= set(final)
    assert ("Image", str(staging / "curves.png")) in fake.calls and (res.run_dir / "curves.png").exists()
    summary = next(c for c in fake.calls if c[0] == "summary")[1]
    assert summary["best_epoch"] == res.best_epoch and "test/infonce/mean_R" in summary and "test/cca/mean_R" in summary
    assert fake.calls[-1] == ("finish",)


def test_wandb_online_failure_falls_back_to_offline(cache, monkeypatch):
    fake = FakeWandb(fail_online=True)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    fit_adapters(_cfg(cache, **{"train.name": "online", "train.wandb": True, "train.wandb_mode": "online",
                                "train.epochs": 1, "train.track_metrics": []}), progress=False)
    assert [c[1]["mode"] for c in fake.calls if c[0] == "init"] == ["online", "offline"]


def test_wandb_errors_name_the_fix(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(TrainError, match=r"pip install -e '\.\[wandb\]'"):
        fit_adapters(_cfg(cache, **{"train.wandb": True, "train.epochs": 1}), progress=False)
    with pytest.raises(TrainError, match="Did you mean: offline"):
        fit_adapters(_cfg(cache, **{"train.wandb_mode": "ofline"}), progress=False)
