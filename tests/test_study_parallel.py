"""Parallel studies: claims and heartbeats, --jobs N workers, two launches at once, kill -9 of a
worker, the SLURM launcher (submitit's local executor; a fake sbatch for the job settings and
sbatch's refusals), --status, --summarize, progress lines and the bad inputs of each. Generated
data, tiny random encoders; the answer of every launcher is compared with the serial run's."""

from __future__ import annotations

import csv
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import study.cells
import study.runner
from extract.run import extract
from pipeline.config import load_config, with_values
from study.claims import HOST, claims_dir, list_claims, read_claim, try_claim
from study.cli import main as study_cli
from study.grid import StudyError, expand
from study.runner import run_study, status_of, summarize_study
from study.slurm import submit
from study.workers import ENTRIES_FILE, Plan, work
from tests.fixtures import make_flickr30k
from tests.test_study import BASE

ROOT = Path(__file__).resolve().parents[1]
AXES = {"train.seed": [0, 1], "analyze.k": [2, 3]}  # 4 cells, 2 trainings (k is an analysis setting)
VALUES = {"analyze.metrics": ["cka", "mutual_knn"], "train.track_metrics": ["cka"], "study.repeat": "train.seed"}
TIMING = "run.train_time_s"  # columns (and their summaries) that differ between launches, besides "run" (the
#   run name carries the study's name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(config file, output folder) with every tiny encoder extracted."""
    root = tmp_path_factory.mktemp("parallel")
    data = make_flickr30k(root / "data", n_per_split=(16, 6, 6))
    path = root / "base.toml"
    path.write_text(BASE.format(data=data, cache=root / "cache"))
    extract(load_config(path))
    return path, root / "out"


def config(world, name: str, axes=None, **values):
    path, out = world
    return with_values(load_config(path), {"study.name": name, "study.axes": axes or AXES, "analyze.out": str(out),
                                           **VALUES, **values})


def folder_of(world, name: str) -> Path:
    return world[1] / "flickr30k" / "test" / "studies" / name


def table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "run" and not k.startswith(TIMING)} for r in csv.DictReader(fh)]


def cli(world, name: str, *args: str) -> list[str]:
    """The command line of `python -m study.cli` on the world's config (a separate process)."""
    path, out = world
    sets = [a for k, v in {**{f"study.axes.{k}": v for k, v in AXES.items()}, **VALUES}.items()
            for a in ("--set", f"{k}={v!r}".replace("'", '"'))]
    return [sys.executable, "-m", "study.cli", "--config", str(path), "--name", name, "--set", f"analyze.out={out}",
            *sets, *args]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def serial(world):
    """The serial run every other launch must reproduce: (cells.csv rows, summary.csv rows)."""
    result = run_study(config(world, "serial"), progress=False)
    assert result.failed == 0 and result.ran == 4 and result.trained == 2
    return table(result.folder / "cells.csv"), table(result.folder / "summary.csv")


# ----------------------------------------------------------------------------- claims
def test_a_claim_is_exclusive_heartbeats_and_is_released(tmp_path):
    claim = try_claim(tmp_path, "run-a", {"cells": ["c1"], "worker": 0}, timeout=0.5)
    assert claim is not None and try_claim(tmp_path, "run-a", {}, timeout=0.5) is None  # held: live pid, this host
    with claim:
        info = read_claim(claim.path, 0.5)
        assert (info.doc["host"], info.doc["pid"], info.cells, info.stale) == (HOST, os.getpid(), ["c1"], False)
        before = claim.path.stat().st_mtime_ns
        time.sleep(0.3)  # several heartbeats (every timeout / 10 s)
        assert claim.path.stat().st_mtime_ns > before
    assert not claim.path.exists() and list_claims(tmp_path, 0.5) == []


