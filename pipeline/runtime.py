"""Small runtime helpers shared by the stages: device choice, autocast, provenance facts."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from importlib import metadata

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was asked for but CUDA is not available; use --device cpu or auto.")
    return dev


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (fp32 = no autocast). fp16 on CPU is refused."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("fp16 autocast is not supported on CPU; use bf16 or fp32.")
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_workers() -> int:
    """DataLoader workers when the config says -1: min(8, CPU cores - 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


def versions() -> dict:
    """Library versions for provenance records."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "transformers", "datasets", "h5py", "zarr", "numpy", "platonic-align"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
