"""Format ``coco``: MS-COCO 2014 with the Karpathy splits (123,287 images, 5 captions each).

Expected under ``data_dir``: ``dataset_coco.json`` (Karpathy split file); images at
``data_dir/<filepath>/<filename>`` (option ``image_dir`` replaces ``data_dir`` as the root), i.e.
the COCO 2014 folders ``train2014/`` and ``val2014/``. Image id = file name stem
(``"COCO_val2014_000000391895"``).

Splits: ``train`` (82,783), ``restval`` (30,504), ``val`` (5,000), ``test`` (5,000). Option
``restval``: ``"split"`` (default) keeps restval a split of its own; ``"train"`` loads its images
as part of ``train`` (113,287 images, the training set of most COCO retrieval papers), so that
``fit-adapters`` trains on them: ``extract --dataset coco --set data.options.restval=train``.
With ``"train"`` there is no split ``restval``. The fingerprint of such a train split differs from
the plain one, so a cache extracted one way reads as stale the other way.

Translated captions (Multi30k's German ones, say): option ``translations`` (``translations.py``).
"""
from __future__ import annotations

import os

from .karpathy import karpathy_splits, read_karpathy
from .loading import Format, Source, finish, image_root, option_hint
from . import translations
from .split import DatasetError, Split

KARPATHY_FILE = "dataset_coco.json"
IMAGE_FOLDERS = (".", "images")  # roots tried for <filepath>/<filename>, in this order
RESTVAL_CHOICES = ("split", "train")  # option restval: its own split | part of train


def _restval(source: Source) -> str:
    value = source.options.get("restval", "split")
    if value not in RESTVAL_CHOICES:
        raise DatasetError(f"option restval={value!r}: use 'split' (restval is a split of its own) or 'train' "
                           f"(restval images join train: {option_hint('restval', 'train')}).")
    return value


def _karpathy_file(source: Source):
    path = source.data_dir / KARPATHY_FILE
    if not path.is_file():
        raise DatasetError(f"no {KARPATHY_FILE} in {source.data_dir}; download the Karpathy COCO split file there "
                           "(Karpathy's caption_datasets.zip).")
    return path


def load(source: Source, split: str) -> Split:
    """One split of COCO (see the module docstring)."""
    path = _karpathy_file(source)
    merged: tuple[str, ...] = ()
    if _restval(source) == "train":
        if split == "restval":
            raise DatasetError(f"with {option_hint('restval', 'train')} the restval images are part of split "
                               "'train'; there is no split 'restval' (drop the option to load it on its own).")
        merged = ("restval",) if split == "train" else ()
    records = read_karpathy(path, split, with_filepath=True, merged=merged)
    root = image_root(source.data_dir, source.options.get("image_dir"), IMAGE_FOLDERS,
                      records[0].rel if records else None)
    for r in records:
        r.path = os.path.join(root, r.rel)
    translations.attach(records, dict(source.options), source.data_dir)
    return finish(source, split, records, str(path), root)


def splits(source: Source) -> list[str]:
    """The Karpathy file's splits (without restval when it is part of train)."""
    names = karpathy_splits(_karpathy_file(source))
    if _restval(source) == "train":
        names = [n for n in names if n != "restval"]
    return names


FORMAT = Format(
    name="coco",
    options=("image_dir", "restval", translations.OPTION),
    what_to_get=(
        f"It needs the Karpathy split file {KARPATHY_FILE} (caption_datasets.zip) and the COCO 2014 image "
        "folders train2014/ and val2014/ (cocodataset.org)."
    ),
    load=load,
    splits=splits,
)
