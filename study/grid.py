"""The grid of a study: ``[study.axes]`` (dotted config key -> list of values) expanded into cells.

A cell is one combination of axis values (the product of the axes, in the order the axes are
written, the last axis varying fastest) applied to the base configuration. ``[study.variants]``
(variant name -> {dotted key: value}) adds a leading axis ``variant`` whose values are the
variant names: each variant sets several keys at once, for grids that compare named recipes
("plain", "+mixup", "all") rather than the full product of their options. Every cell gets

* ``config_hash``: sha256 of its resolved configuration (every section but ``[study]``, without
  the execution-only keys of ``EXECUTION_KEYS``). The cell's result file records it, and a rerun
  skips a cell only when the file's hash equals the current one (a finished cell is recognised
  by its configuration, not by its name);
* ``run``: the fit-adapters run it trains, ``<study>_<values of the data/extract/train axes>-<hash>``
  with the hash of the training configuration (sections data, extract, train) only, so cells
  that differ only in an ``analyze.*`` axis share one training;
* ``cell_id``: ``<values of every axis>-<config hash>``, the name of its result file.

Everything is checked before any work starts: unknown keys (with close matches), values of the
wrong type (each cell's configuration is built), empty or repeated values, and keys a study
cannot vary (``train.name``: the study names the runs; ``study.*``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.config import SECTIONS, ConfigError, PipelineConfig, config_default, with_values
from pipeline.errors import PipelineError, did_you_mean
from pipeline.names import safe_name
from pipeline.runs import check_names
from pipeline.runtime import dumps_json
from train.subset import read_subset

STUDY_SECTION = "study"
FIXED_KEYS = ("train.name",)  # the study sets these itself
VARIANT_AXIS = "variant"  # the axis [study.variants] adds (its values: the variant names)
EVALUATIONS = ("platonic", "zeroshot")  # study.evaluations: what a cell measures besides test recall
# Keys that change how a cell runs, not what it computes; left out of the configuration hashes.
EXECUTION_KEYS = ("train.name", "train.device", "extract.device", "extract.workers", "extract.batch_size",
                  "extract.chunk_rows", "extract.encoders", "analyze.kernel_rows", "analyze.out")
TRAIN_SECTIONS = ("data", "extract", "train")  # what a run's training depends on
CELL_SECTIONS = ("data", "extract", "train", "analyze")  # what a cell's results depend on ([search] does not)
HASH_CHARS = 8  # hex digits of a hash shown in names
READABLE_MAX = 60  # characters of axis values kept in a name


class StudyError(ConfigError):
    """A [study] section that cannot be run (it is a config error: nothing has started)."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid. values: {axis key: value}; config: the resolved configuration
    (``train.name`` = ``run``)."""

    index: int
    values: dict
    config: PipelineConfig
    config_hash: str
    run: str
    cell_id: str


# ----------------------------------------------------------------------------- axes
def flatten_axes(axes: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted keys: ``{"train": {"seed": [0, 1]}}`` -> ``{"train.seed": [0, 1]}``
    (``[study.axes.train]`` tables and ``--set study.axes.train.seed=[0,1]`` give nested dicts).
    The values of an axis are a list, so every table is a level of the key."""
    out: dict[str, Any] = {}
    for key, value in axes.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_axes(value, name + "."))
        else:
            out[name] = value
    return out


def check_key(key: str) -> None:
    """A StudyError unless ``key`` is a config key a study may vary (close matches in the message)."""
    section, _, rest = key.partition(".")
    if section == STUDY_SECTION:
        raise StudyError(f"Study axis {key!r}: the [study] section cannot be an axis.")
    if key in FIXED_KEYS:
        raise StudyError(f"Study axis {key!r}: the study names each cell's run itself; remove this axis.")
    name, _, deeper = rest.partition(".")
    try:
        default = config_default(f"{section}.{name}")
    except ConfigError as exc:
        raise StudyError(f"Study axis {key!r}: {exc}") from None
    if deeper and not isinstance(default, dict):
        raise StudyError(f"Study axis {key!r}: {section}.{name} is not a table, so it has no key {deeper!r}.")


