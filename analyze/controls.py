"""Controls for the Platonic test: what the statistics look like for embeddings that were NOT
trained with InfoNCE, on the same rows.

The criterion compares an aligned embedding with the mean of the image and text encoders'
alignment to the reference. The reference is itself an image model, so the image side starts
far above the text side, and an embedding can pass the criterion without training having done
anything (a random linear map of a good image encoder keeps much of its geometry). The
controls tell that apart; each is a pair of (image, text) embeddings of the test rows:

    random      untrained adapters of the run's architecture (random initialisation, seeds
                analyze.seed + 0 .. analyze.seed + analyze.control_seeds - 1), applied to the
                run's standardised features (statistics from the run's adapters.json)
    cca         regularised CCA fitted on the train split (train.baselines, as fit-adapters
                reports it: the same standardisation, every caption pair, the run's dim, the
                encoder layers the run was trained on)
    procrustes  PCA + orthogonal Procrustes fitted the same way

``control_stats`` turns the scores of a control into the quantities the test reports: for
each side s the control's delta (after_s of the control minus the same mean before-score)
and the trained delta minus the control delta (= after_s(trained) - after_s(control)), with
paired 95% intervals from the same resampled rows; a control with several seeds is averaged
over its seeds first. The trained adapters "exceed" a control when that interval lies above 0.

A control that cannot be built (no adapters.json in the run folder, no train split in the
cache) is skipped with a note, never silently: the note lands in platonic.json.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from analyze.compare import AnalyzeError
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError, did_you_mean
from pipeline.runs import find_run
from train.adapters import AlignModel
from train.api import Run, load_run
from train.baselines import FROM_MOMENTS, pair_moments
from train.data import load_data

log = logging.getLogger(__name__)

CONTROLS = ("random", "cca", "procrustes")  # names accepted in analyze.controls, in report order
SIDES = ("image", "text")


@dataclass
class Controls:
    """Control embeddings of the test rows. embeddings: name -> one (image (n, e), text (n, e))
    pair per seed; notes: name -> how it was made, or why it was skipped."""

    embeddings: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def check_controls(names: Sequence[str], seeds: int) -> None:
    """Every name must be one of ``CONTROLS``; ``seeds`` >= 1 when ``random`` is asked for."""
    for name in names:
        if name not in CONTROLS:
            raise AnalyzeError(f"Unknown control {name!r} in analyze.controls.{did_you_mean(name, CONTROLS)} "
                               f"Use any of: {', '.join(CONTROLS)} (or [] for none).")
    if "random" in names and seeds < 1:
        raise AnalyzeError(f"analyze.control_seeds = {seeds}: the random control needs at least 1 seed "
                           f"(or drop 'random' from analyze.controls).")


def _random(run: Run, seeds: Sequence[int], X: np.ndarray, Y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Untrained adapters of the run's architecture, one model per seed, on the run's standardisation."""
    tc = run.train  # the run's whole [train] section, as load_run rebuilt it
    dims = {m: run.source(m)["dim"] for m in SIDES}
    out = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
            torch.manual_seed(seed)
            model = AlignModel(dims, tc).eval()
        untrained = Run(run.run_dir, run.config, run.train, model, run.stats)
        out.append((untrained.embed("image", X), untrained.embed("text", Y)))
    return out


def run_layers(run: Run) -> dict[str, int | None]:
    """{"image", "text"} -> the stored hidden layer the run's adapter reads (None = the entry's features)."""
    return {m: run.source(m).get("layer") for m in SIDES}


def _baselines(cfg: PipelineConfig, names: Sequence[str], trained, layers: Mapping[str, int | None],
               X: np.ndarray, Y: np.ndarray) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """CCA / Procrustes fitted on the train split exactly as fit-adapters' baselines (``trained``:
    the run's [train] section; ``layers``: the stored layers its adapters read), applied to X, Y."""
    train_cfg = dataclasses.replace(trained, modalities={}, max_rows_in_memory=0)
    dim = trained.dim
    data = load_data(dataclasses.replace(cfg, train=train_cfg), torch.device("cpu"), splits=("train",), stream=False,
                     layers=layers)
    try:
        train = data.splits["train"]
        mom = pair_moments(train.features["image"], train.features["text"], train.pairs[:, 0], train.pairs[:, 1])
        x = data.stats.apply("image", torch.as_tensor(X, dtype=torch.float32))
        y = data.stats.apply("text", torch.as_tensor(Y, dtype=torch.float32))
        out = {}
        for name in names:
            al = FROM_MOMENTS[name](mom, dim)
            out[name] = [(al.a(x).numpy(), al.b(y).numpy())]
        return out
    finally:
        data.close()


def open_trained(cfg: PipelineConfig, run: str) -> tuple[Run | None, str]:
    """(the run's loaded adapters, "") or (None, why they cannot be loaded)."""
    try:
        return load_run(find_run(cfg.data.cache, run).path), ""
    except (PipelineError, FileNotFoundError) as exc:
        return None, str(exc)


