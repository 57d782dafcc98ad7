"""Run folders are written whole and checked on use.

fit-adapters writes a run into a hidden staging folder and renames it into place at the end;
aligned entries ``<enc>@<run>`` carry the adapters' sha256, which analyze and ``load_run``
check. Here: failures injected between the writes leave the previous run byte for byte; a
tampered aligned entry or adapters file is refused with a message that says to rerun
fit-adapters; and (slow) ``kill -9`` at random moments never leaves a mixed run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from analyze.cli import main as analyze_main
from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline import runs
from pipeline.cache import find_entry, list_entries, write_entry
from pipeline.runs import RunIntegrityError, check_aligned, verify_run
from tests.test_train import make_cache, tiny_cfg
from train import fit as fit_mod
from train import outputs
from train.api import load_run
from train.cli import main as fit_main
from train.fit import fit_adapters

SMALL = {"train": 64, "val": 16, "test": 16}  # images per split: a run takes about a second
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _fit(cache, seed: int, epochs: int = 2):
    return fit_adapters(tiny_cfg(cache, epochs=epochs, name="r", seed=seed, reference=""), progress=False)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _aligned(cache) -> list:
    return [find_entry(cache, "fake", s, n) for s in SMALL for n in list_entries(cache, "fake", s) if "@" in n]


def _check_consistent(cache) -> tuple[int, list[str]]:
    """The run folder is one training's (every file agrees) -> (its seed, aligned entries refused)."""
    folder = runs.run_dir(cache, "r")
    sha = verify_run(folder)
    config, adapters = (json.loads((folder / f).read_text()) for f in ("config.json", "adapters.json"))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert config["train"]["seed"] == adapters["train"]["seed"] and metrics["adapter_sha256"] == sha
    assert len((folder / "history.csv").read_text().splitlines()) == 1 + metrics["epochs_run"]
    refused = []
    for entry in _aligned(cache):
        try:
            check_aligned(cache, [entry])
        except RunIntegrityError as exc:
            assert "fit-adapters" in str(exc) and "'r'" in str(exc)
            refused.append(entry.name)
    return config["train"]["seed"], refused


# ----------------------------------------------------------------------------- the folder swap
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_commit_replaces_the_whole_folder_and_hides_staging(tmp_path):
    old = runs.staging_dir(tmp_path, "r")
    (old / "config.json").write_text("{}")
    (old / "only-old.txt").write_text("old")
    runs.commit(old, tmp_path, "r")
    new = runs.staging_dir(tmp_path, "r")
    (new / "config.json").write_text("{}")
    assert [r.name for r in runs.list_runs(tmp_path)] == ["r"]  # the staging folder is not a run
    runs.commit(new, tmp_path, "r")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != ".lock") == ["r"]
    assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == ["config.json"]  # nothing of the old


def test_recover_after_a_kill_between_the_two_renames(tmp_path):
    root = tmp_path / "runs"
    pid = _dead_pid()
    moved = root / f"r{runs.TRASH_MARK}{pid}"  # the old run, moved aside
    moved.mkdir(parents=True)
    (moved / "config.json").write_text('{"old": 1}')
    staged = root / f".r{runs.STAGING_MARK}{pid}"  # the new run, never renamed in
    staged.mkdir()
    live = root / f".r{runs.STAGING_MARK}{os.getpid()}"  # a writer still running: left alone
    live.mkdir()
    assert runs.find_run(tmp_path, "r").config == {"old": 1}  # a reader puts the old run back
    assert not moved.exists() and staged.exists()
    runs.recover(root / "r", clean=True)  # the next writer removes dead writers' leftovers
    assert not staged.exists() and live.exists()


# ----------------------------------------------------------------------------- failures between writes
def _fail_on_call(n: int, real, write_first: bool):
    """``real``, except that call ``n`` raises (after doing its write when ``write_first``)."""
    calls = []

    def fail(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            if write_first:
                real(*args, **kw)  # the write happens, then the process "dies"
            raise KeyboardInterrupt("injected failure")
        return real(*args, **kw)

    return fail


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("runsafe"), splits=SMALL, reference="dinov2")


