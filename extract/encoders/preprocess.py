"""Preprocessing shared by the families: image pixels and normalisation, and the two tokenizers.

Images are split in two halves so DataLoader workers ship uint8: :func:`image_pixels` (resize,
centre crop, uint8) runs in the workers, :func:`normalize_pixels` finishes on the model's device;
:func:`image_transform` composes both for one image; :func:`resize_crop` is the same recipe on
uint8 tensors (images decoded outside PIL, e.g. on the GPU). Tokenizers turn a list of B strings into
``{"input_ids", "attention_mask"}`` LongTensors (B, T), right-padded, never an empty row.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from extract.encoders.spec import EncoderSpecError, ImagePrep

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel RGB mean of ImageNet, on [0, 1] pixels
IMAGENET_STD = (0.229, 0.224, 0.225)  # per-channel RGB std of ImageNet, on [0, 1] pixels
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's RGB mean, on [0, 1] pixels
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's RGB std, on [0, 1] pixels
HALF = (0.5, 0.5, 0.5)  # mean = std = 0.5 maps [0, 1] pixels to [-1, 1] (TF-Lite style)
BYTE_VOCAB = 259  # ByteTokenizer: 256 byte ids + pad (256), bos (257), eos (258)


# --------------------------------------------------------------------------- images
def image_pixels(prep: ImagePrep) -> Callable:
    """PIL RGB image -> uint8 tensor (3, prep.crop, prep.crop): the CPU half of preprocessing.

    Resize (shorter side to prep.resize, antialiased) -> CenterCrop(prep.crop) -> ToImage.
    DataLoader workers run this; sending uint8 keeps inter-process traffic 4x smaller than
    float32, and ``normalize_pixels`` finishes on the model's device. Picklable.
    """
    from torchvision.transforms import v2

    return v2.Compose([
        v2.Resize(prep.resize, interpolation=_mode(prep), antialias=True),
        v2.CenterCrop(prep.crop),
        v2.ToImage(),
    ])


def _mode(prep: ImagePrep):
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
            "nearest": InterpolationMode.NEAREST}[prep.interpolation]


def resize_crop(images: torch.Tensor, prep: ImagePrep) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> uint8 (n, 3, prep.crop, prep.crop) on the images' device: the tensor
    twin of :func:`image_pixels` for decoders outside PIL (``extract.gpu_decode``), same recipe:
    shorter side resized to prep.resize (same interpolation, antialiased, output size computed
    the same way), centre crop. Pixels differ from PIL's resampling by rounding only (mean
    |diff| well under 1 grey level; tests/test_gpu_decode.py)."""
    from torchvision.transforms.v2 import functional as TF

    resized = TF.resize(images, [prep.resize], interpolation=_mode(prep), antialias=True)
    return TF.center_crop(resized, [prep.crop])


def normalize_pixels(pixels: torch.Tensor, prep: ImagePrep) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 scaled to [0, 1] and normalised with prep.mean/std."""
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


class _ImageTransform:
    """Picklable composition of ``image_pixels`` and ``normalize_pixels`` for one image."""

    def __init__(self, prep: ImagePrep):
        self.prep, self.pixels = prep, image_pixels(prep)

    def __call__(self, image) -> torch.Tensor:
        return normalize_pixels(self.pixels(image), self.prep)


def image_transform(prep: ImagePrep) -> Callable:
    """PIL RGB image -> normalised float32 tensor (3, prep.crop, prep.crop).

    Resize (shorter side to prep.resize, antialiased) -> CenterCrop(prep.crop) -> scale to
    [0, 1] -> Normalize(prep.mean, prep.std). The returned transform is picklable.
    """
    return _ImageTransform(prep)


# --------------------------------------------------------------------------- text
def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("tokenizer expects a list of strings, got one str; wrap it: tokenizer([text])")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokenizer expects strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return texts


class ByteTokenizer:
    """Download-free tokenizer for the tiny test models: UTF-8 bytes -> ids 0..255.

    Special ids (vocab size BYTE_VOCAB = 259): pad 256, bos 257, eos 258 by default.  Each
    text becomes ``[bos] + bytes + [eos]`` (bos/eos only when set), truncated to
    ``max_tokens`` keeping the specials; a text with no tokens at all becomes
    ``[empty_id]`` (default: pad) so every row has at least one real token.
    Calling it on a list of B strings returns ``{"input_ids", "attention_mask"}``,
    LongTensors (B, T) padded on the right to the longest row.  Picklable.
    """

    def __init__(self, max_tokens: int, pad_id: int = 256, bos_id: int | None = None,
                 eos_id: int | None = None, empty_id: int | None = None):
        n_special = (bos_id is not None) + (eos_id is not None)
        if max_tokens <= n_special:
            raise EncoderSpecError(f"max_tokens={max_tokens} leaves no room for text after {n_special} special "
                                   f"tokens; use max_tokens > {n_special} (--encoder-option NAME.max_tokens=N).")
        self.max_tokens, self.pad_id, self.bos_id, self.eos_id = max_tokens, pad_id, bos_id, eos_id
        self.empty_id = pad_id if empty_id is None else empty_id

    def encode(self, text: str) -> list[int]:
        budget = self.max_tokens - (self.bos_id is not None) - (self.eos_id is not None)
        ids = list(text.encode("utf-8"))[:budget]
        ids = ([self.bos_id] if self.bos_id is not None else []) + ids
        ids += [self.eos_id] if self.eos_id is not None else []
        return ids or [self.empty_id]

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = _check_texts(texts)
        rows = [self.encode(t) for t in texts]
        width = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class HFTokenizer:
    """Wraps a transformers tokenizer into ``tokenizer(list[str]) -> {"input_ids", "attention_mask"}``.

    Right padding to the longest row, truncation to ``max_tokens``; a missing pad
    token is set to the EOS token (GPT-2); a text with no tokens at all (GPT-2 on
    "") becomes one ``empty_id`` token (EOS, else pad) so pooling never sees an
    empty row.  Returns LongTensors (B, T).  Picklable.
    """

    def __init__(self, tokenizer, max_tokens: int):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.empty_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = _check_texts(texts)
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        if ids.shape[1] == 0:  # every text was empty
            ids = torch.full((len(texts), 1), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
        empty = mask.sum(1) == 0
        if empty.any():
            ids[empty, 0], mask[empty, 0] = self.empty_id, 1
        return {"input_ids": ids, "attention_mask": mask}
