"""A run trained on English captions, evaluated per language through the CLIs: analyze languages
(retrieval on the images that have the language, counted), zeroshot --language with prompts from
a file (a language without templates refused), the report's per-language table."""

import json

import numpy as np
from click.testing import CliRunner

from analyze.cli import main as analyze_cli
from extract.cli import main as extract_cli
from extract.run import extract
from tests.fixtures import _image, write_metadata
from train.cli import main as fit_cli

PROMPTS = """
[en]
templates = ["a photo of a {}.", "a {}."]
[de]
templates = ["ein Foto von {}.", "ein {}."]
classes = { animals = "Tiere", food = "Essen" }
[pt_BR]
templates = ["uma foto de {}."]
classes = { animals = "animais" }
"""


def _data(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4), ("test", 8)):
        rows = []
        for i in range(n):
            cls = ("animals", "food")[i % 2]
            name = f"{cls}/{split}_{i}.png"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            _image(rng, 16).save(root / split / name)
            row = {"file_name": name, "caption": f"{i} {cls}", "caption_de": f"{i} {cls} de"}
            if i < 3:
                row["caption_pt_BR"] = f"{i} {cls} pt"
            rows.append(row)
        write_metadata(root / split, rows)
    return root


def test_english_run_evaluated_per_language(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _data(tmp_path / "data")
    (tmp_path / "prompts.toml").write_text(PROMPTS)
    (tmp_path / "exp.toml").write_text(f"""
[data]
dataset = "imagefolder"
data_dir = "{data}"
cache = "{tmp_path / 'cache'}"
label_from = "dir"
[extract]
encoders = ["tiny-resnet", "tiny-bert"]
workers = 0
batch_size = 8
device = "cpu"
[train]
image = "tiny-resnet"
text = "tiny-bert"
dim = 8
epochs = 2
batch_size = 8
name = "en"
[analyze]
out = "{tmp_path / 'reports'}"
bootstrap = 10
permutations = 10
""")
    run = CliRunner()
    cfg = ["--config", str(tmp_path / "exp.toml")]
    for extra in ([], ["--encoder", "tiny-bert", "--set", "data.language=de"],
                  ["--encoder", "tiny-bert", "--set", "data.language=pt-BR"]):
        res = run.invoke(extract_cli, cfg + extra)
        assert res.exit_code == 0, res.output
    res = run.invoke(fit_cli, cfg + ["--no-progress"])
    assert res.exit_code == 0, res.output

    res = run.invoke(analyze_cli, ["languages"] + cfg + ["--language", "en,de,pt_BR,fr"])
    assert res.exit_code == 1 and "no 'fr' captions" in res.output and "data.language=fr" in res.output
    res = run.invoke(analyze_cli, ["languages"] + cfg + ["--language", "en,de,pt_BR", "--prompts", "prompts.toml"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "reports/imagefolder/test/runs/en/languages.json").read_text())
    langs = doc["languages"]
    assert [langs[c]["retrieval"]["n_images"] for c in ("en", "de", "pt-br")] == [8, 8, 3]
    assert langs["de"]["zeroshot"]["n"] == 8 and "top1" in langs["de"]["zeroshot"]
    assert "no name for 1 of 2 classes" in langs["pt-br"]["zeroshot"]["skipped"]  # food has no Portuguese name

    res = run.invoke(analyze_cli, ["zeroshot"] + cfg + ["--language", "de"])
    assert res.exit_code == 1 and "needs templates and class names in de" in res.output
    res = run.invoke(analyze_cli, ["zeroshot"] + cfg + ["--language", "ja", "--prompts", "prompts.toml"])
    assert res.exit_code == 1 and "no templates for 'ja'" in res.output
    res = run.invoke(analyze_cli, ["zeroshot"] + cfg + ["--language", "de", "--prompts", "prompts.toml"])
    assert res.exit_code == 0, res.output
    zs = json.loads((tmp_path / "reports/imagefolder/test/runs/en/zeroshot-de.json").read_text())
    assert zs["prompt_class_names"] == ["Tiere", "Essen"] and zs["templates"][0] == "ein Foto von {}."

    res = run.invoke(analyze_cli, ["report"] + cfg)
    assert res.exit_code == 0, res.output
    report = next((tmp_path / "reports").rglob("report.md")).read_text()
    assert "## Languages" in report and "| pt-br | 3 / 8 |" in report


def test_demo_languages_tables_over_seeds(tmp_path, monkeypatch):
    from demo.languages import languages_of, run, tables
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    data = _data(tmp_path / "data")
    (tmp_path / "prompts.toml").write_text(PROMPTS)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={data}", f"data.cache={tmp_path / 'c'}",
                             "data.label_from=dir", "extract.workers=0", "extract.device=cpu", "train.dim=8",
                             "train.epochs=1", "train.batch_size=8", "train.image=tiny-resnet", "train.reference=",
                             'extract.encoders=["tiny-resnet", "tiny-bert", "tiny-numpy-sentence"]',
                             f"analyze.out={tmp_path / 'r'}"])
    extract(cfg)
    assert languages_of(cfg, "coverage:0.8") == ["de", "en"] and languages_of(cfg, "pt_BR") == ["pt-br"]
    result = run(cfg, ["tiny-bert", "tiny-numpy-sentence"], [0, 1], ["en", "de"], "prompts.toml")
    assert result["n"] == {"en": 8, "de": 8} and len(result["tiny-numpy-sentence"]["de"]["zs_top1"]) == 2
    text = tables(result, ["tiny-bert", "tiny-numpy-sentence"])
    assert "| de | 8 |" in text and "zs_top1" in text
    from demo.languages import summary

    assert "| USE-m3 languages | 2 |" in summary(result, ["tiny-bert", "tiny-numpy-sentence"])


def test_fit_adapters_in_another_language_reads_its_entries(tmp_path):
    import pytest

    from pipeline.config import load_config, with_values
    from train.data import TrainError
    from train.fit import fit_adapters

    data = _data(tmp_path / "data")
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={data}", f"data.cache={tmp_path / 'c'}",
                             "extract.workers=0", "extract.device=cpu", "train.dim=8", "train.epochs=1",
                             "train.batch_size=8", "train.image=tiny-resnet", "train.text=tiny-bert", "train.reference=",
                             'extract.encoders=["tiny-resnet", "tiny-bert"]', "train.name=de"])
    extract(cfg)
    de = with_values(cfg, {"data.language": "de"})
    with pytest.raises(TrainError, match="only the default language's captions of 'tiny-bert'.*data.language=de"):
        fit_adapters(de, progress=False)
    extract(with_values(de, {"extract.encoders": ["tiny-bert"]}))
    run = fit_adapters(de, progress=False)
    doc = json.loads((run.run_dir / "adapters.json").read_text())
    assert doc["modalities"]["text"]["entry"] == "tiny-bert.lang-de"
