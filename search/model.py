"""The aligned model a search embeds with, and its identity: the hash an index records.

:func:`model_hash` is a sha256 of everything that decides an embedding: per tower the encoder as
``aligned.sources.Side`` describes it (registry spec provenance: weights, pooling, preprocessing;
precision; hidden layer; input width), the train-split standardisation (mean, std) and the
adapters' tensors (names, dtypes, shapes, bytes). It is computed from the loaded model's
contents, not from a file or a name, so a run retrained under the same name gets another hash,
and the same model loaded from its run or from its export (``AlignedModel.from_pretrained``)
gets the same one.

:func:`load_model` opens what ``search.run`` names: a run name of ``data.cache``, a run folder,
or an exported model folder; :func:`load_recorded` reopens the model an index records.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from aligned import AlignedModel
from pipeline.runs import ADAPTER_JSON
from search.engine import SearchError
from search.index import ModelMismatchError, ModelRef

HASH_FORMAT = 1  # bump when the definition of model_hash changes (old indexes are then refused)
EXPORT_CONFIG = "config.json"  # an exported model folder holds this and no adapters.json


def _tensor_digest(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        a = a.detach().cpu().contiguous().numpy() if isinstance(a, torch.Tensor) else np.ascontiguousarray(a)
        h.update(json.dumps([name, str(a.dtype), list(a.shape)]).encode("utf-8"))
        h.update(a.tobytes())
    return h.hexdigest()


def model_hash(model: AlignedModel) -> str:
    """sha256 hex of the model's embedding function (see the module docstring)."""
    stats = {f"{kind}.{m}": np.asarray(getattr(model.stats, kind)[m], np.float32)
             for kind in ("mean", "std") for m in model.sides}
    doc = {"format": HASH_FORMAT, "dim": int(model.dim),
           "sides": {m: side.to_json() for m, side in sorted(model.sides.items())},
           "stats": _tensor_digest(stats), "adapters": _tensor_digest(model.adapters.state_dict())}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def is_export(path: Path) -> bool:
    """True for an exported model folder (config.json, no adapters.json: not a run folder)."""
    return (path / EXPORT_CONFIG).is_file() and not (path / ADAPTER_JSON).is_file()


def load_model(run: str, cache: str | Path, device: str = "auto") -> tuple[AlignedModel, ModelRef]:
    """(model, its ModelRef) for ``run``: an exported model folder, a run folder, or a run name in
    ``cache`` (errors from ``aligned`` name what is wrong: unknown run, a run of another cache...)."""
    path = Path(run)
    if is_export(path):
        model = AlignedModel.from_pretrained(path, device=device)
        return model, ModelRef(model_hash(model), path.resolve().name, {"pretrained": str(path.resolve())})
    model = AlignedModel.from_run(run, cache=cache, device=device)
    name = str(model.info.get("run") or Path(run).name)
    return model, ModelRef(model_hash(model), name, {"run": name, "cache": str(Path(cache).resolve())})


def load_recorded(ref: ModelRef, device: str = "auto") -> AlignedModel:
    """The model an index records (``ModelRef.source``), checked against its hash."""
    src = ref.source
    if "pretrained" in src:
        model, now = load_model(str(src["pretrained"]), ".", device)
    elif "run" in src:
        model, now = load_model(str(src["run"]), str(src.get("cache", ".")), device)
    else:
        raise SearchError(f"The index records no loadable model ({ref.name!r}); pass --run, or rebuild the index.")
    if now.hash != ref.hash:
        where = src.get("pretrained") or f"run {src.get('run')!r} of cache {src.get('cache')!r}"
        raise ModelMismatchError(
            f"The index was built with model {ref.name!r} (hash {ref.hash[:12]}), but {where} now holds another model "
            f"(hash {now.hash[:12]}: retrained or re-exported since). Rebuild the index with `search index`.")
    return model