def check_axes(axes: Mapping[str, Any]) -> dict[str, list]:
    """The axes as {dotted key: list of values}, checked (see the module docstring)."""
    flat = flatten_axes(axes)
    if not flat:
        raise StudyError('study.axes is empty: add a [study.axes] table, e.g. "train.seed" = [0, 1, 2].')
    out = {}
    for key, values in flat.items():
        check_key(key)
        if not isinstance(values, (list, tuple)) or not values:
            raise StudyError(f"Study axis {key!r} must be a non-empty list of values, got {values!r}.")
        seen = [dumps_json(v, indent=None, sort_keys=True) for v in values]
        if len(set(seen)) != len(seen):
            raise StudyError(f"Study axis {key!r} lists a value twice: {list(values)!r}.")
        out[key] = list(values)
    return out


def check_repeat(repeat: str, axes: Mapping[str, list]) -> str:
    """``study.repeat``: "" (none) or one of the axes; a valid config key that is not an axis is
    treated as none (one cell per setting); anything else is an error."""
    if not repeat or repeat in axes:
        return repeat
    try:
        check_key(repeat)
    except StudyError:
        raise StudyError(f"study.repeat = {repeat!r} is not one of the axes ({', '.join(axes)})."
                         f"{did_you_mean(repeat, axes)}") from None
    return ""


# ----------------------------------------------------------------------------- names and hashes
def config_hash(config: PipelineConfig | Mapping, sections=CELL_SECTIONS) -> str:
    """sha256 (hex) of the configuration's ``sections`` without ``EXECUTION_KEYS``. ``config``
    is a PipelineConfig or its ``to_dict()`` tree (e.g. a run's config.json: the same JSON)."""
    tree = config.to_dict() if isinstance(config, PipelineConfig) else config
    tree = {s: dict(v) for s, v in tree.items() if s in sections and isinstance(v, Mapping)}
    digest = _subset_digest(config, tree)
    if digest:  # a train.subset file edited in place is another training
        tree["train"]["subset_sha256"] = digest
    for key in EXECUTION_KEYS:
        section, name = key.split(".")
        if section in tree:
            tree[section].pop(name, None)
    return hashlib.sha256(dumps_json(tree, indent=None, sort_keys=True).encode("utf-8")).hexdigest()


def _subset_digest(config: PipelineConfig | Mapping, tree: Mapping) -> str | None:
    """The sha256 of the ``train.subset`` file: read now for a PipelineConfig, as recorded for a
    run's config.json (``subset``); None without a subset (or an unreadable file: its cell's
    check reports it)."""
    if not (tree.get("train") or {}).get("subset"):
        return None
    if isinstance(config, PipelineConfig):
        try:
            return read_subset(tree["train"]["subset"]).sha256
        except PipelineError:
            return None
    return (config.get("subset") or {}).get("sha256")


def train_hash(config: PipelineConfig | Mapping) -> str:
    """:func:`config_hash` of the sections a training depends on (data, extract, train)."""
    return config_hash(config, TRAIN_SECTIONS)


