"""Concept-balanced curation of a training set (``curate``), after Freeze-Align's
"LAION-CLASS-Collected" procedure: choose, from a pool of image-caption pairs, up to N pairs per
concept of a concept list, rare concepts first, so that training covers every concept.

    result = curate(cfg, CurateRequest(concepts=read_concepts("concepts.txt"), per_concept=20))

Pool: the cached split ``request.split`` (default train) of the config's dataset: the pairs of
its image and caption entries (``train.image``, ``train.text``; joined by sample id).

Prototypes, one per concept, in the space the captions are scored in:

* text (always): the concept name in every prompt template (``analyze.prompts``), embedded by
  the pool's text encoder, each prompt L2-normalised, averaged,
  renormalised; scored against the caption features of the pool's text entry;
* images (``concept_images``: a folder with one subfolder of a few images per concept, named as
  the concept): the mean of the L2-normalised image embeddings, renormalised. Without a run they
  are embedded by the pool's image encoder and scored against the pool's *images* (the two
  cosines then live in two encoders' spaces, with their own scales);
* through a run (``request.run``): captions, prompts and example images all go through the run's
  adapters (``train.api.Run``, ``aligned.AlignedModel``) and every prototype is scored against
  the pool's *captions* in the shared space.

A pair's score for a concept is the cosine similarity to its prototype (the mean of the text and
the image cosines when the concept has both). Scores are computed block by block
(``request.block`` pairs x C concepts at a time; no n x C matrix is kept): each pair keeps only
its ``top_k`` best concepts whose score is at least ``floor``: these are the concept's
*candidates*, and their count per concept is the "before" column of the coverage table.

Assignment, rarest concept first: concepts sorted by their number of candidates (ascending,
then by name) each take up to ``per_concept`` of their candidates not taken yet, best score
first, until ``total`` pairs are taken (0 = no total). A pair goes to at most one concept.
Concepts with no candidate are reported (``CurateResult.unmatched``), never dropped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

import torch

from aligned import AlignedModel
from analyze.prompts import DEFAULT_TEMPLATES, check_templates, embed_texts, encoder_for, prompt_texts
from analyze.zeroshot import class_embeddings
from extract.datasets import IMAGE_EXTENSIONS, Item, Split
from extract.encoders import forward_batch, image_pixels, load_encoder
from extract.loader import make_loader
from pipeline.cache import Entry, find_entry
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.join import Pairs, join_pairs
from pipeline.runs import find_run
from pipeline.runtime import resolve_device
from train.api import load_run

log = logging.getLogger(__name__)

BLOCK = 4096  # pool pairs scored at once (a block x C score matrix is the only one held)


class CurateError(PipelineError, ValueError):
    """A concept list, an example-image folder or a budget that cannot be curated with."""


# ----------------------------------------------------------------------------- inputs
def read_concepts(path: str | Path) -> tuple[str, ...]:
    """Concept names, one per line (surrounding spaces removed; lines starting with ``#`` are
    comments). An empty line or a name given twice (compared case-insensitively) is an error
    naming the lines: a silent skip would hide a mistake in the list."""
    p = Path(path)
    if not p.is_file():
        raise CurateError(f"Concept list {path}: no such file; write one concept name per line.")
    lines = p.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():  # trailing newlines at the end of the file
        lines.pop()
    names, seen, empty, twice = [], {}, [], []
    for n, raw in enumerate(lines, start=1):
        name = raw.strip()
        if name.startswith("#"):
            continue
        if not name:
            empty.append(n)
            continue
        key = name.casefold()
        if key in seen:
            twice.append(f"{name!r} (lines {seen[key]} and {n})")
            continue
        seen[key] = n
        names.append(name)
    problems = ([f"empty line(s) {', '.join(map(str, empty[:10]))}"] if empty else []) + (
        [f"duplicate concept(s) {', '.join(twice[:5])}"] if twice else [])
    if problems:
        raise CurateError(f"Concept list {path}: {'; '.join(problems)}. Give each concept once, one per line, "
                          f"without blank lines.")
    if not names:
        raise CurateError(f"Concept list {path} names no concept; write one concept name per line.")
    return tuple(names)


def concept_image_files(folder: str | Path, concepts: Sequence[str]) -> dict[str, list[Path]]:
    """{concept: image files} from ``folder/<concept>/`` (subfolder names compared
    case-insensitively; a concept without a subfolder has text prototypes only). A subfolder
    that names no concept, or an empty one, is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise CurateError(f"--concept-images {folder}: no such folder; give a folder with one subfolder of "
                          f"images per concept.")
    by_key = {c.casefold(): c for c in concepts}
    out: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        concept = by_key.get(sub.name.casefold())
        if concept is None:
            raise CurateError(f"--concept-images {folder}: subfolder {sub.name!r} is not a concept of the list; "
                              f"rename it to a concept name or remove it.")
        files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise CurateError(f"--concept-images {folder}: subfolder {sub.name!r} holds no image "
                              f"({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        out[concept] = files
    if not out:
        raise CurateError(f"--concept-images {folder} has no subfolder named after a concept.")
    return out


@dataclass(frozen=True)
class CurateRequest:
    """What to curate. concepts: names (``read_concepts``); per_concept: N, at most this many
    pairs per concept; total: M, at most this many pairs in all (0 = no limit); floor: smallest
    cosine a candidate may have (None = none); top_k: concepts a pair is a candidate of (its best
    ones); split: the pool; run: a fit-adapters run whose shared space scores (None: the frozen
    encoders' own spaces); concept_images: folder of example images (None: text prototypes only)."""

    concepts: tuple[str, ...]
    per_concept: int
    total: int = 0
    floor: float | None = None
    top_k: int = 1
    split: str = "train"
    run: str | None = None
    concept_images: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    block: int = BLOCK

    def check(self) -> None:
        if self.per_concept < 1:
            raise CurateError(f"--per-concept {self.per_concept}: give at least 1 pair per concept.")
        if self.total < 0:
            raise CurateError(f"--total {self.total}: give 0 (no total) or a positive number of pairs.")
        if not 1 <= self.top_k <= len(self.concepts):
            raise CurateError(f"--top-k {self.top_k}: must be in [1, {len(self.concepts)}] (the number of concepts).")
        if self.floor is not None and not -1.0 <= self.floor <= 1.0:
            raise CurateError(f"--floor {self.floor}: a cosine similarity floor is in [-1, 1].")
        if self.block < 1:
            raise CurateError(f"block {self.block}: must be >= 1.")
        check_templates(self.templates)


@dataclass
class CurateResult:
    """rows: (id, concept, score) of the chosen pairs, in assignment order; before / after:
    {concept: candidates in the pool / pairs chosen}, in the concept list's order; unmatched:
    concepts with no candidate; order: the assignment order (rarest first); pool: pairs scored;
    source: provenance written in the subset file's header."""

    rows: list[tuple[str, str, float]]
    before: dict[str, int]
    after: dict[str, int]
    unmatched: list[str]
    order: list[str]
    pool: int
    source: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the space
@dataclass
class _Space:
    """How the pool and the prototypes are embedded. caption(x) / image(x): (n, d) raw pool
    features -> (n, k) unit rows; text_protos: (C, k) unit rows; image_protos: {concept index:
    (k,) unit vector}; image_vs: "image" (scored against pool images) or "caption"."""

    caption: object
    image: object
    text_protos: np.ndarray
    image_protos: dict[int, np.ndarray]
    image_vs: str
    layers: dict = field(default_factory=dict)  # modality -> stored hidden layer a run's adapter reads


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _space(cfg: PipelineConfig, req: CurateRequest, image: Entry, text: Entry, run) -> _Space:
    files = concept_image_files(req.concept_images, req.concepts) if req.concept_images else {}
    index = {c: i for i, c in enumerate(req.concepts)}
    device = cfg.extract.device
    if run is None:
        prompts = _prompts(text, req, device)
        protos = {index[c]: _unit(_unit(_embed_image_files(image, fs, device)).mean(0)) for c, fs in files.items()}
        return _Space(_unit, _unit, class_embeddings(prompts, len(req.concepts)), protos, "image")
    layer = run.source("text").get("layer")
    prompts = _prompts(text, req, device, layer)
    protos = {}
    if files:
        model = AlignedModel.from_run(req.run, cfg.data.cache, device=device)
        protos = {index[c]: _unit(model.embed_images([str(f) for f in fs], normalize=True, workers=0,
                                                     progress=False).mean(0)) for c, fs in files.items()}
    return _Space(lambda x: run.embed("text", x, normalize=True).astype(np.float64),
                  lambda x: run.embed("image", x, normalize=True).astype(np.float64),
                  class_embeddings(run.embed("text", prompts), len(req.concepts)), protos, "caption",
                  {"text": layer, "image": run.source("image").get("layer")})


def _prompts(text: Entry, req: CurateRequest, device: str, layer: int | None = None) -> np.ndarray:
    """(C * T, d_text) features of every concept in every template (class-major), by the encoder
    that made ``text``, at its precision (not cached: a concept list is small, and zero-shot's
    prompt cache holds the dataset's classes)."""
    _, texts = prompt_texts(req.concepts, req.templates)
    return embed_texts(encoder_for(text), texts, device, str(text.key.get("precision", "fp32")), layer)


def _embed_image_files(image: Entry, files: Sequence[Path], device: str) -> np.ndarray:
    """(len(files), d) features of image files by the encoder that made ``image`` (its pooled
    output, at its precision), decoded as extraction decodes a dataset."""
    encoder = load_encoder(encoder_for(image), resolve_device(device))
    split = Split("concept-images", "curate", [Item(str(i), str(f), ()) for i, f in enumerate(files)], "curate")
    out = np.zeros((len(files), encoder.dim), np.float32)
    loader = make_loader(split, split.items, [range(len(files))], 32, 0, encoder.device,
                         transforms={"pixels": image_pixels(encoder.spec.prep)})
    with torch.inference_mode():
        for batch in loader:
            if batch.unreadable:
                raise CurateError(f"--concept-images: {batch.unreadable[min(batch.unreadable)].error()}")
            feats, _ = forward_batch(encoder, batch.inputs["pixels"], str(image.key.get("precision", "fp32")), False)
            out[list(batch.rows)] = feats.float().cpu().numpy()
    return out


# ----------------------------------------------------------------------------- scoring and assignment
def _rows(entry: Entry, rows: np.ndarray, layer: int | None = None) -> np.ndarray:
    """Features (or stored hidden layer ``layer``) of entry ``rows`` (any order), read as one
    contiguous slice of the entry."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return np.asarray(entry.features(layer, rows=slice(lo, hi)))[rows - lo]


def score_blocks(space: _Space, image: Entry, text: Entry, pairs: Pairs, block: int):
    """Yield (caption indices (b,), scores (b, C)) block by block over the pool's captions."""
    n = len(pairs.text_rows)
    protos = space.text_protos  # (C, k)
    need_images = bool(space.image_protos) and space.image_vs == "image"
    has_image = np.zeros(len(protos), dtype=bool)
    has_image[list(space.image_protos)] = True
    width = len(next(iter(space.image_protos.values()))) if space.image_protos else protos.shape[1]
    img_protos = np.zeros((len(protos), width))  # (C, k_image): zero rows for concepts without images
    for c, v in space.image_protos.items():
        img_protos[c] = v
    for s in range(0, n, block):
        k = np.arange(s, min(n, s + block))
        caps = space.caption(_rows(text, pairs.text_rows[k], space.layers.get("text")))  # (b, k) unit
        scores = caps @ protos.T  # (b, C) cosine to the text prototypes
        if has_image.any():
            against = (space.image(_rows(image, pairs.image_rows[pairs.text_to_image[k]], space.layers.get("image")))
                       if need_images else caps)
            scores = np.where(has_image, 0.5 * (scores + against @ img_protos.T), scores)
        yield k, scores


def candidates(blocks, n_concepts: int, top_k: int, floor: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pair (m,), concept (m,), score (m,)) of every pair's ``top_k`` best concepts scoring at
    least ``floor``, from ``score_blocks``' blocks; ties between concepts go to the earlier one."""
    out_p, out_c, out_s = [], [], []
    for k, scores in blocks:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]  # (b, top_k)
        best = np.take_along_axis(scores, order, axis=1)
        keep = np.ones_like(best, dtype=bool) if floor is None else best >= floor
        rows = np.broadcast_to(k[:, None], order.shape)
        out_p.append(rows[keep])
        out_c.append(order[keep])
        out_s.append(best[keep])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return cat(out_p, np.int64), cat(out_c, np.int64), cat(out_s, np.float64)


