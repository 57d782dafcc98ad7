"""What the transformers families (hf_text, hf_image, clip) share: building the model and tokenizer.

``weights="random"`` specs are built from ``config["model_config_class"]`` and
``config["model_config"]`` with a fixed seed and get a :class:`ByteTokenizer`; every other spec
is loaded with ``from_pretrained`` through the weights chain (:func:`weights.hf_load`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from extract.encoders.preprocess import ByteTokenizer, HFTokenizer
from extract.encoders.spec import EncoderSpec
from extract.encoders.weights import RANDOM_SOURCE, hf_load, seeded


class PretrainedCopy:
    """``save_weights`` for the transformers families (mixed into their Encoder subclasses): the
    model's ``save_pretrained`` folder (config.json + model.safetensors) and its tokenizer's files,
    which ``from_pretrained`` (``weights.hf_load``, a local folder) reads back."""

    def save_weights(self, folder: Path) -> Path:
        if self.spec.weights == "random":
            return super().save_weights(folder)  # nothing to copy: refused with the reason
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        tokenizer = getattr(self.tokenizer, "tokenizer", None)  # HFTokenizer wraps the transformers one
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return folder


def _random_config(spec: EncoderSpec):
    import transformers

    cfg = dict(spec.config)
    if "model_config_class" not in cfg:
        raise ValueError(f"{spec.name}: weights='random' needs config entries model_config_class and model_config")
    return getattr(transformers, cfg["model_config_class"])(**dict(cfg.get("model_config", ())))


def hf_model(spec: EncoderSpec, model_cls, with_tokenizer: bool, read_config: Callable | None = None):
    """(model, tokenizer or None, source) for a transformers family, random or pretrained.

    ``read_config(src, **from_pretrained_kwargs)``, when given, returns the config to load the
    pretrained model with (or raises a PipelineError when the checkpoint does not fit the spec).
    """
    if spec.weights == "random":
        config = _random_config(spec)
        auto = getattr(model_cls, "from_config", None)
        model = seeded(lambda: auto(config) if auto else model_cls(config))
        tok = None
        if with_tokenizer:
            tok = ByteTokenizer(spec.prep.max_tokens, **dict(dict(spec.config).get("tokenizer", ())))
        return model, tok, RANDOM_SOURCE

    def load(src, **kw):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights: 100%" bars are noise in our progress lines
        extra = {"config": read_config(src, **kw)} if read_config else {}
        model = model_cls.from_pretrained(src, dtype=torch.float32, **extra, **kw)
        tok = None
        if with_tokenizer:
            from transformers import AutoTokenizer

            tok = HFTokenizer(AutoTokenizer.from_pretrained(src, **kw), spec.prep.max_tokens)
        return model, tok

    (model, tok), source = hf_load(spec, load)
    return model, tok, source