def _format(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "+".join(_format(v) for v in value)
    elif isinstance(value, Mapping):
        text = "+".join(f"{k}-{_format(v)}" for k, v in value.items())
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def readable(values: Mapping[str, Any]) -> str:
    """``adapter-mlp_train_fraction-0.25_seed-1``: each axis's last key part and value."""
    text = "_".join(f"{k.split('.')[-1]}-{_format(v)}" for k, v in values.items())
    return text[:READABLE_MAX].rstrip("_-")


def check_variants(variants: Mapping[str, Any], axes: Mapping[str, list]) -> dict[str, dict]:
    """``[study.variants]`` as {name: {dotted key: value}}, checked: names usable in file names,
    keys a study may vary (close matches), no key that is also an axis (which would win?)."""
    out = {}
    for name, settings in variants.items():
        if _format(name) != name:
            raise StudyError(f"Study variant {name!r}: a variant name is letters, digits, '.', '+' or '-' "
                             f"(it names files and runs), e.g. {_format(name)!r}.")
        if not isinstance(settings, Mapping):
            raise StudyError(f"Study variant {name!r} must be a table of dotted config keys -> values, e.g. "
                             f'{name} = {{"train.mixup" = 1.0}} ({{}} = the base configuration); got {settings!r}.')
        flat = flatten_axes(settings)
        for key in flat:
            check_key(key)
            if key in axes:
                raise StudyError(f"Study variant {name!r} sets {key!r}, which is also an axis; set it in one place.")
        out[name] = flat
    return out


def study_axes(study) -> dict[str, list]:
    """The grid's axes: ``variant`` (the names of ``[study.variants]``, when there are any) first,
    then ``[study.axes]``, checked (see the module docstring)."""
    if VARIANT_AXIS in flatten_axes(study.axes):
        raise StudyError(f"Study axis {VARIANT_AXIS!r} is made by [study.variants]; list the variants there.")
    axes = check_axes(study.axes) if study.axes or not study.variants else {}
    if study.variants:
        axes = {VARIANT_AXIS: list(check_variants(study.variants, axes)), **axes}
    return axes


def cell_settings(study, values: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys one cell sets: its variant's keys, then its other axis values."""
    settings = {k: v for k, v in values.items() if k != VARIANT_AXIS}
    if VARIANT_AXIS in values:
        settings = {**flatten_axes(study.variants[values[VARIANT_AXIS]]), **settings}
    return settings


# ----------------------------------------------------------------------------- expansion
def expand(config: PipelineConfig) -> list[Cell]:
    """Every cell of ``config.study``'s grid, checked up front (see the module docstring)."""
    study = config.study
    name = _format(study.name) if study.name else ""
    if not name or name != study.name:
        raise StudyError(f"study.name = {study.name!r} must be a non-empty name of letters, digits, '.', '+' "
                         f"or '-' (it names a folder and the runs), e.g. {name or 'adapters-vs-data'!r}.")
    safe_name(name, "study.name")  # a folder name: also short enough
    axes = study_axes(study)
    for evaluation in study.evaluations:
        if evaluation not in EVALUATIONS:
            raise StudyError(f"Unknown study.evaluations entry {evaluation!r}.{did_you_mean(evaluation, EVALUATIONS)} "
                             f"Use some of: {', '.join(EVALUATIONS)}.")
    cells = []
    for index, combo in enumerate(itertools.product(*axes.values())):
        values = dict(zip(axes, combo))
        settings = cell_settings(study, values)
        try:
            cfg = with_values(config, settings, f"study axes, cell {readable(values)}")
        except ConfigError as exc:
            raise StudyError(str(exc)) from None
        h = config_hash(cfg)
        trains = any(k.split(".")[0] in TRAIN_SECTIONS for k in settings if k not in values)  # the variant's keys
        train_values = {k: v for k, v in values.items()
                        if (k == VARIANT_AXIS and trains) or k.split(".")[0] in TRAIN_SECTIONS}
        run = f"{name}_{readable(train_values) or 'base'}-{train_hash(cfg)[:HASH_CHARS]}"
        cfg = with_values(cfg, {"train.name": run})
        try:
            check_names(cfg.train)  # the run and its aligned entries must be usable file names
        except PipelineError as exc:
            raise StudyError(f"Study cell {readable(values)}: {exc} (a cell's run is named <study.name>_<axis "
                             f"values>-<hash>: shorten study.name)") from None
        cells.append(Cell(index, values, cfg, h, run, f"{readable(values)}-{h[:HASH_CHARS]}"))
    return cells


def is_number(value: Any) -> bool:
    """True for int/float values (not bools) that are finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
