"""Registry of frozen encoders: one small spec per encoder, one module per family.

Typical use::

    spec = get_spec("dinov2", image_size=448)          # alias -> "dinov2-base"
    enc = load_encoder(spec, device="auto")             # Encoder (torch.nn.Module)
    x = image_transform(enc.spec.prep)(pil_rgb_image)   # (3, crop, crop) float32
    feats = enc(x[None])                                 # (1, dim) float32

    txt = load_encoder(get_spec("gpt2", pooling="last"))
    feats = txt(txt.tokenize(["A dog runs.", "Two men talk."]))  # (2, 768)

Where things live
-----------------
* ``spec.py``: :class:`EncoderSpec` (+ ``ImagePrep`` / ``TextPrep``), its cache-key
  ``provenance()`` and the overrides (``pooling``, ``image_size``, ``max_tokens``, ``weights``,
  ``revision``; the CLI's ``--encoder-option name.key=value``).
* ``registry.py``: the tables (``REGISTRY``, ``ALIASES``, ``GENERIC``, ``LOADERS``),
  ``get_spec``, ``list_encoders``, ``load_encoder``.
* ``weights.py``: where weights come from (local path -> local cache -> pip package ->
  download) and ``WeightsNotFoundError``, which says what to download.
* ``preprocess.py``: image pixels / normalisation, tokenizers. ``encoder.py``: the ``Encoder``
  every loader returns (``forward(batch, all_layers=False)``).
* One module per family, registering its entries next to its loader: ``torchvision_cnn``
  (``resnet18``, ``mobilenet_v2``, ``efficientnet_lite0``, ``torchvision:<model>``),
  ``hf_image`` (``dinov2-*``, ``hf-image:<id>``), ``clip`` (``clip-vit-b32-{image,text}``),
  ``hf_text`` (``gpt2``, ``distilbert``, sentence encoders, ``hf-text:<id>``), ``numpy_text``
  (``use-multilingual-v3``: numpy, sentence vectors only), ``hf_decoder`` (``smollm2-135m``, GGUF)
  and ``tiny`` (the
  ``tiny-*`` random test models, one per family).

Adding an encoder to a family is one ``register(EncoderSpec(...))`` line in its module; a new
family is one new module (an ``Encoder`` subclass, a loader, ``register_loader`` and its
entries) imported below. No code branches on model names.

Names: registry names (``list_encoders()``); aliases ``dinov2`` -> ``dinov2-base``, ``minilm``
-> ``all-minilm-l6-v2``, ``clip-image``/``clip-text`` -> ViT-B/32; generic
``hf-text:<id>``, ``hf-image:<id>``, ``torchvision:<model>`` (``dim`` 0 in the spec, meaning
"known after load": read ``Encoder.dim`` / ``Encoder.spec``).
"""

from extract.encoders.encoder import TOKEN_MODES, Encoder, forward_batch, forward_tokens, token_grid
from extract.encoders.preprocess import (BYTE_VOCAB, CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD,
                                         ByteTokenizer, HFTokenizer, image_pixels, image_transform, normalize_pixels,
                                         resize_crop)
from extract.encoders.registry import (ALIASES, GENERIC, LOADERS, REGISTRY, TOKEN_FAMILIES, check_tokens, get_spec,
                                       has_layers, list_encoders, load_encoder, register, register_alias,
                                       register_generic, register_loader)
from extract.encoders.spec import EncoderSpec, EncoderSpecError, ImagePrep, TextPrep, UnknownEncoderError
from extract.encoders.weights import TINY_SEED, WeightsNotFoundError

# Families: importing a module registers its loader and entries (order = registry order).
from extract.encoders import torchvision_cnn, hf_image, clip, hf_text, hf_decoder, numpy_text, tiny  # noqa: F401

__all__ = [
    "ALIASES", "BYTE_VOCAB", "CLIP_MEAN", "CLIP_STD", "GENERIC", "HALF", "IMAGENET_MEAN", "IMAGENET_STD", "LOADERS",
    "REGISTRY", "TINY_SEED", "TOKEN_FAMILIES", "TOKEN_MODES", "ByteTokenizer", "Encoder", "check_tokens",
    "forward_tokens", "token_grid", "EncoderSpec", "EncoderSpecError", "HFTokenizer", "has_layers",
    "ImagePrep", "TextPrep", "UnknownEncoderError", "WeightsNotFoundError", "forward_batch", "get_spec", "image_pixels",
    "image_transform", "list_encoders", "load_encoder", "normalize_pixels", "register", "register_alias",
    "register_generic", "register_loader", "resize_crop",
]