@pytest.mark.parametrize("where", ["config", "history", "checkpoint", "metrics", "aligned entry", "commit"])
def test_failure_at_any_write_leaves_the_old_run(small_cache, monkeypatch, where):
    cache = small_cache
    _fit(cache, seed=1)
    before = _snapshot(runs.run_dir(cache, "r"))
    entries_before = {e.name + e.path.parent.name: e.key["adapter_sha256"] for e in _aligned(cache)}
    targets = {"config": (fit_mod, "write_json", 1), "history": (outputs, "write_history", 2),
               "checkpoint": (fit_mod, "save_adapters", 2), "metrics": (fit_mod.RunMetrics, "write", 1),
               "aligned entry": (outputs, "write_entry", 2), "commit": (runs, "replace", 1)}
    obj, attr, n = targets[where]
    monkeypatch.setattr(obj, attr, _fail_on_call(n, getattr(obj, attr), write_first=where != "commit"))
    with pytest.raises(KeyboardInterrupt):
        _fit(cache, seed=2)
    monkeypatch.undo()
    assert _snapshot(runs.run_dir(cache, "r")) == before  # byte for byte
    assert [p.name for p in (cache / "runs").iterdir() if p.name.startswith(".r")] == []  # staging removed
    seed, refused = _check_consistent(cache)
    assert seed == 1
    changed = [e.name for e in _aligned(cache) if entries_before[e.name + e.path.parent.name] != e.key["adapter_sha256"]]
    # entries rewritten before the failure (2 of 6, or all 6 when the commit fails) are refused, the rest pass
    assert sorted(refused) == sorted(changed) and bool(changed) == (where in ("aligned entry", "commit"))


def test_diverged_run_is_committed_as_the_message_says(small_cache, monkeypatch):
    real = fit_mod.Trainer.epoch
    calls = []

    def flaky(self, *args):
        calls.append(1)
        return real(self, *args) if len(calls) < 2 else torch.tensor(float("nan"))

    monkeypatch.setattr(fit_mod.Trainer, "epoch", flaky)
    with pytest.raises(fit_mod.TrainingDiverged, match=str(runs.run_dir(small_cache, "dv"))):
        fit_adapters(tiny_cfg(small_cache, epochs=3, name="dv", reference=""), progress=False)
    folder = runs.run_dir(small_cache, "dv")
    assert (folder / "history.csv").is_file() and verify_run(folder)
    assert load_run(folder).embed("image", np.ones((2, 24))).shape == (2, 16)


def _fits(cache, name: str, **train) -> None:
    fit_adapters(tiny_cfg(cache, epochs=2, name=name, reference="", **train), progress=False)


def test_a_diverging_retrain_leaves_the_previous_complete_run_untouched(tmp_path, monkeypatch):
    cache = make_cache(tmp_path / "cache", splits=SMALL, reference="")
    _fits(cache, "good")
    before = _snapshot(runs.run_dir(cache, "good"))
    res = CliRunner().invoke(fit_main, ["--cache", str(cache), "--dataset", "fake", "--name", "good", "--epochs", "2",
                                        "--device", "cpu", "--reference", "", "--set", "train.lr=inf"])
    assert res.exit_code == 1 and "'train.lr' must be a finite number" in res.output and "Traceback" not in res.output
    monkeypatch.setattr(fit_mod.Trainer, "epoch", lambda self, *a: torch.tensor(float("inf")))  # diverges at once
    with pytest.raises(fit_mod.TrainingDiverged, match="previous run 'good' in .* is kept unchanged"):
        _fits(cache, "good")
    assert _snapshot(runs.run_dir(cache, "good")) == before and _check_consistent_run(cache, "good")
    assert [p.name for p in runs.runs_dir(cache).iterdir() if p.name != ".lock"] == ["good"]  # no leftovers


def _check_consistent_run(cache, name: str) -> bool:
    verify_run(runs.run_dir(cache, name))
    check_aligned(cache, [find_entry(cache, "fake", s, f"{e}@{name}") for s in SMALL for e in ("resnet18", "gpt2")])
    return True


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_hyperparameters_are_refused_up_front(value):
    floats = [f.name for f in dataclasses.fields(TrainConfig) if f.type in (float, "float")]
    assert {"lr", "weight_decay", "temperature", "margin", "mixup", "dropout"} <= set(floats)
    for key in floats:
        with pytest.raises(ConfigError, match=f"'train.{key}' must be a finite number"):
            load_config(None, [f"train.{key}={value}"])
    with pytest.raises(ConfigError, match="'train.lr' must be a finite number"):  # a config built in code
        fit_mod.check_config(dataclasses.replace(TrainConfig(), lr=float(value)))


