"""What a run writes besides its adapters: history.csv, curves.png, the metrics table, and the
aligned entries ``<entry>@<run>`` written back to the cache. File names and the run-folder
layout come from ``pipeline.runs``.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline import runs
from pipeline.cache import sibling_path, write_entry
from pipeline.config import PipelineConfig
from pipeline.plotting import literal_text
from pipeline.runtime import atomic_write
from train.adapters import AlignModel
from train.data import TrainData
from train.evaluate import embed
from train.stream import StreamSplit
from train.tracking import plot_deltas


def write_history(run_dir: Path, history: Sequence[Mapping]) -> None:
    """history.csv: one row per epoch; columns = union of the keys, in first-seen order."""
    fields: list[str] = []
    for row in history:
        fields += [k for k in row if k not in fields]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(history)
    atomic_write(run_dir / runs.HISTORY, text.getvalue())


@literal_text
def plot_curves(run_dir: Path, history: Sequence[Mapping], raw_cka: Mapping[str, float] | None,
                loss: str = "symmetric InfoNCE") -> Path:
    """curves.png, 2 x 2 panels: train loss (``loss``: its name, ``losses.loss_label``); val recall;
    val CKA with the reference (dashed: unaligned features); with tracked metrics
    (train.tracking) the val Platonic deltas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    tracked = any("_delta_" in k for k in (history[0] if history else {}))
    # 2 x 2 panels at the report's page width (analyze.plots.PAGE_PX = 1240 px at 110 dpi)
    fig, axes = plt.subplots(2, 2, figsize=(11.2, 7.4))
    axes = axes.flat
    axes[0].plot(epochs, [r["train_loss"] for r in history])
    axes[0].set(title=f"train loss ({loss})", xlabel="epoch", ylabel="loss")
    for key in ("val_mean_R", "val_i2t_R@1", "val_t2i_R@1", "val_i2t_R@10", "val_t2i_R@10"):
        pts = [(e, r[key]) for e, r in zip(epochs, history) if key in r and not math.isnan(r[key])]
        if pts:
            axes[1].plot(*zip(*pts), marker=".", label=key[4:])
    axes[1].set(title="val retrieval", xlabel="epoch", ylabel="recall", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    cka_keys = [k for k in (history[0] if history else {})  # val_cka_<modality>; not the tracked val_cka_after_*
                if k.startswith("val_cka_") and not k.startswith(("val_cka_after_", "val_cka_delta_"))]
    for key in cka_keys:
        pts = [(e, r[key]) for e, r in zip(epochs, history) if not math.isnan(r[key])]
        line = axes[2].plot(*zip(*pts), marker=".", label=f"aligned {key[8:]}")[0] if pts else None
        raw = (raw_cka or {}).get(key[8:])
        if raw is not None and line is not None:
            axes[2].axhline(raw, ls="--", color=line.get_color(), label=f"raw {key[8:]}")
    axes[2].set(title="val linear CKA with reference" if cka_keys else "no reference entry", xlabel="epoch")
    if cka_keys:
        axes[2].legend(fontsize=8)
    if not (tracked and plot_deltas(axes[3], history)):
        axes[3].axis("off")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = run_dir / runs.CURVES
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_aligned_entries(cfg: PipelineConfig, run_name: str, run_dir: Path, model: AlignModel,
                          data: TrainData, adapter_sha256: str) -> dict[str, dict[str, str]]:
    """Embed every row of every split's source entries and write ``<entry>@<run>`` entries
    next to them (same format), their key tagged with ``adapter_sha256`` (readers check it
    against the run: ``pipeline.runs.check_aligned``); returns {split: {modality: entry name}}.
    ``run_dir``: the folder being written (scratch space); provenance names the run folder."""
    final = runs.run_dir(cfg.data.cache, run_name).resolve()
    written: dict[str, dict[str, str]] = {}
    for split, sd in data.splits.items():
        for m, entry in sd.entries.items():
            name = runs.aligned_name(entry.name, run_name)
            key = {"entry": name, "run": run_name, "source": entry.key, "adapter_sha256": adapter_sha256,
                   "dataset": cfg.data.dataset, "split": split}
            prov = {"run_dir": str(final), "source_entry": entry.name, "source_path": str(entry.path),
                    "modality": m, "adapter": cfg.train.adapter, "normalised": False,
                    "layer": data.layers.get(m)}
            path = sibling_path(entry, name)  # the source's folder: same dataset, data folder and split
            if isinstance(sd, StreamSplit):
                _write_streamed(path, name, entry, sd, m, model, cfg.train.dim, key, prov, run_dir)
            else:
                emb = embed(model, m, sd.features[m]).cpu().numpy().astype(np.float32)
                write_entry(path, name, entry.ids, emb, key, prov)
            written.setdefault(split, {})[m] = name
    return written


def _write_streamed(path: Path, name: str, entry, sd: StreamSplit, modality: str, model: AlignModel, dim: int,
                    key: dict, prov: dict, run_dir: Path) -> None:
    """The aligned entry of a streamed split: source blocks are read, embedded and written to a
    disk-backed (n, dim) array (np.memmap in the run folder, deleted afterwards), which
    ``write_entry`` then copies into the cache; resident memory stays one block plus pages the
    kernel can drop."""
    with tempfile.TemporaryDirectory(prefix=".aligned-", dir=run_dir) as tmp:
        emb = np.lib.format.open_memmap(Path(tmp) / "emb.npy", mode="w+", dtype=np.float32, shape=(entry.n, dim))
        for start, x in sd.iter_rows(modality):
            emb[start:start + x.shape[0]] = embed(model, modality, x).cpu().numpy()
        emb.flush()
        write_entry(path, name, entry.ids, emb, key, prov)
        del emb


def summary_table(test: Mapping[str, Mapping[str, float]]) -> str:
    """Plain-text table: one row per method, recall in percent."""
    cols = runs.RECALL_COLUMNS
    lines = [f"{'method':<12}" + "".join(f"{c:>10}" for c in cols)]
    for method, res in test.items():
        lines.append(f"{method:<12}" + "".join(f"{100 * res.get(c, float('nan')):>10.2f}" for c in cols))
    return "\n".join(lines)
