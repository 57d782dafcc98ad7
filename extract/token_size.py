"""How big a token entry will be, said before extracting, and refused beyond ``extract.max_token_bytes``.

Estimate = rows x tokens per row x width x bytes per value (``extract.token_dtype``). Image
encoders: one probe forward pass on a blank image of the encoder's crop size gives tokens per row
and width exactly (every image of an entry has the same token grid). Text encoders: the mean real
length of up to SAMPLE_TEXTS captions spread over the split, through the encoder's own tokenizer,
and the width of a one-caption probe. Flickr30k (31,783 images) with DINOv2-L at 224 px and every
token: 31,783 x 257 x 1024 x 2 bytes = 16.7e9 bytes, which the default limit (8e9) refuses.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

import numpy as np
import torch

from extract.encoders import forward_tokens, token_grid
from pipeline.config import ConfigError, PipelineConfig

log = logging.getLogger(__name__)
SAMPLE_TEXTS = 256  # captions tokenized for the text estimate


class TokenBudgetError(ConfigError):
    """A token extraction estimated larger than extract.max_token_bytes."""


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def estimate(job, rows: Sequence, cfg: PipelineConfig, device) -> tuple[float, int]:
    """(tokens per row, width) of one loaded encoder's token entry (see the module docstring)."""
    grid = token_grid(cfg.extract.tokens)
    enc = job.encoder
    with torch.inference_mode():
        if enc.spec.modality == "image":
            crop = enc.spec.prep.crop
            _, tokens, mask = forward_tokens(enc, torch.zeros(1, 3, crop, crop, device=device), "fp32", grid)
            return float(mask.sum()), int(tokens.shape[2])
        step = max(1, len(rows) // SAMPLE_TEXTS)
        texts = [r.text for r in rows[::step][:SAMPLE_TEXTS]] or [""]
        mask = enc.tokenize(texts)["attention_mask"]
        _, tokens, _ = forward_tokens(enc, enc.tokenize(texts[:1]), "fp32", grid)
        return float(mask.sum(1).float().mean()), int(tokens.shape[2])


def check_token_size(cfg: PipelineConfig, rows: Sequence, jobs: list, us) -> None:
    """Print each token entry's estimated size (stderr, leader only) and refuse (TokenBudgetError)
    any beyond extract.max_token_bytes, before anything is staged; sets each job's token width."""
    x = cfg.extract
    itemsize = np.dtype(x.token_dtype).itemsize
    for job in jobs:
        per_row, width = estimate(job, rows, cfg, us.device)
        job.token_width, job.token_dtype = width, x.token_dtype
        size = len(rows) * per_row * width * itemsize
        text = (f"{job.spec.name}: tokens {x.tokens}: {len(rows)} rows x {per_row:.1f} tokens x {width} x "
                f"{itemsize} bytes ({x.token_dtype}) = about {human_bytes(size)}")
        if us.leader:
            print(f"{text} (extract.max_token_bytes = {human_bytes(x.max_token_bytes)})", file=sys.stderr,
                  flush=True)
        if size > x.max_token_bytes:
            raise TokenBudgetError(
                f"{text}, more than extract.max_token_bytes ({x.max_token_bytes}). Pool to a smaller grid "
                f"(--tokens grid:4), store fewer rows, or raise the limit: --set extract.max_token_bytes="
                f"{int(size * 1.1) + 1}.")
