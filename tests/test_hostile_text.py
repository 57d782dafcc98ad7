"""User text is inert wherever the pipeline writes it: generated
Markdown (report.md, study.md, the gallery) escapes Markdown-significant HTML
(``analyze.markdown``), and figures draw labels, titles, ticks and legends literally, never as
mathtext (``pipeline.plotting.literal_text``). Here on a tiny dataset whose class folders,
file names, captions and run name are hostile, through the real commands."""

from __future__ import annotations

import ast
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import markdown_it  # a CommonMark renderer (the test extra: markdown-it-py)
import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from analyze import plots
from analyze.cli import main as analyze_cli
from analyze.markdown import md_cell, md_text
from analyze.report import Document
from extract.run import extract
from pipeline.config import load_config
from study import figures as study_figures
from study.report import build_report as build_study_report
from tests.fixtures import write_metadata
from train import outputs
from train.fit import fit_adapters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
MATH = "$\\undefinedmacro$"  # mathtext that raises when parsed
DOLLARS = "cat $5 and $"  # would render as math
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
CLASSES = (MATH, f"{DOLLARS}{IMG}", "plain")
RUN = "m$\\bad$<svg onload=alert(2)>"
PER_CLASS = {"train": 4, "val": 2, "test": 3}


class _Tags(HTMLParser):
    """Every start tag and its attributes in an HTML text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def assert_inert(markdown: str) -> None:
    """``markdown`` rendered as CommonMark holds no tag but the report's own (no link: no ``<a>``),
    no event handler, images only of the report's figures, and shows the hostile strings as text."""
    html = markdown_it.MarkdownIt("commonmark").render(markdown)
    tags = _Tags(html).tags
    allowed = {"h1", "h2", "h3", "p", "table", "thead", "tbody", "tr", "th", "td", "img", "em", "code", "ol", "ul",
               "li", "blockquote", "strong", "br", "hr"}
    assert {t for t, _ in tags} <= allowed, sorted({t for t, _ in tags} - allowed)
    for tag, attrs in tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/") or attrs["src"].endswith(".png"), attrs
    assert "<script" not in html and "&lt;script" in html.replace("&lt;/script", "")  # shown as text


def test_md_text_makes_user_text_inert_and_keeps_it_readable():
    text = f"{SCRIPT} {IMG} [x](javascript:alert(1)) a\\ <http://x> &amp; `code` 3 > 2"
    assert md_text(text) == ("&lt;script>alert(1)&lt;/script> &lt;img src=x onerror=alert(1)> \\[x\\](javascript:"
                             "alert(1)) a\\\\ &lt;http://x> &amp;amp; `code` 3 > 2")
    assert md_text("two\nlines\r\n# heading") == "two lines # heading" and md_cell("a|b") == "a\\|b"
    html = markdown_it.MarkdownIt("commonmark").render(md_text(text))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<a " not in html and "<img" not in html


def test_every_markdown_block_is_escaped(tmp_path):
    png = plots.heatmap(np.eye(2), ["a", "b"], ["a", "b"], "t", tmp_path / "x.png")
    doc = Document(f"Report {SCRIPT}", tmp_path)
    doc.heading(IMG)
    doc.para(f"Run `fit-adapters --name r` on {SCRIPT} and [x](javascript:alert(1))")
    doc.table([f"col {IMG}", "b|c"], [[SCRIPT, 1.0], [f"two\nlines {IMG}", None]])
    doc.figure(png, f"caption {IMG} ](javascript:alert(1))", name="fig 1 (copy).png")
    assert_inert(doc.markdown())
    assert "`fit-adapters --name r`" in doc.markdown()  # the report's own Markdown is kept


def test_study_md_escapes_axis_values_run_names_and_errors(tmp_path):
    axes = {"train.image": [IMG, "b"], "train.seed": [0, 1]}
    summary = [{"train.image": v, "n": 2, "mean_R.mean": 0.5, "mean_R.lo95": 0.4, "mean_R.hi95": 0.6}
               for v in axes["train.image"]]
    cells = [{"train.image": IMG, "train.seed": 0, "status": "failed", "run": RUN, "error": f"Error: {SCRIPT}"},
             {"train.image": "b", "train.seed": 1, "status": "done", "run": f"r{IMG}", "mean_R": 0.5}]
    build_study_report(tmp_path, f"Study {SCRIPT}", f"intro {IMG}", [f"answer {SCRIPT}"], summary, cells, axes,
                       "train.seed", [])
    assert_inert((tmp_path / "study.md").read_text())


