"""Studies: grids of runs (encoders x adapters x data size x seeds ...) summarised with
uncertainty over repeats. ``study.run(cfg)`` is ``study.runner.run_study``; the ``study``
command is ``study.cli``."""

from study.runner import StudyResult, run_study

run = run_study

__all__ = ["StudyResult", "run", "run_study"]
