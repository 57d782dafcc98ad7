"""search with a real AlignedModel (tiny encoders): `search index` of a folder and of a cached split
(reusing the run's aligned entry: the same vectors as embedding the images), `search query` scores
against an independent computation, the model hash, and the bad inputs as one-line errors."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from click.testing import CliRunner

from aligned import AlignedModel, export
from extract import datasets as D
from extract.run import extract
from pipeline.config import load_config
from search.cli import main as search_cli
from search.index import INDEX_JSON, open_index
from search.model import load_model, model_hash
from search.query import Searcher
from tests.fixtures import make_imagefolder, write_bad_images
from train.fit import fit_adapters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

IMAGE, TEXT = "tiny-resnet", "tiny-gpt2"
ATOL = 1e-5  # |vector read from the cache - vector embedded from the image file|, fp32 on CPU (tests/test_aligned.py)


def _options(data, cache) -> dict:
    return {"data.dataset": "imagefolder", "data.data_dir": str(data), "data.cache": str(cache),
            "data.captions": "first", "extract.encoders": (IMAGE, TEXT), "extract.workers": 0,
            "extract.batch_size": 4, "train.image": IMAGE, "train.text": TEXT, "train.reference": "",
            "train.dim": 8, "train.epochs": 1, "train.batch_size": 8, "train.lr": 1e-2, "train.device": "cpu",
            "extract.device": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny imagefolder dataset, its cache and two runs ("lin" and "other", another seed)."""
    root = tmp_path_factory.mktemp("search")
    data = make_imagefolder(root / "data", n=6, captions_per_image=2, list_captions=True)
    cache = root / "cache"
    extract(load_config(None, options=_options(data, cache)))
    for name, seed in (("lin", 0), ("other", 1)):
        fit_adapters(load_config(None, options={**_options(data, cache), "train.name": name, "train.seed": seed}),
                     progress=False)
    return {"root": root, "data": data, "cache": cache}


def _sets(setup, index) -> list[str]:
    out = []
    for key, value in _options(setup["data"], setup["cache"]).items():
        value = ",".join(value) if isinstance(value, tuple) else value
        out += ["--set", f"{key}={json.dumps(value) if isinstance(value, str) else value}"]
    return out + ["--index", str(index)]


def _run(args, ok=True):
    res = CliRunner().invoke(search_cli, [str(a) for a in args], catch_exceptions=False)
    assert (res.exit_code == 0) == ok, res.output
    return res.output


def test_index_a_split_reuses_the_cache_and_equals_embedding_the_files(setup):
    split_ix, folder_ix = setup["root"] / "ix-split", setup["root"] / "ix-folder"
    out = _run(["index", "--split", "test", "--run", "lin", *_sets(setup, split_ix)])
    assert "indexed 6 images (vectors read from the cache) with model lin" in out and "exact search" in out
    out = _run(["index", setup["data"] / "test", "--run", "lin", *_sets(setup, folder_ix)])
    assert "indexed 6 images with model lin" in out and "read from the cache" not in out
    a, b = open_index(split_ix, 8), open_index(folder_ix, 8)
    split = D.load_split("imagefolder", setup["data"], "test")
    assert [it.id for it in a.items] == split.ids and sorted(it.id for it in b.items) == sorted(split.ids)
    assert a.model == b.model and a.items[0].captions == split.items[0].captions
    order = [[it.id for it in b.items].index(i) for i in split.ids]
    np.testing.assert_allclose(a.vectors, b.vectors[order], rtol=0, atol=ATOL)
    model = AlignedModel.from_run("lin", cache=setup["cache"], device="cpu")
    direct = model.embed_images([it.image for it in split.items], workers=0, progress=False)
    np.testing.assert_allclose(a.vectors, direct / np.linalg.norm(direct, axis=1, keepdims=True), atol=ATOL)
    doc = json.loads((split_ix / INDEX_JSON).read_text())
    assert doc["source"]["cached"] is True and doc["model"]["hash"] == model_hash(model)


def test_query_scores_are_the_cosines(setup):
    index = setup["root"] / "ix-q"
    _run(["index", "--split", "test", "--run", "lin", *_sets(setup, index)])
    out = _run(["query", "a red dog near the river", "--json", "-k", 4, *_sets(setup, index)])
    doc = json.loads(out)
    model = AlignedModel.from_run("lin", cache=setup["cache"], device="cpu")
    split = D.load_split("imagefolder", setup["data"], "test")
    img = model.embed_images([it.image for it in split.items], workers=0, progress=False)
    txt = model.embed_texts(["a red dog near the river"], progress=False)[0]
    cos = img @ txt / np.linalg.norm(img, axis=1) / np.linalg.norm(txt)
    want = np.lexsort((np.arange(len(cos)), -cos))[:4]
    assert [r["id"] for r in doc["results"]] == [split.ids[i] for i in want]
    np.testing.assert_allclose([r["score"] for r in doc["results"]], cos[want], atol=1e-5)
    assert doc["model"]["name"] == "lin"
    out = _run(["query", "--image", split.items[2].image, *_sets(setup, index)])
    first = out.splitlines()[0].split()
    assert first[0] == "1" and float(first[1]) == pytest.approx(1.0, abs=1e-5) and first[2] == split.ids[2]


