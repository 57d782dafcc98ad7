"""Every command-line option that mirrors a config key says so in its help, in one format
``[config: KEY; default: VALUE]``, and what it says (key, default, choices) is what
pipeline/config.py holds: help texts cannot drift from the config. Every other option that takes
a value says its default as ``[default: ...]``."""

from __future__ import annotations

import re

import click
import pytest

from aligned.cli import main as export_cli
from analyze.cli import main as analyze_cli
from analyze.curate_cli import main as curate_cli
from extract.cli import main as extract_cli
from pipeline.config import CHOICES, ConfigError, config_default
from search.cli import main as search_cli
from study.cli import main as study_cli
from train.cli import main as fit_cli

KEY = re.compile(r"\[config: ([a-z_]+\.[a-z_]+); default: (\[\]|[^\]]*)\]")
# any other way of naming a config key in brackets: "[config: train.lr]", "[analyze.k: 10]", "[data.dataset]"
LEGACY = re.compile(r"\[(?:config: )?(?:data|extract|train|analyze|study)\.[a-z_]+(?:\]|:)")


def _commands():
    commands = [("extract", extract_cli), ("fit-adapters", fit_cli), ("study", study_cli), ("export", export_cli),
                ("curate", curate_cli)]
    commands += [(f"analyze {n}", c) for n, c in analyze_cli.commands.items()]
    return commands + [(f"search {n}", c) for n, c in search_cli.commands.items()]


def _options():
    for name, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and param.help:
                for key, shown in KEY.findall(param.help):
                    yield pytest.param(param, key, shown, id=f"{name} {param.opts[0]} {key}")


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "[]"
    if isinstance(value, dict) and not value:
        return "{}"
    return str(value)


@pytest.mark.parametrize("param, key, shown", list(_options()))
def test_option_help_matches_the_config(param, key, shown):
    try:
        default = config_default(key)
    except ConfigError as exc:
        pytest.fail(f"{param.opts[0]} names config key {key!r}, which does not exist: {exc}")
    if shown:
        assert shown.strip("'\"") in (_shown(default), repr(default)), \
            f"{param.opts[0]} says the default of {key} is {shown}, the config says {default!r}"
    if isinstance(param.type, click.Choice) and key in CHOICES:
        assert set(param.type.choices) == set(CHOICES[key]), f"{param.opts[0]} choices differ from CHOICES[{key!r}]"


def test_options_that_mirror_config_keys_exist():
    assert len(list(_options())) >= 30


def _every_option():
    for name, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                yield pytest.param(name, command, param, id=f"{name} {param.opts[0]}")


@pytest.mark.parametrize("name, command, param", list(_every_option()))
def test_every_option_says_its_default_in_one_format(name, command, param):
    """Help ends with "[config: KEY; default: VALUE]" (options mirroring a config key) or
    "[default: ...]" (the others that take a value); flags, counters and repeatable options
    without a config key are off / empty by default and say nothing."""
    ctx = click.Context(command, info_name=name)
    record = param.get_help_record(ctx)
    assert record and record[1].strip(), f"{name} {param.opts[0]} has no help text"
    text = " ".join(record[1].split())
    assert not LEGACY.search(text), f"{name} {param.opts[0]}: config key not in the [config: KEY; default: V] format"
    tags = KEY.findall(text)
    assert len(tags) <= 1 and (not tags or text.endswith("]"))
    if param.is_flag or param.count or (param.multiple and not tags) or param.name in ("help",):
        return
    assert tags or re.search(r"\[default: [^\]]+\]$", text), \
        f"{name} {param.opts[0]} does not say its default: {text!r}"
