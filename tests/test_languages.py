"""Captions in several languages: caption_<lang> columns, code normalisation, coverage errors,
language entries and their keys, Multi30k translation files, joins of two languages refused."""

import gzip
import json

import numpy as np
import pytest

from extract import datasets as D
from extract.run import extract
from pipeline.cache import find_entry
from pipeline.config import load_config
from pipeline.join import join_pairs, join_rows
from pipeline.languages import LanguageError, base_entry, column_language, entry_name, normalize
from tests.fixtures import _image, make_flickr30k, write_metadata


def _multilingual(root, n=6):
    """An imagefolder train/test with caption, caption_de on every row, caption_pt_BR on half and
    caption_fr on one row of each split."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        rows = []
        for i in range(n):
            name = f"{split}_{i}.png"
            (root / split).mkdir(parents=True, exist_ok=True)
            _image(rng, 16).save(root / split / name)
            row = {"file_name": name, "caption": f"a red thing {i}", "caption_de": f"ein rotes Ding {i}"}
            if i % 2:
                row["caption_pt_BR"] = f"uma coisa {i}"
            if i == 0:
                row["caption_fr"] = f"une chose {i}"
            rows.append(row)
        write_metadata(root / split, rows)
    return root


def test_codes_are_normalised():
    assert normalize("pt_BR") == normalize("pt-br") == normalize("PT-BR") == "pt-br"
    assert normalize("de.utf8") == "de" and normalize("sr@latin") == "sr-latin"
    assert column_language("caption_pt_BR") == "pt-br" and column_language("caption") is None
    with pytest.raises(LanguageError, match="not a language code"):
        normalize("german language")
    assert entry_name("minilm", "en", "en") == "minilm"
    assert entry_name("minilm", "DE", "en") == "minilm.lang-de" and base_entry("minilm.lang-de") == "minilm"


def test_imagefolder_reads_caption_columns_and_coverage(tmp_path):
    root = _multilingual(tmp_path / "d")
    split = D.load_split("imagefolder", root, "train")
    cov = split.language_coverage("en")
    assert cov == {"en": (6, 6), "de": (6, 6), "pt-br": (3, 6), "fr": (1, 6)}
    de = split.in_language("de")
    assert [it.captions[0] for it in de.items][:1] == ["ein rotes Ding 0"]
    assert de.fingerprint() == split.fingerprint() and de.language_fingerprint != split.fingerprint()
    pt = split.in_language("pt_BR")
    assert len(pt.items) == 3 and {i for i, _ in pt.skipped} == {"train_0", "train_2", "train_4"}
    assert split.in_language("en") is split
    with pytest.raises(LanguageError, match=r"'ja'.*de 6/6 \(100%\), en 6/6.*pt-br 3/6 \(50%\)"):
        split.in_language("ja")


def test_csv_empty_cell_means_no_caption_in_that_language(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        _image(rng, 16).save(tmp_path / f"{i}.png")
    write_metadata(tmp_path, [{"file_name": "0.png", "caption": "a", "caption_ja": "あ"},
                              {"file_name": "1.png", "caption": "b", "caption_ja": ""}], fmt="csv")
    split = D.load_split("imagefolder", tmp_path, "train")
    assert split.language_coverage() == {"en": (2, 2), "ja": (1, 2)}


def _cfg(tmp_path, root, language="en", encoders=("tiny-resnet", "tiny-bert")):
    return load_config(None, [f"data.dataset=imagefolder", f"data.data_dir={root}", f"data.cache={tmp_path / 'c'}",
                              f"extract.encoders={json.dumps(list(encoders))}", "extract.workers=0",
                              "extract.device=cpu", "extract.batch_size=4", f"data.language={language}"])


def test_language_entries_keep_default_keys_and_join_with_images(tmp_path):
    root = _multilingual(tmp_path / "d")
    extract(_cfg(tmp_path, root))
    en = find_entry(tmp_path / "c", "imagefolder", "test", "tiny-bert", root)
    assert "language" not in en.key and en.name == "tiny-bert"
    extract(_cfg(tmp_path, root, "pt_BR", ("tiny-bert",)))
    pt = find_entry(tmp_path / "c", "imagefolder", "test", "tiny-bert.lang-pt-br", root)
    assert pt.key["language"] == "pt-br" and pt.n == 3 and pt.key["encoder"] == en.key["encoder"]
    img = find_entry(tmp_path / "c", "imagefolder", "test", "tiny-resnet", root)
    pairs = join_pairs(img, pt)  # the images without Portuguese captions are dropped with a warning
    assert len(pairs.image_rows) == 3
    with pytest.raises(LanguageError, match="different languages"):
        join_rows([img, en, pt])
    with pytest.raises(LanguageError, match="no captions in language 'ja'.*pt-br 3/6"):
        extract(_cfg(tmp_path, root, "ja", ("tiny-bert",)))
    from analyze.compare import default_entries  # analyses see the entries of data.language only

    assert default_entries(_cfg(tmp_path, root)) == ["tiny-bert", "tiny-resnet"]
    assert default_entries(_cfg(tmp_path, root, "pt_BR")) == ["tiny-bert", "tiny-bert.lang-pt-br", "tiny-resnet"]


def test_multi30k_translation_files_for_flickr30k(tmp_path):
    data = make_flickr30k(tmp_path / "f", n_per_split=(4, 2, 2))
    split = D.load_split("flickr30k", data, "test")
    ids = split.ids
    m30k = data / "multi30k"
    m30k.mkdir()
    (m30k / "test.txt").write_text("".join(f"{i}.jpg\n" for i in ids))
    (m30k / "test.de.gz").write_bytes(gzip.compress("".join(f"Ein Bild {i}\n" for i in ids).encode()))
    (m30k / "test.2.de").write_text("".join(f"Noch ein Bild {i}\n" for i in ids))
    opts = {"translations": ["multi30k/test.de.gz=multi30k/test.txt", "multi30k/test.2.de=multi30k/test.txt"]}
    de = D.load_split("flickr30k", data, "test", **opts).in_language("de")
    assert de.items[0].captions == (f"Ein Bild {ids[0]}", f"Noch ein Bild {ids[0]}")
    train = D.load_split("flickr30k", data, "train", **opts)  # other split: no German captions at all
    with pytest.raises(LanguageError, match="no captions in language 'de'"):
        train.in_language("de")
    (m30k / "bad.de").write_text("only one line\n")
    with pytest.raises(D.DatasetError, match="aligned line by line"):
        D.load_split("flickr30k", data, "test", translations="multi30k/bad.de=multi30k/test.txt")


def test_tuxpaint_keeps_translations_as_caption_columns(tmp_path):
    from demo.tuxpaint import prepare_tuxpaint, read_summary, read_translations
    from tests.fixtures import make_tuxpaint_tree

    txt = tmp_path / "x.txt"
    txt.write_text("A cat.\npt_BR.utf8=Um  gato.\npt-br.utf8=duplicate\nen.utf8=A cat.\nsr@latin.utf8=Mačka\nzz9.utf8=?\n")
    assert read_translations(txt) == {"pt-br": "Um gato.", "sr-latin": "Mačka"}
    out = prepare_tuxpaint(make_tuxpaint_tree(tmp_path / "tree"), tmp_path / "ds", fractions=(1.0, 0.0, 0.0))
    split = D.load_split("imagefolder", out, "train")
    assert split.language_coverage() == {"en": (4, 4), "de": (2, 4), "fr": (1, 4)}
    assert split.in_language("fr").items[0].captions == ("Un chat.",)
    assert read_summary(out)["languages"] == {"de": 2, "fr": 1}
