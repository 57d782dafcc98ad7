"""Warnings about inputs that are valid but make later numbers misleading, found while extracting.

* ``warn_duplicate_images``: images that are byte-identical copies under different ids (their
  content hashes, which every entry records, are equal). Copies are each other's nearest
  neighbours, so kNN and kernel metrics over them are inflated; ``analyze.duplicates`` drops
  (the default) or keeps them in the kernel-metric commands.
* ``TokenCollisions``: distinct captions that a text encoder's tokenizer turns into the same
  token sequence (a length limit cut them to a shared prefix, or its normalisation, e.g.
  lower-casing, made them equal): their features are identical, so the captions cannot be told
  apart by anything downstream.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch

from extract.datasets import duplicate_groups

log = logging.getLogger(__name__)

EXAMPLES = 3  # groups / captions named in a warning


def warn_duplicate_images(where: str, ids: Sequence[str], digests: Sequence[str]) -> list[list[str]]:
    """Log one warning naming the groups of byte-identical images among ``ids`` (with their
    content ``digests``); returns the groups (see ``duplicate_groups``)."""
    groups = duplicate_groups(ids, digests)
    if groups:
        copies = sum(len(g) - 1 for g in groups)
        shown = "; ".join(" = ".join(repr(i) for i in g) for g in groups[:EXAMPLES])
        log.warning("%s: %d of %d images are byte-identical copies of another image under a different id (%d "
                    "group(s), e.g. %s). kNN and kernel metrics count copies as each other's neighbours: "
                    "analyze.duplicates = \"drop\" (the default) keeps one image of each group there, \"keep\" "
                    "keeps them all.", where, copies, len(ids), len(groups), shown)
    return groups


class TokenCollisions:
    """Distinct captions that tokenize to the same sequence, collected batch by batch for one
    text encoder; ``warn`` logs them once at the end."""

    def __init__(self, encoder: str):
        self.encoder = encoder
        self.seen: dict[tuple, str] = {}  # token sequence -> the first caption read as it
        self.pairs: list[tuple[str, str]] = []  # (earlier caption, caption tokenized the same)
        self.longest = 0  # tokens of the longest colliding sequence

    def add(self, texts: Sequence[str], inputs) -> None:
        """One batch: ``texts`` (b,) and the tokenizer's output for them (a mapping with
        ``input_ids`` (b, L) and, optionally, ``attention_mask`` (b, L)); other inputs are ignored."""
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            return
        ids = torch.as_tensor(inputs["input_ids"])
        mask = torch.as_tensor(inputs.get("attention_mask", torch.ones_like(ids))).bool()
        for text, row, keep in zip(texts, ids, mask):
            key = tuple(row[keep].tolist())
            first = self.seen.setdefault(key, text)
            if first != text:
                self.pairs.append((first, text))
                self.longest = max(self.longest, len(key))

    def warn(self, where: str) -> None:
        if not self.pairs:
            return
        shown = "; ".join(f"{a!r} and {b!r}" for a, b in self.pairs[:EXAMPLES])
        log.warning("%s: %s's tokenizer reads %d distinct caption(s) as the same tokens as another one (e.g. %s; "
                    "longest such sequence: %d tokens). Their features are identical: a length limit cut them to "
                    "a shared prefix, or the tokenizer's normalisation made them equal. Use an encoder with a "
                    "longer limit if the captions should differ.", where, self.encoder, len(self.pairs), shown,
                    self.longest)