def test_a_broken_run_folder_never_breaks_commands_about_other_runs(tmp_path, caplog):
    cache = make_cache(tmp_path / "cache", splits=SMALL, reference="")
    _fits(cache, "broken")
    _fits(cache, "other")
    folder = runs.run_dir(cache, "broken")
    for f in folder.iterdir():  # what a diverged run used to leave: config and history, beside its old entries
        if f.name not in ("config.json", "history.csv"):
            f.unlink()
    assert [r.name for r in runs.list_runs(cache)] == ["broken", "other"]
    out = str(tmp_path / "reports")
    base = ["--cache", str(cache), "--dataset", "fake", "--out", out, "--metric", "cka"]
    res = CliRunner().invoke(analyze_main, ["cka", *base])
    assert res.exit_code == 0, res.output
    assert "leaving out cache entry gpt2@broken" in caplog.text and "Run 'broken'" in caplog.text
    scores = json.loads((tmp_path / "reports/fake/test/cka/scores.json").read_text())
    assert "gpt2@other" in scores["entries"] and "gpt2@broken" not in scores["entries"]
    res = CliRunner().invoke(analyze_main, ["report", *base, "--run", "other", "--reference", "", "--bootstrap", "3",
                                            "--permutations", "3"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(analyze_main, ["report", *base, "--run", "broken", "--reference", ""])
    assert res.exit_code == 1 and "Run 'broken'" in res.output  # about the broken run itself: the error


# ----------------------------------------------------------------------------- checks on use
def _rewrite_key(entry, **changes):
    write_entry(entry.path, entry.name, entry.ids, entry.features(), {**entry.key, **changes}, entry.provenance)


def test_tampered_aligned_entry_is_refused_by_analyze(small_cache, caplog):
    cache = small_cache
    _fit(cache, seed=3)
    args = ["--cache", str(cache), "--dataset", "fake", "--image", "resnet18", "--text", "gpt2", "--run", "r",
            "--reference", "dinov2", "--metric", "cka", "--bootstrap", "5", "--permutations", "5", "--k", "3",
            "--out", str(cache.parent / "reports"), "--kernel-rows", "10"]
    ok = CliRunner().invoke(analyze_main, ["platonic", *args])
    assert ok.exit_code == 0, ok.output
    victim = find_entry(cache, "fake", "test", "gpt2@r")
    _rewrite_key(victim, adapter_sha256="0" * 64)
    cka = ["cka", "--cache", str(cache), "--dataset", "fake", "--metric", "cka", "--out", str(cache.parent / "reports")]
    for command in (["platonic", *args], ["report", *args[:-2]], [*cka, "--entries", "gpt2,gpt2@r"]):
        res = CliRunner().invoke(analyze_main, command)
        assert res.exit_code == 1, (command[0], res.output)
        assert "'gpt2@r'" in res.output and "another training of run 'r'" in res.output
        assert "fit-adapters --image resnet18 --text gpt2 --name r" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(analyze_main, cka)  # every entry: the tampered one is left out, with a warning
    assert res.exit_code == 0 and "leaving out cache entry gpt2@r" in caplog.text, res.output
    assert "gpt2@r" not in json.loads((cache.parent / "reports/fake/test/cka/scores.json").read_text())["entries"]
    _rewrite_key(find_entry(cache, "fake", "test", "gpt2@r"), adapter_sha256=victim.key["adapter_sha256"])
    assert CliRunner().invoke(analyze_main, ["platonic", *args]).exit_code == 0


def test_aligned_entry_without_its_run_folder_is_refused(small_cache, tmp_path):
    entry = find_entry(small_cache, "fake", "test", "resnet18")
    write_entry(tmp_path / "fake" / "test" / "resnet18@gone.h5", "resnet18@gone", entry.ids, entry.features(),
                {"entry": "resnet18@gone", "run": "gone", "adapter_sha256": "1" * 64}, {})
    with pytest.raises(RunIntegrityError, match="no run folder.*Rerun `fit-adapters"):
        check_aligned(tmp_path, [find_entry(tmp_path, "fake", "test", "resnet18@gone")])


def test_load_run_refuses_a_folder_that_mixes_trainings(small_cache, tmp_path):
    _fit(small_cache, seed=4)
    folder = tmp_path / "runs" / "r"
    folder.parent.mkdir()
    os.system(f"cp -r {runs.run_dir(small_cache, 'r')} {folder}")
    weights = folder / "adapters.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(RunIntegrityError, match="adapters.safetensors .* is not the file adapters.json describes"):
        load_run(folder)
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    assert load_run(folder).embed("image", np.ones((1, 24))).shape == (1, 16)
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics, "adapter_sha256": "2" * 64}))
    with pytest.raises(RunIntegrityError, match="metrics.json was measured with other adapters"):
        verify_run(folder)