def test_text_search_recall_equals_the_runs_test_recall(setup):
    """Every test caption as a query over the test images: the rank of its own image gives the
    run's recorded text-to-image recall (metrics.json, train.retrieval) to the last digit."""
    index = setup["root"] / "ix-recall"
    _run(["index", "--split", "test", "--run", "lin", *_sets(setup, index)])
    cfg = load_config(None, options={**_options(setup["data"], setup["cache"]), "search.index": str(index)})
    searcher = Searcher.open(cfg)
    split = D.load_split("imagefolder", setup["data"], "test")
    ranks = np.array([[h.id for h in searcher.text(r.text, len(split))].index(r.image_id)
                      for r in split.caption_rows("first")])
    recorded = json.loads((setup["cache"] / "runs" / "lin" / "metrics.json").read_text())["test"]["infonce"]
    for k in (1, 5, 10):
        assert np.mean(ranks < k) == recorded[f"t2i_R@{k}"]


def test_model_hash(setup):
    a = load_model("lin", setup["cache"], "cpu")[1]
    b = load_model(str(setup["cache"] / "runs" / "lin"), setup["cache"], "cpu")[1]
    c = load_model("other", setup["cache"], "cpu")[1]
    assert a.hash == b.hash != c.hash and len(a.hash) == 64
    assert a.source == {"run": "lin", "cache": str(setup["cache"].resolve())}


def test_an_exported_model_has_its_runs_hash(setup):
    """export -> from_pretrained is the same model: an index built from the run answers through the
    export (and the export, loaded by folder, reads the same vectors)."""
    folder = export("lin", setup["root"] / "exported", cache=setup["cache"])
    run_ref = load_model("lin", setup["cache"], "cpu")[1]
    model, ref = load_model(str(folder), setup["cache"], "cpu")
    assert ref.hash == run_ref.hash and ref.source == {"pretrained": str(folder.resolve())}
    index = setup["root"] / "ix-export"
    _run(["index", "--split", "test", "--run", "lin", *_sets(setup, index)])
    by_run = json.loads(_run(["query", "two friends", "--json", *_sets(setup, index)]))
    by_export = json.loads(_run(["query", "two friends", "--json", "--run", folder, *_sets(setup, index)]))
    assert [r["id"] for r in by_run["results"]] == [r["id"] for r in by_export["results"]]
    np.testing.assert_allclose([r["score"] for r in by_run["results"]], [r["score"] for r in by_export["results"]],
                               atol=1e-6)


def test_bad_inputs_are_one_line_errors(setup):
    index = setup["root"] / "ix-bad"
    sets = _sets(setup, index)
    out = _run(["query", "a dog", *sets], ok=False)
    assert "Error: No search index at" in out and "search index IMAGE_FOLDER" in out
    _run(["index", "--split", "test", "--run", "lin", *sets])
    for empty in ("", "   "):
        assert "Error: The query is empty" in _run(["query", empty, *sets], ok=False)
    assert "Error: Give a sentence" in _run(["query", *sets], ok=False)
    out = _run(["query", "a dog", "--run", "other", *sets], ok=False)
    assert "Error: Index" in out and "was built with model 'lin'" in out and "not with 'other'" in out
    bad = write_bad_images(setup["root"] / "bad")
    out = _run(["query", "--image", bad["corrupt"], *sets], ok=False)
    assert "Error: cannot decode the image" in out and "corrupt.jpg" in out
    assert "Error: No run folder" in _run(["index", "--split", "test", "--run", "nope", *sets], ok=False)
    out = _run(["index", "--split", "test", "--run", setup["cache"] / "runs" / "lin", *sets,
                "--cache", setup["root"] / "another-cache"], ok=False)
    assert "Error: Run folder" in out and "belongs to cache" in out
    folder = setup["root"] / "with-bad"
    folder.mkdir()
    for p in (bad["corrupt"], *(setup["data"] / "test").glob("*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    out = _run(["index", folder, "--run", "lin", *sets], ok=False)
    assert "Error: cannot decode the image" in out and "corrupt.jpg" in out
    out = _run(["index", folder, "--run", "lin", "--on-error", "skip", *sets])
    assert "left out 1 images" in out
    assert "not both" in _run(["index", folder, "--split", "test", "--run", "lin", *sets], ok=False)
    assert all(len(line) < 400 for line in out.splitlines())


def test_a_retrained_run_is_refused(setup):
    """Runs last of the tests using run "other": it retrains it."""
    index = setup["root"] / "ix-retrained"
    sets = _sets(setup, index)
    _run(["index", "--split", "test", "--run", "other", *sets])
    opts = {**_options(setup["data"], setup["cache"]), "train.name": "other", "train.seed": 5}
    fit_adapters(load_config(None, options=opts), progress=False)
    out = _run(["query", "a dog", *sets], ok=False)
    assert "Error: The index was built with model 'other'" in out and "retrained or re-exported" in out
    out = _run(["index", "--split", "test", "--run", "other", *sets])
    assert "indexed 6 images (vectors read from the cache)" in out  # the new aligned entries match the new run
    _run(["query", "a dog", *sets])


def test_serve_with_the_port_in_use(setup):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _run(["serve", "--port", port, *_sets(setup, setup["root"] / "ix-none")], ok=False)
    assert out.strip() == (f"Error: Port {port} on 127.0.0.1 is in use (another `search serve`?); pass --port N "
                           "(0 = any free port) or stop the program using it.")
