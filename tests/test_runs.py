"""Tests of the run-folder contract (pipeline.runs) shared by fit-adapters and analyze
(the dependency rules are in test_architecture.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline import runs
from pipeline.config import load_config
from pipeline.errors import PipelineError



def test_aligned_names_round_trip():
    assert runs.aligned_name("resnet18", "base") == "resnet18@base"  # the documented format
    assert runs.source_of("resnet18@base") == ("resnet18", "base")
    assert runs.source_of("resnet18") == ("resnet18", None)
    assert runs.source_of(runs.aligned_name("hf:org/model", "r-1")) == ("hf:org/model", "r-1")
    assert runs.is_aligned("gpt2@x") and not runs.is_aligned("gpt2")
    with pytest.raises(PipelineError, match="must not contain '@'"):
        runs.aligned_name("resnet18", "a@b")


def test_default_run_name_and_folder():
    tc = load_config(None, options={"train.modalities": {"audio": "clap"}, "train.adapter": "mlp"}).train
    assert runs.default_run_name(tc) == "resnet18-gpt2-clap-mlp"
    assert runs.run_name(tc, "mine") == "mine"
    named = load_config(None, options={"train.name": "exp1"}).train
    assert runs.default_run_name(named) == "exp1"
    on_aligned = load_config(None, options={"train.image": "resnet18@exp1"}).train
    assert runs.check_run_name(runs.default_run_name(on_aligned)) == "resnet18+exp1-gpt2-linear"
    assert runs.run_dir("/c", "exp1") == Path("/c/runs/exp1")


def test_run_metrics_round_trip_with_null_for_nan(tmp_path):
    rec = runs.RunMetrics(run="r", dataset="d", best_epoch=3, epochs_run=5, sizes={"test": {"pairs": 4, "image": 2}},
                          test={"infonce": {"mean_R": 0.5, "i2t_R@1": math.nan}, "cca": {"mean_R": 0.25}},
                          val_best={"mean_R": 0.6, "cka_image": math.nan})
    path = rec.write(tmp_path / runs.METRICS)
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["test"]["infonce"]["i2t_R@1"] is None  # strict JSON
    back = runs.RunMetrics.from_json(json.loads(text))
    assert back.mean_R == 0.5 and back.adapters is back.test["infonce"] and math.isnan(back.test["infonce"]["i2t_R@1"])
    assert math.isnan(back.val_best["cka_image"]) and back.sizes == rec.sizes and back.best_epoch == 3
    with pytest.raises(PipelineError, match="no 'test' section"):
        runs.RunMetrics.from_json({"run": "r"})


def test_list_and_find_runs(tmp_path):
    for name in ("alpha", "beta"):
        d = runs.run_dir(tmp_path, name)
        d.mkdir(parents=True)
        (d / runs.CONFIG).write_text(json.dumps({"data": {"dataset": "toy"}, "train": {"image": "i", "text": "t"}}))
    runs.RunMetrics(run="alpha", test={"infonce": {"mean_R": 0.4}}).write(runs.run_dir(tmp_path, "alpha") / runs.METRICS)
    (runs.run_dir(tmp_path, "beta") / runs.METRICS).write_text("{not json")  # unreadable: ignored with a warning
    (runs.runs_dir(tmp_path) / "empty").mkdir()  # no config.json or metrics.json: not a run
    found = runs.list_runs(tmp_path)
    assert [r.name for r in found] == ["alpha", "beta"]
    assert found[0].mean_R == 0.4 and found[1].metrics is None and found[0].image == "i"
    assert found[0].dataset == "toy" and found[0].curves is None
    with pytest.raises(runs.RunNotFoundError, match="Did you mean: alpha"):
        runs.find_run(tmp_path, "alpah")
    assert runs.list_runs(tmp_path / "nowhere") == []
