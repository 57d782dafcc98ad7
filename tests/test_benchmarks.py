"""Every script in benchmarks/ runs in its quick mode, so that none can rot unnoticed.

Scripts are found by globbing benchmarks/*.py and benchmarks/*.sh. A Python script runs with
``--quick`` (tiny sizes, tiny encoders, seconds), a shell script with ``--dry-run`` (its whole
sequence on CPU at tiny sizes); each in a subprocess from the repository root with the repository
first on PYTHONPATH, as a user would type it. The run must exit 0 and print its table's header
(``HEADERS``). A new script fails here until it has that mode and a line in ``HEADERS``.

No script is excluded: the two that are not benchmarks have quick modes too (bad_inputs.py
--quick checks that every replay test it lists exists without running them, as the suite runs
them anyway; small_data_tables.py --quick prints the tables of a generated study folder).

The runs are marked slow: about 20 Python processes (torch imports alone take 4-5 s of CPU each)
and about 3 CPU-minutes in all, run two at a time (about 1.5 minutes on 2 idle cores). The check
that every script is listed is not slow, so a new script without an entry fails in every run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for pattern in ("*.py", "*.sh") for p in (ROOT / "benchmarks").glob(pattern)
                 if p.name != "__init__.py")
QUICK_FLAG = {".py": "--quick", ".sh": "--dry-run"}
TIMEOUT_S = 600  # per script; each takes seconds of CPU, but CI machines can be slow and shared

# script -> lines its quick run must print (regular expressions, searched in stdout): its table's
# header, and for scripts that print sentences rather than a table, the sentence with the result.
HEADERS = {
    "bad_inputs.py": [r"kind\s+cases\s+what the user gets", r"replay tests collected"],
    "bench_aligned.py": [r"measure\s+aligned /s\s+baseline /s\s+ratio\s+goal", r"exactness: max \|embed_images"],
    "bench_distributed_extract.py": [r"procs threads/proc\s+rows compute s\s+items/s\s+wall s\s+max \|diff\|"],
    "bench_extract.py": [r"random models build \(meta device\)",
                         r"encoder\s+precision decode\s+items\s+pipeline/s\s+steady/s\s+bare/s\s+ratio steady ratio",
                         r"encoder\s+load s\s+peak RSS MiB"],
    "bench_integrity.py": [r"encoder\s+rows\s+on s\s+off s\s+on/off\s+rerun on\s+rerun off"],
    "bench_metrics.py": [r"estimator\s+feature s\s+naive s\s+speed-up", r"metric\s+value\s+time s\s+peak MiB"],
    "bench_platonic_controls.py": [r"with controls: [\d.]+ s", r"ratio: [\d.]+x"],
    "bench_platonic_ties.py": [r"speed-up slow/fast: [\d.]+x; identical scores, deltas and permutation p-values: True"],
    "bench_search.py": [r"n\s+engine\s+nlist\s+build s\s+memory MiB\s+query peak"],
    "bench_stream_train.py": [r"mode\s+after import\s+peak RSS\s+peak anon\s+steps/s", r"streaming throughput"],
    "bench_study_parallel.py": [r"study.jobs = 1: \d+ cells", r"speed-up of --jobs 2 over serial: [\d.]+x",
                                r"overhead per cell: "],
    "bench_tokens.py": [r"tokens\s+rows\s+items/s\s+bytes/row\s+ratio\s+goal",
                        r"adapter\s+input width\s+ms/step\s+pairs/s\s+slowdown"],
    "bench_train.py": [r"fit_adapters, \d+ epochs:", r"speed-up: [\d.]+x \(training steps\)"],
    "curation_accuracy.py": [r"top-1 nearest prototype over the whole pool: [\d.]+",
                             r"per-concept\s+chosen\s+accuracy\s+covered\s+full\s+time s"],
    "curation_tables.py": [r"\| train set \| pairs \| cells \| mean R \|", r"\| curated - random \|",
                           r"\| loss \| cells \| mean R \|"],
    "coverage_platonic.py": [r"metric\s+side\s+theta_n\s+MC err\s+coverage\s+mean width"],
    "gpu_check.sh": [r"encoder\s+precision decode\s+items\s+pipeline/s", r"speed-up: [\d.]+x \(training steps\)",
                     r"every step passed"],
    "small_data_tables.py": [r"\| recipe \| train pairs \| val mean_R \|", r"chosen on val: "],
}


def test_every_benchmark_has_a_quick_mode_and_a_header():
    """Fast: each script names its quick flag and has an entry in HEADERS (and no entry is stale)."""
    for name in SCRIPTS:
        flag = QUICK_FLAG[Path(name).suffix]
        assert flag in (ROOT / "benchmarks" / name).read_text(), (
            f"benchmarks/{name} has no {flag}: give it one (tiny sizes, tiny encoders, seconds) that runs the "
            "same code and prints the same table")
        assert name in HEADERS, (f"benchmarks/{name} is not in HEADERS of tests/test_benchmarks.py: add the "
                                 f"header line(s) its {flag} run prints")
    assert not set(HEADERS) - set(SCRIPTS), f"HEADERS lists scripts that are gone: {set(HEADERS) - set(SCRIPTS)}"


def _run_quick(name: str, out: Path) -> tuple[list[str], subprocess.CompletedProcess]:
    script = ROOT / "benchmarks" / name
    flag = QUICK_FLAG[script.suffix]
    cmd = ["bash", str(script), flag] if script.suffix == ".sh" else [sys.executable, str(script), flag]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "OUT": str(out), "MPLBACKEND": "Agg"}
    return cmd, subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def quick_runs(request, tmp_path_factory):
    """{script: future of (command, CompletedProcess)} for the selected scripts, started together in a
    few threads: the quick runs use one core each (OMP_NUM_THREADS=1), so two at a time on 2 cores
    halve the wall time. The slowest are submitted first."""
    names = [item.callspec.params["name"] for item in request.session.items
             if getattr(item, "originalname", "") == "test_benchmark_runs_in_its_quick_mode"]
    first = ("gpu_check.sh", "bench_stream_train.py", "bench_distributed_extract.py")
    names.sort(key=lambda n: (n not in first, first.index(n) if n in first else 0))
    with ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
        futures = {n: pool.submit(_run_quick, n, tmp_path_factory.mktemp(n.replace(".", "_"))) for n in names}
        yield futures
        for future in futures.values():
            future.cancel()


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_in_its_quick_mode(name, quick_runs):
    cmd, run = quick_runs[name].result()
    flag = QUICK_FLAG[Path(name).suffix]
    tail = f"\n--- stdout (end) ---\n{run.stdout[-3000:]}\n--- stderr (end) ---\n{run.stderr[-3000:]}"
    assert run.returncode == 0, f"`{' '.join(cmd[1:])}` exited {run.returncode}{tail}"
    assert name in HEADERS, f"add benchmarks/{name}'s header line(s) to HEADERS in tests/test_benchmarks.py{tail}"
    for header in HEADERS[name]:
        assert re.search(header, run.stdout), f"`{name} {flag}` did not print /{header}/{tail}"