def test_pairs_leaves_out_a_run_whose_metrics_are_of_other_adapters(small_cache, tmp_path, caplog):
    _fit(small_cache, seed=5)
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(12)]
    for name, modality in (("resnet18", "image"), ("gpt2", "text")):
        key = {"entry": name, "encoder": {"name": name, "modality": modality}, "fingerprint": "fp"}
        write_entry(tmp_path / "fake" / "test" / f"{name}.h5", name, ids, rng.normal(size=(12, 4)), key, {})
    folder = tmp_path / "runs" / "r"
    os.system(f"mkdir -p {folder.parent} && cp -r {runs.run_dir(small_cache, 'r')} {folder}")
    args = ["pairs", "--cache", str(tmp_path), "--dataset", "fake", "--metric", "cka", "--out", str(tmp_path / "out")]
    assert CliRunner().invoke(analyze_main, args).exit_code == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics, "adapter_sha256": "2" * 64}))
    res = CliRunner().invoke(analyze_main, args)  # its numbers are not used; the other runs still are
    assert res.exit_code == 0 and "leaving out run r: Run 'r'" in caplog.text and "Rerun `fit-adapters" in caplog.text
    assert json.loads((tmp_path / "out/fake/test/pairs/pairs.json").read_text())["runs_used"] == 0


# ----------------------------------------------------------------------------- kill -9 (slow)
FIT_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {repo!r})
    from tests.test_train import tiny_cfg
    from train.fit import fit_adapters
    print("ready", flush=True)
    fit_adapters(tiny_cfg({cache!r}, epochs=3, name="r", seed=int(sys.argv[1]), reference=""), progress=False)
    print("done", flush=True)
""")


@pytest.mark.slow
def test_kill_9_during_fit_adapters_never_leaves_a_mixed_run(tmp_path):
    cache = make_cache(tmp_path / "cache", splits=SMALL, reference="dinov2")
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT.format(repo=str(REPO), cache=str(cache)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(seed):
        proc = subprocess.Popen([sys.executable, str(script), str(seed)], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"  # imports done: the fit starts now
        return proc

    proc = start(100)
    t0 = time.perf_counter()
    assert proc.wait(timeout=300) == 0
    duration = time.perf_counter() - t0  # one fit, from reading the cache to the commit
    rng = random.Random(0)
    seeds, outcomes = {100}, []
    for trial in range(6):
        seed = 101 + trial
        proc = start(seed)
        time.sleep(rng.uniform(0.3, 1.1) * duration)  # the last part (aligned entries, commit) is short
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got, refused = _check_consistent(cache)  # one training's complete folder, whatever the moment
        assert got in seeds | {seed}, (got, seeds)
        seeds.add(seed)
        outcomes.append((got == seed, len(refused)))
    proc = start(200)
    assert proc.wait(timeout=300) == 0
    assert _check_consistent(cache) == (200, [])  # a clean rerun repairs everything
    assert [p.name for p in (cache / "runs").iterdir() if p.name != ".lock"] == ["r"]  # no leftovers
    print("kill -9 outcomes (new run committed, aligned entries refused):", outcomes)
