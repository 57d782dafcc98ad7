"""``analyze benchmark``: the field's benchmark suite, LAION's CLIP_benchmark (PyPI
``clip-benchmark``, the ``[benchmark]`` extra), on a run's aligned model.

The model is ``aligned.AlignedModel`` (open_clip-shaped: ``preprocess``, ``tokenizer``,
``encode_image``, ``encode_text``), from a run (``--run``) or an exported folder (``--model``).
It goes unchanged into CLIP_benchmark's own metric functions,
``clip_benchmark.metrics.zeroshot_retrieval.evaluate`` and
``clip_benchmark.metrics.zeroshot_classification.evaluate``; nothing of them is re-implemented.
Datasets (``analyze.benchdata``): ``own``, the run's ``analyze.split`` (retrieval, and
classification when ``data.label_from`` gives the images labels), or any dataset CLIP_benchmark
knows, read from ``--dataset-root`` and never downloaded.

CLIP_benchmark's figures, and the project's figure on the same rows (own split only):

  image_retrieval_recall@K   text -> image: a caption hits when its image is in the top K    t2i_R@K
  text_retrieval_recall@K    image -> text: an image hits when any of its captions is there  i2t_R@K
  acc1, acc5                 top-k zero-shot accuracy (acc5 is NaN below 5 classes)          top1, top5
  mean_per_class_recall      sklearn balanced accuracy: mean per-class top-1 over the classes
                             present                                                         balanced

The classifier is built as in ``analyze zeroshot``: every template filled with each class name
(``_`` shown as a space), the mean of the L2-normalised prompt embeddings, renormalised; an image
takes the class of highest cosine (CLIP_benchmark multiplies by 100, which changes no ranking).
The project's side is computed from the run's cached features with the project's own functions
(``train.retrieval.retrieval_summary``, which gave ``metrics.json``'s test recall;
``analyze.zeroshot.summarize``, which gives ``zeroshot.json``), so the two columns differ only by:

* ties: CLIP_benchmark ranks with ``torch.topk`` / ``argmax``, whose order among equal scores is
  unspecified; the project's rule is a fixed one (``train.retrieval``, ``analyze.zeroshot``
  docstrings). Each compared figure records its ``close_calls``: queries whose hit at K is decided
  by a tie or a score difference under ``CLOSE`` (the re-encoded features match the cache to about
  1e-6); with none, the two hit counts are equal.
* float32: CLIP_benchmark averages retrieval hits in float32, so its recall equals the project's
  hit fraction to float32 precision (7 digits), not to the last float64 digit; accuracies and
  balanced accuracy are equal to the last digit.

Mixed precision is off (CLIP_benchmark's default autocast would run a CPU model in bfloat16);
the model runs its encoders at the precision its entries were extracted with. Output:
``<analyze.out>/<dataset>/<split>/runs/<run>/benchmark-<name>-<split>.json`` (exported folder:
``.../models/<folder name>/``), shown in ``analyze report``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from aligned import AlignedModel
from analyze.benchdata import (OWN, TASKS, BenchmarkError, OwnSplit, clip_benchmark, clip_benchmark_dataset, cb_version,
                               collate_for, default_task, labelled_dataset, split_dataset,
                               working_accuracy)
from analyze.compare import header, output_dir
from analyze.evalrun import EvalError, open_run
from analyze.prompts import prompt_features, read_templates
from analyze.zeroshot import class_embeddings, class_scores, split_labels, summarize
from extract.datasets import DatasetError
from pipeline.config import PipelineConfig
from pipeline.runtime import default_workers, resolve_device, write_json
from train.retrieval import KS, retrieval_summary

log = logging.getLogger(__name__)

AGREE = 1e-6  # |CLIP_benchmark - project| under which a figure agrees (float32 averaging, see _compare)
CLOSE = 1e-5  # cosine difference under which a hit counts as a close call (tie or float noise)
TASK_CHOICES = ("auto",) + TASKS  # --task; auto: own = retrieval (+ classification with labels), else CLIP_benchmark's
RETRIEVAL_FIGURES = {f"{way}_retrieval_recall@{k}": f"{ours}_R@{k}" for k in KS
                     for way, ours in (("image", "t2i"), ("text", "i2t"))}  # CLIP_benchmark key -> project key
CLASSIFICATION_FIGURES = {"acc1": "top1", "acc5": "top5", "mean_per_class_recall": "balanced"}


def output_name(name: str, split: str) -> str:
    """File name of one benchmark's results: ``benchmark-<name>-<split>.json`` (``/`` -> ``-``)."""
    return f"benchmark-{name.replace('/', '-')}-{split}.json"


