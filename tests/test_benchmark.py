"""``analyze benchmark``: LAION's CLIP_benchmark on the aligned model equals the project's own
figures on the same rows (metrics.json's test recall, ``analyze zeroshot``), on untied data; ties
are the one documented difference and are counted (close calls). Tiny random encoders, generated
data, no download: CLIP_benchmark's dataset builder is held offline."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("clip_benchmark", reason="the [benchmark] extra (pip install clip-benchmark) is not installed")

from aligned.export import export  # noqa: E402
from analyze.benchdata import OWN, BenchmarkError, cb_templates, clip_benchmark, offline, topk_accuracy  # noqa: E402
from analyze.benchmark import (RETRIEVAL_FIGURES, benchmark, classification_close_calls, evaluate,  # noqa: E402
                               retrieval_close_calls)
from analyze.cli import main as analyze_cli  # noqa: E402
from analyze.report import build_report  # noqa: E402
from analyze.zeroshot import class_embeddings, class_scores, summarize, zero_shot  # noqa: E402
from extract.run import extract  # noqa: E402
from pipeline.config import load_config, with_values  # noqa: E402
from pipeline.runs import find_run, read_run  # noqa: E402
from tests.fixtures import WORDS, write_metadata  # noqa: E402
from train.fit import fit_adapters  # noqa: E402
from train.retrieval import retrieval_summary  # noqa: E402

CLASSES = ("bird", "boat", "red_car", "tree")
PER_CLASS = {"train": 6, "val": 2, "test": 4}
CAPTIONS = 3  # per image: the multi-caption protocol (Flickr30k / COCO have 5)


# ----------------------------------------------------------------------------- a stand-in model
class Tokens(torch.Tensor):
    pass


class TableModel(torch.nn.Module):
    """A CLIP-shaped model over fixed vectors: an "image" is its embedding, a text "t<i>" is row i
    of ``texts``; so CLIP_benchmark sees exactly the embeddings the project's functions get."""

    device = torch.device("cpu")

    def __init__(self, texts: np.ndarray):
        super().__init__()
        self.texts = torch.as_tensor(texts, dtype=torch.float32)
        self.tokenizer = lambda strings: torch.tensor([int(s.split()[-1].lstrip("t")) for s in strings])

    def encode_image(self, x):
        return x

    def encode_text(self, idx):
        return self.texts[idx]


def _retrieval_data(rng, n_images=20, captions=5, d=8):
    img = rng.normal(size=(n_images, d)).astype(np.float32)
    t2i = np.repeat(np.arange(n_images), captions)
    txt = (img[t2i] + rng.normal(scale=1.5, size=(len(t2i), d))).astype(np.float32)
    return img, txt, t2i


def _cb_retrieval(img, txt, t2i):
    items = [(torch.as_tensor(img[i]), [f"t{j}" for j in np.flatnonzero(t2i == i)]) for i in range(len(img))]
    return evaluate(TableModel(txt), items, "zeroshot_retrieval", OWN, batch_size=7, workers=0)


def test_clip_benchmark_retrieval_equals_the_project_recall_on_untied_data():
    """Five captions per image, batches that do not divide the images: image_retrieval = t2i,
    text_retrieval = i2t, equal hit counts (CLIP_benchmark averages in float32)."""
    img, txt, t2i = _retrieval_data(np.random.default_rng(0))
    cb = _cb_retrieval(img, txt, t2i)
    ours = retrieval_summary(img, txt, t2i)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    close = retrieval_close_calls(unit(img), unit(txt), t2i)
    assert all(n == 0 for per in close.values() for n in per.values())
    for f, p in RETRIEVAL_FIGURES.items():
        n = len(t2i) if p.startswith("t2i") else len(img)
        assert round(cb[f] * n) == round(ours[p] * n) and cb[f] == pytest.approx(ours[p], abs=1e-7), f
    assert 0 < cb["image_retrieval_recall@1"] < cb["image_retrieval_recall@10"] < 1  # not a trivial case


