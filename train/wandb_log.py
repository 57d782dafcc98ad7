"""Optional experiment tracking with Weights & Biases for fit-adapters.

With ``train.wandb = true`` a run logs: the resolved configuration (``wandb.config``), every
history row as one step (``step`` = epoch; non-finite values are left out), and at the end the
test retrieval table of the adapters and baselines (``test_retrieval``), the history as a table
(``history``), the figures of the run folder (``curves.png``) and a flat summary (best epoch,
``test/<method>/<key>``, the tracked Platonic values of the best epoch).

``train.wandb_mode``: ``offline`` (the default) writes the W&B run into ``<run folder>/wandb/``
with no login and no network (upload later with ``wandb sync <run folder>/wandb/offline-run-*``);
``online`` needs a login and falls back to offline, with a warning, when W&B cannot be
reached; ``disabled`` makes every W&B call a no-op. ``train.wandb_group`` groups runs (a study
sets it to its name), ``train.wandb_project`` names the project.

With ``train.wandb = false`` (the default) nothing here imports ``wandb``: ``open_logger``
returns a ``NullLogger`` and the package need not be installed (``pip install -e '.[wandb]'``
installs it).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.config import PipelineConfig, TrainConfig
from pipeline.errors import did_you_mean
from train.errors import TrainError

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")  # train.wandb_mode values (wandb.init's mode)
JOB_TYPE = "fit-adapters"
RECALL_COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_R")


def check_settings(tc: TrainConfig) -> None:
    """A known ``train.wandb_mode`` (checked even with logging off, so a typo shows at once)."""
    if tc.wandb_mode not in MODES:
        raise TrainError(f"train.wandb_mode = {tc.wandb_mode!r} is not a mode.{did_you_mean(tc.wandb_mode, MODES)} "
                         f"Use one of: {', '.join(MODES)}.")


class NullLogger:
    """Tracking off: every call does nothing."""

    enabled = False

    def log_epoch(self, row: Mapping) -> None:
        pass

    def finish(self, metrics: Mapping, history: Sequence[Mapping], figures: Sequence[Path]) -> None:
        pass


def _finite(row: Mapping) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class WandbLogger:
    """One W&B run: ``wandb`` is the imported module, ``run`` what ``wandb.init`` returned."""

    enabled = True

    def __init__(self, wandb, run):
        self.wandb, self.run = wandb, run

    def log_epoch(self, row: Mapping) -> None:
        """One history row (one epoch) as one step."""
        self.run.log(_finite(row), step=int(row["epoch"]))

    def finish(self, metrics: Mapping, history: Sequence[Mapping], figures: Sequence[Path]) -> None:
        """Final tables, figures and summary (``metrics``: the run's metrics.json document), then close."""
        test = metrics.get("test", {})
        table = self.wandb.Table(columns=["method", *RECALL_COLUMNS],
                                 data=[[m, *(r.get(c) for c in RECALL_COLUMNS)] for m, r in test.items()])
        cols = list(dict.fromkeys(k for row in history for k in row))
        hist = self.wandb.Table(columns=cols, data=[[row.get(c) for c in cols] for row in history])
        images = {Path(p).stem: self.wandb.Image(str(p)) for p in figures if Path(p).is_file()}
        self.run.log({"test_retrieval": table, "history": hist, **images})
        summary = {"best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
                   **{f"test/{m}/{k}": v for m, r in test.items() for k, v in _finite(r).items()}}
        for m, values in (metrics.get("tracking") or {}).get("best", {}).items():
            summary.update({f"best/{k}": v for k, v in _finite(values).items()})
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        self.run.finish()


def _import_wandb():
    try:
        import wandb  # noqa: PLC0415  (optional, heavy: imported only when tracking is on)
    except ImportError:
        raise TrainError("train.wandb = true needs the wandb package: pip install -e '.[wandb]' "
                         "(or set train.wandb = false).") from None
    return wandb


def open_logger(cfg: PipelineConfig, name: str, run_dir: Path, group: str | None = None) -> NullLogger | WandbLogger:
    """The run's logger: a NullLogger when ``train.wandb`` is false (``wandb`` is not imported),
    else a W&B run named ``name`` in ``train.wandb_project``, grouped by ``group`` or
    ``train.wandb_group``, writing under ``run_dir``."""
    tc = cfg.train
    check_settings(tc)
    if not tc.wandb:
        return NullLogger()
    wandb = _import_wandb()
    kwargs = {"project": tc.wandb_project, "name": name, "group": group or tc.wandb_group or None,
              "config": {"source": cfg.source, **cfg.to_dict()}, "dir": str(run_dir), "job_type": JOB_TYPE}
    try:
        run = wandb.init(mode=tc.wandb_mode, **kwargs)
    except Exception as exc:  # noqa: BLE001  (no login / no network: any W&B failure falls back)
        if tc.wandb_mode != "online":
            raise
        log.warning("W&B online logging failed (%s); logging offline under %s instead", exc, run_dir)
        run = wandb.init(mode="offline", **kwargs)
    return WandbLogger(wandb, run)
