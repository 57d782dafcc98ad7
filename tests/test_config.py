import tomllib
from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, defaults_tree, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_toml_equals_dataclass_defaults():
    tree = tomllib.loads((ROOT / "pipeline.toml").read_text())
    assert tree == defaults_tree()


def test_every_key_in_pipeline_toml_is_commented():
    for line in (ROOT / "pipeline.toml").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"uncommented key: {line}"


def test_precedence_file_then_set_then_options(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nlr = 0.5\nepochs = 3\n[extract]\nencoders = ["tiny-resnet"]\n')
    cfg = load_config(f, ["train.epochs=4", "extract.encoder_options.gpt2.pooling=last"],
                      {"train.epochs": 5, "train.seed": None})
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 5 and cfg.train.seed == 0
    assert cfg.extract.encoders == ("tiny-resnet",)
    assert cfg.extract.encoder_options == {"gpt2": {"pooling": "last"}}
    assert cfg.source == str(f)


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config() == PipelineConfig()


@pytest.mark.parametrize("text, match", [
    ("[train]\nlrr = 1\n", "Unknown config key 'train.lrr'. Did you mean: train.lr"),
    ("[trian]\nlr = 1\n", "Unknown config section 'trian'. Did you mean: train"),
    ('[train]\nlr = "fast"\n', "'train.lr' expects float"),
    ("[train]\nepochs = 1.5\n", "'train.epochs' expects int"),
    ('[extract]\nencoders = "resnet18"\n', None),  # a comma string is accepted for lists
    ("[train\n", "not valid TOML"),
])
def test_bad_keys_and_types_name_the_key(tmp_path, text, match):
    f = tmp_path / "c.toml"
    f.write_text(text)
    if match is None:
        assert load_config(f).extract.encoders == ("resnet18",)
        return
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        load_config(f)


def test_override_parsing():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("data.dataset=hf:nlphuji/flickr30k") == (["data", "dataset"], "hf:nlphuji/flickr30k")
    assert parse_override("train.learnable_temperature=true") == (["train", "learnable_temperature"], True)
    with pytest.raises(ConfigError):
        parse_override("lr")
    with pytest.raises(ConfigError, match="Unknown config key"):
        load_config(None, ["train.nope=1"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/pipeline.toml")


def test_fixed_choices_live_in_one_table():
    """Stage constants that the config also checks are read from pipeline.config.CHOICES; the two that
    a lower module owns (cache file formats, autocast precisions) must equal it."""
    from pipeline.config import CHOICES
    from pipeline.runtime import PRECISIONS
    from pipeline.storage import FORMATS

    assert tuple(FORMATS) == CHOICES["extract.format"] and tuple(PRECISIONS) == CHOICES["extract.precision"]
    assert CHOICES["data.on_empty"] == CHOICES["data.missing"]
