"""Token features in the cache (``extract --tokens``): what each encoder family stores, the size
estimate and its refusal, the key, and the bad inputs (resume, kill -9 and shards of token entries
are the parametrized cases of tests/test_extract.py, tests/test_distributed_extract.py and
tests/test_cache.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract import datasets as D
from extract.cli import main as extract_cli
from extract.encoders import EncoderSpecError, get_spec, image_transform, load_encoder, token_grid
from extract.run import extract
from extract.token_size import TokenBudgetError
from pipeline.cache import CacheError, StaleCacheError, staging_folders
from pipeline.config import ConfigError, load_config
from tests.fixtures import make_flickr30k

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    return make_flickr30k(tmp_path_factory.mktemp("flickr"), n_per_split=(2, 2, 5))


def _cfg(data_dir, cache, encoders, **extract_opts):
    opts = {"data.data_dir": str(data_dir), "data.cache": str(cache), "data.dataset": "flickr30k",
            "extract.encoders": tuple(encoders), "extract.split": "test", "extract.workers": 0,
            "extract.batch_size": 2, "extract.chunk_rows": 4}
    opts.update({f"extract.{k}": v for k, v in extract_opts.items()})
    return load_config(ROOT / "pipeline.toml", options=opts)


def test_token_modes_parse():
    assert token_grid("none") is None and token_grid("all") == 0 and token_grid("grid:4") == 4
    for bad in ("grid:0", "grid", "grid:x", "4", "ALL"):
        with pytest.raises(EncoderSpecError, match="none | all | grid:K"):
            token_grid(bad)


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_tokens_match_the_encoder_and_pooled_features_do_not_change(flickr, tmp_path, fmt):
    """Stored tokens equal the encoder's own token states (rounded to float16) row by row; the pooled
    features of a token entry equal those of a pooled extraction; the key adds tokens + token_dtype."""
    names = ("tiny-resnet", "tiny-dinov2", "tiny-gpt2", "tiny-bert")
    pooled = {e.name: e for e in extract(_cfg(flickr, tmp_path / "pooled", names, format=fmt))}
    tok = {e.name: e for e in extract(_cfg(flickr, tmp_path / "tok", names, format=fmt, tokens="grid:2"))}
    split = D.load_split("flickr30k", flickr, "test")
    texts = [r.text for r in split.caption_rows("longest")]
    for name in names:
        a, b = pooled[name], tok[name]
        np.testing.assert_array_equal(a.features(), b.features())
        assert "tokens" not in a.key and not a.has_tokens
        assert b.key["tokens"] == "grid:2" and b.key["token_dtype"] == "float16"
        assert {k: v for k, v in b.key.items() if k not in ("tokens", "token_dtype", "token_layout")} == a.key
        enc = load_encoder(get_spec(name))
        if enc.spec.modality == "image":
            tf = image_transform(enc.spec.prep)
            batch = torch.stack([tf(split.load_image(i)) for i in range(len(split))])
        else:
            batch = enc.tokenize(texts)
        _, states, mask = enc.encode_tokens(batch, 2)
        flat, lengths = b.tokens()
        np.testing.assert_array_equal(lengths, mask.sum(1).numpy())
        np.testing.assert_allclose(flat.astype(np.float32), states[mask].numpy(), rtol=2e-3, atol=2e-3)
    # ViT: CLS + 2 x 2 pooled patches; text: only the real tokens (lengths differ by caption)
    assert set(tok["tiny-dinov2"].token_lengths()) == {5}
    assert tok["tiny-gpt2"].token_width == 32
    assert [tok[n].key["token_layout"] for n in names] == ["positions", "cls+patches", "text", "text"]


def test_a_pooled_entry_is_stale_for_a_token_request(flickr, tmp_path):
    extract(_cfg(flickr, tmp_path, ("tiny-gpt2",)))
    with pytest.raises(StaleCacheError, match="tokens: cached None vs requested 'all'"):
        extract(_cfg(flickr, tmp_path, ("tiny-gpt2",), tokens="all"))
    (entry,) = extract(_cfg(flickr, tmp_path, ("tiny-gpt2",), tokens="all"), force=True)
    assert entry.has_tokens


def test_refusals_before_anything_is_written(flickr, tmp_path):
    with pytest.raises(EncoderSpecError, match="'tiny-clip-image' .* has no token output"):
        extract(_cfg(flickr, tmp_path, ("tiny-clip-image",), tokens="all"))
    with pytest.raises(ConfigError, match="cannot be combined"):
        extract(_cfg(flickr, tmp_path, ("tiny-gpt2",), tokens="all", layers="all"))
    with pytest.raises(TokenBudgetError, match=r"5 rows x 17.0 tokens x 32 x 2 bytes .*max_token_bytes=\d+"):
        extract(_cfg(flickr, tmp_path, ("tiny-dinov2",), tokens="all", max_token_bytes=1000))
    assert not list(tmp_path.glob("*/test/*.h5")) and not list(tmp_path.glob("*/test/*.partial-*"))
    (entry,) = extract(_cfg(flickr, tmp_path, ("tiny-dinov2",), tokens="all", max_token_bytes=6000))
    assert entry.token_lengths().sum() == 5 * 17 and not staging_folders(entry.path)


def test_cli_prints_the_estimate_and_the_token_count(flickr, tmp_path):
    args = ["--encoder", "tiny-dinov2", "--data-dir", str(flickr), "--cache", str(tmp_path), "--split", "test",
            "--workers", "0", "--tokens", "grid:2"]
    res = CliRunner().invoke(extract_cli, args)
    assert res.exit_code == 0, res.output
    assert "tiny-dinov2: tokens grid:2: 5 rows x 5.0 tokens x 32 x 2 bytes (float16) = about 1.6 kB" in res.output
    assert "25 tokens x 32" in res.output
    res = CliRunner().invoke(extract_cli, [*args[:-1], "grid:0"])
    assert res.exit_code == 1 and "Error: extract.tokens must be none | all | grid:K" in res.output


def test_pooled_entries_refuse_token_reads(flickr, tmp_path):
    (entry,) = extract(_cfg(flickr, tmp_path, ("tiny-resnet",)))
    with pytest.raises(CacheError, match=r"'tiny-resnet' holds pooled features only.*--encoder tiny-resnet "
                                         r"--tokens grid:4"):
        entry.tokens()
