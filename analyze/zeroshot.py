"""Zero-shot classification in the shared space (``analyze zeroshot``), as CLIP, LiT and the
frozen-encoder alignment papers (FuseMix, ShareLock, SAIL) report it.

Classes come from the dataset (``extract.labels``: a metadata column, or ``data.label_from =
"dir"``). Each class name (``_`` shown as a space) is filled into every template, the run's
frozen text encoder embeds the prompts (cached, ``analyze.prompts``), the run's text adapter
maps them, and the class embedding is the mean of the L2-normalised prompt embeddings,
renormalised. An image is assigned the class of highest cosine similarity.

Figures: top-1 / top-5 accuracy (fractions), balanced accuracy (mean of the per-class top-1
accuracies over the classes present), per-class accuracy, a confusion matrix, and chance
levels: a random ranking gets top-k = k / C and balanced accuracy 1 / C; always answering
the most frequent class gets its frequency (``majority``). Ties: a class scoring exactly as
high as the true class counts against it (the true class has rank = the number of other
classes scoring >= it), so constant embeddings score 0, not 1: the rule of retrieval
(``train.retrieval``), whose exact cosine similarities are used.

The same figures for the closed-form baselines (CCA, PCA + Procrustes, refitted on the run's
train pairs) and for the training-free ASIF relative representation (``analyze.matching``):
images described by their similarities to the train images, prompts by theirs to the train
captions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from analyze import plots
from analyze.compare import header, output_dir
from analyze.evalrun import EvalError, RunView, open_run
from analyze.matching import relative_representation
from analyze.prompts import language_prompts, prompt_features, prompt_tokens, read_templates
from extract.labels import class_name, dataset_classes, image_labels
from pipeline.config import PipelineConfig
from pipeline.languages import normalize
from pipeline.runtime import write_json
from train.retrieval import cosine_scores

log = logging.getLogger(__name__)

KS = (1, 5)  # top-k accuracies reported
FIGURE_MAX_CLASSES = 60  # confusion matrices of more classes are not drawn
OUTPUT = "zeroshot.json"  # in <analyze.out>/<dataset>/<split>/runs/<run>/


# ----------------------------------------------------------------------------- the figures
def _unit(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


def class_embeddings(prompt_emb, n_classes: int) -> np.ndarray:
    """(C * T, d) prompt embeddings, class-major (row c * T + t) -> (C, d): the mean of each
    class's L2-normalised prompt embeddings, renormalised."""
    P = _unit(prompt_emb)
    if n_classes < 1 or P.shape[0] % n_classes:
        raise ValueError(f"{P.shape[0]} prompt rows do not split into {n_classes} classes of equal size.")
    return _unit(P.reshape(n_classes, -1, P.shape[1]).mean(axis=1))


def class_scores(image_emb, class_emb) -> np.ndarray:
    """(n, d) images x (C, d) classes -> (n, C) cosine similarities, computed exactly as retrieval
    ranks them (``train.retrieval.cosine_scores``), so equal class embeddings tie exactly."""
    return cosine_scores(image_emb, class_emb)


def _labels(labels, scores: np.ndarray) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (scores.shape[0],) or (len(y) and (y.min() < 0 or y.max() >= scores.shape[1])):
        raise ValueError(f"labels must be (n,) = ({scores.shape[0]},) class indices in [0, {scores.shape[1]}); "
                         f"got shape {y.shape}.")
    return y


def true_ranks(scores, labels) -> np.ndarray:
    """(n,) 0-based rank of the true class: the number of OTHER classes scoring >= it."""
    S = np.asarray(scores, dtype=np.float64)
    y = _labels(labels, S)
    true = S[np.arange(len(y)), y][:, None]
    return (S >= true).sum(axis=1) - 1


def predictions(scores, labels) -> np.ndarray:
    """(n,) predicted class, with the tie rule: the true class only when it scores strictly
    highest, else the best other class."""
    S = np.array(scores, dtype=np.float64)
    y = _labels(labels, S)
    rank = true_ranks(S, y)
    S[np.arange(len(y)), y] = -np.inf
    return np.where(rank == 0, y, S.argmax(axis=1))


