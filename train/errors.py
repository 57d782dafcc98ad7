"""The training stage's errors (a leaf module: every train module may import it)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError


class TrainError(PipelineError, RuntimeError):
    """A problem with the training inputs or the run (the message says what to do)."""


class ConfigValueError(TrainError, ValueError):
    """A ``[train]`` value that is out of range or names nothing (adapter kind, schedule)."""


def out_of_range(key: str, value, allowed: str) -> ConfigValueError:
    """The error for ``train.<key> = value`` outside ``allowed`` (e.g. ">= 1"), naming the flag to fix it."""
    return ConfigValueError(f"train.{key} = {value!r} is out of range: it must be {allowed} "
                            f"(set it with --set train.{key}=VALUE).")


class AdapterMismatchError(TrainError):
    """Adapters applied to features (or a cache entry) they were not trained for."""


class TrainingDiverged(TrainError):
    """The loss became non-finite or exploded. ``message`` may hold ``{kept}`` (what happened to the
    run folder, filled in once it is known); ``checkpoint``: the epoch of the last good weights, or None."""

    def __init__(self, message: str, checkpoint: int | None = None):
        super().__init__(message.replace("{kept}", "rank 0 keeps the run's record"))
        self.message, self.checkpoint = message, checkpoint

    def with_record(self, final: Path, committed: bool) -> "TrainingDiverged":
        """This error saying what became of run folder ``final``: the diverged run's record was
        committed there (``committed``), or a finished run of that name was kept untouched."""
        if not committed:
            kept = (f"the previous run {final.name!r} in {final} is kept unchanged (this attempt was discarded; "
                    f"train it under another --name to keep its history)")
        elif self.checkpoint is not None:
            kept = f"the last good checkpoint (epoch {self.checkpoint}) is kept in {final}"
        else:
            kept = f"no checkpoint was written (history in {final})"
        return TrainingDiverged(self.message.replace("{kept}", kept), self.checkpoint)
