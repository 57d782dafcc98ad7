"""The :class:`Encoder` every family returns, token pooling, and the last step of every loader.

Layers (``forward(batch, all_layers=True)``): a list of ``num_layers`` tensors ``(B, d_l)``,
shallow to deep, pooled the same way as the default output; each family documents what its
layers are, and the last entry is the final representation before any projection (CLIP) or L2
normalisation (sentence encoders).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from extract.encoders.preprocess import normalize_pixels
from extract.encoders.spec import EncoderSpec, EncoderSpecError
from pipeline.runtime import autocast, resolve_device


class Encoder(torch.nn.Module):
    """A frozen encoder: ``forward(batch) -> (B, dim)`` float32 features.

    Attributes: spec (EncoderSpec, with ``dim`` filled in), dim (output dim),
    num_layers (length of the ``all_layers=True`` list), tokenizer (text: a
    picklable callable, see ``preprocess.ByteTokenizer``/``HFTokenizer``; image:
    None), source (where the weights were loaded from, for logs), model (the
    wrapped library module).

    Inputs -- images: float tensor (B, 3, crop, crop) normalised with prep.mean/std
    (see ``image_transform``); text: the tokenizer's dict with LongTensors
    ``input_ids``/``attention_mask`` (B, T).  Inputs are moved to the encoder's
    device.  Works under ``torch.autocast``; outputs are always float32.
    Subclasses implement ``_encode(batch, all_layers) -> (final (B, D), layers list | None)``.
    """

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, dim: int, num_layers: int,
                 tokenizer: Callable | None = None, source: str = ""):
        super().__init__()
        self.model = model
        self.spec = spec if spec.dim == dim else dataclasses.replace(spec, dim=dim)
        self.dim, self.num_layers, self.tokenizer, self.source = dim, num_layers, tokenizer, source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """list of B strings -> {"input_ids", "attention_mask"} LongTensors (B, T), right-padded."""
        if self.tokenizer is None:
            raise TypeError(f"{self.spec.name} is an image encoder; it has no tokenizer")
        return self.tokenizer(texts)

    def forward(self, batch, all_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Pooled features (B, dim) float32, or with all_layers=True a list of num_layers (B, d_l) tensors."""
        final, layers = self.encode(batch, all_layers)
        return layers if all_layers else final

    def encode(self, batch, all_layers: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """One forward pass: (features (B, dim) float32, list of num_layers (B, d_l) or None)."""
        batch = self._check_batch(batch)
        with torch.no_grad():
            final, layers = self._encode(batch, all_layers)
        final = final.float()
        final = F.normalize(final, dim=-1) if self.spec.normalize else final
        return final, [t.float() for t in layers] if all_layers else None

    def _check_batch(self, batch):
        if self.spec.modality == "image":
            if not (torch.is_tensor(batch) and batch.ndim == 4 and batch.shape[1] == 3 and batch.is_floating_point()):
                got = tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__
                raise ValueError(f"{self.spec.name} expects a float image tensor (B, 3, H, W), got {got}")
            return batch.to(self.device, non_blocking=True)
        if not (isinstance(batch, Mapping) and "input_ids" in batch and "attention_mask" in batch):
            raise ValueError(f"{self.spec.name} expects the tokenizer's dict with input_ids and attention_mask; "
                             "use encoder.tokenize(texts)")
        return {k: batch[k].to(self.device, non_blocking=True) for k in ("input_ids", "attention_mask")}

    def _encode(self, batch, all_layers: bool):  # -> (final (B, D), layers list | None)
        raise NotImplementedError

    def encode_tokens(self, batch, grid: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass: (features (B, dim) float32, exactly as ``encode`` gives them; token
        states (B, T, w) float32; mask (B, T) bool, True on real tokens). Images: the final
        feature map's positions (CNNs) or CLS + patch tokens after the final norm (ViTs),
        average-pooled to a ``grid`` x ``grid`` grid when ``grid`` > 0 (0 = every position);
        texts: the last hidden state of every real token (``grid`` does not apply)."""
        batch = self._check_batch(batch)
        with torch.no_grad():
            final, tokens, mask = self._encode_tokens(batch, grid)
        final = final.float()
        final = F.normalize(final, dim=-1) if self.spec.normalize else final
        return final, tokens.float(), mask.bool()

    def _encode_tokens(self, batch, grid: int):  # -> (final (B, D), tokens (B, T, w), mask (B, T))
        raise EncoderSpecError(f"{self.spec.name}: the {self.spec.family!r} family has no token output")

    def save_weights(self, folder: Path) -> Path:
        """Write a copy of the loaded weights (safetensors, plus whatever else this family's loader
        reads, e.g. a tokenizer) into ``folder``; returns the path to load it from as the spec's
        ``weights`` (``get_spec(name, weights=path)``), on a machine without the original files.
        EncoderSpecError for a family that cannot (randomly initialised encoders need no copy)."""
        raise EncoderSpecError(f"{self.spec.name}: the {self.spec.family!r} family cannot save a copy of its weights"
                               f"{' (randomly initialised: nothing to save)' if self.spec.weights == 'random' else ''}")


def forward_batch(encoder: Encoder, batch, precision: str = "fp32",
                  all_layers: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """One batch as extraction hands it to an encoder: (features (B, dim) float32 on the encoder's
    device, list of num_layers (B, d_l) or None). ``batch``: uint8 pixels (B, 3, h, w) from
    ``image_pixels`` (moved to the device, then scaled and normalised there with
    ``normalize_pixels``), float pixels already normalised (``image_transform``), or the
    tokenizer's dict; the forward pass runs under ``autocast(device, precision)``. ``extract``
    and ``aligned.AlignedModel`` both call this, so their features are computed the same way."""
    device = encoder.device
    if isinstance(batch, Mapping):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    elif torch.is_tensor(batch) and batch.dtype == torch.uint8:
        batch = normalize_pixels(batch.to(device, non_blocking=True), encoder.spec.prep)
    with autocast(device, precision):
        return encoder.encode(batch, all_layers)


TOKEN_MODES = "none | all | grid:K"  # extract.tokens


def token_grid(value: str) -> int | None:
    """``extract.tokens`` -> None ("none": pooled features only), 0 ("all": every token) or K
    ("grid:K": image token grids average-pooled to K x K); EncoderSpecError otherwise."""
    if value == "none":
        return None
    if value == "all":
        return 0
    head, _, k = str(value).partition(":")
    if head == "grid" and k.isdigit() and int(k) >= 1:
        return int(k)
    raise EncoderSpecError(f"extract.tokens must be {TOKEN_MODES} (K >= 1, e.g. grid:4), got {value!r}.")


def grid_tokens(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """Feature maps (B, C, h, w) -> tokens (B, h*w, C), or average-pooled (``adaptive_avg_pool2d``)
    to (B, grid*grid, C) when ``grid`` > 0 (a side already at most ``grid`` is kept as it is)."""
    maps = maps.float()
    if grid and (maps.shape[2] > grid or maps.shape[3] > grid):
        maps = F.adaptive_avg_pool2d(maps, (min(grid, maps.shape[2]), min(grid, maps.shape[3])))
    return maps.flatten(2).transpose(1, 2)


def forward_tokens(encoder: Encoder, batch, precision: str = "fp32",
                   grid: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``forward_batch`` for token extraction: (features (B, dim), tokens (B, T, w), mask (B, T)),
    inputs prepared and autocast exactly as ``forward_batch`` does (``Encoder.encode_tokens``)."""
    device = encoder.device
    if isinstance(batch, Mapping):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    elif torch.is_tensor(batch) and batch.dtype == torch.uint8:
        batch = normalize_pixels(batch.to(device, non_blocking=True), encoder.spec.prep)
    with autocast(device, precision):
        return encoder.encode_tokens(batch, grid)


def pool_tokens(h: torch.Tensor, pooling: str, mask: torch.Tensor | None = None, first: int = 1) -> torch.Tensor:
    """Pool token states h (B, T, D) -> (B, D) float32.

    cls: token 0; last: the last real token (index mask.sum(1) - 1); mean: masked
    mean over real tokens (text), or mean over tokens ``first:`` (image patches).
    """
    h = h.float()
    if pooling == "cls":
        return h[:, 0]
    if pooling == "last":
        idx = (mask.sum(1) - 1).clamp_min(0)
        return h[torch.arange(h.shape[0], device=h.device), idx]
    if pooling == "mean":
        if mask is None:
            return h[:, first:].mean(1)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown pooling {pooling!r}")


def finish(enc: Encoder, device) -> Encoder:
    """Eval mode, no gradients, moved to ``device`` (``"auto"`` = CUDA when present)."""
    enc.eval()
    enc.requires_grad_(False)
    return enc.to(resolve_device(device))
