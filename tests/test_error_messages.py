"""Error messages point the right way: every ``--option`` and command they name exists.

A message names options in two ways: after a command (``extract --encoder X --split Y``, inside
backticks or parentheses or in running text), which must be options of that command, or on
their own (``lower --lr``, ``--set train.lr=...``), which must be options of some command; the
commands that can reach a message are checked where a test reaches it (``check_message``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from analyze.cli import main as analyze_cli
from analyze.curate_cli import main as curate_cli
from extract.cli import main as extract_cli
from extract.run import extract
from pipeline.config import load_config
from study.cli import main as study_cli
from tests.fixtures import make_imagefolder
from train.cli import main as fit_cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "extract", "similarity", "train", "analyze", "study", "demo")


def _options(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts} | {"--help"}


COMMANDS = {"extract": _options(extract_cli), "fit-adapters": _options(fit_cli), "study": _options(study_cli),
            "curate": _options(curate_cli)}
COMMANDS.update({f"analyze {n}": _options(c) for n, c in analyze_cli.commands.items()})
COMMANDS["analyze"] = set().union(*(v for k, v in COMMANDS.items() if k.startswith("analyze ")))
ANY = set().union(*COMMANDS.values())
EXTERNAL = ("torchrun", "pip", "huggingface-cli", "apt-get", "python -m", "pytest")  # their options are theirs
NAMES = sorted([*COMMANDS, *EXTERNAL], key=len, reverse=True)
COMMAND = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, NAMES)) + r")(?![\w-])")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
END = re.compile(r"[`()]|[.;:,] |$")  # where the options of a named command end


def named_options(message: str) -> list[tuple[str | None, str]]:
    """(command or None, option) for every ``--option`` in ``message``; the command is the one
    named right before it, in the same backtick span, parenthesis or clause."""
    out: list[tuple[str | None, str]] = []
    pos = 0
    for m in COMMAND.finditer(message):
        out += [(None, o) for o in OPTION.findall(message[pos:m.start()])]
        end = m.end() + END.search(message, m.end()).start() - m.end() if END.search(message, m.end()) else len(message)
        out += [(m.group(1), o) for o in OPTION.findall(message[m.end():end])]
        pos = max(pos, end)
    out += [(None, o) for o in OPTION.findall(message[pos:])]
    return out


def check_message(message: str, reached_from: str | None = None) -> None:
    """Assert every option ``message`` names exists: after a command, in that command; on its
    own, in ``reached_from`` (the command that printed it) or, when unknown, in some command."""
    for command, option in named_options(message):
        if command in EXTERNAL:
            continue
        allowed = COMMANDS[command] if command else COMMANDS[reached_from] if reached_from else ANY
        assert option in allowed, f"{option} named {'after ' + command if command else 'on its own'} " \
                                  f"in: {message!r}"


def _literal(node: ast.AST) -> str | None:
    """The text of a string or f-string (placeholders as {}), or of string concatenations."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left), _literal(node.right)
        return None if left is None and right is None else (left or "{}") + (right or "{}")
    return None


def _raised_messages():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    for arg in node.exc.args:
                        text = _literal(arg)
                        if text and "--" in text:
                            yield pytest.param(text, id=f"{path.relative_to(ROOT)}:{node.lineno}")


def test_the_parser_attributes_options_to_the_command_before_them():
    msg = ("Re-extract it (`extract --encoder x --captions all --force`) or train with --set data.captions=first; "
           "then fit-adapters --lr 1e-3. On 8 GPUs: torchrun --nproc-per-node 8 -m train.cli.")
    assert named_options(msg) == [("extract", "--encoder"), ("extract", "--captions"), ("extract", "--force"),
                                  (None, "--set"), ("fit-adapters", "--lr"), ("torchrun", "--nproc-per-node")]
    check_message(msg)
    with pytest.raises(AssertionError):
        check_message("pass the folder (--data-dir).", reached_from="analyze zeroshot")
    with pytest.raises(AssertionError):
        check_message("Run `fit-adapters --data-dir x` first.")


@pytest.mark.parametrize("message", list(_raised_messages()))
def test_every_error_message_names_options_that_exist(message):
    check_message(message)


def test_raised_messages_are_found():
    assert len(list(_raised_messages())) >= 40


def test_a_cache_of_another_dataset_is_named_not_the_default_one(tmp_path):
    """fit-adapters without --dataset on a cache extracted from an imagefolder: the error names
    the dataset the cache holds and how to pick it, not an extraction of the default dataset."""
    data = make_imagefolder(tmp_path / "data", n=4)
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'[data]\ndataset = "imagefolder"\ndata_dir = "{data}"\ncache = "{tmp_path / "cache"}"\n'
                        f'[extract]\nencoders = ["tiny-resnet"]\nworkers = 0\nbatch_size = 4\n')
    extract(load_config(cfg_file))
    res = CliRunner().invoke(fit_cli, ["--cache", str(tmp_path / "cache"), "--image", "tiny-resnet", "--no-progress"])
    assert res.exit_code == 1 and "imagefolder" in res.output and "--dataset imagefolder" in res.output, res.output
    assert "flickr30k" in res.output and "--split train" not in res.output
    check_message(res.output, reached_from="fit-adapters")
