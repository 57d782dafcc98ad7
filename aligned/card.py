"""The model card (README.md) of an exported aligned model, and the licence fields of its weights.

Sections: how to use it, the encoders (weights, settings, licence), the data and the training
settings (the run's config.json and adapters.json), held-out retrieval (metrics.json), and,
when ``analyze`` has written them for these very adapters, zero-shot classification
(``zeroshot.json``, recorded with the adapters' sha256) and the Platonic test with its intervals
(``platonic.json``, used when newer than the adapters). Every number is copied from those files,
which the card names.

Licences: a pip package that ships the weights (its ``License-Expression`` / ``License`` metadata or
licence classifiers), else a ``license:`` line in the front matter of the weights folder's
README.md (Hugging Face model cards), else "not recorded" with where the weights come from.
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Mapping

from extract.encoders import EncoderSpec
from pipeline.runs import ADAPTERS_METHOD, RECALL_COLUMNS, RunFolder
from train.losses import loss_label

SIDES = ("image", "text")


def _package_licence(requirement: str) -> str | None:
    name = re.split(r"[=<>!~ ]", requirement.strip(), maxsplit=1)[0]
    try:
        meta = metadata.metadata(name)
    except metadata.PackageNotFoundError:
        return None
    value = meta.get("License-Expression") or meta.get("License")
    if value and value.strip() and value.strip().upper() != "UNKNOWN":
        return value.strip().splitlines()[0]
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return ", ".join(classifiers) or None


def _card_licence(folder: str) -> str | None:
    """``license:`` of the YAML front matter of ``folder``/README.md (a Hugging Face model card)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    match = re.search(r"^license:\s*(\S.*)$", front, flags=re.MULTILINE)
    return match.group(1).strip().strip("'\"") if match else None