# ----------------------------------------------------------------------------- close calls
def _ambiguous(scores: torch.Tensor, true: torch.Tensor, others: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """Queries whose hit at K depends on ties or differences under CLOSE: rows of ``scores`` (b, m)
    with ``true`` (b, 1) the correct item's score and ``others`` (b, m) the candidates that compete."""
    ahead = ((scores > true + CLOSE) & others).sum(1)  # surely ranked above the correct item
    maybe = ((scores >= true - CLOSE) & others).sum(1)  # possibly ranked above it
    return {k: int(((ahead < k) & (maybe >= k)).sum()) for k in ks}


def retrieval_close_calls(image_emb, text_emb, text_to_image, ks: Sequence[int] = KS, block: int = 512) -> dict:
    """{"t2i": {K: n}, "i2t": {K: n}}: close calls of each direction on unit-row embeddings
    (image (n_images, d), text (n_texts, d)); image -> text uses each image's best caption."""
    img, txt = torch.as_tensor(np.asarray(image_emb, np.float64)), torch.as_tensor(np.asarray(text_emb, np.float64))
    t2i = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    out = {"t2i": dict.fromkeys(ks, 0), "i2t": dict.fromkeys(ks, 0)}
    for s in range(0, txt.shape[0], block):
        S = txt[s:s + block] @ img.T
        own = torch.zeros_like(S, dtype=torch.bool).scatter_(1, t2i[s:s + block, None], True)
        for k, n in _ambiguous(S, S.gather(1, t2i[s:s + block, None]), ~own, ks).items():
            out["t2i"][k] += n
    for s in range(0, img.shape[0], block):
        S = img[s:s + block] @ txt.T
        own = t2i[None, :] == torch.arange(s, s + S.shape[0])[:, None]
        best = S.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
        for k, n in _ambiguous(S, best, ~own, ks).items():
            out["i2t"][k] += n
    return out


def classification_close_calls(scores, labels, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """{K: n}: images whose top-K hit is decided by a tie or a difference under CLOSE; scores (n, C)."""
    S = torch.as_tensor(np.asarray(scores, np.float64))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)[:, None]
    others = torch.ones_like(S, dtype=torch.bool).scatter_(1, y, False)
    return _ambiguous(S, S.gather(1, y), others, ks)


def _compare(cb: dict, ours: dict | None, figures: dict[str, str], close: dict[str, int]) -> list[dict]:
    """One row per CLIP_benchmark figure: its value, the project's on the same rows, the close calls
    and ``agree`` (equal to float32 precision: hit fractions of fewer than a million queries differ
    by at least 1e-6 when their counts differ)."""
    rows = []
    for f, p in figures.items():
        if f not in cb:
            continue
        mine = None if ours is None else ours.get(p)
        both = isinstance(mine, float) and isinstance(cb[f], float) and math.isfinite(mine) and math.isfinite(cb[f])
        rows.append({"figure": f, "project_figure": p, "clip_benchmark": cb[f], "project": mine,
                     "close_calls": close.get(p), "agree": (abs(cb[f] - mine) < AGREE) if both else None})
    return rows


def unexplained(results: dict) -> list[str]:
    """Figures where CLIP_benchmark and the project differ without a close call to explain it:
    the aligned model did not reproduce the cached features (should never happen)."""
    return [f"{task}/{r['figure']}" for task, res in results.items() for r in res["compare"]
            if r["agree"] is False and not r["close_calls"]]


# ----------------------------------------------------------------------------- running CLIP_benchmark
def evaluate(model, dataset, task: str, name: str, batch_size: int, workers: int) -> dict[str, float]:
    """CLIP_benchmark's ``evaluate`` of ``task`` on ``dataset`` (items as its datasets give them)
    for ``model`` (on ``model.device``), mixed precision off. Returns its metrics dict; recall@K
    for the K of ``train.retrieval.KS`` up to the number of images."""
    cb = clip_benchmark()
    if name.startswith("wds/"):  # WebDatasets batch themselves, as in CLIP_benchmark's CLI
        loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, num_workers=workers)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             collate_fn=collate_for(name, task))
    dev = torch.device(model.device)
    # CLIP_benchmark moves tensors to `device` and opens torch.autocast(device): it takes a device type
    where = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with where, warnings.catch_warnings():
        # sklearn's balanced accuracy warns when a class is predicted that no image has: such classes
        # are candidates on purpose (as in analyze zeroshot), and averaged over the classes present
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", "A single label was found")
        if task == "zeroshot_retrieval":
            ks = [k for k in KS if k <= len(dataset)] if hasattr(dataset, "__len__") else list(KS)
            if not ks:  # CLIP_benchmark's topk cannot take K above the number of images
                raise BenchmarkError(f"{name}: {len(dataset)} images, too few for recall@{KS[0]}.")
            return cb["retrieval"].evaluate(model, loader, model.tokenizer, dev.type, amp=False, recall_k_list=ks)
        with working_accuracy(cb["classification"]):
            return cb["classification"].evaluate(model, loader, model.tokenizer, dataset.classes, dataset.templates,
                                                 dev.type, amp=False)


