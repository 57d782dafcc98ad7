"""transformers image models (DINOv2 and any ``AutoModel`` ViT): CLS token or patch mean.

Features: the CLS token (``cls``) or the mean of the patch tokens (``mean``, register tokens
excluded) of the last hidden state, which is after the model's final layernorm. Layers: one per
transformer block (``hidden_states[1:]``, embeddings excluded), the last one the default output.

Generic name ``hf-image:<hub id or local folder>``: ``AutoModel``; pooling ``cls`` (default) or
``mean``; preprocessing read from the folder's image processor config at load time when there
is one (else ImageNet defaults: resize 256 bicubic, crop 224) -- read ``Encoder.spec.prep``.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from extract.encoders.encoder import Encoder, finish, grid_tokens, pool_tokens
from extract.encoders.hf_common import PretrainedCopy, hf_model
from extract.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD
from extract.encoders.registry import register, register_alias, register_generic, register_loader
from extract.encoders.spec import INTERPOLATIONS, EncoderSpec, EncoderSpecError, ImagePrep
from extract.encoders.weights import WeightsNotFoundError, hf_load


class HFImageEncoder(PretrainedCopy, Encoder):
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
        return pool_tokens(h, self.spec.pooling, first=self._first_patch)

    def _encode_tokens(self, x, grid):
        """CLS + patch tokens of the final-normed last hidden state (register tokens left out);
        with ``grid`` the patch grid (h/p x w/p) average-pooled to grid x grid, CLS kept."""
        h = self.model(pixel_values=x, **self._kw).last_hidden_state
        final = self._pool(h)
        if h.ndim == 4:  # convolutional hidden state: its positions
            tokens = grid_tokens(h, grid)
        else:
            patch = int(self.model.config.patch_size)
            gh, gw = x.shape[2] // patch, x.shape[3] // patch
            patches = h[:, self._first_patch:]
            if patches.shape[1] != gh * gw:
                raise EncoderSpecError(f"{self.spec.name}: {patches.shape[1]} patch tokens do not form the "
                                       f"{gh} x {gw} grid of a {x.shape[2]} x {x.shape[3]} input")
            maps = patches.float().transpose(1, 2).reshape(h.shape[0], h.shape[2], gh, gw)
            tokens = torch.cat([h[:, :1].float(), grid_tokens(maps, grid)], dim=1)
        return final, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def _encode(self, x, all_layers):
        out = self.model(pixel_values=x, output_hidden_states=all_layers, **self._kw)
        final = self._pool(out.last_hidden_state)
        if not all_layers:
            return final, None
        return final, [self._pool(h) for h in out.hidden_states[1:-1]] + [final]


def _spec_with_processor_prep(spec: EncoderSpec) -> EncoderSpec:
    """Replace spec.prep by the model's image processor settings when a processor config exists."""
    from transformers import AutoImageProcessor

    try:
        proc, _ = hf_load(spec, lambda src, **kw: AutoImageProcessor.from_pretrained(src, **kw))
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
        prep = ImagePrep(int(resize), int(crop_px), interp if interp in INTERPOLATIONS else "bicubic",
                         tuple(proc.image_mean), tuple(proc.image_std))
    except (TypeError, ValueError, AttributeError):
        return spec
    return dataclasses.replace(spec, prep=prep)


def _load_hf_image(spec: EncoderSpec, device) -> Encoder:
    from transformers import AutoModel

    model, _, source = hf_model(spec, AutoModel, with_tokenizer=False)
    if dict(spec.config).get("prep_from_processor") and spec.weights != "random":
        spec = _spec_with_processor_prep(spec)
    return finish(HFImageEncoder(spec, model, source), device)


DINO_PREP = ImagePrep(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD)  # DINOv2's ImageNet recipe


def _generic_hf_image(src: str) -> EncoderSpec:
    return EncoderSpec(
        f"hf-image:{src}", "image", "hf-image", src, 0, "cls", ("cls", "mean"), DINO_PREP,
        config=(("prep_from_processor", True),), description="generic transformers AutoModel image encoder")


register_loader("hf-image", _load_hf_image, tokens="cls+patches")
register_generic("hf-image", _generic_hf_image)
for _size, _dim in (("small", 384), ("base", 768), ("large", 1024), ("giant", 1536)):
    register(EncoderSpec(
        f"dinov2-{_size}", "image", "hf-image", f"facebook/dinov2-{_size}", _dim, "cls", ("cls", "mean"),
        DINO_PREP, description=f"DINOv2 ViT-{_size[0].upper()}/14; CLS token after the final layernorm"))
register_alias("dinov2", "dinov2-base")