def test_stale_claims_are_taken_over_and_the_old_owner_notices(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = claims_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "dead.json").write_text(f'{{"host": "{HOST}", "pid": {int(gone.stdout)}, "cells": ["x"]}}')
    assert "has ended" in read_claim(folder / "dead.json", 300).reason  # same host, process gone: at once
    (folder / "far.json").write_text('{"host": "elsewhere", "pid": 1, "cells": ["y"]}')
    assert try_claim(tmp_path, "far", {}, timeout=300) is None  # another host, fresh heartbeat: live
    old = time.time() - 400
    os.utime(folder / "far.json", (old, old))
    assert "no heartbeat for 400 s" in read_claim(folder / "far.json", 300).reason
    mine = [try_claim(tmp_path, key, {"cells": [key]}, timeout=300) for key in ("dead", "far")]
    assert all(c is not None for c in mine)  # both taken over
    assert [(c.doc["pid"], c.cells) for c in list_claims(tmp_path, 300)] == [(os.getpid(), ["dead"]),
                                                                            (os.getpid(), ["far"])]
    # the old owner of a claim that was taken over sees it lost, and does not delete the new owner's file
    held = mine[0]
    os.replace(held.path, folder / ".dead.json.stale")  # what a takeover does: the old file moves away ...
    (folder / "dead.json").write_text('{"host": "elsewhere", "pid": 2}')  # ... and a new claim is created
    assert held.lost
    held.release()
    assert (folder / "dead.json").exists()
    mine[1].release()
    assert not (folder / "far.json").exists()


def test_racing_workers_take_a_stale_claim_exactly_once(tmp_path):
    folder = claims_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "unit.json").write_text('{"host": "elsewhere", "pid": 1}')
    old = time.time() - 1000
    os.utime(folder / "unit.json", (old, old))
    won, start = [], threading.Barrier(8)

    def race(i):
        start.wait()
        claim = try_claim(tmp_path, "unit", {"worker": i}, timeout=60)
        if claim is not None:
            won.append(claim)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and read_claim(folder / "unit.json", 60).doc["pid"] == os.getpid()
    won[0].release()


# ----------------------------------------------------------------------------- same answer, entries first
def test_entries_are_made_once_before_any_cell_trains(world, serial, monkeypatch):
    events = []
    real_extract, real_fit = study.cells.extract, study.cells.fit_adapters
    monkeypatch.setattr(study.cells, "extract", lambda c, **k: events.append("extract") or real_extract(c, **k))
    monkeypatch.setattr(study.cells, "fit_adapters", lambda c, **k: events.append("fit") or real_fit(c, **k))
    cfg = config(world, "first", {"train.seed": [0, 1], "analyze.k": [2]})
    result = run_study(cfg, progress=False)
    assert result.ran == 2 and events == ["extract", "fit", "fit"]  # one request, verified once, before training
    assert (result.folder / ENTRIES_FILE).is_file() and not list(claims_dir(result.folder).glob("*.json"))

    def no_extraction(*a, **k):
        raise AssertionError("a worker extracted")

    monkeypatch.setattr(study.cells, "extract", no_extraction)  # a fresh worker reads entries.json instead
    assert work(Plan(cfg, result.folder, "another-launch")) == 0


def test_two_workers_give_the_serial_answer(world, serial):
    result = run_study(config(world, "jobs2", **{"study.jobs": 2}), progress=False)
    assert result.failed == 0 and result.ran == 4 and result.trained == 2
    docs = [study.cells.read_result(p) for p in sorted((result.folder / "cells").glob("*.json"))]
    assert len({d["by"]["pid"] for d in docs}) == 2 and os.getpid() not in {d["by"]["pid"] for d in docs}
    by_run = {}
    for d in docs:
        by_run.setdefault(d["run"], set()).add(d["by"]["pid"])
    assert all(len(p) == 1 for p in by_run.values())  # the cells of one training ran in one worker
    assert (table(result.folder / "cells.csv"), table(result.folder / "summary.csv")) == serial