def accuracy(image_emb, class_emb, labels, ks: Sequence[int] = KS) -> dict[str, float]:
    """Top-k accuracy (fractions) of nearest-class-embedding classification.

    image_emb: (n, d); class_emb: (C, d); labels: (n,) true class indices. Returns
    {"top1": ..., "top5": ...} (one key per k). A tie with the true class counts against it."""
    rank = true_ranks(class_scores(image_emb, class_emb), labels)
    return {f"top{k}": float((rank < k).mean()) for k in ks}


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, row = true class, column = predicted class."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(pred)), 1)
    return out


def summarize(scores: np.ndarray, labels: np.ndarray, classes: Sequence[str], ks: Sequence[int] = KS) -> dict:
    """Every figure of one method from its (n, C) scores: top-k, balanced accuracy, per-class
    accuracy ({class: {"n", "top1"}} for the classes present) and the confusion matrix."""
    rank, pred = true_ranks(scores, labels), predictions(scores, labels)
    conf = confusion_matrix(pred, labels, len(classes))
    counts = conf.sum(axis=1)
    present = counts > 0
    per_class = {classes[c]: {"n": int(counts[c]), "top1": float(conf[c, c] / counts[c])}
                 for c in np.flatnonzero(present)}
    return {**{f"top{k}": float((rank < k).mean()) for k in ks},
            "balanced": float(np.mean([v["top1"] for v in per_class.values()])),
            "per_class": per_class, "confusion": conf.tolist()}


def chance(labels: np.ndarray, n_classes: int, ks: Sequence[int] = KS) -> dict[str, float]:
    """Random ranking: top-k = k / C, balanced 1 / C. Always answering the most frequent class:
    top-1 ``majority`` (its share of the images), balanced ``majority_balanced`` = 1 / (classes
    present among the labels), as balanced accuracy averages over the classes present."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes)
    return {**{f"top{k}": min(1.0, k / n_classes) for k in ks}, "balanced": 1.0 / n_classes,
            "majority": float(counts.max() / max(1, counts.sum())),
            "majority_balanced": 1.0 / max(1, int((counts > 0).sum()))}


# ----------------------------------------------------------------------------- the command
def _method_scores(rv: RunView, test, prompts: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """method -> (n_images, C) scores: the run's adapters, the baselines, ASIF."""
    out = {"adapters": class_scores(rv.embed("image", test.image),
                                    class_embeddings(rv.embed("text", prompts), n_classes))}
    if rv.token_length("image") or rv.token_length("text"):  # token runs: no closed-form baselines, no ASIF
        return out
    for method in rv.baselines:
        out[method] = class_scores(rv.baseline_embed(method, "image", test.image),
                                   class_embeddings(rv.baseline_embed(method, "text", prompts), n_classes))
    train = rv.split("train")
    mx, my = train.image.mean(0), train.text.mean(0)
    anchors_x, anchors_y = train.image[train.text_to_image] - mx, train.text - my  # one anchor per train pair
    classes = class_embeddings(relative_representation(prompts - my, anchors_y).toarray(), n_classes)
    out["relative"] = np.asarray(relative_representation(test.image - mx, anchors_x) @ classes.T)  # unit rows
    return out


def split_labels(cfg: PipelineConfig, test) -> tuple[list[str], np.ndarray]:
    """(classes, labels): the dataset's classes (``data.label_from``, every split) and the (n_images,)
    class index of each image of ``test`` (a ``SplitPairs`` of ``analyze.split``), in its row order."""
    d, split = cfg.data, cfg.analyze.split
    options = {"on_empty": d.on_empty, "missing": d.missing}
    classes = dataset_classes(d.dataset, d.data_dir, d.label_from, options)
    if len(classes) < 2:
        raise EvalError(f"Zero-shot classification needs at least two classes; the labels "
                        f"(data.label_from = {d.label_from!r}) give {classes}.")
    by_id = image_labels(d.dataset, d.data_dir, split, d.label_from, options)
    missing = [i for i in test.image_ids if i not in by_id]
    if missing:
        raise EvalError(f"{len(missing)} cached {split} images have no label in {d.data_dir} (first: {missing[0]!r}); "
                        f"the cache and the dataset differ. Re-extract, or point --set data.data_dir to the data.")
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.asarray([index[by_id[i]] for i in test.image_ids])


