"""The encoder registry: names -> specs, aliases, generic ``prefix:<id>`` names, family -> loader.

Family modules fill these tables when the package is imported (each next to its loader):
``register(spec)`` adds a named entry, ``register_alias``, ``register_generic`` a spec builder
for ``prefix:<id>`` names and ``register_loader`` the function that builds a family's encoder.
Every table refuses a name that is already taken (big_vision style). :func:`get_spec` resolves
a name and applies overrides; :func:`load_encoder` builds it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from extract.encoders.encoder import Encoder
from extract.encoders.spec import EncoderSpec, EncoderSpecError, UnknownEncoderError, with_overrides
from pipeline.errors import did_you_mean

REGISTRY: dict[str, EncoderSpec] = {}  # registry name -> spec
ALIASES: dict[str, str] = {}  # alias -> registry name
GENERIC: dict[str, Callable[[str], EncoderSpec]] = {}  # "<prefix>" of "<prefix>:<id>" -> spec builder
LOADERS: dict[str, Callable[[EncoderSpec, Any], Encoder]] = {}  # family -> loader(spec, device) -> Encoder
TOKEN_FAMILIES: dict[str, str] = {}  # family -> token layout of its encoders (Encoder.encode_tokens): "cls+patches"
#   (token 0 is CLS, then the patch grid), "positions" (feature-map positions), "text" (real tokens in order)


def register(spec: EncoderSpec) -> EncoderSpec:
    """Add ``spec`` to :data:`REGISTRY`; a taken name, a ':' in it or a family without loader is an error."""
    if spec.name in REGISTRY or spec.name in ALIASES:
        raise ValueError(f"encoder name {spec.name!r} is already registered; pick another name")
    if ":" in spec.name:
        raise ValueError(f"encoder name {spec.name!r} must not contain ':' (reserved for generic names)")
    if spec.family not in LOADERS:
        raise ValueError(f"{spec.name}: no loader for family {spec.family!r}; register_loader it first")
    REGISTRY[spec.name] = spec
    return spec


def register_alias(alias: str, target: str) -> None:
    """Make ``alias`` resolve to the registered name ``target``."""
    if alias in REGISTRY or alias in ALIASES:
        raise ValueError(f"alias {alias!r} is already taken")
    if target not in REGISTRY:
        raise ValueError(f"alias {alias!r} points at unknown encoder {target!r}")
    ALIASES[alias] = target


def register_generic(prefix: str, build: Callable[[str], EncoderSpec]) -> None:
    """Let ``<prefix>:<id>`` names resolve to ``build(id)`` (a spec with dim 0 = known after load)."""
    if prefix in GENERIC:
        raise ValueError(f"generic prefix {prefix!r} is already taken")
    GENERIC[prefix] = build


def register_loader(family: str, load: Callable[[EncoderSpec, Any], Encoder], tokens: str = "") -> None:
    """``load(spec, device)`` builds every spec of ``family``: an Encoder in eval mode, frozen, on device;
    ``tokens``: the token layout when its encoders implement ``Encoder.encode_tokens`` (``extract --tokens``;
    see TOKEN_FAMILIES), "" when they have no token output."""
    if family in LOADERS:
        raise ValueError(f"family {family!r} already has a loader")
    LOADERS[family] = load
    if tokens:
        TOKEN_FAMILIES[family] = tokens


def check_tokens(spec: EncoderSpec) -> str:
    """The token layout of ``spec``'s family; EncoderSpecError naming the encoder when it has none."""
    if spec.family not in TOKEN_FAMILIES:
        able = sorted(n for n, s in REGISTRY.items() if s.family in TOKEN_FAMILIES and s.modality == spec.modality)
        raise EncoderSpecError(
            f"Encoder {spec.name!r} ({spec.family} family) has no token output, so --tokens cannot store its tokens; "
            f"extract it with --tokens none, or pick another {spec.modality} encoder, one of: {', '.join(able[:6])}.")
    return TOKEN_FAMILIES[spec.family]


def _lookup(name: str) -> EncoderSpec:
    if not isinstance(name, str) or not name.strip():
        raise UnknownEncoderError(f"encoder name must be a non-empty string, got {name!r}")
    name = name.strip()
    name = ALIASES.get(name, name)
    if name in REGISTRY:
        return REGISTRY[name]
    prefix, sep, rest = name.partition(":")
    if sep and prefix in GENERIC:
        if not rest.strip():
            raise UnknownEncoderError(f"generic encoder name {name!r} needs an id after '{prefix}:'")
        return GENERIC[prefix](rest.strip())
    candidates = list(REGISTRY) + list(ALIASES) + [f"{p}:<id>" for p in GENERIC]
    raise UnknownEncoderError(
        f"unknown encoder {name!r}.{did_you_mean(name.lower(), candidates, n=5, cutoff=0.5)} Run "
        f"`extract --list-encoders` for all names, or use a generic name: "
        f"{', '.join(p + ':<hub id, path or model name>' for p in GENERIC)}.")


def get_spec(name: str, **overrides) -> EncoderSpec:
    """Resolve ``name`` (registry name, alias or generic ``prefix:<id>``) and apply overrides.

    Overrides (see ``spec.OPTIONS``): pooling (one of spec.poolings), image_size (int px; sets
    prep.crop and scales prep.resize by the same factor), max_tokens (int), weights (local path,
    hub id or torchvision weights name), revision (hub revision or None).
    Raises UnknownEncoderError (a KeyError) for unknown names, with close matches;
    EncoderSpecError (a ValueError) for an unknown override key or a bad value.
    """
    return with_overrides(_lookup(name), overrides)


def has_layers(spec: EncoderSpec) -> bool:
    """Whether the encoder has hidden layers (``extract --layers all``): False for the numpy
    sentence encoders (``config["outputs"] = "sentence"``: sentence vectors only)."""
    return dict(spec.config).get("outputs") != "sentence"


def list_encoders(include_tiny: bool = True) -> list[str]:
    """Sorted registry names (aliases and generic names excluded); tiny = randomly initialised test models."""
    return sorted(n for n, s in REGISTRY.items() if include_tiny or s.weights != "random")


def load_encoder(spec: EncoderSpec | str, device: str | torch.device = "cpu") -> Encoder:
    """Build the encoder for ``spec`` (or a name, resolved by get_spec) on ``device`` ("auto" = CUDA if present).

    Raises WeightsNotFoundError when the weights are not available locally and cannot be fetched.
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    if spec.family not in LOADERS:
        raise ValueError(f"{spec.name}: no loader for family {spec.family!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[spec.family](spec, device)
