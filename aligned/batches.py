"""Batched embedding of many images or texts to numpy (``AlignedModel.embed_images`` /
``embed_texts``), with a progress bar.

Image files go through extraction's own input path: a :class:`extract.datasets.Split` of the
files, decoded once each in DataLoader workers (``extract.loader.make_loader``: ``to_rgb``, then
the encoder's ``image_pixels``, uint8 to the model's device), so a file embeds exactly as it
would inside a dataset. PIL images given directly are converted in this process the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from aligned.errors import AlignedError
from aligned.inputs import check_texts
from extract.datasets import Item, Split
from extract.encoders import image_pixels
from extract.loader import loader_workers, make_loader


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AlignedError(f"batch_size must be a positive integer, got {batch_size!r}")


def _is_pil(x) -> bool:
    return hasattr(x, "mode") and hasattr(x, "convert")


def embed_images(model, images, batch_size: int = 64, normalize: bool = False, workers: int = -1,
                 progress: bool | None = None) -> np.ndarray:
    """(N, dim) float32 embeddings of ``images`` (paths and/or PIL images; one of them alone is a
    list of one), in order. See ``AlignedModel.embed_images``."""
    _check_batch_size(batch_size)
    images = [images] if isinstance(images, (str, os.PathLike)) or _is_pil(images) else list(images)
    files = [(i, x) for i, x in enumerate(images) if isinstance(x, (str, os.PathLike))]
    pils = [(i, x) for i, x in enumerate(images) if _is_pil(x)]
    if len(files) + len(pils) != len(images):
        bad = next(x for x in images if not isinstance(x, (str, os.PathLike)) and not _is_pil(x))
        raise AlignedError(f"embed_images takes image file paths or PIL images, got a {type(bad).__name__}")
    out = np.zeros((len(images), model.dim), np.float32)
    with tqdm(total=len(images), desc="embed images", unit="img", dynamic_ncols=True,
              disable=None if progress is None else not progress) as bar, torch.inference_mode():
        if files:
            split = Split("files", "embed", [Item(str(i), str(Path(p)), ()) for i, p in files], "embed_images")
            loader = make_loader(split, split.items, [range(len(files))], batch_size, loader_workers(workers),
                                 model.device, transforms={"pixels": image_pixels(model.preprocess.prep)})
            for batch in loader:
                if batch.unreadable:
                    raise batch.unreadable[min(batch.unreadable)].error()  # ImageError: index and path
                rows = [files[r][0] for r in batch.rows]
                out[rows] = model.encode_image(batch.inputs["pixels"], normalize).cpu().numpy()
                bar.update(len(rows))
        for s in range(0, len(pils), batch_size):
            chunk = pils[s:s + batch_size]
            pixels = torch.stack([model.preprocess.pixels(im) for _, im in chunk])
            out[[i for i, _ in chunk]] = model.encode_image(pixels, normalize).cpu().numpy()
            bar.update(len(chunk))
    return out


def embed_texts(model, texts: Sequence[str], batch_size: int = 64, normalize: bool = False,
                progress: bool | None = None) -> np.ndarray:
    """(N, dim) float32 embeddings of strings, in order; every text is checked before any work."""
    _check_batch_size(batch_size)
    texts = check_texts(texts)
    out = np.zeros((len(texts), model.dim), np.float32)
    with tqdm(total=len(texts), desc="embed texts", unit="txt", dynamic_ncols=True,
              disable=None if progress is None else not progress) as bar, torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            chunk = texts[s:s + batch_size]
            out[s:s + len(chunk)] = model.encode_text(model.tokenizer(chunk), normalize).cpu().numpy()
            bar.update(len(chunk))
    return out
