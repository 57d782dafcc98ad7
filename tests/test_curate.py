"""Concept-balanced curation: the concept list's bad lines, the rarest-first assignment on known
candidates, scoring in blocks equal to scoring at once, and ``curate`` end to end on a tiny cache
(tiny random encoders: captions that *are* a concept's prompt score 1 with it, so the right
concept is known) through to fit-adapters --set train.subset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from analyze.curate import (CurateError, CurateRequest, assign, candidates, concept_image_files, curate,
                            read_concepts)
from analyze.curate_cli import main as curate_cli
from extract.run import extract
from pipeline.config import load_config
from tests.fixtures import make_imagefolder, write_metadata
from train.fit import fit_adapters
from train.subset import read_subset

pytestmark = pytest.mark.usefixtures("one_thread")
CONCEPTS = ("cat", "dog", "boat", "tree", "unicorn")  # unicorn: in no caption
TEMPLATE = "a photo of a {}."


def test_read_concepts_refuses_blank_lines_and_repeats(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("# animals\ncat\n dog \n\n")
    assert read_concepts(p) == ("cat", "dog")  # comments and the trailing newline are fine
    p.write_text("cat\n\ndog\nCat\n")
    with pytest.raises(CurateError, match=r"empty line\(s\) 2; duplicate concept\(s\) 'Cat' \(lines 1 and 4\)"):
        read_concepts(p)
    p.write_text("# nothing\n")
    with pytest.raises(CurateError, match="names no concept"):
        read_concepts(p)
    with pytest.raises(CurateError, match="no such file"):
        read_concepts(tmp_path / "missing.txt")


def test_assign_takes_rarest_concepts_first_and_each_pair_once():
    # concept 0: candidates 0-5 (common), concept 1: candidates 4, 5 (rare); pair 4/5 are also 0's best
    pair = np.array([0, 1, 2, 3, 4, 5, 4, 5])
    concept = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    score = np.array([.9, .8, .7, .6, .95, .99, .5, .4])
    p, c, s, order = assign(pair, concept, score, 3, per_concept=3)
    assert order == [2, 1, 0]  # concept 2 has none, then the rare one
    assert list(zip(p, c)) == [(4, 1), (5, 1), (0, 0), (1, 0), (2, 0)]  # the rare concept gets 4 and 5 first
    assert len(set(p)) == len(p)
    p, c, _, _ = assign(pair, concept, score, 3, per_concept=3, total=3)
    assert list(c) == [1, 1, 0]


def test_candidates_in_blocks_keep_top_k_above_the_floor():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, size=(50, 4))
    blocks = [(np.arange(s, min(50, s + 7)), scores[s:s + 7]) for s in range(0, 50, 7)]
    p, c, s = candidates(blocks, 4, 2, 0.2)
    want = {(i, j) for i in range(50) for j in np.argsort(-scores[i])[:2] if scores[i, j] >= 0.2}
    assert set(zip(p.tolist(), c.tolist())) == want
    np.testing.assert_array_equal(s, scores[p, c])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A tiny imagefolder whose train captions are the concepts' prompts (4 cats, 3 dogs, 2 boats,
    1 tree), with tiny random encoders extracted."""
    tmp = tmp_path_factory.mktemp("pool")
    data = make_imagefolder(tmp / "data", n=10)
    truth = ["cat"] * 4 + ["dog"] * 3 + ["boat"] * 2 + ["tree"]
    rows = [{"file_name": f"sub/train_{i}.png" if i % 2 else f"train_{i}.png", "caption": TEMPLATE.format(c)}
            for i, c in enumerate(truth)]
    write_metadata(data / "train", rows)
    (tmp / "concepts.txt").write_text("\n".join(CONCEPTS) + "\n")
    (tmp / "templates.txt").write_text(TEMPLATE + "\n")
    opts = {"data.dataset": "imagefolder", "data.data_dir": str(data), "data.cache": str(tmp / "cache"),
            "extract.encoders": ("tiny-resnet", "tiny-gpt2"), "extract.workers": 0, "extract.device": "cpu",
            "train.image": "tiny-resnet", "train.text": "tiny-gpt2", "train.reference": "", "train.dim": 8,
            "train.epochs": 1, "train.batch_size": 4, "train.device": "cpu"}
    cfg = load_config(None, options=opts)
    extract(cfg)
    ids = [r["file_name"].rsplit(".", 1)[0] for r in rows]
    return tmp, cfg, dict(zip(ids, truth))


