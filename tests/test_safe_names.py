"""Names taken from data or configuration never become a path outside their folder: split names in
a root metadata.jsonl or a Karpathy JSON, and every other name
that becomes a file or folder (dataset, entry, run, study, analysis split) passes
``pipeline.names.safe_name``; names too long for a file name are one-line errors before any work;
a cache or output folder that cannot be written is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from analyze.cli import main as analyze_cli
from analyze.compare import output_dir
from extract.cli import main as extract_cli
from extract.datasets import load_split, requested_splits
from pipeline import runs
from pipeline.cache import entry_path, split_dir
from pipeline.config import load_config, with_values
from pipeline.names import MAX_NAME_BYTES, UnsafeNameError, safe_name
from study.cli import main as study_cli
from tests.fixtures import make_flickr30k, make_imagefolder, write_metadata
from tests.test_train import make_cache
from train.cli import main as fit_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tree(root: Path, *skip: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (outside ``skip``) -> its bytes (None for folders)."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
            if not any(p == s or s in p.parents for s in skip)}


def _victim(path: Path) -> Path:
    """A folder holding what a traversing split would overwrite (``<encoder>.h5``) or, under
    --force, delete (``<encoder>.zarr/``)."""
    (path / "tiny-resnet.zarr").mkdir(parents=True)
    (path / "tiny-resnet.zarr" / "zarr.json").write_text("{}")
    (path / "tiny-resnet.h5").write_bytes(b"precious")
    return path


def _imagefolder_with_split(root: Path, split: str) -> Path:
    data = make_imagefolder(root, splits=None, n=4)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[2]["split"] = split
    write_metadata(data, [{**r, "split": r.get("split", "train")} for r in rows])
    return data


def _karpathy_with_split(root: Path, split: str) -> Path:
    data = make_flickr30k(root, n_per_split=(3, 1, 1), token=False)
    doc = json.loads((data / "dataset_flickr30k.json").read_text())
    doc["images"][1]["split"] = split
    (data / "dataset_flickr30k.json").write_text(json.dumps(doc))
    return data


@pytest.mark.parametrize("layout", ["metadata.jsonl", "absolute", "karpathy"])
def test_a_split_name_from_data_never_leaves_the_cache(tmp_path, layout):
    victim = _victim(tmp_path / "victim" / "x")
    split = str(victim) if layout == "absolute" else "../../victim/x"
    if layout == "karpathy":
        data, dataset, row = _karpathy_with_split(tmp_path / "data", split), "flickr30k", "images[1]"
    else:
        data, dataset, row = _imagefolder_with_split(tmp_path / "data", split), "imagefolder", "line 3"
    cache = tmp_path / "cache"
    before = _tree(tmp_path, cache)
    for force in ([], ["--force"]):
        res = CliRunner().invoke(extract_cli, ["--encoder", "tiny-resnet", "--dataset", dataset, "--data-dir", str(data),
                                               "--cache", str(cache), "--split", "all", "--device", "cpu",
                                               "--workers", "0", *force])
        assert res.exit_code == 1, res.output
        assert row in res.output and "split name" in res.output and "path separator" in res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert _tree(tmp_path, cache) == before  # nothing written or deleted outside the cache
    assert not list(cache.rglob("*.h5")) and not list(cache.rglob("*.lock"))


@pytest.mark.parametrize("name, why", [("", "empty"), (".", "names a folder"), ("..", "names a folder"),
                                       ("a/b", "path separator"), ("/abs", "path separator"), (".x", "starts with '.'"),
                                       ("a\nb", "control character"), ("é" * 101, "202 bytes long")])
def test_safe_name_refuses_what_is_not_one_short_path_component(name, why):
    with pytest.raises(UnsafeNameError, match=why):
        safe_name(name, "split name", "metadata.jsonl line 4")
    assert safe_name("a" * MAX_NAME_BYTES, "x") == "a" * MAX_NAME_BYTES
    for ok in ("validation-2.v1_ok", "m$\\bad$", "<b>x"):  # POSIX file names; other code must escape them
        assert safe_name(ok, "x") == ok


def test_every_path_built_from_a_name_is_checked(tmp_path):
    data = make_imagefolder(tmp_path / "data", n=2)
    for build in (lambda: split_dir(tmp_path, "fake", "../x"), lambda: entry_path(tmp_path, "fake", "test", ".."),
                  lambda: load_split("imagefolder", data, "../../etc/x"),
                  lambda: requested_splits("imagefolder", data, "/abs"),
                  lambda: runs.run_dir(tmp_path, ".."), lambda: runs.find_run(tmp_path, "../../x"),
                  lambda: entry_path(tmp_path, "..", "test", "resnet18")):
        with pytest.raises(UnsafeNameError):
            build()
    cfg = load_config(None, options={"analyze.out": str(tmp_path / "out")})
    for bad in ({"analyze.split": "../../x"}, {"analyze.split": "/abs"}, {"data.dataset": ".."}):
        with pytest.raises(UnsafeNameError):
            output_dir(with_values(cfg, bad), "cka")
    for part in ("..", "a" * 300):
        with pytest.raises(UnsafeNameError):
            output_dir(cfg, "studies", part)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def _one_line(res, *words):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    for w in words:
        assert w in res.output, res.output


def test_names_too_long_for_a_file_are_one_line_errors_before_any_work(tmp_path):
    cache = make_cache(tmp_path / "cache", splits={"train": 40, "val": 8, "test": 8}, reference="")
    before = _tree(tmp_path)
    res = CliRunner().invoke(fit_cli, ["--cache", str(cache), "--dataset", "fake", "--name", "r" * 300,
                                       "--device", "cpu", "--reference", ""])
    _one_line(res, "run name", "300 bytes long")
    res = CliRunner().invoke(fit_cli, ["--cache", str(cache), "--dataset", "fake", "--name", "r" * 195,
                                       "--device", "cpu", "--reference", ""])  # fits, but <encoder>@<run> does not
    _one_line(res, "aligned entry name", "--name")
    model = tmp_path / ("m" * 250) / "model"
    res = CliRunner().invoke(extract_cli, ["--encoder", f"hf-image:{model}", "--dataset", "imagefolder",
                                           "--data-dir", str(tmp_path), "--cache", str(cache)])
    _one_line(res, "cache entry name of --encoder", "shorter path")
    toml = tmp_path / "study.toml"
    toml.write_text(f'[study]\nname = "{"s" * 250}"\n[study.axes]\n"train.seed" = [0, 1]\n[data]\ncache = "{cache}"\n'
                    f'dataset = "fake"\n[analyze]\nout = "{tmp_path / "out"}"\n')
    _one_line(CliRunner().invoke(study_cli, ["--config", str(toml)]), "study.name", "250 bytes long")
    toml.write_text(toml.read_text().replace("s" * 250, "s" * 190))  # the folder fits, its runs' names do not
    _one_line(CliRunner().invoke(study_cli, ["--config", str(toml)]), "shorten study.name")
    assert _tree(tmp_path) == {**before, str(toml): toml.read_bytes()}  # nothing was written


@pytest.mark.parametrize("folder", ["/dev/null", "/proc/x"])
def test_a_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, folder):
    cache = make_cache(tmp_path / "cache", splits={"train": 40, "val": 8, "test": 8}, reference="")
    data = make_imagefolder(tmp_path / "data", n=2)
    res = CliRunner().invoke(extract_cli, ["--encoder", "tiny-resnet", "--dataset", "imagefolder", "--data-dir",
                                           str(data), "--cache", folder, "--device", "cpu", "--workers", "0"])
    _one_line(res, f"'{folder}/imagefolder-", "cache folder (data.cache, --cache)")
    res = CliRunner().invoke(analyze_cli, ["cka", "--cache", str(cache), "--dataset", "fake", "--metric", "cka",
                                           "--out", folder])
    _one_line(res, f"'{folder}/fake/test/cka'", "output folder (analyze.out, --out)")
    res = CliRunner().invoke(fit_cli, ["--cache", folder, "--dataset", "fake", "--device", "cpu", "--reference", ""])
    assert res.exit_code == 1 and "Traceback" not in res.output  # nothing to read there: the missing-entry error
