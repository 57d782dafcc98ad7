"""Every cell's whole configuration checked before the first cell runs.

``study.grid.expand`` checks the grid (keys, types, fixed choices); the values that only a stage
knows (an adapter kind, an encoder name, a range such as ``train.epochs >= 1``, a metric or
control name) are checked here with the stages' own up-front checks, for every cell, so that a
typo in one axis value fails the study at once, naming the cell and its axis values, instead of
failing that cell after the others have trained. What depends on the data (a kNN ``k`` larger
than the rows, an entry made for another request) is found when the cell runs and fails that
cell only.
"""

from __future__ import annotations

from typing import Sequence

from analyze.compare import resolve_metrics
from analyze.controls import check_controls
from extract.run import check_request
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from study.cells import extraction_config
from study.grid import Cell, StudyError
from train.fit import check_train


def check_cell(cfg: PipelineConfig) -> None:
    """The checks each stage of a cell makes before it reads data: its extraction request, the
    training configuration, the analysis metrics and (for the Platonic test) the controls."""
    check_request(extraction_config(cfg)[0])
    check_train(cfg.train)
    resolve_metrics(cfg.analyze.metrics)
    if "platonic" in cfg.study.evaluations:
        check_controls(cfg.analyze.controls, cfg.analyze.control_seeds)


def check_cells(cells: Sequence[Cell]) -> None:
    """A StudyError naming the first cell (and its axis values) whose configuration a stage refuses."""
    for cell in cells:
        try:
            check_cell(cell.config)
        except PipelineError as exc:
            values = ", ".join(f"{k} = {v!r}" for k, v in cell.values.items())
            raise StudyError(f"Study cell {cell.index + 1} of {len(cells)} ({values}): {exc}") from None
