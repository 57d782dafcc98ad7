"""Runtime helpers shared by every stage, each written once: device choice, autocast, CPU count,
UTC timestamps, folders made writable (or one clear error), atomic file writes, JSON with one convention for non-finite values, finite-row
checks and provenance facts."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from pipeline.errors import PipelineError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes


class DeviceError(PipelineError, ValueError):
    """A device name that does not exist or cannot be used on this machine."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; any other name must be a usable torch device.

    Raises DeviceError for names torch does not know (``"tpu"``) and for CUDA without CUDA.
    """
    if isinstance(device, torch.device):
        dev = device
    elif str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, ValueError):
            raise DeviceError(f"Unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"Device {str(device)!r} was asked for but CUDA is not available; use auto or cpu.")
    if dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise DeviceError(f"Device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N.")
    return dev


def rank_device(device: str) -> torch.device:
    """This process's device when it is one of several (torchrun): ``auto``/``cuda`` with CUDA
    -> ``cuda:LOCAL_RANK`` (modulo the GPUs present; made the current device), ``auto`` without
    CUDA -> CPU, anything else as ``resolve_device``. A fixed ``cuda:N`` is refused: every
    rank would use the same GPU."""
    device = str(device)
    if device.startswith("cuda:"):
        raise DeviceError(f"Device {device!r} with several processes: every rank would use the same GPU. "
                          "Use --device cuda (rank r takes cuda:LOCAL_RANK) or auto.")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return resolve_device("cpu" if device == "auto" else device)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (fp32 = no autocast). fp16 on CPU is refused."""
    if precision not in PRECISIONS:
        raise DeviceError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise DeviceError("fp16 autocast is not supported on CPU; use bf16 or fp32.")
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """DataLoader workers when the config says -1: min(8, CPU cores - 1)."""
    return max(0, min(8, cpu_count() - 1))


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. ``2026-11-28T19:10:14+00:00``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class FolderError(PipelineError, OSError):
    """A folder the pipeline must write into cannot be created or written to."""


def make_dir(path: str | Path, what: str = "folder") -> Path:
    """``path`` created with its parents and checked writable; FolderError naming it (and
    ``what`` it is, e.g. "output folder (--out)") otherwise: a path under a file such as
    ``/dev/null``, in ``/proc``, or without write permission."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FolderError(f"Cannot create the {what} {str(path)!r}: {exc.strerror or exc}. "
                          f"Choose a folder you can write to.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FolderError(f"Cannot write to the {what} {str(path)!r}: permission denied. "
                          f"Choose a folder you can write to.")
    return path


def atomic_write(path: str | Path, write: Callable[[str], Any] | bytes | str) -> Path:
    """Write ``path`` atomically: to a temporary file in the same folder, fsync, then rename.

    ``write`` is the content (bytes or str, UTF-8) or a function that writes a file at the
    temporary path it is given (e.g. ``safetensors.torch.save_file(tensors, tmp)``). Readers see
    the old file or the new one, never a part.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if callable(write):
            os.close(fd)
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            data = write.encode("utf-8") if isinstance(write, str) else write
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """True when a process with this id runs on this machine (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def jsonable(obj: Any) -> Any:
    """The project's JSON convention: NaN/inf -> null, numpy scalars/arrays -> Python values,
    paths -> str, tuples -> lists, anything else unknown -> str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (int, str)):
        return obj
    return str(obj)


def dumps_json(doc: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Strict JSON text of ``doc`` under the :func:`jsonable` convention (never NaN tokens)."""
    return json.dumps(jsonable(doc), indent=indent, sort_keys=sort_keys, allow_nan=False, ensure_ascii=False)


def write_json(path: str | Path, doc: Any, indent: int | None = 1) -> Path:
    """Write ``doc`` as strict JSON (non-finite -> null), atomically, with a trailing newline."""
    return atomic_write(path, dumps_json(doc, indent=indent) + "\n")


def finite_rows(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Boolean mask (n,) of the rows of a 2-D array or tensor whose entries are all finite."""
    if isinstance(x, torch.Tensor):
        return torch.isfinite(x).all(dim=1).cpu().numpy()
    return np.isfinite(np.asarray(x)).all(axis=1)


def first_nonfinite_row(x: np.ndarray | torch.Tensor) -> int | None:
    """Index of the first row holding NaN or inf, or None when every entry is finite."""
    bad = np.flatnonzero(~finite_rows(x))
    return int(bad[0]) if bad.size else None


def versions() -> dict:
    """Library versions for provenance records."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "transformers", "datasets", "h5py", "zarr", "numpy", "platonic-align"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