def _own_tasks(cfg: PipelineConfig, rv, model, task: str, templates, force: bool, batch: int,
               workers: int) -> tuple[dict, dict]:
    """(results, skipped) of the own split: retrieval and/or classification, each with the
    project's figures on the same cached rows."""
    split = cfg.analyze.split
    own: OwnSplit = split_dataset(rv, split, model.preprocess)
    pairs = rv.split(split)
    results, skipped = {}, {}
    if task in ("auto", "zeroshot_retrieval"):
        t0 = time.perf_counter()
        cb = evaluate(model, own.retrieval, "zeroshot_retrieval", OWN, batch, workers)
        img, txt = rv.embed("image", pairs.image), rv.embed("text", pairs.text)
        ours = retrieval_summary(img, txt, pairs.text_to_image)
        close = retrieval_close_calls(img, txt, pairs.text_to_image)
        flat = {f"{way}_R@{k}": n for way, per in close.items() for k, n in per.items()}
        results["zeroshot_retrieval"] = {
            "n_images": len(pairs.image_ids), "n_texts": len(pairs.text_ids), "metrics": cb, "project": ours,
            "compare": _compare(cb, ours, RETRIEVAL_FIGURES, flat), "seconds": time.perf_counter() - t0}
    if task in ("auto", "zeroshot_classification"):
        try:
            classes, labels = split_labels(cfg, pairs)
        except (DatasetError, EvalError) as exc:  # no labels: a logged skip under auto
            if task != "auto":
                raise
            log.warning("analyze benchmark: no zero-shot classification of the own split: %s", exc)
            skipped["zeroshot_classification"] = str(exc)
            return results, skipped
        t0 = time.perf_counter()
        tpl = read_templates(templates)
        cb = evaluate(model, labelled_dataset(own, labels, classes, tpl), "zeroshot_classification", OWN, batch, workers)
        prompts = prompt_features(cfg.data.cache, cfg.data.dataset, rv.entry(split, "text"), classes, tpl,
                                  cfg.extract.device, force, rv.layer("text"))
        S = class_scores(rv.embed("image", pairs.image), class_embeddings(rv.embed("text", prompts), len(classes)))
        ours = {k: v for k, v in summarize(S, labels, classes).items() if k in CLASSIFICATION_FIGURES.values()}
        close = classification_close_calls(S, labels)
        results["zeroshot_classification"] = {
            "n": int(len(labels)), "classes": list(classes), "templates": list(tpl), "label_from": cfg.data.label_from,
            "metrics": cb, "project": ours, "seconds": time.perf_counter() - t0,
            "compare": _compare(cb, ours, CLASSIFICATION_FIGURES, {"top1": close[1], "top5": close[5],
                                                                   "balanced": close[1]})}
    return results, skipped