def test_a_tie_is_the_documented_difference_and_is_counted():
    """Two images whose captions are the same vector: CLIP_benchmark's topk puts one of the tied
    captions first, the project's rule decides the tie its own way; close_calls counts the
    queries where that matters, and the hit counts differ by at most that."""
    rng = np.random.default_rng(1)
    img, txt, t2i = _retrieval_data(rng, n_images=12, captions=1)
    img[1] = img[0] + 1e-3 * rng.normal(size=img.shape[1])
    txt[0] = txt[1] = img[0]  # images 0 and 1 both score their caption and the other's equally
    cb, ours = _cb_retrieval(img, txt, t2i), retrieval_summary(img, txt, t2i)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    close = retrieval_close_calls(unit(img.astype(np.float64)), unit(txt.astype(np.float64)), t2i)
    assert close["i2t"][1] >= 1 and close["t2i"][1] >= 1
    for f, p in RETRIEVAL_FIGURES.items():
        way, k = p.split("_R@")
        n = len(t2i) if way == "t2i" else len(img)
        assert abs(round(cb[f] * n) - round(ours[p] * n)) <= close[way][int(k)], f


def test_close_calls_hand_case():
    # captions 0 (of image 0) and 2 (of image 1) score both images equally; caption 1 is clear.
    # Image 0's own caption 0 ties with caption 2; image 1's best caption (1) is clear.
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[2 ** -0.5, 2 ** -0.5], [0.0, 1.0], [2 ** -0.5, 2 ** -0.5]])
    assert retrieval_close_calls(img, txt, [0, 1, 1], ks=(1, 2)) == {"t2i": {1: 2, 2: 0}, "i2t": {1: 1, 2: 0}}
    scores = np.array([[0.5, 0.5, 0.1], [0.9, 0.2, 0.1], [0.3, 0.3 + 1e-7, 0.3 - 1e-7]])
    assert classification_close_calls(scores, [0, 0, 2], ks=(1, 2)) == {1: 2, 2: 1}


def test_clip_benchmark_classification_equals_analyze_zeroshot_figures():
    """Same classifier (mean of normalised prompt embeddings, renormalised) and figures: acc1 /
    acc5 / mean_per_class_recall = top1 / top5 / balanced to the last digit (a class absent from
    the labels is still a candidate, as in analyze zeroshot)."""
    rng = np.random.default_rng(2)
    C, T, n, d = 6, 3, 40, 8
    centres = rng.normal(size=(C, d))
    labels = rng.integers(0, C - 1, size=n)  # class C-1 never appears among the images
    img = (centres[labels] + rng.normal(scale=1.2, size=(n, d))).astype(np.float32)
    prompts = (np.repeat(centres, T, axis=0) + rng.normal(scale=0.5, size=(C * T, d))).astype(np.float32)
    names = [f"c{c}" for c in range(C)]

    class Items(list):
        classes = [f"class t{c}" for c in range(C)]  # "{c} t" templates below make "class t<c> t<row>"
        templates = [f"{{c}} {t}" for t in range(T)]

    model = TableModel(prompts)
    model.tokenizer = lambda s: torch.tensor([int(x.split()[1][1:]) * T + int(x.split()[2]) for x in s])
    cb = evaluate(model, Items((torch.as_tensor(img[i]), int(labels[i])) for i in range(n)),
                  "zeroshot_classification", OWN, batch_size=16, workers=0)
    ours = summarize(class_scores(img, class_embeddings(prompts, C)), labels, names)
    assert classification_close_calls(class_scores(img, class_embeddings(prompts, C)), labels) == {1: 0, 5: 0}
    assert (cb["acc1"], cb["acc5"], cb["mean_per_class_recall"]) == (ours["top1"], ours["top5"], ours["balanced"])
    assert 0.2 < cb["acc1"] < 1


