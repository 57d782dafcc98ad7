"""A gallery of coloured images and a stand-in model whose embeddings are known by hand, for the
search tests: an image embeds as its mean RGB (plus 1, so black is not the zero vector), a sentence
as the sum of the RGB of the colour words it holds (plus 1). So "red" finds the red images first
and every cosine can be computed in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from extract.datasets import ImageError, to_rgb
from search.index import ModelRef

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "white": (255, 255, 255), "black": (0, 0, 0)}


def _open(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except Exception as exc:
        raise ImageError(path, path, f"{type(exc).__name__}: {exc}") from None


class ColourModel:
    """The embed_images / embed_texts surface of ``aligned.AlignedModel``, 3-d and exact."""

    dim = 3

    def __init__(self, name: str = "colours"):
        self.ref = ModelRef(f"hash-of-{name}", name, {})
        self.images_embedded = 0

    def embed_images(self, images, batch_size: int = 64, normalize: bool = False, workers: int = -1,
                     progress=None) -> np.ndarray:
        out = []
        for x in images:
            im = x if isinstance(x, Image.Image) else _open(str(x))
            out.append(np.asarray(to_rgb(im), np.float64).reshape(-1, 3).mean(axis=0) + 1)
        self.images_embedded += len(out)
        return np.asarray(out, np.float32).reshape(-1, 3)

    def embed_texts(self, texts, batch_size: int = 64, normalize: bool = False, progress=None) -> np.ndarray:
        out = [np.sum([COLOURS[w] for w in t.lower().split() if w in COLOURS] or [(0, 0, 0)], axis=0) + 1.0
               for t in texts]
        return np.asarray(out, np.float32).reshape(-1, 3)


def make_gallery(root: str | Path, per_colour: int = 2, size: int = 24) -> Path:
    """``root/<colour>/<colour>_<i>.png`` images of one flat colour (slightly shaded by i), with a
    metadata.jsonl per colour folder captioning each "a <colour> square number <i>"."""
    root = Path(root)
    for name, rgb in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(per_colour):
            shade = tuple(max(0, min(255, c - 8 * i)) for c in rgb)
            Image.new("RGB", (size, size), shade).save(folder / f"{name}_{i}.png")
            rows.append(f'{{"file_name": "{name}_{i}.png", "caption": "a {name} square number {i}"}}\n')
        (folder / "metadata.jsonl").write_text("".join(rows), encoding="utf-8")
    return root
