"""Inputs that would otherwise end in a raw traceback are one-line errors (the
over-long names and unwritable folders are in ``tests/test_safe_names.py``): a non-finite
``--seeds``, a template with a lone brace, and ``NAME.weights`` pointing at a file that is not a
checkpoint of that model."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch
from click.testing import CliRunner

from analyze.cli import main as analyze_cli
from analyze.prompts import PromptError, check_templates, read_templates
from extract.cli import main as extract_cli
from tests.fixtures import make_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _one_line(res, *words):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    for w in words:
        assert w in res.output, res.output


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_seeds_are_one_line_errors(tmp_path, value):
    res = CliRunner().invoke(analyze_cli, ["matching", "--seeds", value, "--cache", str(tmp_path)])
    _one_line(res, f"--seeds {float(value)}", "fraction of the matched rows")


@pytest.mark.parametrize("template, words", [("a photo of {}}.", "Single '}'"), ("a photo of {", "Single '{'"),
                                              ("a photo of {0}.", "exactly one '{}'"),
                                              ("{{}} photo", "exactly one '{}'")])
def test_a_template_with_a_lone_brace_is_one_line_before_any_work(tmp_path, template, words):
    with pytest.raises(PromptError, match=words.replace("{", "\\{").replace("}", "\\}")):
        check_templates([template])
    path = tmp_path / "templates.txt"
    path.write_text(f"a photo of a {{}}.\n{template}\n")
    with pytest.raises(PromptError, match="templates.txt"):
        read_templates(path)
    res = CliRunner().invoke(analyze_cli, ["zeroshot", "--templates", str(path), "--cache", str(tmp_path / "none")])
    _one_line(res, "templates.txt", repr(template))
    assert check_templates(["a {} with {{braces}}."]) == ("a {} with {{braces}}.",)  # escaped braces stay allowed


def _bad_checkpoints(folder) -> dict[str, str]:
    """{kind: path} of files that are not resnet18 checkpoints, each with the words its error says."""
    files = {"text": (folder / "notes.pth", "not a PyTorch checkpoint"),
             "empty": (folder / "empty.pth", "empty or truncated"),
             "pickle": (folder / "obj.pth", "Python objects other than tensors"),
             "zip": (folder / "arch.zip", "not a PyTorch checkpoint"),
             "tensor": (folder / "tensor.pth", "holds a Tensor"),
             "other model": (folder / "other.pth", "missing key(s) (first: conv1.weight)")}
    files["text"][0].write_text("hello\n")
    files["empty"][0].write_bytes(b"")
    files["pickle"][0].write_bytes(pickle.dumps({"a": [1, 2]}))
    with zipfile.ZipFile(files["zip"][0], "w") as z:
        z.writestr("x.txt", "hi")
    torch.save(torch.ones(3), files["tensor"][0])
    torch.save({"layer.weight": torch.ones(2, 2)}, files["other model"][0])
    return {k: v for k, v in files.items()}


def test_weights_that_are_not_a_checkpoint_are_one_line_naming_the_file(tmp_path):
    data = make_imagefolder(tmp_path / "data", n=2)
    for kind, (path, words) in _bad_checkpoints(tmp_path).items():
        res = CliRunner().invoke(extract_cli, ["--encoder", "resnet18", "--encoder-option", f"resnet18.weights={path}",
                                               "--dataset", "imagefolder", "--data-dir", str(data), "--cache",
                                               str(tmp_path / "cache"), "--split", "train", "--device", "cpu",
                                               "--workers", "0"])
        _one_line(res, str(path), words, "expected a PyTorch state dict")
