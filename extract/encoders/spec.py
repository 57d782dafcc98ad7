"""What identifies one frozen encoder: :class:`EncoderSpec` with its preprocessing, and overrides.

A spec says what the encoder is (modality, family, weights identifier, output dim, pooling,
preprocessing that ships with the weights) and nothing else; its :meth:`EncoderSpec.provenance`
is recorded in every cache entry's ``key``, so changing a registered spec makes old entries stale.

Overrides (``get_spec(name, key=value)``, the CLI's ``--encoder-option name.key=value``) are the
dataclass fields marked with ``option`` metadata below; their values are parsed from the field's
type (``int`` -> positive integer, also from a digit string; ``str`` -> non-empty string;
``str | None`` -> also None). Consequences of an override are in :func:`with_overrides`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.errors import PipelineError, close_matches
from pipeline.runtime import jsonable

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # resize modes ImagePrep accepts


class EncoderSpecError(PipelineError, ValueError):
    """An encoder spec, override or checkpoint that does not fit together (bad pooling, size, value...)."""


class UnknownEncoderError(PipelineError, KeyError):
    """An encoder name that is neither registered, an alias nor a generic ``family:<id>`` name."""


def _option(key: str, help: str, **kw) -> Any:
    """A dataclass field that ``get_spec(name, key=value)`` may override; ``help`` says what a value is."""
    return field(metadata={"option": key, "help": help}, **kw)


def _positive_int(owner: str, key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EncoderSpecError(f"{owner}.{key} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ImagePrep:
    """Image preprocessing shipped with the weights (timm / open_clip style).

    resize: the shorter side is resized to this many px; crop: then centre-cropped
    to crop x crop px; interpolation: "bilinear" | "bicubic" (| "nearest");
    mean/std: per-channel RGB normalisation of [0, 1] pixels.
    """

    resize: int
    crop: int = _option("image_size", "crop size in px; the resize side keeps the spec's resize/crop ratio")
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        _positive_int("ImagePrep", "resize", self.resize)
        _positive_int("ImagePrep", "crop", self.crop)
        if self.interpolation not in INTERPOLATIONS:
            raise EncoderSpecError(f"ImagePrep.interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        for key in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, key))
            if len(value) != 3:
                raise EncoderSpecError(f"ImagePrep.{key} needs 3 values (RGB), got {value!r}")
            object.__setattr__(self, key, value)
        if min(self.std) <= 0:
            raise EncoderSpecError(f"ImagePrep.std must be positive, got {self.std!r}")


@dataclass(frozen=True)
class TextPrep:
    """Text preprocessing: max_tokens is the truncation length in tokens (special tokens included)."""

    max_tokens: int = _option("max_tokens", "truncation length in tokens")

    def __post_init__(self):
        _positive_int("TextPrep", "max_tokens", self.max_tokens)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that identifies one frozen encoder; see the module docstring.

    ``dim`` 0 means "known after load" (generic names): read ``Encoder.dim`` / ``Encoder.spec``.
    ``config`` holds family-specific settings as a tuple of (key, value) pairs (hashable, so
    the spec stays frozen); read it with ``dict(spec.config)``. Keys used by the loaders:
    ``arch`` (torchvision / EfficientNet architecture), ``layers`` (tiny ResNet),
    ``model_config_class`` + ``model_config`` (transformers config class name and its kwargs,
    for ``weights="random"``), ``tokenizer`` (ByteTokenizer kwargs, for ``weights="random"``),
    ``package_path`` / ``package_pip`` (pip package shipping the weights), ``code_package``
    (pip package with the model code), ``max_positions`` (longest token sequence the model
    accepts), ``prep_from_processor`` (read the preprocessing from the checkpoint at load time).
    """

    name: str
    modality: str
    family: str
    weights: str = _option("weights", "a local path, a hub id or a torchvision weights name")
    dim: int
    pooling: str = _option("pooling", "one of the spec's poolings")
    poolings: tuple[str, ...]
    prep: ImagePrep | TextPrep
    revision: str | None = _option("revision", "hub branch, tag or commit", default=None)
    normalize: bool = False
    config: tuple = ()
    description: str = ""

    def __post_init__(self):
        if self.modality not in ("image", "text"):
            raise EncoderSpecError(f"{self.name}: modality must be 'image' or 'text', got {self.modality!r}")
        want = ImagePrep if self.modality == "image" else TextPrep
        if not isinstance(self.prep, want):
            raise EncoderSpecError(f"{self.name}: a {self.modality} encoder needs a {want.__name__}, got {self.prep!r}")
        object.__setattr__(self, "poolings", tuple(self.poolings))
        if self.pooling not in self.poolings:
            raise EncoderSpecError(f"{self.name}: pooling {self.pooling!r} is not one of {self.poolings}")
        if not isinstance(self.dim, int) or self.dim < 0:
            raise EncoderSpecError(f"{self.name}: dim must be an int >= 0 (0 = known after load), got {self.dim!r}")
        if not isinstance(self.weights, str) or not self.weights:
            raise EncoderSpecError(f"{self.name}: weights must be a non-empty string, got {self.weights!r}")
        object.__setattr__(self, "weights", os.path.expanduser(self.weights))
        config = tuple(self.config)
        if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in config):
            raise EncoderSpecError(f"{self.name}: config must be a tuple of (str, value) pairs, got {self.config!r}")
        object.__setattr__(self, "config", config)
        limit = dict(config).get("max_positions")
        if self.modality == "text" and limit is not None and self.prep.max_tokens > limit:
            raise EncoderSpecError(f"{self.name}: max_tokens={self.prep.max_tokens} exceeds the model's {limit} "
                                   f"positions; use max_tokens <= {limit}")

    def provenance(self) -> dict:
        """Every field as a JSON-serialisable dict (prep flattened to ``prep_<field>``); the cache key."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "prep":
                out["prep_type"] = type(value).__name__
                for pf in dataclasses.fields(value):
                    out[f"prep_{pf.name}"] = jsonable(getattr(value, pf.name))
            elif f.name == "config":
                out["config"] = {k: jsonable(v) for k, v in value}
            else:
                out[f.name] = jsonable(value)
        return out


def config_pairs(mapping: Mapping) -> tuple:
    """dict -> tuple of (key, value) pairs, recursively for nested dicts (a hashable spec config)."""
    return tuple((k, config_pairs(v) if isinstance(v, Mapping) else v) for k, v in mapping.items())


# --------------------------------------------------------------------------- overrides
def _options(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """override key -> (field, resolved type) for the fields of ``cls`` marked with ``option``."""
    hints = typing.get_type_hints(cls)
    return {f.metadata["option"]: (f, hints[f.name]) for f in dataclasses.fields(cls) if "option" in f.metadata}


OPTIONS = {cls: _options(cls) for cls in (EncoderSpec, ImagePrep, TextPrep)}  # owner -> key -> (field, type)
_MODALITY = {ImagePrep: "image", TextPrep: "text"}  # prep class -> modality it serves


def _parse(name: str, key: str, value, hint, help: str):
    """``value`` as the field type ``hint`` wants: int -> positive int (digit strings accepted),
    str -> stripped non-empty string, ``X | None`` -> None also allowed."""
    args = typing.get_args(hint) or (hint,)
    optional, base = type(None) in args, next(a for a in args if a is not type(None))
    if value is None and optional:
        return None
    if base is int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        raise EncoderSpecError(f"{name}: override {key}={value!r} must be a positive integer ({help})")
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise EncoderSpecError(f"{name}: override {key}={value!r} must be a non-empty string"
                           f"{' or None' if optional else ''} ({help})")


def _target(spec: EncoderSpec, key: str) -> tuple[type, dataclasses.Field, Any]:
    """(owner class, field, type) that override ``key`` sets on ``spec``; unknown or misplaced keys fail."""
    for owner, options in OPTIONS.items():
        if key not in options:
            continue
        if owner is not EncoderSpec and owner is not type(spec.prep):
            article = "an" if spec.modality == "image" else "a"
            raise EncoderSpecError(f"{spec.name}: {key} applies to {_MODALITY[owner]} encoders; this is {article} "
                                   f"{spec.modality} encoder (use {', '.join(OPTIONS[type(spec.prep)])})")
        return (owner, *options[key])
    valid = [k for options in OPTIONS.values() for k in options]
    close = close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise EncoderSpecError(f"{spec.name}: unknown override {key!r}{hint}; valid overrides: {', '.join(valid)}")


def with_overrides(spec: EncoderSpec, overrides: Mapping[str, Any]) -> EncoderSpec:
    """``spec`` with ``overrides`` (override key -> value) applied; ``spec`` itself when there are none.

    Consequences: a new ``weights`` or ``revision`` drops ``package_path`` (the shipped package
    holds the default weights only); ``image_size`` sets the crop, scales the resize side by the
    same factor and turns ``prep_from_processor`` off (an explicit size wins). The result is
    validated like any spec (pooling among ``poolings``, max_tokens within ``max_positions``).
    Raises EncoderSpecError (a ValueError) for unknown keys and bad values.
    """
    if not overrides:
        return spec
    changes: dict[str, Any] = {}
    prep_changes: dict[str, Any] = {}
    for key, value in overrides.items():
        owner, f, hint = _target(spec, key)
        parsed = _parse(spec.name, key, value, hint, f.metadata["help"])
        (changes if owner is EncoderSpec else prep_changes)[f.name] = parsed
    config = dict(spec.config)
    if "weights" in changes or "revision" in changes:
        config.pop("package_path", None)
    if "crop" in prep_changes:
        prep_changes["resize"] = round(prep_changes["crop"] * spec.prep.resize / spec.prep.crop)
        if "prep_from_processor" in config:
            config["prep_from_processor"] = False
    if prep_changes:
        changes["prep"] = dataclasses.replace(spec.prep, **prep_changes)
    return dataclasses.replace(spec, config=tuple(config.items()), **changes)


def recorded_overrides(spec: EncoderSpec, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides (override key -> value) under which ``spec`` (as the registry gives it)
    records the option values of ``provenance`` (a ``provenance()`` dict, e.g. a cache entry's
    ``key["encoder"]``): the inverse of :func:`with_overrides` for the option fields. Options the
    provenance does not record, or records with the spec's own value, are left out."""
    out: dict[str, Any] = {}
    for owner, options in OPTIONS.items():
        if owner is not EncoderSpec and owner is not type(spec.prep):
            continue
        for key, (f, _) in options.items():
            recorded = f.name if owner is EncoderSpec else f"prep_{f.name}"
            have = getattr(spec if owner is EncoderSpec else spec.prep, f.name)
            if recorded in provenance and provenance[recorded] != jsonable(have):
                out[key] = provenance[recorded]
    return out


def changed_fields(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Sorted names of the fields two ``provenance()`` dicts disagree on (JSON-compared)."""
    a, b = jsonable(recorded), jsonable(now)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
