"""What the aligned model takes in: images through :class:`Preprocess` (the datasets' RGB
conversion, then the image encoder's own recipe), texts through :class:`Tokenizer` (the text
encoder's tokenizer; empty texts refused), batches as :class:`Tokens`."""

from __future__ import annotations

from typing import Sequence

import torch

from aligned.errors import AlignedError
from extract.datasets import to_rgb
from extract.encoders import Encoder, image_pixels, normalize_pixels
from extract.encoders.spec import ImagePrep


class Preprocess:
    """PIL image -> float32 tensor (3, crop, crop): RGB conversion as the datasets do it
    (``to_rgb``: EXIF orientation, transparency on white, 16-bit and palette modes), then the
    image encoder's recipe (resize, centre crop, scale, normalise). :meth:`pixels` is the uint8
    half that extraction's DataLoader workers run. Picklable."""

    def __init__(self, prep: ImagePrep):
        self.prep, self._pixels = prep, image_pixels(prep)

    def pixels(self, image) -> torch.Tensor:
        """PIL image -> uint8 tensor (3, crop, crop) (normalised later, on the model's device)."""
        if not hasattr(image, "mode") or not hasattr(image, "convert"):
            raise AlignedError(f"preprocess expects a PIL image, got {type(image).__name__}; open files with "
                               "PIL.Image.open(path), or pass the paths to model.embed_images(paths).")
        return self._pixels(to_rgb(image))

    def __call__(self, image) -> torch.Tensor:
        return normalize_pixels(self.pixels(image), self.prep)

    def __repr__(self) -> str:
        return f"Preprocess({self.prep})"


class Tokens(dict):
    """The tokenizer's batch: ``{"input_ids", "attention_mask"}`` LongTensors (B, T); ``.to(device)``
    returns the batch moved there (as open_clip's token tensor does)."""

    def to(self, device) -> "Tokens":
        return Tokens({k: v.to(device) for k, v in self.items()})


class Tokenizer:
    """list of B strings (or one string) -> :class:`Tokens`, with the text encoder's own tokenizer
    and truncation. An empty or whitespace-only text is refused (AlignedError), as the datasets
    refuse empty captions: its embedding would carry no sentence."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, texts: str | Sequence[str]) -> Tokens:
        return Tokens(self.encoder.tokenize(check_texts(texts)))


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """``texts`` as a list of non-empty strings (one string = a list of one); AlignedError naming
    the first text that is not a string or is empty / whitespace-only."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise AlignedError(f"text {i} is a {type(t).__name__}, not a string: {t!r}")
        if not t.strip():
            raise AlignedError(f"text {i} of {len(texts)} is empty or whitespace-only; give at least one word "
                               f"(an empty text has no meaning to embed).")
    return texts
