"""Small datasets in the real on-disk formats, for tests (fast: a few KB each, no network).

Every ``make_*`` function writes into ``root`` (created if needed) and returns the folder to pass
as ``data_dir`` to :func:`extract.datasets.load_split` (for hf: the ``save_to_disk`` path, to pass
as ``"hf:<path>"``). Content is deterministic given ``seed``; images are small, distinct and
smooth enough to be JPEG-compressed; captions of one image have distinct lengths, so the
"longest" caption is unambiguous (its index varies between images).

    make_flickr30k(root)            dataset_flickr30k.json + flickr30k-images/*.jpg
                                    + results_20130124.token + train.txt/val.txt/test.txt
    make_coco(root)                 dataset_coco.json + train2014/ val2014/ images
    make_imagefolder(root)          train/ val/ test/ with metadata.jsonl or metadata.csv
    make_hf_dataset(root)           datasets.Dataset.save_to_disk folder (image, caption list, split, filename)
    write_metadata(folder, rows)    an imagefolder metadata file from row dicts
    write_bad_images(folder)        corrupt / truncated / every PIL mode; see BAD_IMAGE_PIXELS
    make_tuxpaint_tree(root)        a fake unpacked tuxpaint-stamps-default tree
    make_tuxpaint_deb(root)         that tree packed as a .deb (needs dpkg-deb)
    pack_deb(tree, deb, links)      a tree packed as a .deb-like ar + tar archive in Python, with extra
                                    link / device members (no dpkg needed)
"""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange")
SUBJECTS = ("dog", "cat", "man", "woman", "child", "bird", "horse", "car", "boat", "bicycle")
WORDS = (
    "running", "near", "the", "old", "river", "under", "a", "tall", "tree", "with", "two",
    "friends", "on", "sunny", "day", "in", "park", "while", "people", "watch", "from", "bench",
)
FLICKR_BASE_ID = 1000092795  # Flickr30k-style numeric image ids start here