def _external_task(cfg: PipelineConfig, model, name: str, root: str, task: str, templates, batch: int,
                   workers: int) -> dict:
    task = default_task(name) if task == "auto" else task
    t0 = time.perf_counter()
    tpl = read_templates(templates) if templates else None
    ds = clip_benchmark_dataset(name, root, cfg.analyze.split, model.preprocess, task, tpl)
    cb = evaluate(model, ds, task, name, batch, workers)
    res = {"metrics": cb, "project": None, "compare": _compare(cb, None, RETRIEVAL_FIGURES
                                                               if task == "zeroshot_retrieval" else CLASSIFICATION_FIGURES, {}),
           "seconds": time.perf_counter() - t0}
    try:
        res["n"] = len(ds)
    except TypeError:  # an iterable (WebDataset) has no length
        pass
    if task == "zeroshot_classification":
        res["classes"], res["templates"] = list(ds.classes), list(ds.templates)
    return {task: res}


def benchmark(cfg: PipelineConfig, run: str | None = None, name: str = OWN, dataset_root: str | None = None,
              task: str = "auto", templates: str | Path | None = None, model_dir: str | Path | None = None,
              force: bool = False) -> dict:
    """``analyze benchmark``: CLIP_benchmark on the aligned model of run ``run`` (default
    train.name), or of the exported folder ``model_dir``, for dataset ``name`` (``own`` = the run's
    ``analyze.split``; else a CLIP_benchmark dataset under ``dataset_root``, split
    ``analyze.split``). task: ``TASK_CHOICES``; templates: a template file (None = analyze
    zeroshot's default set on the own split, CLIP_benchmark's own set elsewhere); force: recompute
    the cached prompt features of the project's side (as ``analyze zeroshot --force``). Writes the
    JSON (module docstring) and returns it (plus ``out`` and ``path``)."""
    if task not in TASK_CHOICES:
        raise BenchmarkError(f"--task must be one of {', '.join(TASK_CHOICES)}; got {task!r}.")
    if name != OWN and not dataset_root:
        raise BenchmarkError(f"CLIP_benchmark dataset {name!r} needs --dataset-root, the folder that holds its files "
                             f"(what each dataset needs: docs/aligned-model.md).")
    if name == OWN and model_dir is not None:
        raise BenchmarkError("The own split is benchmarked for a run (--run), whose cached features give the "
                             "project's figures beside CLIP_benchmark's; --model benchmarks CLIP_benchmark datasets.")
    clip_benchmark()  # a missing extra fails before any model is loaded
    t0 = time.perf_counter()
    device = resolve_device(cfg.extract.device)
    workers = cfg.extract.workers if cfg.extract.workers >= 0 else default_workers()
    batch = cfg.extract.batch_size
    rv = None
    if model_dir is not None:
        model = AlignedModel.from_pretrained(model_dir, device=str(device))
        who = {"model": str(Path(model_dir).resolve())}
        out = output_dir(cfg, "models", Path(model_dir).resolve().name)
    else:
        rv = open_run(cfg, run)
        model = AlignedModel.from_run(rv.path, cache=cfg.data.cache, device=str(device))
        who = {"run": rv.name, "run_sha256": rv.sha256}
        out = output_dir(cfg, "runs", rv.name)
    model.eval()
    if name == OWN:
        results, skipped = _own_tasks(cfg, rv, model, task, templates, force, batch, workers)
    else:
        results, skipped = _external_task(cfg, model, name, str(dataset_root), task, templates, batch, workers), {}
    odd = unexplained(results)
    if odd:
        log.warning("analyze benchmark: CLIP_benchmark and the project differ on %s with no tie or close call to "
                    "explain it: the aligned model does not reproduce the run's cached features", ", ".join(odd))
    doc = {**header(cfg, "benchmark"), **who, "unexplained": odd, "benchmark": name, "dataset_root": None if name == OWN else str(dataset_root),
           "clip_benchmark": cb_version(), "device": str(device), "close": CLOSE, "results": results,
           "skipped": skipped, "seconds": time.perf_counter() - t0}
    path = write_json(out / output_name(name, cfg.analyze.split), doc)
    return {**doc, "out": out, "path": path}