def licence(spec: EncoderSpec, source: str) -> dict:
    """{"licence": str | None, "from": where it was read} for an encoder loaded from ``source``."""
    if spec.weights == "random":
        return {"licence": "none (randomly initialised test model)", "from": "registry"}
    found = []
    for req in (dict(spec.config).get("package_pip") or "").split():
        value = _package_licence(req)
        if value:
            found.append(f"{value} ({req})")
    if found:
        return {"licence": "; ".join(found), "from": "pip package metadata"}
    path = source.partition(":")[2]
    folder = path if os.path.isdir(path) else os.path.dirname(path) if os.path.isfile(path) else ""
    value = _card_licence(folder) if folder else None
    if value:
        return {"licence": value, "from": f"{folder}/README.md"}
    return {"licence": None, "from": f"not recorded: check the licence of {spec.weights!r} where it was obtained"}


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def _read(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None


def _zeroshot(reports: Path | None, sha: str) -> str:
    doc = _read(reports / "zeroshot.json" if reports else None)
    if doc is None or doc.get("run_sha256") != sha:
        why = "not computed" if doc is None else "computed for other adapters"
        return f"Not available ({why}): run `analyze zeroshot --run RUN`, then export again."
    ch, res = doc["chance"], doc["results"]
    rows = [[m, r["top1"], r["top5"], r["balanced"]] for m, r in res.items()]
    rows.append(["chance", ch["top1"], ch["top5"], ch["balanced"]])
    return (f"{doc['n']} {doc['split']} images, {len(doc['classes'])} classes (labels: {doc.get('label_from')}), "
            f"{len(doc['templates'])} prompt templates; from `{reports / 'zeroshot.json'}` ({doc['created']}).\n\n"
            + _table(["method", "top-1", "top-5", "balanced"], rows))


def _platonic(reports: Path | None, adapters_mtime: float) -> str:
    path = reports / "platonic.json" if reports else None
    doc = _read(path)
    if doc is None or path.stat().st_mtime < adapters_mtime:
        why = "not computed" if doc is None else "older than the adapters"
        return f"Not available ({why}): run `analyze platonic --run RUN`, then export again."
    rows = []
    for metric, r in doc["results"].items():
        for side in SIDES:
            d = r["delta"][side]
            rows.append([metric, side, d["delta"], f"[{d['ci_lo']:.3f}, {d['ci_hi']:.3f}]", d["verdict"]])
    e = doc["entries"]
    return (f"Reference {e['reference']!r}, n = {doc['n']} {doc['split']} rows, {doc['bootstrap']} bootstrap "
            f"resamples (95% CIs), {doc['permutations']} shuffled pairings; from `{path}` ({doc['created']}).\n\n"
            f"{doc['headline']}\n\n"
            + _table(["metric", "side", "delta (after - mean before)", "95% CI", "verdict"], rows))


def _weights_line(e: Mapping) -> str:
    w = e["weights"]
    if w.get("included"):
        return f"included as safetensors in `{w['included']}`"
    return f"not included; loaded from {w['source']} at export; to get them: {w['get']}"


def _objective(config: Mapping) -> str:
    """The training objective in words, e.g. "symmetric InfoNCE, temperature 0.07" or, for a sigmoid-loss
    run, "sigmoid (SigLIP) loss, learnt temperature 0.071 and bias -9.79"."""
    tc = config["adapters"]["train"]
    if tc.get("loss") == "sigmoid":
        bias = config.get("logit_bias")
        return (f"sigmoid (SigLIP) loss, learnt temperature {config['temperature']:.4g}"
                + ("" if bias is None else f" and bias {bias:.4g}"))
    return f"{loss_label(tc.get('loss', 'infonce'), tc.get('loss_direction', 'symmetric'))}, temperature {config['temperature']:.4g}"


def model_card(config: Mapping, run: RunFolder, reports: Path | None, adapters_mtime: float) -> str:
    """README.md text for an export's ``config`` (config.json), its run and analysis folder."""
    enc, tc = config["encoders"], config["adapters"]["train"]
    data = run.config.get("data", {})
    licences = {(enc[m]["weights"]["licence"]["licence"] or "unknown") for m in SIDES}
    front = "other" if len(licences) > 1 else next(iter(licences))
    rows = [[m, e["entry"], e["loaded"]["description"] or e["loaded"]["family"], e["loaded"]["weights"],
             e["loaded"]["pooling"], "features" if e["layer"] is None else f"hidden layer {e['layer']}", e["dim"],
             e["precision"], e["weights"]["licence"]["licence"] or "not recorded"] for m, e in enc.items()]
    weights = "\n".join(f"- {m}: {_weights_line(e)} (state sha256 {e['state_sha256'][:16]})" for m, e in enc.items())
    sizes = (run.metrics.sizes if run.metrics else {}) or {}
    size_rows = [[s, v.get("pairs", ""), v.get("image", ""), v.get("text", "")] for s, v in sizes.items()]
    test = (run.metrics.test if run.metrics else {}) or {}
    recall = _table(["method", *RECALL_COLUMNS], [[m, *(r.get(c, float("nan")) for c in RECALL_COLUMNS)]
                                                   for m, r in test.items()]) if test else "Not recorded."
    best = f"best epoch {run.metrics.best_epoch} of {run.metrics.epochs_run}" if run.metrics else ""
    return f"""---
license: {front}
library_name: platonic-align
tags: [image-text-retrieval, feature-extraction, frozen-encoders, platonic-align]
---
# Aligned model `{config['run']}`: {enc['image']['entry']} + {enc['text']['entry']}

Two frozen encoders and the adapters of run `{config['run']}`, trained by `fit-adapters` to map both into one
{config['dim']}-d space ({_objective(config)}). Written by
`aligned-export`; every file is listed with its sha256 in `SHA256SUMS`.

## Use

```python
from PIL import Image
from aligned import AlignedModel
model = AlignedModel.from_pretrained("path/to/this/folder")
image = model.encode_image(model.preprocess(Image.open("photo.jpg")).unsqueeze(0), normalize=True)
text = model.encode_text(model.tokenizer(["a red bicycle", "a dog"]), normalize=True)
print(image @ text.T)   # cosine similarities
```

## Encoders

{_table(["modality", "entry", "encoder", "weights", "pooling", "adapter reads", "width", "precision", "licence"], rows)}

Weights:
{weights}

## Data

Dataset `{data.get('dataset')}` from `{data.get('data_dir')}`, caption policy `{data.get('captions')}`.

{_table(["split", "pairs", "image rows", "text rows"], size_rows) if size_rows else "Sizes not recorded."}

## Training

Adapter `{tc['adapter']}` ({tc['dim']}-d; hidden {tc['hidden']} for mlp/residual), loss `{tc['loss']}`
({tc['loss_direction']}), {tc['epochs']} epochs of batch {tc['batch_size']}, lr {tc['lr']}, weight decay
{tc['weight_decay']}, schedule {tc['schedule']}, temperature {tc['temperature']}
({'learnable' if tc['learnable_temperature'] else 'fixed'}), standardisation {tc['standardize']}, seed
{tc['seed']}, train fraction {tc['train_fraction']}; {best}.

## Held-out retrieval ({'test' if test else 'not recorded'})

Recall@K on the test split from the run's `metrics.json` (row `{ADAPTERS_METHOD}`: these adapters; the others are
the closed-form baselines fitted on the same features).

{recall}

## Zero-shot classification

{_zeroshot(reports, config['adapters'].get('sha256', ''))}

## Platonic test

{_platonic(reports, adapters_mtime)}
"""
