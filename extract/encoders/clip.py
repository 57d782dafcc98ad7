"""CLIP towers (transformers ``CLIP{Vision,Text}ModelWithProjection``): projected embeddings.

Image features: ``image_embeds`` (the projected, post-layernormed CLS token); text features:
``text_embeds`` (the projected EOS token); neither is L2-normalised. Layers: the CLS token (image)
or last real token (text) of each transformer block; the last one is the final representation
after the post/final layernorm, before the projection.

A checkpoint may be a whole ``CLIPModel`` or one tower. Its projection size is read from its
config before loading and must equal the spec's ``dim`` (EncoderSpecError naming both sizes).
"""

from __future__ import annotations

from extract.encoders.encoder import Encoder, finish, pool_tokens
from extract.encoders.hf_common import PretrainedCopy, hf_model
from extract.encoders.preprocess import CLIP_MEAN, CLIP_STD
from extract.encoders.registry import register, register_alias, register_loader
from extract.encoders.spec import EncoderSpec, EncoderSpecError, ImagePrep, TextPrep


class CLIPImageEncoder(PretrainedCopy, Encoder):
    """CLIP vision tower with projection: image_embeds; layers = CLS tokens, last = post-layernormed CLS."""

    def __init__(self, spec, model, source):
        cfg = model.config
        super().__init__(spec, model, cfg.projection_dim, cfg.num_hidden_layers, source=source)

    def _encode(self, x, all_layers):
        out = self.model(pixel_values=x, output_hidden_states=all_layers, interpolate_pos_encoding=True)
        if not all_layers:
            return out.image_embeds, None
        last = self.model.vision_model.post_layernorm(out.last_hidden_state[:, 0])
        return out.image_embeds, [pool_tokens(h, "cls") for h in out.hidden_states[1:-1]] + [last.float()]


class CLIPTextEncoder(PretrainedCopy, Encoder):
    """CLIP text tower with projection: text_embeds (EOS token); layers pooled at the last real token."""

    def __init__(self, spec, model, tokenizer, source):
        cfg = model.config
        super().__init__(spec, model, cfg.projection_dim, cfg.num_hidden_layers, tokenizer, source)

    def _encode(self, batch, all_layers):
        mask = batch["attention_mask"]
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=all_layers)
        if not all_layers:
            return out.text_embeds, None
        layers = [pool_tokens(h, "last", mask) for h in out.hidden_states[1:-1]]
        return out.text_embeds, layers + [pool_tokens(out.last_hidden_state, "last", mask)]


def _tower_config(spec: EncoderSpec, tower: str):
    """``read_config(src, **kw)`` for hf_model: the checkpoint's ``tower`` ("vision" | "text") config
    with the projection size of the whole model, checked against ``spec.dim`` (0 = any)."""
    def read(src, **kw):
        from transformers import AutoConfig, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

        cfg = AutoConfig.from_pretrained(src, **kw)
        if isinstance(cfg, CLIPConfig):  # a whole CLIP model: the tower configs may carry a default projection
            sub = getattr(cfg, f"{tower}_config")
            sub.projection_dim = cfg.projection_dim
        elif isinstance(cfg, CLIPVisionConfig if tower == "vision" else CLIPTextConfig):
            sub = cfg
        else:
            raise EncoderSpecError(f"{spec.name}: the checkpoint {spec.weights!r} is a {type(cfg).__name__}, "
                                   f"not a CLIP model or CLIP {tower} tower")
        if spec.dim and sub.projection_dim != spec.dim:
            raise EncoderSpecError(
                f"{spec.name}: the checkpoint {spec.weights!r} projects to {sub.projection_dim}-d but the spec "
                f"says {spec.dim}-d; pass weights of a CLIP model with a {spec.dim}-d projection, or register an "
                f"entry with dim={sub.projection_dim} in extract/encoders/clip.py")
        return sub
    return read


def _load_clip_image(spec: EncoderSpec, device) -> Encoder:
    from transformers import CLIPVisionModelWithProjection

    model, _, source = hf_model(spec, CLIPVisionModelWithProjection, with_tokenizer=False,
                                read_config=_tower_config(spec, "vision"))
    return finish(CLIPImageEncoder(spec, model, source), device)


def _load_clip_text(spec: EncoderSpec, device) -> Encoder:
    from transformers import CLIPTextModelWithProjection

    model, tok, source = hf_model(spec, CLIPTextModelWithProjection, with_tokenizer=True,
                                  read_config=_tower_config(spec, "text"))
    return finish(CLIPTextEncoder(spec, model, tok, source), device)


register_loader("clip-image", _load_clip_image)
register_loader("clip-text", _load_clip_text)

register(EncoderSpec(
    "clip-vit-b32-image", "image", "clip-image", "openai/clip-vit-base-patch32", 512, "cls", ("cls",),
    ImagePrep(224, 224, "bicubic", CLIP_MEAN, CLIP_STD),
    description="OpenAI CLIP ViT-B/32 image tower, projected image_embeds (not normalised)"))
register(EncoderSpec(
    "clip-vit-b32-text", "text", "clip-text", "openai/clip-vit-base-patch32", 512, "last", ("last",),
    TextPrep(77), config=(("max_positions", 77),),
    description="OpenAI CLIP ViT-B/32 text tower, projected text_embeds at the EOS token (not normalised)"))
register_alias("clip-image", "clip-vit-b32-image")
register_alias("clip-text", "clip-vit-b32-text")
