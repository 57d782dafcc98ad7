"""Turn the Debian package ``tuxpaint-stamps-default`` into an imagefolder image–caption dataset.

The package (GPL-2, 161 MB, installable offline from the Debian archive) holds clip-art stamps under
``usr/share/tuxpaint/stamps/<category>/...``: each ``NAME.png`` has a ``NAME.txt`` whose first line
is an English description ("A Sumatran tiger.") and whose other lines are translations
(``fr.utf8=...``). This gives about 538 real image–caption pairs (about 498 distinct captions).

What :func:`prepare_tuxpaint` does:

- reads the ``.deb`` itself (an ``ar`` archive whose ``data.tar.{gz,xz,bz2,zst}`` member holds the
  files; ``.zst`` needs the ``zstd`` program) and writes only the stamps' regular ``.png`` / ``.txt``
  files to a temporary folder; a symbolic link, hard link or device among them is refused (a link
  could put an outside file's content into a caption), as is any member path with ``..``;
  an unpacked tree is read in place, where symbolic links are refused too;
- takes every ``*.png`` outside ``symbols/`` (money, shapes, letters: not descriptive pictures) with a
  non-empty English line; skipped and counted: PNGs without a ``.txt`` (mostly ``NAME_mirror.png``,
  Tux Paint's pre-mirrored copy of ``NAME.png``), txt files with no English line, unreadable images;
  a txt that is not UTF-8 is read as Latin-1 (counted);
- images: composited on white (RGBA, LA, palette transparency), padded to a square with white,
  downscaled to at most ``size`` px (default 256; never upscaled), saved as PNG;
- split by image: the pairs are ordered by sha256("<seed>:<relative path>") and cut at the
  fractions (exact sizes, independent of file-system listing order);
- writes ``out_dir/{train,val,test}/<category>/.../NAME.png`` and one ``metadata.jsonl`` per split
  (``file_name``, ``caption``, and ``caption_<lang>`` for each translation the txt holds:
  ``de.utf8=...`` -> ``caption_de``, ``pt_BR.utf8=...`` -> ``caption_pt-br``; docs/languages.md), so
  ``load_split("imagefolder", out_dir, "train")`` reads it; image
  ids are the stamp paths without extension, e.g. ``animals/mammals/tiger``;
- writes the marker ``tuxpaint_dataset.json`` last (source, parameters, summary counts); a rerun
  with the same source and parameters returns at once; changed parameters rebuild the folder.

Command line, from the repository root: ``python -m demo.tuxpaint DEB_OR_DIR OUT [--seed 0]
[--size 256] [--fractions 0.7 0.1 0.2] [--fetch]`` (``--fetch``: DEB_OR_DIR is a folder; the .deb
is downloaded there with ``apt-get download`` when absent).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Iterator

from PIL import Image

from extract.datasets import DatasetError, pad_square, to_rgb
from pipeline.languages import CAPTION_PREFIX, LanguageError, normalize
from pipeline.runtime import atomic_write, write_json

log = logging.getLogger(__name__)

DEB_PACKAGE = "tuxpaint-stamps-default"  # Debian package name
STAMPS_SUBDIR = "usr/share/tuxpaint/stamps"  # where the stamps live inside the package
STAMP_SUFFIXES = (".png", ".txt")  # the only files read from the package
EXCLUDED_CATEGORIES = ("symbols",)  # top-level stamp folders left out (symbols, not pictures)
DEFAULT_SIZE = 256  # px, maximum side of the square output images (smaller ones are not upscaled)
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test fractions of the pairs
SPLIT_NAMES = ("train", "val", "test")
MARKER = "tuxpaint_dataset.json"  # written last; records source, parameters and summary
FORMAT_VERSION = 2  # bump when the output changes for the same inputs (2: caption_<lang> translations)
_TRANSLATION = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z]{2,3})?(@\w+)?\.utf-?8\s*=", re.IGNORECASE)
_TAR_MODES = {"data.tar": "r|", "data.tar.gz": "r|gz", "data.tar.xz": "r|xz", "data.tar.bz2": "r|bz2"}


def fetch_tuxpaint_deb(dest_dir: str | Path) -> Path:
    """Return the newest ``tuxpaint-stamps-default_*.deb`` in dest_dir, downloading it with
    ``apt-get download`` (no root, no installation) when there is none."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    debs = sorted(dest.glob(f"{DEB_PACKAGE}_*.deb"))
    if debs:
        return debs[-1]
    apt = shutil.which("apt-get")
    if apt is None:
        raise DatasetError(f"apt-get not found: download {DEB_PACKAGE}_*.deb from a Debian mirror into {dest} by hand.")
    proc = subprocess.run([apt, "download", DEB_PACKAGE], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob(f"{DEB_PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise DatasetError(
            f"`apt-get download {DEB_PACKAGE}` in {dest} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}. Run `apt-get update` first (as root), or download the .deb by hand."
        )
    return debs[-1]


# --------------------------------------------------------------------------- reading the .deb


class _Bounded:
    """Read-only view of the next ``size`` bytes of a file (one ``ar`` member), for tarfile's stream mode."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _find_data_member(f: BinaryIO, deb: Path) -> tuple[str, int]:
    """Seek ``f`` to the start of the data.tar.* member of an ``ar`` archive; returns (name, size)."""
    if f.read(8) != b"!<arch>\n":
        raise DatasetError(f"{deb} is not a Debian package (no ar header); pass the {DEB_PACKAGE} .deb or its unpacked folder.")
    while True:
        header = f.read(60)
        if len(header) < 60:
            raise DatasetError(f"{deb} has no data.tar member; is it a complete .deb?")
        name, size = header[:16].decode("ascii", "replace").strip().rstrip("/"), int(header[48:58])
        if name.startswith("data.tar"):
            return name, size
        f.seek(size + size % 2, 1)  # members are padded to an even size


@contextlib.contextmanager
def _data_tar(deb: Path, tmp: Path) -> Iterator[tarfile.TarFile]:
    """The .deb's data tarball as a tarfile stream (zstd through the ``zstd`` program)."""
    with open(deb, "rb") as f:
        name, size = _find_data_member(f, deb)
        if name in _TAR_MODES:
            with tarfile.open(fileobj=_Bounded(f, size), mode=_TAR_MODES[name]) as tar:
                yield tar
            return
        zstd = shutil.which("zstd")
        if name != "data.tar.zst" or zstd is None:
            raise DatasetError(f"{deb}: cannot read its {name} member here (zstd needs the `zstd` program); unpack "
                               "it with `dpkg-deb -x DEB DIR` and pass DIR instead.")
        packed = tmp / name
        with open(packed, "wb") as out:
            shutil.copyfileobj(_Bounded(f, size), out)
    proc = subprocess.Popen([zstd, "-dcq", str(packed)], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            yield tar
        while proc.stdout.read(1 << 16):  # the tar padding after the end marker, so zstd can finish
            pass
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.stdout.close()
        code = proc.wait()
    if code != 0:
        raise DatasetError(f"`zstd -d` failed on the {name} member of {deb} (exit {code}); is the .deb complete?")


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    return "a device, FIFO or other special file"


def unpack_stamps(deb: Path, dest: Path) -> Path:
    """Write the regular .png/.txt files under the stamps folder of ``deb`` to ``dest``; returns the
    stamps folder under ``dest``. Links, devices and paths with '..' are refused (DatasetError)."""
    prefix = STAMPS_SUBDIR + "/"
    with _data_tar(deb, dest) as tar:
        for member in tar:
            rel = member.name.removeprefix("./")
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts:
                raise DatasetError(f"{deb}: member {member.name!r} points outside the package; refusing this .deb.")
            if not rel.startswith(prefix) or not rel.endswith(STAMP_SUFFIXES) or member.isdir():
                continue
            if not member.isfile():
                raise DatasetError(f"{deb}: stamp file {rel} is {_kind(member)}, not a regular file; refusing this "
                                   ".deb (a link could put another file's content into a caption). Use the "
                                   f"package from the Debian archive (`apt-get download {DEB_PACKAGE}`).")
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return dest / STAMPS_SUBDIR


# --------------------------------------------------------------------------- collecting the stamps


def read_description(txt: Path) -> tuple[str | None, bool]:
    """The English description of a stamp: first line that is not blank, a '#' comment or a
    translation (``xx.utf8=...``), with whitespace collapsed. Returns (text or None, latin1_fallback)."""
    data = txt.read_bytes()
    try:
        text, fallback = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, fallback = data.decode("latin-1"), True
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _TRANSLATION.match(line):  # translations begin: the English line is missing
            return None, fallback
        return " ".join(line.split()), fallback
    return None, fallback


def read_translations(txt: Path) -> dict[str, str]:
    """The translations of a stamp's description, {language: text}: every ``xx.utf8=...`` line
    (``pt_BR.utf8`` -> ``pt-br``, ``sr@latin.utf8`` -> ``sr-latin``; ``pipeline.languages.normalize``),
    whitespace collapsed, empty ones and plain ``en`` (the first line is English) left out; the first
    of two spellings of one code wins."""
    data = txt.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not _TRANSLATION.match(line):
            continue
        code, _, value = line.partition("=")
        value = " ".join(value.split())
        try:
            lang = normalize(code.strip())
        except LanguageError:
            log.info("%s: ignoring translation with unknown language code %r", txt, code)
            continue
        if value and lang != "en":
            out.setdefault(lang, value)
    return out


def _find_stamps(root: Path) -> Path:
    for cand in (root / STAMPS_SUBDIR, root / "stamps", root):
        if cand.is_dir() and any(cand.rglob("*.png")):
            return cand
    raise DatasetError(
        f"no Tux Paint stamps (*.png) under {root}; pass the .deb of {DEB_PACKAGE} or the folder it was "
        f"unpacked into (holding {STAMPS_SUBDIR})."
    )


def _source_record(src: Path) -> dict:
    """Identifies the input for the marker: name, size and sha256 of a .deb; a digest of the listing of a folder."""
    h = hashlib.sha256()
    if src.is_file():
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"kind": "deb", "name": src.name, "bytes": src.stat().st_size, "sha256": h.hexdigest()}
    stamps = _find_stamps(src)
    for p in sorted(stamps.rglob("*")):
        if p.suffix in (".png", ".txt") and p.is_file():
            h.update(f"{p.relative_to(stamps).as_posix()}\0{p.stat().st_size}\n".encode())
    return {"kind": "dir", "name": src.name, "listing_sha256": h.hexdigest()}


def _collect(stamps: Path) -> tuple[list[tuple[str, Path, str, dict]], Counter]:
    """(relative path without .png, png path, caption, translations) for every usable stamp, and skip counts."""
    pairs, counts = [], Counter()
    for png in sorted(stamps.rglob("*.png")):
        rel = png.relative_to(stamps).with_suffix("").as_posix()
        if rel.split("/")[0] in EXCLUDED_CATEGORIES:
            counts["excluded category (symbols/)"] += 1
            continue
        txt = png.with_suffix(".txt")
        for path in (png, txt):
            if path.is_symlink():
                raise DatasetError(f"{path} is a symbolic link (to {path.readlink()}); refusing it, as a link could "
                                   "put another file's content into the dataset. Replace it with a copy.")
        if not txt.is_file():
            reason = "mirror copy without txt (NAME_mirror.png)" if png.stem.endswith("_mirror") else "no txt"
            counts[reason] += 1
            log.info("skipping %s: %s", rel, reason)
            continue
        caption, latin1 = read_description(txt)
        if latin1:
            counts["txt read as Latin-1 (not UTF-8)"] += 1
            log.warning("%s is not UTF-8; read as Latin-1", txt)
        if not caption:
            counts["no English line in txt"] += 1
            log.warning("skipping %s: no English line in %s", rel, txt.name)
            continue
        pairs.append((rel, png, caption, read_translations(txt)))
    return pairs, counts


def _assign_splits(rels: list[str], seed: int, fractions: tuple[float, float, float]) -> dict[str, str]:
    """rel -> split: order by sha256("<seed>:<rel>") and cut at the fractions (round to whole images)."""
    order = sorted(rels, key=lambda r: hashlib.sha256(f"{seed}:{r}".encode()).hexdigest())
    n_train = round(len(order) * fractions[0])
    n_val = round(len(order) * (fractions[0] + fractions[1])) - n_train
    return {r: ("train" if i < n_train else "val" if i < n_train + n_val else "test") for i, r in enumerate(order)}


def _convert(png: Path, size: int) -> Image.Image:
    """RGB on white, padded square, at most size x size px (Lanczos downscale)."""
    with Image.open(png) as im:
        im.load()
        img = pad_square(to_rgb(im))
    if img.width > size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img


# --------------------------------------------------------------------------- writing the dataset


def _write_dataset(build: Path, pairs: list[tuple[str, Path, str, dict]], split_of: dict[str, str], size: int,
                   skipped: Counter) -> dict:
    """Images and one metadata.jsonl per split into ``build``; returns the summary."""
    rows: dict[str, list[dict]] = {s: [] for s in SPLIT_NAMES}
    languages: Counter = Counter()
    for rel, png, caption, translations in pairs:
        try:
            img = _convert(png, size)
        except Exception as exc:
            skipped["unreadable image"] += 1
            log.warning("skipping %s: %s: %s", rel, type(exc).__name__, exc)
            continue
        split = split_of[rel]
        dest = build / split / f"{rel}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        img.save(dest)
        rows[split].append({"file_name": f"{rel}.png", "caption": caption,
                            **{f"{CAPTION_PREFIX}{lang}": t for lang, t in sorted(translations.items())}})
        languages.update(translations.keys())
    for split, split_rows in rows.items():
        if split_rows:
            atomic_write(build / split / "metadata.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows))
    captions = [r["caption"] for rs in rows.values() for r in rs]
    return {
        "pairs": len(captions),
        "distinct_captions": len(set(captions)),
        "splits": {s: len(rs) for s, rs in rows.items()},
        "languages": dict(languages.most_common()),  # stamps with a caption in each other language
        "skipped": dict(sorted(skipped.items())),
    }


def _complete(out_dir: Path, marker: dict) -> bool:
    return all((out_dir / s / "metadata.jsonl").is_file() for s in SPLIT_NAMES if marker["summary"]["splits"].get(s))


def _up_to_date(out_dir: Path, source: dict, params: dict) -> bool:
    """True when out_dir holds this very build; clears an outdated one; refuses a foreign folder."""
    marker_path = out_dir / MARKER
    if marker_path.is_file():
        old = json.loads(marker_path.read_text(encoding="utf-8"))
        if old.get("source") == source and old.get("params") == params and _complete(out_dir, old):
            log.info("%s is up to date (%d pairs); nothing to do", out_dir, old["summary"]["pairs"])
            return True
        log.warning("%s was built from another source or with other parameters; rebuilding", out_dir)
        shutil.rmtree(out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DatasetError(f"{out_dir} is not empty and holds no {MARKER}; choose an empty or new folder.")
    return False


def _check_args(src: Path, size: int, fractions: tuple[float, ...]) -> None:
    if size < 1:
        raise DatasetError(f"size must be a positive number of pixels, got {size}.")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(f"fractions must be 3 non-negative numbers (train, val, test) summing to 1, got {fractions}.")
    if not src.exists():
        raise DatasetError(f"{src} does not exist; pass the {DEB_PACKAGE} .deb (see fetch_tuxpaint_deb) or its unpacked folder.")


def prepare_tuxpaint(
    deb_or_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    size: int | None = None,
) -> Path:
    """Build (or reuse) the Tux Paint imagefolder dataset; returns out_dir.

    deb_or_dir: the tuxpaint-stamps-default .deb, or a folder it was unpacked into.
    out_dir: output folder (created; must be empty or hold an earlier output of this function).
    seed: split seed; fractions: (train, val, test), summing to 1; size: max side in px (None -> 256).
    The summary (pairs, distinct captions, split sizes, skip counts) is logged and stored in the marker.
    """
    src, out_dir = Path(deb_or_dir).expanduser(), Path(out_dir).expanduser()
    size = DEFAULT_SIZE if size is None else int(size)
    fractions = tuple(float(f) for f in fractions)
    _check_args(src, size, fractions)
    source = _source_record(src)
    params = {"seed": seed, "fractions": list(fractions), "size": size, "version": FORMAT_VERSION}
    if _up_to_date(out_dir, source, params):
        return out_dir
    with tempfile.TemporaryDirectory(prefix="tuxpaint-") as tmp:
        stamps = unpack_stamps(src, Path(tmp)) if src.is_file() else _find_stamps(src)
        pairs, skipped = _collect(stamps)
        if not pairs:
            raise DatasetError(f"no usable stamp (PNG with an English description) under {stamps}.")
        split_of = _assign_splits([p[0] for p in pairs], seed, fractions)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            summary = _write_dataset(build, pairs, split_of, size, skipped)
            write_json(build / MARKER, {"source": source, "params": params, "summary": summary, "package": DEB_PACKAGE},
                       indent=2)
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above)
            build.replace(out_dir)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    log.info("Tux Paint dataset in %s: %s", out_dir, json.dumps(summary))
    return out_dir


def read_summary(out_dir: str | Path) -> dict:
    """The summary stored by prepare_tuxpaint: pairs, distinct_captions, splits, skipped."""
    return json.loads((Path(out_dir) / MARKER).read_text(encoding="utf-8"))["summary"]


def main(argv: list[str] | None = None) -> int:
    """``python -m demo.tuxpaint DEB_OR_DIR OUT``: build the dataset and print its summary as JSON."""
    ap = argparse.ArgumentParser(prog="python -m demo.tuxpaint", description=__doc__.split("\n\n")[0])
    ap.add_argument("deb_or_dir", help=f"the {DEB_PACKAGE} .deb, its unpacked folder, or (--fetch) a download folder")
    ap.add_argument("out_dir", help="output imagefolder dataset (train/ val/ test/ with metadata.jsonl)")
    ap.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"max image side in px (default {DEFAULT_SIZE})")
    ap.add_argument("--fractions", type=float, nargs=3, default=DEFAULT_FRACTIONS, metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--fetch", action="store_true", help="download the .deb into DEB_OR_DIR with apt-get if absent")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        src = fetch_tuxpaint_deb(args.deb_or_dir) if args.fetch else Path(args.deb_or_dir)
        out = prepare_tuxpaint(src, args.out_dir, seed=args.seed, fractions=tuple(args.fractions), size=args.size)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(read_summary(out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
