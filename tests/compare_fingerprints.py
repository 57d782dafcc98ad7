"""Check that split fingerprints are byte-identical to those of an earlier version of the loaders.

Caches record the fingerprint of the split they were extracted from; a loader change that alters
it for unchanged data would make every existing cache entry stale. This script builds the fixture
datasets of ``tests/fixtures.py`` for every format, loads the same splits with the current
``extract.datasets`` and with ``extract/datasets.py`` as it was at git revision REV (read with
``git show`` into a temporary module), and prints both fingerprints per split.

Run from the repository root: ``python -m tests.compare_fingerprints [REV]`` (default REV:
0f83b75, the last commit with the single-file loader). Exit status 1 when any fingerprint differs.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from extract import datasets as new
from tests.fixtures import make_coco, make_flickr30k, make_hf_dataset, make_imagefolder, write_metadata

DEFAULT_REV = "0f83b75"


def old_module(rev: str, folder: Path):
    """extract/datasets.py at ``rev`` imported as a stand-alone module."""
    source = subprocess.run(["git", "show", f"{rev}:extract/datasets.py"], capture_output=True, text=True, check=True)
    path = folder / "old_datasets.py"
    path.write_text(source.stdout, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_datasets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def cases(root: Path) -> list[tuple[str, str, Path, str, dict]]:
    """(label, dataset, data_dir, split, options) for every format and layout of the fixtures."""
    flickr = make_flickr30k(root / "flickr")
    token = shutil.copytree(flickr, root / "flickr_token")
    (token / "dataset_flickr30k.json").unlink()
    coco = make_coco(root / "coco")
    folders = make_imagefolder(root / "if_jsonl", n=4, captions_per_image=3)
    csv = make_imagefolder(root / "if_csv", fmt="csv", n=4, captions_per_image=2)
    column = make_imagefolder(root / "if_column", list_captions=True, split_column=True, captions_per_image=4)
    single = make_imagefolder(root / "if_root", splits=None, n=3)
    empty = root / "if_empty"
    shutil.copytree(single, empty)
    write_metadata(empty, [{"file_name": "train_0.png", "caption": ["a", " ", "the third"]},
                           {"file_name": "sub/train_1.png", "caption": ""},
                           {"file_name": "train_2.png", "caption": "fine"}])
    hf_col = make_hf_dataset(root, n_per_split=(4, 2, 2))
    make_hf_dataset(root, n_per_split=(3, 2, 1), layout="dict", name="dd")
    out = []
    for split in ("train", "val", "test"):
        out.append((f"flickr30k json {split}", "flickr30k", flickr, split, {}))
        out.append((f"flickr30k token {split}", "flickr30k", token, split, {}))
        out.append((f"imagefolder jsonl {split}", "imagefolder", folders, split, {}))
        out.append((f"imagefolder csv {split}", "imagefolder", csv, split, {}))
        out.append((f"imagefolder split column {split}", "imagefolder", column, split, {}))
        out.append((f"hf column {split}", f"hf:{hf_col}", root, split, {}))
        out.append((f"hf dict {split}", "hf:dd", root, split, {}))
    for split in ("train", "restval", "val", "test"):
        out.append((f"coco {split}", "coco", coco, split, {}))
    out.append(("imagefolder root", "imagefolder", single, "train", {}))
    out.append(("imagefolder on_empty=skip", "imagefolder", empty, "train", {"on_empty": "skip"}))
    return out


def main(argv: list[str]) -> int:
    import datasets

    datasets.disable_progress_bars()
    logging.disable(logging.WARNING)  # the on_empty=skip case logs what it drops
    rev = argv[0] if argv else DEFAULT_REV
    with tempfile.TemporaryDirectory(prefix="fingerprints-") as tmp:
        old = old_module(rev, Path(tmp))
        differ, todo = 0, cases(Path(tmp))
        for label, dataset, data_dir, split, options in todo:
            a = old.load_split(dataset, data_dir, split, **options)
            b = new.load_split(dataset, data_dir, split, **options)
            fa, fb = a.fingerprint(), b.fingerprint()
            sub_a, sub_b = a.select(range(0, len(a), 2)).fingerprint(), b.select(range(0, len(b), 2)).fingerprint()
            same = fa == fb and sub_a == sub_b and [tuple(vars(i).values()) for i in a.items] == [tuple(vars(i).values()) for i in b.items]
            differ += not same
            print(f"{'identical' if same else 'DIFFERENT'}  {fb[:16]}  {label} ({len(b)} images)")
        print(f"{differ} of {len(todo)} splits differ" if differ else f"all {len(todo)} fingerprints identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
