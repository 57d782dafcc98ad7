"""The aligned model: two frozen encoders and the run's adapters, shaped like an open_clip model.

    model = AlignedModel.from_run("demo", cache="cache/demo")
    image = model.preprocess(Image.open("cat.png")).unsqueeze(0)         # (1, 3, crop, crop)
    text = model.tokenizer(["a cat", "a boat"])                          # .to(device) works
    with torch.no_grad():
        img, txt = model.encode_image(image, normalize=True), model.encode_text(text, normalize=True)
    probs = (model.logit_scale.exp() * img @ txt.T).softmax(dim=-1)

One embedding is computed exactly as the run's aligned cache entries were: the image through
the dataset's RGB conversion (``extract.datasets.to_rgb``) and the encoder's own preprocessing
(``image_pixels`` then ``normalize_pixels``), the encoder forward as extraction runs it
(``extract.encoders.forward_batch``: same precision, same hidden layer), the train-split
standardisation (``train.data.Stats``) and the adapter (``train.adapters.AlignModel``). So
``embed_images`` / ``embed_texts`` on a split's raw images and captions reproduce its
``<entry>@<run>`` entries row for row (tests/test_aligned.py: fp32 on CPU, within 1e-5).
Token-projector runs (``train.adapter = "token"``) take the same path with the encoder's token
states (``forward_tokens``), rounded to the entry's token dtype (float16) as extraction stored
them and padded as training read them (``train.tokens.pad_token_batch``); see docs/tokens.md
for the tolerance that holds.

Building one: :meth:`AlignedModel.from_run` (a run of a cache), :meth:`AlignedModel.from_pretrained`
(a folder written by ``aligned.export``; its layout: ``aligned.folder``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from aligned import batches
from aligned.errors import AlignedError
from aligned.folder import read_folder
from aligned.inputs import Preprocess, Tokenizer
from aligned.sources import MODALITIES, Side, locate_run, side_of
from extract.encoders import Encoder, forward_batch, forward_tokens, load_encoder, token_grid
from pipeline.runtime import autocast, resolve_device
from train.adapters import MAX_LOGIT_SCALE, AlignModel
from train.api import load_run
from train.data import Stats
from train.tokens import pad_token_batch


class AlignedModel(torch.nn.Module):
    """Image and text encoders with their run's adapters: new images and sentences -> (N, dim)
    vectors in the run's shared space. open_clip / CLIP shaped: ``preprocess``, ``tokenizer``,
    ``encode_image``, ``encode_text`` (``normalize=False`` by default), ``logit_scale`` (log of
    1/tau: ``logit_scale.exp()`` multiplies cosine similarities), ``logit_bias`` (sigmoid-loss
    runs; else None), ``forward(image, text)``.

    Attributes: image_encoder, text_encoder (frozen ``extract.encoders.Encoder``), adapters (the
    run's ``AlignModel``), stats (train-split standardisation), sides (modality -> ``Side``:
    entry, spec, precision, layer), info (where it came from: run name and folder, adapters.json).
    """

    def __init__(self, encoders: Mapping[str, Encoder], sides: Mapping[str, Side], adapters: AlignModel,
                 stats: Stats, info: Mapping):
        super().__init__()
        self.image_encoder, self.text_encoder = encoders["image"], encoders["text"]
        self.adapters, self.stats, self.sides, self.info = adapters, stats, dict(sides), dict(info)
        for m, enc in encoders.items():
            side = self.sides[m]
            width = side.tokens["width"] if side.tokens else side.dim
            if side.layer is None and enc.dim != width:
                raise AlignedError(f"the {m} encoder {side.entry!r} gives {enc.dim}-d features, but the {m} adapter "
                                   f"was trained on {side.dim}-d ones: the weights found are not the ones the "
                                   f"run's entries were extracted with.")
            autocast(enc.device, side.precision)  # fp16 entries on a CPU: refused here, not at the first batch
        self.preprocess = Preprocess(self.image_encoder.spec.prep)
        self.tokenizer = Tokenizer(self.text_encoder)
        self.requires_grad_(False)  # an inference model; model.adapters.requires_grad_(True) to fine-tune them
        self.eval()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_run(cls, run: str | Path, cache: str | Path | None = None, device: str = "auto") -> "AlignedModel":
        """The aligned model of a fit-adapters run: ``run`` is a run name in ``cache`` (default: the
        config's ``data.cache``, "cache") or a run folder. Rebuilds the encoders its entries were
        extracted with (registry spec, options, precision, the hidden layer the adapters read) and
        refuses when they no longer match the recorded entry keys (``EncoderChangedError``).
        ``device``: "auto" (CUDA when present), "cpu", "cuda", "cuda:N"."""
        folder = locate_run(run, cache)
        loaded = load_run(folder, device="cpu")
        sides = {m: side_of(loaded, m) for m in MODALITIES}
        dev = resolve_device(device)
        encoders = {m: load_encoder(s.spec, dev) for m, s in sides.items()}
        info = {"run": folder.name, "run_dir": str(folder.resolve()), "adapters": loaded.config}
        return cls(encoders, sides, loaded.model, loaded.stats, info).to(dev)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "auto") -> "AlignedModel":
        """The model exported to ``folder`` (``aligned-export --run NAME FOLDER``, ``aligned.export``); no
        cache is needed. Refused when a file was edited (SHA256SUMS), or when the encoder weights
        are neither in the folder (``--include-weights``) nor on this machine, or differ from the
        exported ones (``aligned.folder``)."""
        return cls(*read_folder(folder, device))

    # ------------------------------------------------------------------ the open_clip surface
    @property
    def device(self) -> torch.device:
        return self.adapters.log_scale.device

    @property
    def dim(self) -> int:
        """Width of the shared space."""
        return int(self.info["adapters"]["train"]["dim"])

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) identifying what this model computes: the adapters' sha256 and, per modality,
        the source entry, its encoder provenance, precision and hidden layer. The same for a run and
        its export (with or without included weights); an index of embeddings records it."""
        doc = self.info["adapters"]
        mods = {m: {"entry": s.get("entry"), "encoder": (s.get("key") or {}).get("encoder"),
                    "precision": (s.get("key") or {}).get("precision"), "layer": s.get("layer")}
                for m, s in sorted(doc["modalities"].items()) if m in MODALITIES}
        blob = json.dumps({"adapters_sha256": doc.get("sha256"), "modalities": mods}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @property
    def logit_scale(self) -> torch.Tensor:
        """log(1/tau), the run's temperature (CLIP's convention: ``logit_scale.exp()`` <= 100)."""
        return self.adapters.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE))

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """The learnt logit bias b of a sigmoid-loss (SigLIP) run, else None (open_clip's SigLIP
        models: P(match) = sigmoid(logit_scale.exp() * img @ txt.T + logit_bias))."""
        return self.adapters.logit_bias

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, crop, crop) images -> (B, dim) float32 embeddings. ``image``: stacked
        ``preprocess`` outputs (float), or uint8 pixels from ``preprocess.pixels`` (normalised on
        the model's device, as extraction does). ``normalize``: L2-normalised rows."""
        return self._encode("image", self.image_encoder, image, normalize)

    def encode_text(self, text: Mapping | Sequence[str], normalize: bool = False) -> torch.Tensor:
        """Tokens from ``tokenizer`` (or the strings themselves) -> (B, dim) float32 embeddings."""
        if isinstance(text, str) or (not isinstance(text, Mapping) and isinstance(text, Sequence)):
            text = self.tokenizer(text)
        return self._encode("text", self.text_encoder, text, normalize)

    def forward(self, image: torch.Tensor | None = None, text: Mapping | None = None):
        """open_clip's forward: (image features, text features, logit_scale.exp()), features
        L2-normalised; a side not given is None. A sigmoid-loss run adds its ``logit_bias`` as a
        fourth element, as open_clip's SigLIP models do."""
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        if self.logit_bias is not None:
            return img, txt, self.logit_scale.exp(), self.logit_bias
        return img, txt, self.logit_scale.exp()

    def _encode(self, modality: str, encoder: Encoder, batch, normalize: bool) -> torch.Tensor:
        side = self.sides[modality]
        if side.tokens:  # token adapters: the stored token dtype and padding, as training read them
            _, tokens, mask = forward_tokens(encoder, batch, side.precision, token_grid(side.tokens["grid"]) or 0)
            tokens = tokens.to(getattr(torch, side.tokens["dtype"])).float()
            x = pad_token_batch(tokens, mask, side.tokens["length"])
        else:
            features, layers = forward_batch(encoder, batch, side.precision, side.layer is not None)
            x = features if side.layer is None else layers[side.layer]
        out = self.adapters(modality, self.stats.apply(modality, x.float()))
        return F.normalize(out, dim=-1) if normalize else out

    # ------------------------------------------------------------------ convenience (numpy, batched)
    def embed_images(self, images, batch_size: int = 64, normalize: bool = False, workers: int = -1,
                     progress: bool | None = None) -> np.ndarray:
        """(N, dim) float32 embeddings of image files (paths) or PIL images, in order; files are
        decoded in DataLoader workers (-1: as many as extraction uses) exactly as ``extract``
        decodes a dataset. A file that does not decode is an ``ImageError`` naming it.
        progress: tqdm bar (None: only on a terminal)."""
        return batches.embed_images(self, images, batch_size, normalize, workers, progress)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = False,
                    progress: bool | None = None) -> np.ndarray:
        """(N, dim) float32 embeddings of strings, in order (an empty string is refused)."""
        return batches.embed_texts(self, texts, batch_size, normalize, progress)

    def extra_repr(self) -> str:
        s = self.sides
        return (f"run={self.info.get('run')!r}, image={s['image'].entry!r} (layer {s['image'].layer}), "
                f"text={s['text'].entry!r} (layer {s['text'].layer}), dim={self.dim}")