def control_embeddings(cfg: PipelineConfig, run: str, X: np.ndarray, Y: np.ndarray,
                       trained_run: tuple[Run | None, str] | None = None) -> Controls:
    """The controls ``analyze.controls`` asks for, on the test rows X (n, d_x) (image encoder)
    and Y (n, d_y) (text encoder) of run ``run``; see the module docstring. ``trained_run``:
    ``open_trained(cfg, run)`` when the caller has it already."""
    a = cfg.analyze
    check_controls(a.controls, a.control_seeds)
    out = Controls()
    loaded, reason = trained_run or open_trained(cfg, run)
    trained = loaded.train if loaded else cfg.train  # the run's own settings (the command's if unloadable)
    layers = run_layers(loaded) if loaded else {}
    dim = trained.dim
    if "random" in a.controls:
        if loaded is None:
            out.notes["random"] = f"skipped: the run's adapters could not be loaded ({reason})"
        else:
            seeds = [a.seed + i for i in range(a.control_seeds)]
            out.embeddings["random"] = _random(loaded, seeds, X, Y)
            out.notes["random"] = (f"untrained {trained.adapter} adapters (seeds {seeds[0]}..{seeds[-1]}) on the "
                                   f"run's standardised features")
    fitted = [c for c in a.controls if c in FROM_MOMENTS]
    if fitted:
        try:
            out.embeddings.update(_baselines(cfg, fitted, trained, layers, X, Y))
            where = {m: "" if layers.get(m) is None else f" layer {layers[m]}" for m in SIDES}
            for name in fitted:
                out.notes[name] = (f"{name} fitted on the train split ({trained.image}{where['image']} x "
                                   f"{trained.text}{where['text']}), dim {dim}")
        except PipelineError as exc:
            for name in fitted:
                out.notes[name] = f"skipped: no train split to fit it on ({exc})"
    for name, note in out.notes.items():
        if note.startswith("skipped"):
            log.warning("control %s %s", name, note)
    return out


# ----------------------------------------------------------------------------- statistics
def control_columns(controls: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], first: int
                    ) -> dict[str, tuple[list[int], list[int]]]:
    """Column indices of each control's per-seed (image, text) scores when the representations
    are laid out as [trained terms..., control 1 seed 1 image, text, seed 2 image, text, ...],
    starting at column ``first``: name -> (image columns, text columns)."""
    cols, at = {}, first
    for name, pairs in controls.items():
        cols[name] = ([at + 2 * s for s in range(len(pairs))], [at + 2 * s + 1 for s in range(len(pairs))])
        at += 2 * len(pairs)
    return cols


def control_stats(name: str, cols: tuple[list[int], list[int]], point: np.ndarray, draws: np.ndarray,
                  calib: Mapping[str, np.ndarray], before: tuple[np.ndarray, np.ndarray],
                  after: tuple[np.ndarray, np.ndarray], interval: Callable) -> dict:
    """One control's statistics for one metric.

    point (R,) full-sample scores and draws (D, R) resampled (bootstrap or leave-one-out) scores
    of every representation; calib: calibration arrays (R,) of the point scores; before:
    (point (), draws (D,)) of the mean before-score; after: (point (2,), draws (D, 2)) of the
    trained after-scores; interval(theta, draws) -> (lo, hi) for a difference. Returns {"seeds", "terms": {after_<side>: {...}},
    "delta": {side: {delta, ci_lo, ci_hi, excess, excess_ci_lo, excess_ci_hi, exceeds}}}."""
    res = {"seeds": len(cols[0]), "terms": {}, "delta": {}}
    for s, side in enumerate(SIDES):
        c = cols[s]
        ctrl, ctrl_draws = point[c].mean(), draws[:, c].mean(axis=1)
        res["terms"][f"after_{side}"] = {
            "score": ctrl, "calibrated": float(np.mean(calib["calibrated"][c])),
            "threshold": float(np.mean(calib["threshold"][c])), "p_value": float(np.mean(calib["p_value"][c])),
            "per_seed": point[c].tolist()}
        delta, delta_draws = ctrl - before[0], ctrl_draws - before[1]
        excess, excess_draws = after[0][s] - ctrl, after[1][:, s] - ctrl_draws
        dlo, dhi = interval(np.asarray(delta), delta_draws)
        elo, ehi = interval(np.asarray(excess), excess_draws)
        exceeds = bool(elo > 0) if np.isfinite(elo) else None
        res["delta"][side] = {"delta": float(delta), "ci_lo": float(dlo), "ci_hi": float(dhi), "excess": float(excess),
                              "excess_ci_lo": float(elo), "excess_ci_hi": float(ehi), "exceeds": exceeds}
    return res


def versus_controls(controls: Mapping[str, Mapping], side: str) -> tuple[bool | None, str]:
    """(beats every control?, a clause for the verdict sentence) for one side; None without controls
    or without resamples."""
    if not controls:
        return None, "no controls were computed"
    flags = {name: c["delta"][side]["exceeds"] for name, c in controls.items()}
    parts = "; ".join(f"{name}{' (' + str(c['seeds']) + ' seeds)' if c['seeds'] > 1 else ''} delta "
                      f"{c['delta'][side]['delta']:+.3f}, trained minus control {c['delta'][side]['excess']:+.3f} "
                      f"(95% CI {c['delta'][side]['excess_ci_lo']:.3f} to {c['delta'][side]['excess_ci_hi']:.3f})"
                      for name, c in controls.items())
    if any(f is None for f in flags.values()):
        return None, f"against the controls on the same rows ({parts}) no paired interval was computed"
    below = [name for name, f in flags.items() if not f]
    verdict = ("the trained delta exceeds every control" if not below else
               f"the trained delta does not exceed the {', '.join(below)} control{'s' if len(below) > 1 else ''}")
    return not below, f"against the controls on the same rows ({parts}): {verdict}"