def test_topk_accuracy_stand_in_and_templates():
    out = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.6]])
    assert topk_accuracy(out, torch.tensor([0, 0, 1]), topk=(1, 2, 3)) == [1 / 3, 2 / 3, 1.0]
    assert cb_templates(["a photo of a {}.", "{} {curly}"]) == ["a photo of a {c}.", "{c} {{curly}}"]
    assert cb_templates(["{} {curly}"])[0].format(c="dog") == "dog {curly}"


# ----------------------------------------------------------------------------- a tiny trained run
def make_benchmark_data(root):
    """train/val/test, a folder per class, JPEG images, three distinct captions per image."""
    rng = np.random.default_rng(0)
    colours = {c: rng.integers(30, 225, 3) for c in CLASSES}
    for split, k in PER_CLASS.items():
        rows = []
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(k):
                rel = f"{c}/{split}_{i}.jpg"
                pixels = np.clip(colours[c] + rng.integers(-60, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / rel, quality=95)
                for j in range(CAPTIONS):
                    words = " ".join(rng.choice(WORDS, 3))
                    rows.append({"file_name": rel, "caption": f"a {c.replace('_', ' ')} {words} {split} {i} {j}"})
        write_metadata(root / split, rows)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    data = make_benchmark_data(tmp / "data")
    toml = tmp / "exp.toml"
    toml.write_text(f"""
[data]
dataset = "imagefolder"
data_dir = "{data}"
captions = "all"
cache = "{tmp / 'cache'}"
label_from = "dir"
[extract]
encoders = ["tiny-resnet", "tiny-gpt2"]
workers = 0
batch_size = 16
device = "cpu"
[train]
image = "tiny-resnet"
text = "tiny-gpt2"
reference = ""
dim = 8
epochs = 3
batch_size = 16
name = "b"
[analyze]
reference = ""
metrics = ["cka"]
bootstrap = 5
permutations = 5
out = "{tmp / 'reports'}"
""")
    cfg = load_config(toml)
    extract(cfg)
    fit_adapters(cfg, progress=False)
    return toml, cfg


def test_benchmark_of_the_own_split_equals_metrics_json_and_analyze_zeroshot(tiny):
    toml, cfg = tiny
    res = CliRunner().invoke(analyze_cli, ["benchmark", "--config", str(toml)])
    assert res.exit_code == 0, res.output
    assert "image_retrieval_recall@1" in res.output and "mean_per_class_recall" in res.output
    doc = json.loads(next(Path(cfg.analyze.out).rglob("benchmark-own-test.json")).read_text())
    assert doc["unexplained"] == [] and doc["skipped"] == {}
    retrieval, zs = doc["results"]["zeroshot_retrieval"], doc["results"]["zeroshot_classification"]
    assert retrieval["n_images"] == len(CLASSES) * PER_CLASS["test"] and retrieval["n_texts"] == CAPTIONS * retrieval["n_images"]
    assert all(r["close_calls"] == 0 and r["agree"] is not False for r in retrieval["compare"] + zs["compare"])
    assert zs["metrics"]["acc5"] is None  # NaN (stored as null): CLIP_benchmark has no top-5 below 5 classes
    # against metrics.json, written by fit-adapters: the same hit counts
    test = read_run(find_run(cfg.data.cache, "b").path).metrics.adapters
    for f, p in RETRIEVAL_FIGURES.items():
        n = retrieval["n_texts"] if p.startswith("t2i") else retrieval["n_images"]
        assert round(retrieval["metrics"][f] * n) == round(test[p] * n), f
        assert retrieval["metrics"][f] == pytest.approx(test[p], abs=1e-7), f
    # against analyze zeroshot: to the last digit
    direct = zero_shot(cfg, "b")["results"]["adapters"]
    m = zs["metrics"]
    assert (m["acc1"], m["mean_per_class_recall"]) == (direct["top1"], direct["balanced"])
    assert zs["templates"] and zs["classes"] == list(CLASSES)
    # the report shows the figures beside the project's
    md = build_report(cfg, "b").md.read_text()
    assert "CLIP_benchmark" in md and "image_retrieval_recall@1" in md


def test_a_clip_benchmark_dataset_from_files_gives_the_own_split_figures(tiny, tmp_path):
    """The own test split written in CLIP_benchmark's Flickr30k layout (images + a Karpathy-style
    caption file) under --dataset-root: its reader, the same figures."""
    _, cfg = tiny
    root = tmp_path / "flickr"
    lines, test = ["image,caption"], Path(cfg.data.data_dir) / "test"
    for line in (test / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        lines.append(f"{row['file_name']},{row['caption']}")
        (root / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        (root / row["file_name"]).write_bytes((test / row["file_name"]).read_bytes())
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    own = benchmark(cfg, "b")["results"]["zeroshot_retrieval"]["metrics"]
    flickr = benchmark(cfg, "b", "flickr30k", str(root))
    assert flickr["results"]["zeroshot_retrieval"]["n"] == len(CLASSES) * PER_CLASS["test"]
    assert flickr["results"]["zeroshot_retrieval"]["metrics"] == pytest.approx(own, abs=1e-7)
    assert flickr["path"].name == "benchmark-flickr30k-test.json"
    # the exported model (--model FOLDER) gives the same figures
    folder = export("b", tmp_path / "exported", cfg.data.cache)
    again = benchmark(cfg, None, "flickr30k", str(root), model_dir=folder)
    assert again["results"]["zeroshot_retrieval"]["metrics"] == flickr["results"]["zeroshot_retrieval"]["metrics"]
    assert again["path"].parent.name == "exported" and again["path"].parent.parent.name == "models"


def test_own_split_without_labels_skips_classification_with_the_reason(tiny):
    _, cfg = tiny
    res = benchmark(with_values(cfg, {"data.label_from": "species"}), "b")
    assert "zeroshot_retrieval" in res["results"] and "zeroshot_classification" not in res["results"]
    assert "species" in res["skipped"]["zeroshot_classification"]
    with pytest.raises(Exception, match="species"):
        benchmark(with_values(cfg, {"data.label_from": "species"}), "b", task="zeroshot_classification")


@pytest.mark.parametrize("args, message", [
    (["cifar10"], "needs --dataset-root"),
    (["cifar1000", "--dataset-root", "{tmp}"], "Did you mean"),
    (["cifar10", "--dataset-root", "{tmp}"], "never downloads"),
    (["flickr30k", "--dataset-root", "{tmp}/absent"], "would download it with kaggle"),
    (["mscoco_captions", "--dataset-root", "{tmp}"], "http://images.cocodataset.org/zips/val2014.zip"),
    (["sugar_crepe/add_att", "--dataset-root", "{tmp}", "--task", "auto"], "image_caption_selection"),
])
def test_clear_errors_and_no_download(tiny, tmp_path, args, message):
    toml, _ = tiny
    res = CliRunner().invoke(analyze_cli, ["benchmark", *[a.format(tmp=tmp_path) for a in args], "--config", str(toml)])
    assert res.exit_code == 1 and message in res.output, res.output
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing fetched, nothing unpacked


def test_offline_refuses_processes_and_connections(tmp_path):
    import socket
    import subprocess
    with offline("x", str(tmp_path)):
        with pytest.raises(BenchmarkError, match="would run `wget http://example.org/a.zip`"):
            subprocess.call("wget http://example.org/a.zip", shell=True)
        with pytest.raises(BenchmarkError, match="would connect to"):
            socket.create_connection(("127.0.0.1", 9))
    assert subprocess.call(["true"]) == 0  # restored


def test_an_external_classification_dataset_runs_offline(tiny):
    """CLIP_benchmark's own "dummy" dataset (one blank image, two classes, its default templates)."""
    _, cfg = tiny
    res = benchmark(cfg, "b", "dummy", "unused")
    r = res["results"]["zeroshot_classification"]
    assert r["n"] == 1 and r["classes"] == ["blank image", "noisy image"] and math.isnan(r["metrics"]["acc5"])
    assert r["metrics"]["acc1"] in (0.0, 1.0) and r["project"] is None
    assert clip_benchmark()["builder"] is not None