def assign(pair: np.ndarray, concept: np.ndarray, score: np.ndarray, n_concepts: int, per_concept: int,
           total: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Rarest concept first (fewest candidates, then the list's order), each takes up to
    ``per_concept`` of its untaken candidates, best score first (ties: lower pair index), until
    ``total`` pairs are taken (0: no total). Returns the chosen (pair, concept, score) arrays in
    assignment order and the concept order."""
    counts = np.bincount(concept, minlength=n_concepts)
    order = sorted(range(n_concepts), key=lambda c: (counts[c], c))
    taken: set[int] = set()
    out: list[tuple[int, int, float]] = []
    by_concept = np.argsort(concept, kind="stable")
    starts = np.searchsorted(concept[by_concept], np.arange(n_concepts + 1))
    for c in order:
        idx = by_concept[starts[c]:starts[c + 1]]
        idx = idx[np.lexsort((pair[idx], -score[idx]))]
        got = 0
        for i in idx:
            if got == per_concept or (total and len(out) == total):
                break
            p = int(pair[i])
            if p in taken:
                continue
            taken.add(p)
            out.append((p, c, float(score[i])))
            got += 1
        if total and len(out) == total:
            break
    arr = np.asarray(out, dtype=np.float64).reshape(-1, 3)
    return arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2], order


def curate(cfg: PipelineConfig, req: CurateRequest) -> CurateResult:
    """Score the pool against the concepts and choose the subset; see the module docstring."""
    req.check()
    run = None if req.run is None else load_run(find_run(cfg.data.cache, req.run).path)
    names = ({m: run.source(m)["entry"] for m in ("image", "text")} if run is not None
             else {"image": cfg.train.image, "text": cfg.train.text})  # a run scores its own encoders' entries
    image, text = (find_entry(cfg.data.cache, cfg.data.dataset, req.split, names[m], cfg.data.data_dir)
                   for m in ("image", "text"))
    if run is not None:
        run.check_entry("image", image)
        run.check_entry("text", text)
    pairs = join_pairs(image, text)
    space = _space(cfg, req, image, text, run)
    C = len(req.concepts)
    pair, concept, score = candidates(score_blocks(space, image, text, pairs, req.block), C, req.top_k, req.floor)
    chosen_p, chosen_c, chosen_s, order = assign(pair, concept, score, C, req.per_concept, req.total)
    before = np.bincount(concept, minlength=C)
    after = np.bincount(chosen_c, minlength=C)
    ids = [str(text.ids[r]) for r in pairs.text_rows[chosen_p]]
    rows = [(i, req.concepts[c], s) for i, c, s in zip(ids, chosen_c, chosen_s)]
    unmatched = [req.concepts[c] for c in range(C) if before[c] == 0]
    if len(unmatched) == C:
        raise CurateError(f"No pool pair matches any of the {C} concepts" + (
            f" at --floor {req.floor:g}; lower it" if req.floor is not None else "") + ".")
    source = {"dataset": cfg.data.dataset, "split": req.split, "data_dir": str(cfg.data.data_dir),
              "image": image.name, "text": text.name, "run": req.run, "per_concept": req.per_concept,
              "total": req.total, "floor": req.floor, "top_k": req.top_k, "concepts": len(req.concepts),
              "concept_images": req.concept_images is not None}
    return CurateResult(rows, {c: int(before[i]) for i, c in enumerate(req.concepts)},
                        {c: int(after[i]) for i, c in enumerate(req.concepts)}, unmatched,
                        [req.concepts[c] for c in order], len(pairs.text_rows), source)


def random_subset(cfg: PipelineConfig, n: int, seed: int, split: str = "train") -> tuple[list[tuple[str, str, float]], dict]:
    """The control of a curated subset: ``n`` pool pairs drawn uniformly without replacement
    (generator seeded by ``seed``), as (id, "random", 0.0) rows in pool order, and the header's
    provenance."""
    image = find_entry(cfg.data.cache, cfg.data.dataset, split, cfg.train.image, cfg.data.data_dir)
    text = find_entry(cfg.data.cache, cfg.data.dataset, split, cfg.train.text, cfg.data.data_dir)
    pairs = join_pairs(image, text)
    if not 1 <= n <= len(pairs.text_rows):
        raise CurateError(f"A random subset of {n} pairs from a pool of {len(pairs.text_rows)}: give 1 to "
                          f"{len(pairs.text_rows)}.")
    picked = np.sort(np.random.default_rng([int(seed), 0xC0A7]).choice(len(pairs.text_rows), n, replace=False))
    rows = [(str(text.ids[r]), "random", 0.0) for r in pairs.text_rows[picked]]
    return rows, {"dataset": cfg.data.dataset, "split": split, "data_dir": str(cfg.data.data_dir), "image": image.name,
                  "text": text.name, "random": {"n": n, "seed": int(seed)}}


# ----------------------------------------------------------------------------- outputs
def coverage_lines(result: CurateResult, per_concept: int) -> list[str]:
    """The answer first (pairs chosen, concepts covered, concepts matching nothing), then one row
    per concept: candidates in the pool, pairs chosen, assignment rank (1 = rarest)."""
    covered = sum(1 for v in result.after.values() if v)
    full = sum(1 for v in result.after.values() if v >= per_concept)
    lines = [f"curated {len(result.rows)} of {result.pool} pool pairs: {covered} of {len(result.after)} concepts "
             f"covered, {full} at the full {per_concept} per concept."]
    if result.unmatched:
        shown = ", ".join(result.unmatched[:10]) + (" ..." if len(result.unmatched) > 10 else "")
        lines.append(f"{len(result.unmatched)} concept(s) match no pool pair (no pair has them as its best concept"
                     f"{' above the floor' if result.source.get('floor') is not None else ''}): {shown}")
    rank = {c: i + 1 for i, c in enumerate(result.order)}
    width = max(12, *(len(c) for c in result.after))
    lines.append(f"{'concept':<{width}}  {'pool':>6}  {'chosen':>6}  {'order':>5}")
    for c in result.after:
        lines.append(f"{c:<{width}}  {result.before[c]:>6}  {result.after[c]:>6}  {rank[c]:>5}")
    return lines
