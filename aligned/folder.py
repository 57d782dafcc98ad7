"""The exported-model folder (Hugging Face convention) and reading it back, without any cache.

    <folder>/config.json            what the model is: the run's adapters.json document ("adapters":
                                    adapter settings, standardisation, source entry keys), per
                                    modality the encoder ("encoders": spec provenance as extracted and
                                    as loaded, precision, hidden layer, weights' state sha256, where
                                    the weights come from, licence), shared dim, temperature
    <folder>/adapters.safetensors   the run's adapter weights, byte for byte
    <folder>/README.md              the model card (aligned.card)
    <folder>/encoders/<modality>/   the encoder weights as safetensors (``aligned-export --include-weights``)
    <folder>/SHA256SUMS             sha256 of every other file (``sha256sum -c SHA256SUMS`` checks it)

:func:`verify_folder` refuses a folder whose files were edited, added to the list or lost; a
model is only read from a verified folder (:func:`read_folder`). Encoders whose weights are not
in the folder are loaded where the registry finds them (package, hub cache, local file) and must
hash to the recorded state sha256 (``extract.encoders.weights.state_digest``); missing or other
weights are refused with what to install. Nothing here unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from aligned.errors import AlignedError
from aligned.sources import MODALITIES, Side, rebuild_spec
from extract.encoders import Encoder, WeightsNotFoundError, get_spec, load_encoder
from extract.encoders.spec import changed_fields, recorded_overrides
from extract.encoders.weights import state_digest
from extract.run import resolve_spec
from pipeline.runs import ADAPTER_WEIGHTS, file_sha256
from pipeline.runtime import resolve_device
from train.api import build_adapters

CONFIG = "config.json"
ADAPTERS = ADAPTER_WEIGHTS  # "adapters.safetensors", as in a run folder
CARD = "README.md"
SUMS = "SHA256SUMS"
ENCODERS = "encoders"  # encoders/<modality>/...: included weights
MODEL_TYPE = "platonic-align-aligned-model"  # config.json "model_type"
FORMAT = 1  # config.json "format"
REQUIRED = (CONFIG, ADAPTERS)  # files every export lists


def sums_text(folder: Path, names: list[str]) -> str:
    """``SHA256SUMS`` content (the ``sha256sum`` format: "<hex>  <relative path>") for ``names``."""
    return "".join(f"{file_sha256(folder / n)}  {n}\n" for n in sorted(names))


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused when the name leads outside the folder (a hand-edited list)."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise AlignedError(f"{folder / SUMS} names {name!r}, outside the folder; the folder was tampered with: "
                           f"export the run again.")
    return path


def verify_folder(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of an export after checking every file ``SHA256SUMS`` lists;
    AlignedError naming the first edited or missing file and what to do."""
    folder = Path(folder)
    sums = folder / SUMS
    if not sums.is_file():
        what = "does not exist" if not folder.exists() else f"holds no {SUMS}"
        raise AlignedError(f"{str(folder)!r} {what}: it is not an exported aligned model. Write one with "
                           f"`aligned-export --run NAME {folder}`.")
    listed = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        sha, sep, name = line.partition("  ")
        if not sep or len(sha) != 64:
            raise AlignedError(f"{sums}: line {line!r} is not '<sha256>  <file>'; export the run again.")
        listed[name] = sha
    for name in REQUIRED:
        if name not in listed:
            raise AlignedError(f"{sums} does not list {name}: not a complete export; export the run again.")
    for name, sha in listed.items():
        path = _inside(folder, name)
        if not path.is_file():
            hint = (" (encoder weights written by --include-weights)" if name.startswith(ENCODERS + "/") else "")
            raise AlignedError(f"{folder}: {name}{hint} is missing; copy the whole folder again, or export the "
                               f"run again.")
        if file_sha256(path) != sha:
            raise AlignedError(f"{folder}: {name} was modified after export (sha256 {file_sha256(path)[:12]}, "
                               f"recorded {sha[:12]}); restore the original file, or export the run again "
                               f"(`aligned-export --run NAME {folder}`).")
    return listed


def _check_loaded(m: str, enc: Encoder, rec: Mapping, included: bool, where: str) -> None:
    """The loaded encoder must be the exported one: same weights (state sha256) and the same
    settings once loaded (dim and preprocessing resolved at load time)."""
    digest = state_digest(enc)
    if digest != rec["state_sha256"]:
        raise AlignedError(
            f"{where}: the {m} encoder weights found on this machine ({enc.source}) are not the ones this model was "
            f"exported with (state sha256 {digest[:12]}, recorded {rec['state_sha256'][:12]}). Install the recorded "
            f"weights ({rec['weights']['get']}), or export the run again with --include-weights.")
    loaded, now = dict(rec["loaded"]), enc.spec.provenance()
    if included:  # weights read from the folder: its path and the dropped package location differ by design
        for d in (loaded, now):
            d.pop("weights", None)
            d["config"] = {k: v for k, v in (d.get("config") or {}).items() if k != "package_path"}
    changed = changed_fields(loaded, now)
    if changed:
        raise AlignedError(f"{where}: the {m} encoder loads with other settings than at export "
                           f"({', '.join(changed)} changed); use the code version it was exported with.")


def _encoder(m: str, rec: Mapping, folder: Path, device, where: str) -> tuple[Encoder, Side]:
    name = rec["entry"]
    included = rec["weights"].get("included")
    if included:
        options = {**recorded_overrides(get_spec(name), rec["encoder"]), "weights": str(_inside(folder, included))}
        spec = resolve_spec(name, options)
    else:
        spec = rebuild_spec(name, rec["encoder"], where)
    try:
        enc = load_encoder(spec, device)
    except WeightsNotFoundError as exc:
        raise AlignedError(f"{where}: the {m} encoder's weights are not in the folder (exported without "
                           f"--include-weights) and not on this machine. {exc} Or export the run again with "
                           f"--include-weights.") from None
    _check_loaded(m, enc, rec, bool(included), where)
    return enc, Side(m, name, spec, str(rec["precision"]), rec["layer"], int(rec["dim"]), rec.get("tokens"))


def read_folder(folder: str | Path, device: str = "auto") -> tuple[dict, dict, object, object, dict]:
    """(encoders, sides, adapters, stats, info) of a verified export, for ``AlignedModel``."""
    folder = Path(folder)
    verify_folder(folder)
    where = f"exported model {str(folder)!r}"
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AlignedError(f"{where}: {CONFIG} is not JSON ({exc}); export the run again.") from None
    if config.get("model_type") != MODEL_TYPE or config.get("format") != FORMAT:
        raise AlignedError(f"{where}: {CONFIG} is not an aligned-model config of format {FORMAT} (model_type "
                           f"{config.get('model_type')!r}, format {config.get('format')!r}).")
    _, adapters, stats = build_adapters(config["adapters"], folder / ADAPTERS, str(folder / CONFIG))
    dev = resolve_device(device)
    encoders, sides = {}, {}
    for m in MODALITIES:
        encoders[m], sides[m] = _encoder(m, config["encoders"][m], folder, dev, where)
    info = {"run": config["run"], "run_dir": config["exported"]["run_dir"], "adapters": config["adapters"],
            "folder": str(folder.resolve())}
    return encoders, sides, adapters.to(dev).eval(), stats, info
