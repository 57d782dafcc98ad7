"""``train.subset``: a file naming the train pairs to keep (``curate`` writes one).

The file is a CSV with the columns ``id``, ``concept``, ``score`` (one row per kept pair; extra
columns are ignored). ``curate`` puts one comment line first, ``# curate: {json}``, recording
where the subset was drawn from (dataset, split, the caption entry, its data folder); a
hand-written file may leave it out.

An id keeps the train pair whose caption row id it is (``<image>#k`` under the "all" caption
policy) or every pair of the image whose id it is. Every id must name a pair of the train split
(``SubsetError`` names the first ones that do not), and a file whose header says it was drawn from
another dataset is refused. The subset is applied before ``train.train_fraction`` (which then
takes its share of the subset's images: ``train.fraction``).

The run records the file's sha256 (``Subset.record``: adapters.json ``subset``, config.json) and
keeps a copy as ``subset.csv`` in the run folder (``pipeline.runs.SUBSET``), which is what the
evaluation of the run reads (``analyze.evalrun``), so the baselines are refitted on exactly the
run's train pairs even if the original file is later edited or moved.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.join import image_id
from pipeline.runtime import atomic_write
from train.errors import TrainError

COLUMNS = ("id", "concept", "score")
HEADER = "# curate: "  # first line of a file curate wrote: provenance as one JSON object
SHOWN = 5  # ids named in an error


class SubsetError(TrainError):
    """A subset file that cannot be read, or that does not fit the train split."""


@dataclass(frozen=True)
class Subset:
    """A read subset file. ids / concepts / scores: one per row, in file order; sha256: of the
    file's bytes; source: the provenance of the header line ({} when there is none)."""

    path: str
    ids: tuple[str, ...]
    concepts: tuple[str, ...]
    scores: tuple[float, ...]
    sha256: str
    source: dict = field(default_factory=dict)
    text: str = field(default="", repr=False)  # the file's text (the run folder keeps this copy)

    def record(self) -> dict:
        """What a run records of the subset it trained on."""
        return {"file": Path(self.path).name, "sha256": self.sha256, "n_ids": len(self.ids),
                "n_concepts": len(set(self.concepts)), "source": self.source}

    def check_dataset(self, dataset: str, split: str = "train") -> None:
        """SubsetError when the header says the subset was drawn from another dataset or split."""
        was, was_split = self.source.get("dataset"), self.source.get("split")
        if was is not None and was != dataset:
            raise SubsetError(f"Subset {self.path} was curated from dataset {was!r}, but this run trains on "
                              f"{dataset!r}: its ids name other pairs. Curate this dataset's pool: curate --config "
                              f"CFG --concepts FILE --out SUBSET.csv, with data.dataset = {dataset!r}.")
        if was_split is not None and was_split != split:
            raise SubsetError(f"Subset {self.path} was curated from the {was_split!r} split; training reads the "
                              f"{split!r} split. Curate it again without --split (the train split).")

    def mask(self, image_ids: Sequence[str], row_ids: Sequence[str], where: str) -> np.ndarray:
        """(n_pairs,) bool: the pairs (``image_ids``, ``row_ids``: one per pair) that an id of the
        subset names; SubsetError naming the ids that name none (``where``: the split, in words)."""
        images = np.asarray([image_id(str(i)) for i in image_ids], dtype=object).astype(str)
        rows = np.asarray([str(i) for i in row_ids], dtype=object).astype(str)
        wanted = np.asarray(self.ids, dtype=object).astype(str)
        unknown = wanted[~(np.isin(wanted, rows) | np.isin(wanted, images))]
        if len(unknown) == len(wanted):
            raise SubsetError(f"None of the {len(wanted)} ids of subset {self.path} (e.g. {str(wanted[0])!r}) is a pair of "
                              f"{where}: it is a subset of another dataset or cache. Curate this one: curate --config "
                              f"CFG --concepts FILE --out SUBSET.csv.")
        if len(unknown):
            shown = ", ".join(repr(str(u)) for u in unknown[:SHOWN])
            raise SubsetError(f"{len(unknown)} of the {len(wanted)} ids of subset {self.path} are not pairs of {where}: "
                              f"{shown}{' ...' if len(unknown) > SHOWN else ''}. Remove them, or curate the subset "
                              f"again from this cache (curate --config CFG ...).")
        return np.isin(rows, wanted) | np.isin(images, wanted)


def parse_subset(text: str, path: str) -> Subset:
    """A Subset from the text of a subset file (``path``: named in errors)."""
    lines = text.splitlines()
    source: dict = {}
    if lines and lines[0].startswith(HEADER):
        try:
            source = json.loads(lines[0][len(HEADER):])
        except json.JSONDecodeError:
            raise SubsetError(f"Subset {path}: the first line starts with {HEADER.strip()!r} but is not JSON; "
                              f"remove that line or write the file again with curate.") from None
        lines = lines[1:]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise SubsetError(f"Subset {path} has no column {', '.join(missing)} (header: {reader.fieldnames}); a subset "
                          f"file is a CSV with the columns {', '.join(COLUMNS)} (curate writes one).")
    ids, concepts, scores, seen = [], [], [], {}
    for n, row in enumerate(reader, start=2 + bool(source)):
        sid = (row["id"] or "").strip()
        if not sid:
            raise SubsetError(f"Subset {path}, line {n}: empty id.")
        if sid in seen:
            raise SubsetError(f"Subset {path}, line {n}: id {sid!r} again (first on line {seen[sid]}); a pair is "
                              f"kept once, under one concept.")
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            raise SubsetError(f"Subset {path}, line {n}: score {row['score']!r} is not a number.") from None
        seen[sid] = n
        ids.append(sid)
        concepts.append((row["concept"] or "").strip())
        scores.append(score)
    if not ids:
        raise SubsetError(f"Subset {path} lists no pairs; a subset needs at least one id.")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Subset(path, tuple(ids), tuple(concepts), tuple(scores), digest, source, text)


def read_subset(path: str | Path) -> Subset:
    """Read and check a subset file (``train.subset``)."""
    p = Path(path)
    if not p.is_file():
        raise SubsetError(f"train.subset = {str(path)!r}: no such file. Write one with curate --config CFG "
                          f"--concepts FILE --per-concept N --out SUBSET.csv, or drop --set train.subset.")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SubsetError(f"Subset {path} is not UTF-8 text; a subset file is a CSV ({', '.join(COLUMNS)}).") from None
    return parse_subset(text, str(path))


def subset_text(rows: Iterable[tuple[str, str, float]], source: dict) -> str:
    """The text of a subset file: the provenance line, the header, one (id, concept, score) row each."""
    buf = io.StringIO()
    buf.write(HEADER + json.dumps(source, sort_keys=True) + "\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for sid, concept, score in rows:
        w.writerow((sid, concept, f"{float(score):.6f}"))
    return buf.getvalue()


def write_subset(path: str | Path, rows: Iterable[tuple[str, str, float]], source: dict) -> Path:
    """Write a subset file whole (an interrupted write leaves the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, subset_text(rows, source).encode("utf-8"))
    return path
