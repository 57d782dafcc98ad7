"""JPEG decoding on the GPU (``extract.decode``): workers read bytes, the GPU decodes and resizes.

On a CUDA machine the CPU path (PIL decode + resize in DataLoader workers) is the bottleneck of
extraction, not the model. With the GPU decoder:

1. workers read each image's bytes and, when :func:`jpeg_orientation` accepts them (a plain
   8-bit baseline/progressive JPEG, gray or YCbCr, whole, with a readable EXIF orientation),
   send the bytes undecoded (:func:`read_jpeg`); every other image (PNG, CMYK, truncated,
   unreadable...) is decoded by PIL in the worker exactly as with ``decode = "cpu"``;
2. the main process decodes a batch's JPEGs in ONE call of torchvision's
   ``decode_jpeg(list_of_uint8_tensors, device="cuda")`` (batched nvJPEG), applies the EXIF
   orientation (:func:`orient`), resizes and centre-crops per preprocessing with
   ``preprocess.resize_crop`` (the CPU recipe on tensors: shorter side, same interpolation,
   antialias, centre crop), and merges the rows in row order with those decoded on the CPU
   (:class:`GpuDecoder`). A JPEG nvJPEG rejects falls back to PIL in the main process, so its
   pixels, errors (``ImageError`` naming id and path) and skips are those of the CPU path.

Why torchvision's ``decode_jpeg`` and not NVIDIA DALI: DALI is an extra dependency of several
hundred MB that is not on PyPI proper (NVIDIA's own index), so it cannot be installed offline
here, and it would own the whole input pipeline; torchvision is already a dependency and its
batched CUDA decode is the documented path. (torchvision 0.29 deprecates its image codecs in
favour of TorchCodec; moving is a change inside :func:`decode_jpegs` only.)

The decoder is part of an image entry's cache key (nvJPEG's IDCT and chroma upsampling differ
from libjpeg-turbo's at the pixel level): :func:`decode_key` adds ``"decode": "gpu-nvjpeg"``;
CPU decoding adds nothing, so keys of caches made before this option existed stay the same.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import torch

from extract import datasets as D
from extract.encoders import ImagePrep, image_pixels, resize_crop
from extract.loader import Batch, EncodedImage, Unreadable
from pipeline.config import CHOICES, ConfigError

log = logging.getLogger(__name__)

DECODES = CHOICES["extract.decode"]  # auto, cpu, gpu
CPU, GPU_NVJPEG = "cpu", "gpu-nvjpeg"  # effective decoders; the second is recorded in cache keys
_SOF_OK = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman): nvJPEG decodes these
_NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC share the 0xC0-0xCF range with the SOF markers
_STANDALONE = (0x01, *range(0xD0, 0xD8))  # TEM, RST0-7: markers without a length field


# ----------------------------------------------------------------------------- which decoder

def effective_decoder(decode: str, device: torch.device | str, computing: bool = True) -> str:
    """The decoder a run uses, as recorded in the cache key: ``"cpu"`` or ``"gpu-nvjpeg"``.

    auto: gpu-nvjpeg when the model runs on CUDA, else cpu; cpu: cpu; gpu: gpu-nvjpeg, refused
    with a ConfigError when ``device`` is not CUDA and ``computing`` (``extract --merge`` decodes
    nothing, so it accepts gpu anywhere to match shards that decoded on GPUs).
    """
    if decode not in DECODES:
        raise ConfigError(f"extract.decode must be one of {', '.join(DECODES)}, got {decode!r}.")
    device = torch.device(device)
    if decode == "cpu" or (decode == "auto" and device.type != "cuda"):
        return CPU
    if decode == "gpu" and computing and device.type != "cuda":
        where = "" if torch.cuda.is_available() else " (no CUDA on this machine)"
        raise ConfigError(f"extract.decode=gpu decodes JPEGs on the model's CUDA device, but the model runs on "
                          f"{device}{where}. Use --decode auto (GPU when the model runs on CUDA, else CPU) "
                          "or --decode cpu.")
    return GPU_NVJPEG


def decode_key(decoder: str) -> dict:
    """What an image entry's cache key records about the decoder: nothing for cpu (keys made before
    extract.decode existed stay valid), ``{"decode": "gpu-nvjpeg"}`` for the GPU decoder."""
    return {} if decoder == CPU else {"decode": decoder}


# ----------------------------------------------------------------------------- worker side

def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag (0x0112) of an EXIF block's IFD0 (TIFF layout, after ``Exif\\0\\0``):
    1..8; 1 when absent or out of range (PIL then leaves the image as stored); None when the
    block cannot be read (PIL would log and ignore it: the CPU path handles such files)."""
    order = {b"II": "little", b"MM": "big"}.get(bytes(tiff[:2]))
    if order is None or len(tiff) < 8 or int.from_bytes(tiff[2:4], order) != 42:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd < 8 or ifd + 2 > len(tiff):
        return None
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[e:e + 2], order) == 0x0112:
            kind, count = int.from_bytes(tiff[e + 2:e + 4], order), int.from_bytes(tiff[e + 4:e + 8], order)
            if kind != 3 or count != 1:  # not one SHORT: leave it to PIL
                return None
            value = int.from_bytes(tiff[e + 8:e + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _frame_ok(segment: bytes) -> bool:
    """A SOF segment nvJPEG decodes to the same colours as PIL: 8-bit, known size, 1 (gray) or 3
    (YCbCr) components; 3 components named R, G, B are RGB-coded (libjpeg's rule): CPU."""
    if len(segment) < 6 or segment[0] != 8 or segment[5] not in (1, 3):
        return False
    if int.from_bytes(segment[1:3], "big") == 0 or int.from_bytes(segment[3:5], "big") == 0:
        return False
    return not (segment[5] == 3 and bytes(segment[6:15:3]) == b"RGB")


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation (1..8) of a JPEG the GPU path decodes like PIL, else None (CPU path).

    Reads only the marker segments before the first scan. None for: not a JPEG; not ending in
    the EOI marker (truncated, or trailing data); a frame other than 8-bit Huffman baseline /
    extended / progressive with 1 or 3 components (lossless, arithmetic, 12-bit, CMYK/YCCK);
    RGB-coded (Adobe transform 0, or components named R, G, B); an MPO; an unreadable EXIF
    block, several EXIF blocks or an XMP orientation (PIL reads those its own way).
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    pos, orientation, frame = 2, None, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == 0xDA:  # start of scan: the headers are done
            return (orientation or 1) if frame else None
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            if marker not in _SOF_OK or frame or not _frame_ok(segment):
                return None
            frame = True
        elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            if orientation is not None:  # PIL joins several EXIF blocks into one: leave that to it
                return None
            orientation = _exif_orientation(segment[6:])
            if orientation is None:
                return None
        elif marker == 0xE1 and b"tiff:Orientation" in segment:  # XMP orientation
            return None
        elif marker == 0xE2 and segment[:4] == b"MPF\x00":  # multi-picture (MPO)
            return None
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12 and segment[11] == 0:
            return None  # Adobe transform 0: RGB (or CMYK) coded
        pos += 2 + length
    return None


def read_jpeg(split: D.Split, i: int) -> EncodedImage | None:
    """Worker hook (``loader.Rows``): item i's bytes and orientation when the GPU path takes it,
    else None (the worker decodes it with PIL, raising or skipping as the CPU path does)."""
    data = split.image_bytes(i)
    if data is None:
        return None
    orientation = jpeg_orientation(data)
    return None if orientation is None else EncodedImage(data, orientation)


# ----------------------------------------------------------------------------- main-process side

def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as displayed under EXIF ``orientation`` (1..8), as PIL's ``exif_transpose``:
    2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
    8 rotate 90 counter-clockwise."""
    h, w = image.ndim - 2, image.ndim - 1
    if orientation == 2:
        return image.flip(w)
    if orientation == 3:
        return image.flip(h, w)
    if orientation == 4:
        return image.flip(h)
    if orientation == 5:
        return image.transpose(h, w)
    if orientation == 6:
        return torch.rot90(image, -1, (h, w))
    if orientation == 7:
        return image.flip(h, w).transpose(h, w)
    if orientation == 8:
        return torch.rot90(image, 1, (h, w))
    return image


def decode_jpegs(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """1-D uint8 CPU tensors of JPEG bytes -> (3, H, W) uint8 RGB on ``device`` (gray JPEGs are
    replicated to 3 channels, as PIL's convert("RGB")), in ONE batched call (nvJPEG on CUDA);
    None for an image the decoder rejects (then the batch is retried one image at a time)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29: "use TorchCodec"
        try:
            return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for one in data:
                try:
                    out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


class GpuDecoder:
    """The ``prepare`` hook of ``loader.batches`` for the GPU decoder.

    ``preps``: {input key: ImagePrep}, one per distinct preprocessing of the image encoders (the
    keys of ``Batch.inputs``). Calling it on a batch decodes its encoded JPEGs on ``device`` in
    one call, orients them, resizes and crops them per preprocessing (images of one size in one
    call), and returns a Batch whose inputs ((b, 3, crop, crop) uint8 on ``device``) hold every
    readable row in row order. Rejected JPEGs are decoded by PIL here (same pixels, errors and
    skips as the CPU path); :meth:`stats` counts both kinds for the provenance.
    """

    def __init__(self, split: D.Split, preps: dict[str, ImagePrep], device: torch.device | str):
        self.split, self.preps, self.device = split, dict(preps), torch.device(device)
        self.cpu_transforms = {key: image_pixels(prep) for key, prep in self.preps.items()}
        self.counts = {"decoded_on_device": 0, "decoder_fallbacks": 0}
        self._warned = False

    def stats(self) -> dict:
        return dict(self.counts)

    def __call__(self, batch: Batch) -> Batch:
        if batch.encoded is None:
            return batch
        rows = sorted(batch.encoded.spans)
        encoded = [batch.encoded.image(i) for i in rows]
        decoded = decode_jpegs([data for data, _ in encoded], self.device)
        images = {i: orient(img, o) for i, img, (_, o) in zip(rows, decoded, encoded) if img is not None}
        fallback = [i for i in rows if i not in images]
        self._count(len(images), len(fallback))
        unreadable = dict(batch.unreadable)
        pieces = [(list(batch.rows), batch.inputs)] if batch.rows else []
        pieces += self._on_device(images) + self._on_cpu(fallback, unreadable)
        order = [i for piece_rows, _ in pieces for i in piece_rows]
        if not order:
            return Batch([], {}, unreadable)
        perm = torch.as_tensor(np.argsort(order, kind="stable"), device=self.device)
        inputs = {key: torch.cat([p[key].to(self.device, non_blocking=True) for _, p in pieces])[perm]
                  for key in self.preps}
        return Batch(sorted(order), inputs, unreadable)

    def _count(self, on_device: int, fallbacks: int) -> None:
        self.counts["decoded_on_device"] += on_device
        self.counts["decoder_fallbacks"] += fallbacks
        if fallbacks and not on_device and not self._warned:
            self._warned = True
            log.warning("the GPU decoder rejected all %d JPEGs of a batch; PIL decodes them in the main process "
                        "(slow). Check that torchvision has nvJPEG (CUDA build), or use --decode cpu.", fallbacks)

    def _on_device(self, images: dict[int, torch.Tensor]) -> list[tuple[list[int], dict]]:
        """Resize and crop decoded images, one call per (size, preprocessing): [(rows, {key: (n, 3, c, c)})]."""
        groups: dict[tuple, list[int]] = {}
        for i, image in images.items():
            groups.setdefault(tuple(image.shape), []).append(i)
        out = []
        for group in groups.values():
            stack = torch.stack([images[i] for i in group])
            out.append((group, {key: resize_crop(stack, prep) for key, prep in self.preps.items()}))
        return out

    def _on_cpu(self, rows: list[int], unreadable: dict[int, Unreadable]) -> list[tuple[list[int], dict]]:
        """PIL decoding of the JPEGs the GPU rejected, as a worker does; unreadable ones are added to
        ``unreadable`` with their ImageError's id, path and reason."""
        done, pixels = [], {key: [] for key in self.preps}
        for i in rows:
            try:
                image = self.split.load_image(i)
            except D.ImageError as exc:
                unreadable[i] = Unreadable(exc.sample_id, exc.path, exc.reason)
                continue
            done.append(i)
            for key, transform in self.cpu_transforms.items():
                pixels[key].append(transform(image))
        return [(done, {key: torch.stack(v) for key, v in pixels.items()})] if done else []