# ----------------------------------------------------------------------------- figures
def _figure_functions() -> list[tuple[str, str]]:
    """(module file, function) of every project function that creates a matplotlib figure."""
    found = []
    for pkg in ("pipeline", "extract", "similarity", "train", "analyze", "study", "demo"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.FunctionDef):
                    continue
                calls = {c.func.attr for c in ast.walk(node) if isinstance(c, ast.Call)
                         and isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", "") == "plt"}
                if calls & {"subplots", "figure", "subplot_mosaic", "subplot"}:
                    decorated = any(getattr(d, "id", getattr(d, "attr", "")) == "literal_text"
                                    for d in node.decorator_list)
                    found.append((f"{path.relative_to(ROOT)}::{node.name}", decorated))
    return found


def test_every_function_that_creates_a_figure_draws_text_literally():
    found = _figure_functions()
    assert len(found) >= 6, found  # analyze.plots (4), study.figures, train.outputs
    assert [name for name, decorated in found if not decorated] == []


@pytest.fixture()
def drawn(monkeypatch):
    """Every text of every figure saved while the fixture is active: [(text, parse_math)]."""
    texts = []
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        texts.extend((t.get_text(), t.get_parse_math()) for t in fig.findobj(matplotlib.text.Text))
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return texts


def test_figure_writers_draw_hostile_labels_literally(tmp_path, drawn):
    labels = [MATH, DOLLARS]
    plots.heatmap(np.eye(2), labels, labels, f"title {MATH}", tmp_path / "h.png", xlabel=DOLLARS, ylabel=MATH,
                  mark=[(0, 1, MATH)])
    plots.kernel_panels({MATH: np.eye(3), DOLLARS: np.eye(3)}, DOLLARS, tmp_path / "k.png")
    plots.grouped_bars({MATH: [{"label": DOLLARS, "value": 0.2, "lo": 0.1, "hi": 0.3}]}, MATH, tmp_path / "b.png")
    plots.scatter([0.1, 0.2], [0.3, 0.4], labels, MATH, tmp_path / "s.png", xlabel=DOLLARS, ylabel=MATH)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_mean_R": 0.1 * e, "lr": 0.1, "temperature": 0.07}
               for e in (1, 2)]
    outputs.plot_curves(tmp_path, history, None, loss=MATH)
    axes = {"train.train_fraction": [0.5, 1.0], "train.image": [MATH, DOLLARS], "train.text": [DOLLARS, "t"]}
    summary = [{"train.train_fraction": f, "train.image": i, "train.text": t, "n": 1, "mean_R.mean": 0.1 + f / 4,
                "pair.cka.mean": 0.3 + f / 5} for f in (0.5, 1.0) for i in (MATH, DOLLARS) for t in (DOLLARS, "t")]
    assert study_figures.fraction_figure(summary, axes, "", tmp_path / "f.png")
    assert study_figures.pair_figure(summary, axes, "", tmp_path / "p.png")[0]
    assert study_figures.heatmap_figure(summary, axes, "", tmp_path / "hm.png")
    shown = [t for t, _ in drawn if t]
    assert drawn and all(parse is False for _, parse in drawn)
    assert any(MATH in t for t in shown) and any(DOLLARS in t for t in shown)


# ----------------------------------------------------------------------------- through the commands
def _hostile_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, k in PER_CLASS.items():
        rows = []
        for c, colour in zip(CLASSES, ((30, 30, 220), (30, 200, 30), (220, 30, 30))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(k):
                rel = f"{c}/{IMG}{split}_{i}.png"
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / rel)
                rows.append({"file_name": rel, "caption": f"{c[:3]}{i}{split} {SCRIPT} [x](javascript:alert(1)) {MATH}"})
        write_metadata(root / split, rows)
    return root


def test_reports_and_figures_of_hostile_names_through_the_commands(tmp_path):
    data = _hostile_dataset(tmp_path / "data")
    toml = tmp_path / "exp.toml"
    toml.write_text(f"""
[data]
dataset = "imagefolder"
data_dir = "{data}"
captions = "first"
cache = "{tmp_path / 'cache'}"
label_from = "dir"
[extract]
encoders = ["tiny-resnet", "tiny-gpt2", "tiny-dinov2"]
workers = 0
batch_size = 8
[train]
image = "tiny-resnet"
text = "tiny-gpt2"
reference = ""
dim = 8
epochs = 2
batch_size = 4
lr = 1e-3
name = {json.dumps(RUN)}
[analyze]
reference = "tiny-dinov2"
metrics = ["cka", "mutual_knn"]
k = 2
bootstrap = 3
permutations = 3
controls = []
out = "{tmp_path / 'reports'}"
""")
    cfg = load_config(toml)
    extract(cfg)
    fit_adapters(cfg, progress=False)
    for command in (["cka"], ["zeroshot"], ["platonic"], ["report"]):
        res = CliRunner().invoke(analyze_cli, [*command, "--config", str(toml)])
        assert res.exit_code == 0, (command, res.output, res.exception)
    report = next((tmp_path / "reports").rglob("report.md")).read_text()
    for shown in ("Retrieval gallery", "Zero-shot classification", "tiny-resnet@m$\\\\bad$&lt;svg"):
        assert shown in report, shown
    assert_inert(report)
    assert math.isfinite(json.loads(next((tmp_path / "reports").rglob("zeroshot.json")).read_text())["n"])
