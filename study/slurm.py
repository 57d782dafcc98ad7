"""``study --launcher slurm``: a launch as SLURM jobs, submitted through submitit.

Two submissions: the extraction job (``study.workers.prepare_task``: every cell's entries made or
verified once), then a job array of ``min(array_size, trainings left)`` tasks
(``study.workers.array_task``: each claims and runs units until none is left) that starts only
when the extraction job has succeeded (``--dependency=afterok:<id>``). ``study`` returns once
both are submitted; ``study --status`` shows what runs, ``study --summarize`` (or ``study`` again
once the array has ended) writes the tables, figures and report. Job scripts and logs:
``<study>/slurm/<job id>_*``. The settings (``[study.slurm]``, checked by :func:`slurm_settings`):
partition, timeout_min, gpus_per_task, cpus_per_task, mem_gb, array_size, setup (shell lines
before each task) and additional (any other sbatch flag).

submitit's other executors run the same job code: the tests use ``cluster="local"``
(subprocesses on this machine), which has no job dependencies, so there the extraction job is
waited for before the array is submitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import SLURM_DEFAULTS
from pipeline.errors import did_you_mean
from study.grid import StudyError
from study.workers import Plan, array_task, prepare_task

log = logging.getLogger(__name__)

LOGS_DIR = "slurm"  # <study>/slurm/: submitit's job scripts, pickles and logs
RULES = {  # key: (types, check, allowed)
    "partition": (str, lambda v: True, "a partition name"),
    "timeout_min": (int, lambda v: v >= 1, ">= 1"),
    "gpus_per_task": (int, lambda v: v >= 0, ">= 0"),
    "cpus_per_task": (int, lambda v: v >= 1, ">= 1"),
    "mem_gb": ((int, float), lambda v: v > 0, "> 0"),
    "array_size": (int, lambda v: v >= 1, ">= 1"),
    "setup": (list, lambda v: all(isinstance(x, str) for x in v), "a list of shell lines"),
    "additional": (dict, lambda v: True, "a table of sbatch flags"),
}


@dataclass
class Submission:
    """What ``submit`` submitted: job ids, the number of array tasks, the log folder and the
    submitit jobs (``jobs[0]`` is the extraction job)."""

    prep_job: str
    array_job: str
    tasks: int
    logs: Path
    jobs: list = field(default_factory=list)


def slurm_settings(study) -> dict[str, Any]:
    """``study.slurm`` over its defaults, checked: unknown keys (close matches), types, ranges."""
    given = dict(study.slurm)
    for key in given:
        if key not in SLURM_DEFAULTS:
            raise StudyError(f"Unknown key study.slurm.{key}.{did_you_mean(key, SLURM_DEFAULTS)} "
                             f"Known: {', '.join(SLURM_DEFAULTS)}.")
    settings = {**SLURM_DEFAULTS, **given}
    for key, (types, ok, allowed) in RULES.items():
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
            raise StudyError(f"study.slurm.{key} = {value!r} is out of range: it must be {allowed}.")
    return settings


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " / ".join(lines[-3:]) or type(exc).__name__


def submit(plan: Plan, tasks: int, cluster: str = "slurm") -> Submission:
    """Submit the extraction job and the training array of ``tasks`` tasks (module docstring)."""
    s = slurm_settings(plan.config.study)
    try:
        import submitit  # an optional extra: pip install 'platonic-align[slurm]'
        from submitit.core.utils import UncompletedJobError
    except ImportError:
        raise StudyError("`study --launcher slurm` needs submitit: pip install 'platonic-align[slurm]' "
                         "(or pip install submitit).") from None
    logs = plan.folder / LOGS_DIR
    try:
        executor = submitit.AutoExecutor(folder=logs / "%j", cluster=cluster)
    except RuntimeError as exc:
        raise StudyError(f"`study --launcher slurm` submits through submitit, which needs SLURM's `sbatch` and `srun` "
                         f"on PATH ({_one_line(exc)}). Run it on a login node of the cluster, or run the cells on "
                         f"this machine with --jobs N.") from None
    params = {"name": f"study-{plan.config.study.name}", "timeout_min": s["timeout_min"], "mem_gb": s["mem_gb"],
              "cpus_per_task": s["cpus_per_task"], "gpus_per_node": s["gpus_per_task"],
              "slurm_setup": list(s["setup"]), "slurm_additional_parameters": dict(s["additional"])}
    if s["partition"]:
        params["slurm_partition"] = s["partition"]
    def refused(exc: BaseException) -> StudyError:  # sbatch's own message (its stderr), or no sbatch at all
        return StudyError(f"SLURM refused the submission: {_one_line(exc)}. Check [study.slurm] (partition = "
                          f"{s['partition']!r}, timeout_min = {s['timeout_min']}, gpus_per_task = "
                          f"{s['gpus_per_task']}, additional = {s['additional']!r}).")

    try:
        executor.update_parameters(**params)
        prep = executor.submit(prepare_task, plan)
    except (UncompletedJobError, OSError, ValueError) as exc:
        raise refused(exc) from None
    if executor.cluster == "slurm":
        executor.update_parameters(slurm_dependency=f"afterok:{prep.job_id}", slurm_array_parallelism=tasks)
    else:  # no dependencies outside SLURM: wait for the entries
        try:
            prep.result()
        except UncompletedJobError as exc:
            raise StudyError(f"The extraction job {prep.job_id} failed: {_one_line(exc)} (logs in {logs}).") from None
    try:
        array = executor.map_array(array_task, [plan] * tasks, list(range(tasks)))
    except (UncompletedJobError, OSError, ValueError) as exc:
        raise refused(exc) from None
    log.info("submitted extraction job %s and %d training tasks %s", prep.job_id, tasks, array[0].job_id)
    return Submission(str(prep.job_id), str(array[0].job_id).split("_")[0], tasks, logs, [prep, *array])