def _image(rng: np.random.Generator, size: int | tuple[int, int]) -> Image.Image:
    """A smooth, distinct RGB image: random colour gradient plus a little noise. size: side or (w, h)."""
    w, h = (size, size) if isinstance(size, int) else size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    c0, c1, c2 = rng.uniform(0, 255, size=(3, 3))
    img = c0 + np.multiply.outer(x, c1 - c0) + np.multiply.outer(y, c2 - c0) * 0.5
    img += rng.normal(0, 8, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _captions(rng: np.random.Generator, n: int = 5) -> list[str]:
    """n captions of one image with distinct lengths (longest at a random index)."""
    color = str(rng.choice(COLORS))
    base = f"{'An' if color[0] in 'aeiou' else 'A'} {color} {rng.choice(SUBJECTS)}"
    extra = list(rng.choice(WORDS, size=2 * n + 2))
    order = rng.permutation(n)  # caption k gets 2*order[k] extra words
    return [" ".join([base] + extra[: 2 * int(order[k])]) + "." for k in range(n)]


def _tokens(text: str) -> list[str]:
    return text.lower().rstrip(".").split()


def _karpathy_image(filename: str, imgid: int, split: str, caps: list[str], sentid0: int, **extra) -> dict:
    sents = [
        {"raw": c, "tokens": _tokens(c), "imgid": imgid, "sentid": sentid0 + j} for j, c in enumerate(caps)
    ]
    return {**extra, "filename": filename, "imgid": imgid, "split": split,
            "sentids": [s["sentid"] for s in sents], "sentences": sents}


def make_flickr30k(
    root: str | Path,
    n_per_split: tuple[int, int, int] = (6, 3, 3),
    size: int = 48,
    seed: int = 0,
    karpathy: bool = True,
    token: bool = True,
) -> Path:
    """A tiny Flickr30k: Karpathy json (karpathy=True), token file + split lists (token=True), JPEGs.

    n_per_split: images in (train, val, test); 5 captions each. File order is shuffled (not by id).
    Returns root.
    """
    root = Path(root)
    img_dir = root / "flickr30k-images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = sum(n_per_split)
    splits = [s for s, n in zip(("train", "val", "test"), n_per_split) for _ in range(n)]
    order = rng.permutation(total)
    images, token_lines = [], []
    for imgid, j in enumerate(order):
        img_id = str(FLICKR_BASE_ID + 7919 * int(j))
        caps = _captions(rng)
        _image(rng, size).save(img_dir / f"{img_id}.jpg", quality=90)
        images.append(_karpathy_image(f"{img_id}.jpg", imgid, splits[j], caps, 5 * imgid))
        token_lines += [f"{img_id}.jpg#{k}\t{c}" for k, c in enumerate(caps)]
    if karpathy:
        doc = {"images": images, "dataset": "flickr30k"}
        (root / "dataset_flickr30k.json").write_text(json.dumps(doc), encoding="utf-8")
    if token:
        (root / "results_20130124.token").write_text("\n".join(token_lines) + "\n", encoding="utf-8")
        for s in ("train", "val", "test"):
            ids = [Path(im["filename"]).stem for im in images if im["split"] == s]
            (root / f"{s}.txt").write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    return root


def make_coco(
    root: str | Path,
    n_per_split: tuple[int, int, int, int] = (4, 2, 2, 2),
    size: int = 48,
    seed: int = 0,
) -> Path:
    """A tiny COCO Karpathy split: dataset_coco.json + train2014/ and val2014/ JPEGs.

    n_per_split: images in (train, restval, val, test); train images live in train2014/, the others in
    val2014/ (as in the real file). 5 captions each, 6 for the first image. Returns root.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    images, imgid = [], 0
    for split, n in zip(("train", "restval", "val", "test"), n_per_split):
        folder = "train2014" if split == "train" else "val2014"
        (root / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            cocoid = 391895 + 1013 * imgid
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            caps = _captions(rng, 6 if imgid == 0 else 5)
            _image(rng, size).save(root / folder / filename, quality=90)
            images.append(_karpathy_image(filename, imgid, split, caps, 10 * imgid, filepath=folder, cocoid=cocoid))
            imgid += 1
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    return root


def write_metadata(folder: str | Path, rows: list[dict], fmt: str = "jsonl") -> Path:
    """Write an imagefolder metadata file (metadata.jsonl or metadata.csv) from row dicts.

    In CSV, list values are written as JSON lists (how the loader reads a list of captions).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = folder / "metadata.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path
    if fmt != "csv":
        raise ValueError(f"fmt must be 'jsonl' or 'csv', got {fmt!r}")
    path = folder / "metadata.csv"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def make_imagefolder(
    root: str | Path,
    splits: tuple[str, ...] | None = ("train", "val", "test"),
    n: int = 4,
    fmt: str = "jsonl",
    size: int = 32,
    seed: int = 0,
    captions_per_image: int = 1,
    list_captions: bool = False,
    split_column: bool = False,
) -> Path:
    """A tiny imagefolder dataset; n PNG images per split, every other one in a subfolder "sub/".

    splits: one folder per split with its own metadata file; None or () -> a single root metadata file
    (split "train"). split_column=True -> a single root metadata file with a "split" column instead.
    list_captions: one row per image with a list of captions, else one row per caption.
    File names are "<split>_<i>.png" / "sub/<split>_<i>.png" (ids "train_0", "sub/train_1", ...).
    Returns root.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = list(splits or ("train",))
    all_rows = []
    for split in names:
        folder = root if (not splits or split_column) else root / split
        rows = []
        for i in range(n):
            rel = f"sub/{split}_{i}.png" if i % 2 else f"{split}_{i}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            _image(rng, size).save(folder / rel)
            caps = _captions(rng, captions_per_image)
            extra = {"split": split} if split_column else {}
            if list_captions:
                rows.append({"file_name": rel, "caption": caps, **extra})
            else:
                rows += [{"file_name": rel, "caption": c, **extra} for c in caps]
        if splits and not split_column:
            write_metadata(folder, rows, fmt)
        all_rows += rows
    if not splits or split_column:
        write_metadata(root, all_rows, fmt)
    return root


def make_hf_dataset(
    root: str | Path,
    n_per_split: tuple[int, int, int] = (4, 2, 2),
    size: int = 32,
    seed: int = 0,
    layout: str = "column",
    name: str = "hf_dataset",
) -> Path:
    """A tiny Hugging Face dataset saved with save_to_disk; returns its path (use "hf:<path>").

    Columns: image (Image feature, PNG bytes), caption (list of 5 strings), filename ("<id>.jpg").
    layout "column": one Dataset with a "split" column (train/val/test), rows interleaved;
    layout "dict": a DatasetDict with members train / validation / test and no split column.
    """
    from datasets import Dataset, DatasetDict, Features, List, Value
    from datasets import Image as HFImage

    rng = np.random.default_rng(seed)
    splits = [s for s, n in zip(("train", "val", "test"), n_per_split) for _ in range(n)]
    order = rng.permutation(len(splits))
    rows = {"image": [], "caption": [], "split": [], "filename": []}
    for j in order:
        rows["image"].append(_image(rng, size))
        rows["caption"].append(_captions(rng))
        rows["split"].append(splits[j])
        rows["filename"].append(f"{FLICKR_BASE_ID + 7919 * int(j)}.jpg")
    features = Features(image=HFImage(), caption=List(Value("string")), split=Value("string"), filename=Value("string"))
    path = Path(root) / name
    if layout == "column":
        Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    elif layout == "dict":
        members = {}
        for split, key in (("train", "train"), ("val", "validation"), ("test", "test")):
            idx = [i for i, s in enumerate(rows["split"]) if s == split]
            sub = {c: [v[i] for i in idx] for c, v in rows.items() if c != "split"}
            members[key] = Dataset.from_dict(sub, features=Features({c: f for c, f in features.items() if c != "split"}))
        DatasetDict(members).save_to_disk(str(path))
    else:
        raise ValueError(f"layout must be 'column' or 'dict', got {layout!r}")
    return path


# Expected RGB after extract.datasets.to_rgb, per write_bad_images name: {(x, y): (r, g, b)}.
BAD_IMAGE_PIXELS = {
    "gray": {(0, 0): (77, 77, 77)},
    "one_bit": {(0, 0): (255, 255, 255), (1, 0): (0, 0, 0)},
    "palette": {(0, 0): (10, 20, 30), (1, 0): (200, 100, 50)},
    "palette_transparent": {(0, 0): (255, 255, 255), (1, 0): (10, 20, 30)},
    "rgba": {(0, 0): (255, 255, 255), (1, 0): (255, 0, 0), (2, 0): (127, 127, 127)},
    "la": {(0, 0): (255, 255, 255), (1, 0): (40, 40, 40)},
    "cmyk": {(0, 0): (0, 255, 255), (1, 0): (255, 255, 255)},
    "i16": {(0, 0): (255, 255, 255), (1, 0): (128, 128, 128), (2, 0): (1, 1, 1), (3, 0): (0, 0, 0)},
}
# write_bad_images names that cannot be decoded (ImageError expected).
BAD_IMAGE_BROKEN = ("corrupt", "truncated", "empty", "bomb")


def write_bad_images(folder: str | Path) -> dict[str, Path]:
    """Write one small image per problem case; returns {name: path}.

    Decodable (expected pixels in BAD_IMAGE_PIXELS): gray (L), one_bit (1), palette (P),
    palette_transparent (P with a transparent index 0), rgba (transparent, opaque red, half-transparent
    black), la, cmyk (TIFF; pure cyan), i16 (16-bit PNG: 65535, 32768, 256, 0), exif_rotated (a 4x2 JPEG
    with EXIF orientation 6, displayed 2x4). Broken (BAD_IMAGE_BROKEN): corrupt (JPEG header + junk),
    truncated (first half of a valid JPEG), empty (0 bytes), bomb (a 60-byte PNG whose header claims
    40,000 x 40,000 pixels: PIL's decompression-bomb guard refuses it before decoding).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, ext: str, **kw) -> None:
        out[name] = folder / f"{name}.{ext}"
        img.save(out[name], **kw)

    save("gray", Image.new("L", (4, 4), 77), "png")
    one = Image.new("1", (4, 4), 0)
    one.putpixel((0, 0), 1)
    save("one_bit", one, "png")
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    save("palette", pal, "png")
    palt = Image.new("P", (4, 4), 1)
    palt.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palt.putpixel((0, 0), 0)
    save("palette_transparent", palt, "png", transparency=0)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    for xy, v in (((0, 0), (0, 0, 0, 0)), ((1, 0), (255, 0, 0, 255)), ((2, 0), (0, 0, 0, 128))):
        rgba.putpixel(xy, v)
    save("rgba", rgba, "png")
    la = Image.new("LA", (4, 4), (40, 255))
    la.putpixel((0, 0), (0, 0))
    save("la", la, "png")
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    cmyk.putpixel((0, 0), (255, 0, 0, 0))
    save("cmyk", cmyk, "tif")
    i16 = np.zeros((4, 4), np.uint16)
    i16[0, :4] = (65535, 32768, 256, 0)
    save("i16", Image.fromarray(i16), "png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("exif_rotated", Image.new("RGB", (4, 2), (0, 128, 0)), "jpg", exif=exif)

    rng = np.random.default_rng(0)
    out["corrupt"] = folder / "corrupt.jpg"
    out["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(200))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    out["truncated"] = folder / "truncated.jpg"
    out["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["empty"] = folder / "empty.png"
    out["empty"].write_bytes(b"")
    out["bomb"] = folder / "bomb.png"
    out["bomb"].write_bytes(_png_header_only(40_000, 40_000))
    return out


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` 1-bit pixels but holds one empty data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# Fake tuxpaint-stamps-default tree: relative path under the stamps folder -> (PNG kind, txt bytes or None).
TUXPAINT_FAKE = {
    "animals/cat.png": ("rgba", "A cat.\nfr.utf8=Un chat.\nde.utf8=Eine Katze.\n".encode()),
    "animals/birds/owl.png": ("la", "# a comment line\n\n  An   owl.  \nde.utf8=Eine Eule.\n".encode()),
    "food/apple.png": ("palette", "A crème brûlée apple.\n".encode("latin-1")),  # not UTF-8
    "food/apple_mirror.png": ("palette", None),  # Tux Paint's pre-mirrored copy: no txt of its own
    "household/lamp.png": ("rgba", None),  # no txt
    "plants/tree.png": ("rgba", "\nfr.utf8=Un arbre.\n".encode()),  # no English line
    "vehicles/car.png": ("wide", "A car.\n".encode()),
    "symbols/star.png": ("rgba", "A star.\n".encode()),  # symbols/ is left out
}
TUXPAINT_FAKE_CAPTIONS = {  # expected pairs: image id -> caption
    "animals/cat": "A cat.",
    "animals/birds/owl": "An owl.",
    "food/apple": "A crème brûlée apple.",
    "vehicles/car": "A car.",
}


def make_tuxpaint_tree(root: str | Path) -> Path:
    """A fake unpacked tuxpaint-stamps-default (see TUXPAINT_FAKE); returns root (holding usr/)."""
    root = Path(root)
    stamps = root / "usr/share/tuxpaint/stamps"
    rng = np.random.default_rng(1)
    for rel, (kind, txt) in TUXPAINT_FAKE.items():
        png = stamps / rel
        png.parent.mkdir(parents=True, exist_ok=True)
        if kind == "wide":
            img = Image.new("RGBA", (60, 20), (0, 0, 0, 0))
            img.paste(Image.new("RGBA", (40, 10), (255, 0, 0, 255)), (10, 5))
        else:
            img = _image(rng, 24).convert("RGBA")
            a = np.asarray(img).copy()
            a[:4, :, 3] = 0  # transparent top rows
            img = Image.fromarray(a, "RGBA")
            if kind == "la":
                img = img.convert("LA")
            elif kind == "palette":
                img = img.convert("P")
        img.save(png)
        if txt is not None:
            png.with_suffix(".txt").write_bytes(txt)
    return root


def make_tuxpaint_deb(root: str | Path, compression: str = "gzip") -> Path:
    """make_tuxpaint_tree packed as root/tuxpaint-stamps-default_0.0-1_all.deb by dpkg-deb (needs it);
    compression: gzip | xz | zstd | none (dpkg-deb -Z)."""
    root = Path(root)
    tree = make_tuxpaint_tree(root / "pkg")
    (tree / "DEBIAN").mkdir(exist_ok=True)
    (tree / "DEBIAN/control").write_text(
        "Package: tuxpaint-stamps-default\nVersion: 0.0-1\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: fake stamps for tests\n"
    )
    deb = root / "tuxpaint-stamps-default_0.0-1_all.deb"
    subprocess.run([shutil.which("dpkg-deb") or "dpkg-deb", "--build", f"-Z{compression}", str(tree), str(deb)],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return deb


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}`\n".encode()
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def pack_deb(tree: str | Path, deb: str | Path, links: dict[str, tuple[str, str]] | None = None,
             compression: str = "xz") -> Path:
    """Pack every file of ``tree`` (as ./<relative path>) into a .deb-like archive without dpkg: an ``ar``
    archive of debian-binary, control.tar.gz and data.tar.<compression> (gz | xz | bz2).

    links: extra data.tar members {member path: (kind, target)}, kind "sym" (symbolic link), "hard"
    (hard link to an earlier member) or "fifo" (target ignored): what a hostile package could hold.
    """
    tree, deb = Path(tree), Path(deb)

    def tar_bytes(mode: str, fill) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tar:
            fill(tar)
        return buf.getvalue()

    def data(tar: tarfile.TarFile) -> None:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=f"./{path.relative_to(tree).as_posix()}")
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = target
            tar.addfile(info)

    def control(tar: tarfile.TarFile) -> None:
        text = b"Package: tuxpaint-stamps-default\nVersion: 0.0-1\nArchitecture: all\n"
        info = tarfile.TarInfo("./control")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))

    deb.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
                    + _ar_member("control.tar.gz", tar_bytes("w:gz", control))
                    + _ar_member(f"data.tar.{compression}", tar_bytes(f"w:{compression}", data)))
    return deb


def embedded_images(page: str) -> list[tuple[int, int]]:
    """(display width, natural width) of every embedded image (PNG figures, JPEG thumbnails) of a page."""
    found = re.findall(r'<img src="data:image/(?:png|jpeg);base64,([^"]+)"([^>]*)>', page)
    out = []
    for data, attrs in found:
        width = re.search(r'width="(\d+)"', attrs)
        assert width, "an embedded image without a display width"
        out.append((int(width.group(1)), Image.open(io.BytesIO(base64.b64decode(data))).width))
    return out
