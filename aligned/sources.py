"""What an aligned model is made of: per modality (image, text), the frozen encoder its run's
adapter was trained on, rebuilt from the cache-entry key the run recorded.

A run's ``adapters.json`` records, per modality, the source entry's ``key`` (``train.api``):
the encoder's spec provenance (``key["encoder"]``: weights, pooling, preprocessing, ...), the
extraction precision, and the hidden layer the adapter reads (``"layer"``; None = the entry's
features). :func:`side_of` turns that into a :class:`Side`; the spec is rebuilt through the
registry (the recorded name with the recorded option values, ``spec.recorded_overrides``) and
must give back exactly the recorded provenance, else :class:`EncoderChangedError` names the
fields that changed (a registry entry edited since the extraction: its features would differ).

:func:`locate_run` finds the run folder from a run name in a cache or a folder path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from aligned.errors import AlignedError
from extract.encoders import EncoderSpec, get_spec
from extract.encoders.spec import changed_fields, recorded_overrides
from extract.run import resolve_spec
from pipeline.config import config_default
from pipeline.names import is_aligned
from pipeline.runs import ADAPTER_JSON, find_run, runs_dir
from train.api import Run

MODALITIES = ("image", "text")  # the two towers of an aligned model


class EncoderChangedError(AlignedError):
    """The registry no longer builds the encoder a run's entries were extracted with."""


@dataclass(frozen=True)
class Side:
    """One tower: the cache entry the adapter read (``entry``), the encoder that made it
    (``spec``, checked against the entry's key), the extraction precision, the hidden layer the
    adapter reads (None = the pooled features) and the adapter's input width ``dim``; ``tokens``
    for token adapters (``train.tokens``): {"width", "layout", "length" (token slots per row),
    "grid" (``extract.tokens``), "dtype" (the stored token dtype)}, else None."""

    modality: str
    entry: str
    spec: EncoderSpec
    precision: str
    layer: int | None
    dim: int
    tokens: dict | None = None

    def to_json(self) -> dict:
        doc = {"modality": self.modality, "entry": self.entry, "encoder": self.spec.provenance(),
               "precision": self.precision, "layer": self.layer, "dim": self.dim}
        return {**doc, "tokens": self.tokens} if self.tokens else doc  # pooled sides: as before (index hashes)


def token_side(src: Mapping) -> dict | None:
    """Side.tokens of a run's modality record (adapters.json ``modalities``), None for pooled adapters."""
    if not src.get("tokens"):
        return None
    key, width = src.get("key") or {}, int(src["tokens"]["width"])
    return {**src["tokens"], "length": int(src["dim"]) // (width + 1), "grid": str(key.get("tokens", "all")),
            "dtype": str(key.get("token_dtype", "float16"))}


def rebuild_spec(name: str, recorded: Mapping, where: str) -> EncoderSpec:
    """The spec of encoder ``name`` whose provenance is ``recorded`` (a cache key's ``encoder``),
    rebuilt through the registry; EncoderChangedError naming the differing fields otherwise."""
    spec = resolve_spec(name, recorded_overrides(get_spec(name), recorded))
    changed = changed_fields(recorded, spec.provenance())
    if changed:
        raise EncoderChangedError(
            f"{where}: encoder {name!r} as the registry builds it now differs from the one its cache entries were "
            f"extracted with ({', '.join(changed)} changed), so new embeddings would not match the trained adapter. "
            f"Use the version of the code the run was trained with, or re-extract (`extract --encoder {name} "
            f"--force`) and retrain the run.")
    return spec


def side_of(run: Run, modality: str) -> Side:
    """The :class:`Side` of one modality of a loaded run (AlignedError when it cannot be rebuilt)."""
    where = f"run {str(run.run_dir)!r}"
    if modality not in run.config["modalities"]:
        raise AlignedError(f"{where} has no {modality} adapter (it aligns {', '.join(run.modalities)}); an "
                           f"aligned model needs an image and a text adapter: train one with fit-adapters --image "
                           f"... --text ...")
    src = run.source(modality)
    key = src.get("key") or {}
    name = str(key.get("entry") or src["entry"])
    if is_aligned(name):
        raise AlignedError(f"{where}: the {modality} adapter was trained on aligned entry {name!r} (another run's "
                           f"output), not on an encoder's features; an aligned model is built from runs trained "
                           f"on encoder entries.")
    recorded = key.get("encoder")
    if not isinstance(recorded, Mapping):
        raise AlignedError(f"{where}: adapters.json records no encoder for the {modality} entry {name!r} (written "
                           f"by an old version); rerun fit-adapters to record it.")
    spec = rebuild_spec(name, recorded, where)
    if spec.modality != modality:
        raise AlignedError(f"{where}: the {modality} adapter was trained on {name!r}, a {spec.modality} encoder.")
    layer = src.get("layer")
    return Side(modality, name, spec, str(key.get("precision", "fp32")), None if layer is None else int(layer),
                int(src["dim"]), token_side(src))


def locate_run(run: str | Path, cache: str | Path | None = None) -> Path:
    """The folder of ``run``: a run folder (a path holding adapters.json), or a run name looked up
    in ``cache`` (default: the config's ``data.cache``). A folder that is not in the ``cache``
    given is refused: its entries and reports live in its own cache."""
    path = Path(run)
    if (path / ADAPTER_JSON).is_file():
        own = path.resolve().parent.parent
        if cache is not None and path.resolve().parent != runs_dir(cache).resolve():
            raise AlignedError(f"Run folder {str(path)!r} belongs to cache {str(own)!r}, not to cache {str(cache)!r}; "
                               f"pass --cache {own} (or cache={str(own)!r}), or the name of a run of {str(cache)!r}.")
        return path
    if isinstance(run, Path) or len(path.parts) > 1:  # a bare name is a run name, even beside a same-named folder
        raise AlignedError(f"{str(path)!r} is not a run folder (it holds no {ADAPTER_JSON}); pass a run name or "
                           f"the folder <cache>/runs/<name> written by fit-adapters.")
    return find_run(cache if cache is not None else config_default("data.cache"), str(run)).path