def test_the_slurm_launcher_with_submitits_local_executor_gives_the_serial_answer(world, serial, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(study.runner, "submit", functools.partial(submit, cluster="local"))
    cfg = config(world, "local-slurm", **{"study.launcher": "slurm", "study.slurm": {"gpus_per_task": 0,
                                                                                       "array_size": 3}})
    result = run_study(cfg, progress=False)
    sub = result.submission
    assert sub is not None and sub.tasks == 2  # at most one task per training
    assert all(job.result() is not None for job in sub.jobs)  # the extraction job, then the array tasks
    lines = status_of(cfg)
    assert lines[0] == "study local-slurm: 4 cells: 4 done, 0 failed, 0 running, 0 left"
    assert any("SLURM: extraction job" in line for line in lines)
    done = summarize_study(cfg)
    assert done.failed == 0 and done.ran == 4 and done.trained == 2
    assert (table(done.folder / "cells.csv"), table(done.folder / "summary.csv")) == serial
    assert (done.folder / "study.html").is_file()
    again = run_study(cfg, progress=False)  # everything is finished: nothing to submit, the tables are written
    assert again.submission is None and again.failed == 0


# ----------------------------------------------------------------------------- concurrency and kills
def _start(world, name: str, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as fh:  # a file, not a pipe: a full pipe would stop the process
        return subprocess.Popen(cli(world, name, *args), env=environment(), stdout=fh, stderr=subprocess.STDOUT,
                                text=True)


def test_two_launches_at_once_never_run_a_cell_twice(world, serial, tmp_path):
    procs = [_start(world, "twice", tmp_path / f"{i}.log", "-v") for i in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    ran = [line.split("study.cells: cell ")[1].split()[0] for text in logs for line in text.splitlines()
           if "study.cells: cell " in line]
    assert len(ran) == 4 and sorted(ran) == sorted(set(ran)), logs  # every cell once, by one of the two
    assert table(folder_of(world, "twice") / "cells.csv") == serial[0]


def test_a_worker_killed_mid_cell_has_its_cell_rerun(world, tmp_path):
    proc = _start(world, "killed", tmp_path / "log", "--jobs", "2", "--set", "train.epochs=40")
    folder = folder_of(world, "killed")
    victim, deadline = None, time.time() + 300
    while victim is None and time.time() < deadline and proc.poll() is None:
        for claim in list_claims(folder, 300):
            if claim.doc.get("pid") not in (None, proc.pid):
                victim = claim
                break
        time.sleep(0.05)
    assert victim is not None, (tmp_path / "log").read_text()
    os.kill(victim.doc["pid"], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, (tmp_path / "log").read_text()
    log = (tmp_path / "log").read_text()
    assert "ended with status -9" in log and f"taking over {victim.path.name}" in log, log
    docs = [study.cells.read_result(folder / "cells" / f"{c}.json") for c in victim.cells]
    assert all(d["status"] == "done" and d["by"]["pid"] != victim.doc["pid"] for d in docs)
    assert [r["status"] for r in table(folder / "cells.csv")] == ["done"] * 4


# ----------------------------------------------------------------------------- status, progress, bad input
def test_progress_lines_in_a_log_and_status_of_a_running_claim(world, serial, capsys):
    cfg = config(world, "lines", {"train.seed": [0], "analyze.k": [2, 3]})
    run_study(cfg)  # stderr is not a terminal under pytest: plain lines
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("study lines: ")]
    assert lines[0].startswith("study lines: 2 cells: 0 done, 0 failed, 0 running, 2 left; elapsed 0:00, ETA unknown")
    assert lines[-1].startswith("study lines: 2 cells: 2 done, 0 failed, 0 running, 0 left; elapsed ")
    assert all("ETA" in line for line in lines)
    folder = folder_of(world, "lines")
    held = try_claim(folder, "some-run", {"worker": 3, "cells": [c.cell_id for c in expand(cfg)]}, 300)
    with held:
        status = status_of(cfg)
    assert status[0] == "study lines: 2 cells: 2 done, 0 failed, 1 running, 0 left"
    assert f"running  some-run on {HOST}:{os.getpid()} (worker 3)" in status[1]
    assert status[-2].startswith("last launch ") and "1 worker on" in status[-2]


@pytest.mark.parametrize("values, match", [
    ({"study.jobs": 0}, "study.jobs = 0 is out of range"),
    ({"study.jobs": -2}, "study.jobs = -2 is out of range"),
    ({"study.claim_timeout": 0.0}, "study.claim_timeout = 0.0 is out of range"),
    ({"study.launcher": "slurm", "study.slurm": {"partion": "gpu"}}, "Unknown key study.slurm.partion. Did you mean: "
                                                                      "partition"),
    ({"study.launcher": "slurm", "study.slurm": {"gpus_per_task": "one"}}, "study.slurm.gpus_per_task = 'one'"),
    ({"study.launcher": "slurm", "study.slurm": {"mem_gb": 0}}, "study.slurm.mem_gb = 0 is out of range"),
])
def test_bad_launch_settings_are_refused_before_any_work(world, values, match):
    with pytest.raises(StudyError, match=match):
        run_study(config(world, "bad", **values), progress=False)
    assert not folder_of(world, "bad").joinpath("study.json").exists()


def test_jobs_zero_on_the_command_line_is_one_line(world):
    res = CliRunner().invoke(study_cli, cli(world, "bad", "--jobs", "0")[3:])
    assert res.exit_code == 1 and "study.jobs = 0 is out of range" in res.output and "Traceback" not in res.output


def test_more_jobs_than_trainings_start_only_the_workers_needed(world, serial, caplog):
    caplog.set_level("INFO", logger="study.workers")
    result = run_study(config(world, "many", {"train.seed": [0], "analyze.k": [2, 3]}, **{"study.jobs": 8}),
                       progress=False)
    assert result.failed == 0 and result.ran == 2
    assert "study.jobs = 8 but 1 trainings to run: starting 1 workers" in caplog.text


def test_another_configuration_is_refused_while_it_runs_and_by_status_and_summarize(world, serial):
    cfg = config(world, "serial")
    other = with_values(cfg, {"study.axes": {"train.seed": [0, 1, 2], "analyze.k": [2, 3]}})
    with pytest.raises(StudyError, match="was written by another configuration"):
        summarize_study(other)
    with pytest.raises(StudyError, match="was written by another configuration"):
        status_of(other)
    with pytest.raises(StudyError, match="No study has run in"):
        status_of(config(world, "never-ran"))
    folder = folder_of(world, "serial")
    with try_claim(folder, "someone", {"cells": ["seed-9-0123abcd"]}, 300):  # a live worker of another grid
        with pytest.raises(StudyError, match="is being run with another configuration"):
            run_study(other, progress=False)
    assert summarize_study(cfg).failed == 0  # the folder's own configuration is fine


def _fake_slurm(tmp_path, sbatch: str) -> str:
    """A PATH whose srun does nothing and whose sbatch runs ``sbatch`` (shell)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\n{sbatch}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_slurm_jobs_carry_the_settings_and_the_array_waits_for_the_entries(world, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    scripts = tmp_path / "scripts.txt"
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path, f'cat "$1" >> {scripts}\necho "Submitted batch job 4242"'))
    res = CliRunner().invoke(study_cli, cli(world, "sbatch", "--launcher", "slurm", "--set",
                                            "study.slurm.partition=gpu", "--set", "study.slurm.array_size=2",
                                            "--set", 'study.slurm.additional={account = "lab"}')[3:])
    assert res.exit_code == 0, res.output
    assert "extraction job 4242, then training array 4242 (2 tasks)" in res.output and "study --summarize" in res.output
    text = scripts.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --account=lab", "#SBATCH --array=0-1%2",
                 "#SBATCH --dependency=afterok:4242"):
        assert line in text, line
    assert text.count("#SBATCH --dependency") == 1  # only the training array waits


def test_slurm_refusals_are_one_line(world, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    res = CliRunner().invoke(study_cli, cli(world, "nosbatch", "--launcher", "slurm")[3:])
    assert res.exit_code == 1 and "needs SLURM's `sbatch` and `srun` on PATH" in res.output
    assert "Traceback" not in res.output and "--jobs N" in res.output
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path, 'echo "sbatch: error: invalid partition specified: nogpu" >&2\n'
                                                     'echo "sbatch: error: Batch job submission failed: Invalid '
                                                     'partition name specified" >&2\nexit 1'))
    res = CliRunner().invoke(study_cli, cli(world, "badpart", "--launcher", "slurm", "--set",
                                            "study.slurm.partition=nogpu")[3:])
    assert res.exit_code == 1 and "Traceback" not in res.output
    error = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "SLURM refused the submission: sbatch: error: invalid partition specified: nogpu" in \
        error[0] and "partition = 'nogpu'" in error[0]


def test_workers_share_the_cores_and_take_the_gpus_round_robin(monkeypatch):
    import study.workers as W

    cfg = with_values(load_config(None), {"train.device": "cpu"})
    monkeypatch.setattr(W, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert W.placements(cfg, 4) == [({"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}, 4)] * 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a cap the user set
    assert W.placements(cfg, 4)[0][1] == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert W.placements(cfg, 32)[0][1] == 1  # at least one thread
    monkeypatch.setattr(W.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(W.torch.cuda, "device_count", lambda: 2)
    auto = with_values(cfg, {"train.device": "auto"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in W.placements(auto, 3)] == ["3", "5", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in W.placements(auto, 2)] == ["0", "1"]
    assert "CUDA_VISIBLE_DEVICES" not in W.placements(cfg, 2)[0][0]  # train.device = cpu: no GPU
    with pytest.raises(StudyError, match="every worker would train on the same GPU"):
        W.placements(with_values(cfg, {"train.device": "cuda:1"}), 2)