def zero_shot(cfg: PipelineConfig, run: str | None = None, templates: str | Path | None = None,
              force: bool = False, language: str | None = None, prompts: str | Path | None = None) -> dict:
    """``analyze zeroshot``: zero-shot accuracy of a run (and the baselines, and ASIF) on the
    images of ``analyze.split``. templates: a template file (None = the default set); force:
    recompute the cached prompt features; language / prompts: prompts in another language, with
    templates and class names from the TOML file ``prompts`` (``prompts.language_prompts``:
    refused for a language it has no templates for). Writes ``runs/<run>/zeroshot.json`` (for a
    language other than data.default_language ``zeroshot-<code>.json``) and
    ``zeroshot-confusion.png``; returns the JSON document (plus ``out``)."""
    t0 = time.perf_counter()
    d, split = cfg.data, cfg.analyze.split
    code = normalize(language if language is not None else d.default_language, "--language")
    other = code != normalize(d.default_language, "data.default_language")
    if prompts is not None and templates is not None:
        raise EvalError("pass --templates (one language) or --prompts (templates per language), not both.")
    tpl = read_templates(templates) if prompts is None and not other else None  # checked before any work
    dataset_classes(d.dataset, d.data_dir, d.label_from, {"on_empty": d.on_empty, "missing": d.missing})  # refuses
    rv = open_run(cfg, run)  # duplicate display names before the run is opened
    test = rv.split(split)
    classes, labels = split_labels(cfg, test)
    names = None
    prompts_file = prompts
    if tpl is None:
        tpl, names = language_prompts(prompts_file, code, d.default_language, classes)
    t_prompt = time.perf_counter()
    if rv.token_length("text"):  # padded token rows of the prompts, computed each time (not cached)
        prompts = prompt_tokens(rv.entry(split, "text"), classes, tpl, rv.token_length("text"), cfg.extract.device,
                                names)
    else:
        prompts = prompt_features(d.cache, d.dataset, rv.entry(split, "text"), classes, tpl, cfg.extract.device,
                                  force, rv.layer("text"), names, code if prompts_file is not None or other else None)
    t_prompt = time.perf_counter() - t_prompt
    results = {m: summarize(S, labels, classes) for m, S in _method_scores(rv, test, prompts, len(classes)).items()}
    out = output_dir(cfg, "runs", rv.name)
    doc = {**header(cfg, "zeroshot"), "run": rv.name, "run_sha256": rv.sha256, "n": int(len(labels)),
           "classes": classes, "class_names": [class_name(c) for c in classes], "label_from": d.label_from,
           "templates": list(tpl), "language": code, "prompt_class_names": names, "chance": chance(labels, len(classes)), "results": results,
           "prompt_seconds": t_prompt, "seconds": time.perf_counter() - t0, "figures": {}}
    if len(classes) <= FIGURE_MAX_CLASSES and not other:
        conf = np.asarray(results["adapters"]["confusion"], dtype=float)
        rows = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        rows[conf.sum(axis=1) == 0] = np.nan
        doc["figures"]["confusion"] = plots.heatmap(
            rows, doc["class_names"], doc["class_names"], f"Zero-shot confusion, run {rv.name} ({split}, n={len(labels)}; "
            f"rows: true class, share of its images)", out / "zeroshot-confusion.png",
            xlabel="predicted", ylabel="true", vmin=0, vmax=1).name
    write_json(out / (f"zeroshot-{code}.json" if other or prompts_file is not None else OUTPUT), doc)
    return {**doc, "out": out}