def test_curate_assigns_each_pair_its_concept_and_reports_the_unmatched(pool):
    tmp, cfg, truth = pool
    req = CurateRequest(read_concepts(tmp / "concepts.txt"), per_concept=2, templates=(TEMPLATE,), block=3)
    res = curate(cfg, req)
    assert all(truth[i] == c for i, c, _ in res.rows) and all(s == pytest.approx(1.0, abs=1e-5) for *_, s in res.rows)
    assert res.before == {"cat": 4, "dog": 3, "boat": 2, "tree": 1, "unicorn": 0}
    assert res.after == {"cat": 2, "dog": 2, "boat": 2, "tree": 1, "unicorn": 0}
    assert res.unmatched == ["unicorn"] and res.order[:2] == ["unicorn", "tree"]
    once = curate(cfg, CurateRequest(req.concepts, per_concept=2, templates=(TEMPLATE,), block=1000))
    assert [r[:2] for r in once.rows] == [r[:2] for r in res.rows]  # blocks change nothing (but BLAS rounding)
    np.testing.assert_allclose([r[2] for r in once.rows], [r[2] for r in res.rows], atol=1e-12)
    with pytest.raises(CurateError, match="No pool pair matches any of the 2 concepts at --floor 0.9999; lower it"):
        curate(cfg, CurateRequest(("zebra", "lion"), per_concept=2, templates=(TEMPLATE,), floor=0.9999))
    with pytest.raises(CurateError, match="a cosine similarity floor is in"):
        curate(cfg, CurateRequest(req.concepts, per_concept=2, floor=1.5))


def test_the_command_writes_subset_and_figure_and_fit_adapters_trains_on_it(pool):
    tmp, cfg, truth = pool
    out = tmp / "out" / "subset.csv"
    args = ["--cache", cfg.data.cache, "--dataset", "imagefolder", "--set", f"data.data_dir={cfg.data.data_dir}",
            "--set", "train.image=tiny-resnet", "--set", "train.text=tiny-gpt2", "--set", "extract.device=cpu",
            "--concepts", str(tmp / "concepts.txt"), "--templates", str(tmp / "templates.txt"),
            "--per-concept", "2", "--total", "6", "--out", str(out), "--random-seeds", "0,1"]
    res = CliRunner().invoke(curate_cli, args)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("curated 6 of 10 pool pairs: 4 of 5 concepts covered, 2 at the full 2")  # the answer first
    assert "1 concept(s) match no pool pair" in lines[1] and "unicorn" in lines[1]
    assert (tmp / "out" / "subset.png").is_file() and lines[-1].endswith("subset.png")
    subset = read_subset(out)
    assert len(subset.ids) == 6 and subset.source["dataset"] == "imagefolder" and subset.source["per_concept"] == 2
    assert [truth[i] for i in subset.ids] == list(subset.concepts)
    controls = [read_subset(tmp / "out" / f"subset.random-{s}.csv") for s in (0, 1)]
    assert all(len(c.ids) == 6 and c.source["random"]["seed"] == s for s, c in enumerate(controls))
    assert controls[0].ids != controls[1].ids
    run = fit_adapters(load_config(None, options={**_train_opts(cfg), "train.subset": str(out), "train.name": "cur"}),
                       progress=False)
    assert json.loads((run.run_dir / "adapters.json").read_text())["train_images"]["n"] == 6


def _train_opts(cfg):
    return {"data.dataset": "imagefolder", "data.data_dir": str(cfg.data.data_dir), "data.cache": str(cfg.data.cache),
            "train.image": "tiny-resnet", "train.text": "tiny-gpt2", "train.reference": "", "train.dim": 8,
            "train.epochs": 1, "train.batch_size": 4, "train.device": "cpu"}


def test_concept_images_give_image_prototypes(pool, tmp_path):
    tmp, cfg, truth = pool
    folder = tmp_path / "imgs"
    from PIL import Image
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 10, 10) if c == "cat" else (10, 10, 200)).save(folder / c / "a.png")
    assert set(concept_image_files(folder, CONCEPTS)) == {"cat", "dog"}
    res = curate(cfg, CurateRequest(CONCEPTS, per_concept=3, templates=(TEMPLATE,), concept_images=str(folder)))
    assert sum(res.after.values()) >= 1 and res.source["concept_images"] is True
    (folder / "zebra").mkdir()
    with pytest.raises(CurateError, match="subfolder 'zebra' is not a concept"):
        concept_image_files(folder, CONCEPTS)


@pytest.mark.parametrize("args, message", [
    ([], "curate needs --concepts, --per-concept, --out"),
    (["--concepts", "X", "--per-concept", "0", "--out", "o.csv"], "no such file"),
])
def test_bad_command_lines_are_one_line(args, message, tmp_path):
    res = CliRunner().invoke(curate_cli, args + ["--cache", str(tmp_path)])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


def test_curate_through_a_run_scores_in_its_shared_space(pool, tmp_path):
    tmp, cfg, truth = pool
    fit_adapters(load_config(None, options={**_train_opts(cfg), "train.name": "space"}), progress=False)
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    res = curate(cfg, CurateRequest(CONCEPTS, per_concept=2, templates=(TEMPLATE,), run="space",
                                    concept_images=str(tmp_path / "imgs")))
    assert res.source["run"] == "space" and 1 <= len(res.rows) <= 8
    assert len({i for i, *_ in res.rows}) == len(res.rows)  # each pair once
    text_only = curate(cfg, CurateRequest(CONCEPTS, per_concept=2, templates=(TEMPLATE,), run="space"))
    assert all(s == pytest.approx(1.0, abs=1e-5) for *_, s in text_only.rows)  # a caption equal to its prompt
