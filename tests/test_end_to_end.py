"""The whole pipeline through its real entry points on generated data and tiny random encoders:
extract -> fit-adapters -> analyze cka / platonic / report, in a temporary folder."""

import json

from click.testing import CliRunner

from analyze.cli import main as analyze_cli
from extract.cli import main as extract_cli
from pipeline.cache import find_entry
from pipeline.runs import aligned_name
from tests.fixtures import make_coco, make_flickr30k
from train.cli import main as fit_cli


def test_extract_fit_analyze_through_the_clis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./pipeline.toml here: built-in defaults plus the config below
    data = make_flickr30k(tmp_path / "data", n_per_split=(24, 8, 8))
    (tmp_path / "exp.toml").write_text(f"""
[data]
data_dir = "{data}"
captions = "all"
cache = "{tmp_path / 'cache'}"
[extract]
encoders = ["tiny-resnet", "tiny-gpt2", "tiny-dinov2"]
workers = 0
batch_size = 8
[train]
image = "tiny-resnet"
text = "tiny-gpt2"
reference = "tiny-dinov2"
dim = 16
epochs = 3
batch_size = 16
lr = 1e-3
name = "e2e"
[analyze]
reference = "tiny-dinov2"
metrics = ["cka", "unbiased_cka", "mutual_knn"]
k = 3
bootstrap = 20
permutations = 20
out = "{tmp_path / 'reports'}"
""")
    runner = CliRunner()
    cfg = ["--config", str(tmp_path / "exp.toml")]

    res = runner.invoke(extract_cli, cfg)
    assert res.exit_code == 0, res.output
    text = find_entry(tmp_path / "cache", "flickr30k", "test", "tiny-gpt2")
    assert text.n == 40 and text.ids[0].endswith("#0")  # 8 images x 5 captions

    res = runner.invoke(extract_cli, cfg)  # a rerun reuses every entry
    assert res.exit_code == 0, res.output

    res = runner.invoke(fit_cli, cfg + ["--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "cache" / "runs" / "e2e" / "metrics.json").read_text())
    assert {"infonce", "cca", "procrustes"} <= set(metrics["test"])
    aligned = find_entry(tmp_path / "cache", "flickr30k", "test", aligned_name("tiny-resnet", "e2e"))
    assert list(aligned.ids) == list(find_entry(tmp_path / "cache", "flickr30k", "test", "tiny-resnet").ids)

    for command in (["cka"], ["platonic"], ["report"]):
        res = runner.invoke(analyze_cli, command + cfg)
        assert res.exit_code == 0, (command, res.output)
    html = list((tmp_path / "reports").rglob("report.html"))
    assert html and "data:image/png;base64" in html[0].read_text()


def test_coco_train_plus_restval_is_trained_on(tmp_path, monkeypatch):
    """data.options.restval = "train": extract writes the restval images into the train entries and
    fit-adapters trains on train + restval (the usual 113k-image COCO training set)."""
    monkeypatch.chdir(tmp_path)
    data = make_coco(tmp_path / "data", n_per_split=(10, 6, 6, 6))
    (tmp_path / "coco.toml").write_text(f"""
[data]
dataset = "coco"
data_dir = "{data}"
options = {{ restval = "train" }}
cache = "{tmp_path / 'cache'}"
[extract]
encoders = ["tiny-resnet", "tiny-gpt2"]
workers = 0
batch_size = 8
[train]
image = "tiny-resnet"
text = "tiny-gpt2"
reference = ""
dim = 8
epochs = 1
batch_size = 8
name = "restval"
""")
    runner = CliRunner()
    cfg = ["--config", str(tmp_path / "coco.toml")]
    res = runner.invoke(extract_cli, cfg)
    assert res.exit_code == 0, res.output
    assert find_entry(tmp_path / "cache", "coco", "train", "tiny-resnet").n == 16  # 10 train + 6 restval
    assert not (tmp_path / "cache" / "coco" / "restval").exists()
    res = runner.invoke(fit_cli, cfg + ["--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "cache" / "runs" / "restval" / "metrics.json").read_text())
    assert metrics["sizes"]["train"]["pairs"] == 16
    res = runner.invoke(extract_cli, cfg + ["--split", "restval"])
    assert res.exit_code == 1 and "split 'restval' is not a split of coco" in res.output
