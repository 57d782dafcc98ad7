"""Format ``hf:<hub id or local path>``: a Hugging Face ``datasets`` dataset.

A local path (absolute, relative to the working directory, or relative to ``data_dir``) written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with ``datasets.load_from_disk``;
anything else goes to ``datasets.load_dataset(id)`` (standard HF cache, honours
``HF_DATASETS_OFFLINE``).

Columns (options in brackets): image (``image_column``, default ``"image"``), captions
(``caption_column``, default ``"caption"``; string or list of strings), split (``split_column``,
default ``"split"``; when absent the DatasetDict member of that name is used, and a plain Dataset
is split ``"train"``), id (``id_column``, default ``"filename"`` then ``"img_id"``; a value with an
image extension is reduced to its stem). Images are decoded lazily from the Arrow files;
``Item.image`` is ``"hf-row:<row>"``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import did_you_mean
from pipeline.languages import column_language

from .loading import IMAGE_EXTENSIONS, Format, Record, Source, captions_from_cell, finish, norm_split, split_name
from .loading import add_translations, strip_image_ext, unknown_split
from .split import HF_ROW_PREFIX, DatasetError, Split, option_hint

ID_COLUMNS = ("filename", "img_id")  # id columns tried when option id_column is not given


def _datasets():
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DatasetError("hf:... datasets need the `datasets` package: pip install datasets") from exc
    return datasets


def _open(source: Source) -> tuple[Any, str]:
    """(Dataset or DatasetDict, where it came from) for "hf:<spec>"."""
    datasets, spec = _datasets(), source.argument
    local = Path(spec).expanduser()
    candidates = [local] + ([source.data_dir / local] if not local.is_absolute() else [])
    found = next((c for c in candidates if c.exists()), None)
    if found is not None:
        try:
            return datasets.load_from_disk(str(found)), str(found.resolve())
        except Exception as exc:
            raise DatasetError(
                f"{found} exists but is not a dataset saved with save_to_disk ({type(exc).__name__}: {exc})."
            ) from exc
    try:
        return datasets.load_dataset(spec), f"hf-hub:{spec}"
    except Exception as exc:
        raise DatasetError(
            f"could not load Hugging Face dataset {spec!r} ({type(exc).__name__}: {exc}). Either download it "
            f"where there is network (`python -c \"import datasets; datasets.load_dataset('{spec}')\"` fills the "
            "HF cache; then HF_DATASETS_OFFLINE=1 works offline), or save it with save_to_disk(PATH) and pass "
            "hf:PATH. A local path given here was not found (also tried relative to data_dir)."
        ) from exc


def _members(obj: Any) -> dict:
    """{member name: Dataset}; a plain Dataset is the one member None."""
    return dict(obj) if isinstance(obj, _datasets().DatasetDict) else {None: obj}


def _split_rows(source: Source, obj: Any, where: str, split: str) -> tuple[Any, list[int]]:
    """(the Dataset holding the split, its row indices)."""
    split_col = source.options.get("split_column", "split")
    members = _members(obj)
    some = next(iter(members.values()))
    if split_col in some.column_names:
        if len(members) == 1:
            ds = some
        else:
            key = next((k for k in members if norm_split(k) == split), None)
            ds = members[key] if key is not None else _datasets().concatenate_datasets([members[k] for k in sorted(members)])
        values = [norm_split(v) for v in ds.select_columns([split_col]).to_dict()[split_col]]
        rows = [i for i, v in enumerate(values) if v == split]
        if not rows:
            raise unknown_split(split, values, f"the {split_col!r} column of {where}")
        return ds, rows
    if "split_column" in source.options:
        raise DatasetError(f"{where} has no split column {split_col!r}; columns: {', '.join(some.column_names)}.")
    if None in members:  # a plain Dataset without split column: all of it is "train"
        if split != "train":
            raise unknown_split(split, ["train"], f"{where} (a Dataset without a {split_col!r} column is split 'train')")
        return members[None], list(range(len(members[None])))
    key = next((k for k in members if norm_split(k) == split), None)
    if key is None:
        raise unknown_split(split, [norm_split(k) for k in members], where)
    return members[key], list(range(len(members[key])))


def _columns(source: Source, cols: list[str], where: str) -> tuple[str, str, str]:
    """(image, caption, id) column names, checked against the dataset's columns."""
    def need(option: str, default: str | None) -> str:
        name = source.options.get(option, default)
        if name not in cols:
            raise DatasetError(f"{where} has no column {name!r} ({option}); columns: {', '.join(cols)}. "
                               f"Name it with {option_hint(option)}." + did_you_mean(str(name), cols))
        return name

    image_col, caption_col = need("image_column", "image"), need("caption_column", "caption")
    if "id_column" in source.options:
        return image_col, caption_col, need("id_column", None)
    id_col = next((c for c in ID_COLUMNS if c in cols), None)
    if id_col is None:
        raise DatasetError(f"{where} has no id column ({' or '.join(map(repr, ID_COLUMNS))}); columns: "
                           f"{', '.join(cols)}. Name it with {option_hint('id_column')}.")
    return image_col, caption_col, id_col


def load(source: Source, split: str) -> Split:
    """One split of a Hugging Face dataset (see the module docstring)."""
    obj, where = _open(source)
    ds, rows = _split_rows(source, obj, where, split)
    image_col, caption_col, id_col = _columns(source, ds.column_names, where)
    lang_cols = [c for c in ds.column_names if column_language(c) and c != caption_col]
    table = ds.select_columns([caption_col, id_col, *lang_cols]).to_dict()
    records = []
    for r in rows:
        at = f"{where} row {r}"
        raw_id = table[id_col][r]
        if raw_id is None or str(raw_id).strip() == "":
            raise DatasetError(f"{at}: empty id in column {id_col!r}.")
        img_id = str(raw_id).strip()
        if img_id.lower().endswith(IMAGE_EXTENSIONS):
            img_id = strip_image_ext(img_id)
        caps = captions_from_cell(table[caption_col][r], at)
        key = f"{HF_ROW_PREFIX}{r}"
        records.append(Record(img_id, key, key, caps, list(range(len(caps))), at))
        add_translations(records[-1], {c: table[c][r] for c in lang_cols}, caption_col, at)
    images = ds.select_columns([image_col]).with_format("arrow")
    return finish(source, split, records, where, None, check_files=False, hf_images=images)


def splits(source: Source) -> list[str]:
    """Values of the split column, else the DatasetDict member names, else ["train"]."""
    obj, _ = _open(source)
    members = list(_members(obj).values())
    col = source.options.get("split_column", "split")
    if col in members[0].column_names:
        return [split_name(v, f"{source.dataset} row {i} (column {col!r})") for m in members
                for i, v in enumerate(m.select_columns([col]).to_dict()[col])]
    return [split_name(k, f"{source.dataset} (DatasetDict member)") for k in _members(obj) if k is not None] or ["train"]


FORMAT = Format(
    name="hf",
    argument="<hub id or local path>",
    options=("image_column", "caption_column", "split_column", "id_column"),
    what_to_get=("It needs a dataset saved with save_to_disk (pass hf:PATH) or a hub id whose files are in the "
                 "Hugging Face cache."),
    load=load,
    splits=splits,
    needs_folder=False,
)
