"""Tests for demo.tuxpaint: the Tux Paint stamps (a Debian package) turned into an imagefolder dataset."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from demo import tuxpaint
from extract.datasets import DatasetError, load_split
from tests.fixtures import TUXPAINT_FAKE_CAPTIONS, make_tuxpaint_deb, make_tuxpaint_tree, pack_deb

REAL_DEB = Path(os.environ.get("TUXPAINT_DEB", "/tmp/tux/tuxpaint-stamps-default_2022.06.04-1_all.deb"))
STAMPS = "./usr/share/tuxpaint/stamps"  # the stamps folder as a .deb member path



def test_read_description(tmp_path):
    cases = {
        "plain": (b"A cat.\nfr.utf8=Un chat.\n", ("A cat.", False)),
        "comment": (b"# c\n\n  An   owl. \n", ("An owl.", False)),
        "bom": ("\ufeffA b\u00e9e.\n".encode(), ("A b\u00e9e.", False)),
        "latin1": ("A cr\u00e8me.\n".encode("latin-1"), ("A cr\u00e8me.", True)),
        "no_english": (b"\nfr.utf8=Un arbre.\n", (None, False)),
        "empty": (b"", (None, False)),
        "calc": (b"A calculator.  6x7=42\n", ("A calculator. 6x7=42", False)),
    }
    for name, (data, want) in cases.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
        assert tuxpaint.read_description(tmp_path / f"{name}.txt") == want, name


def test_prepare_tuxpaint_fake_tree(tmp_path, caplog):
    tree = make_tuxpaint_tree(tmp_path / "tree")
    out = tuxpaint.prepare_tuxpaint(tree, tmp_path / "out", seed=0, fractions=(0.5, 0.25, 0.25), size=16)
    summary = tuxpaint.read_summary(out)
    assert summary["pairs"] == 4 and summary["distinct_captions"] == 4
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1}
    assert summary["skipped"] == {
        "excluded category (symbols/)": 1,
        "mirror copy without txt (NAME_mirror.png)": 1,
        "no English line in txt": 1,
        "no txt": 1,
        "txt read as Latin-1 (not UTF-8)": 1,
    }
    got = {}
    for split in ("train", "val", "test"):
        s = load_split("imagefolder", out, split)
        for i, it in enumerate(s.items):
            got[it.id] = it.captions
            img = s.load_image(i)
            assert img.size[0] == img.size[1] <= 16
    assert got == {k: (v,) for k, v in TUXPAINT_FAKE_CAPTIONS.items()}
    car = Image.open(next(out.glob("*/vehicles/car.png")))
    assert car.size == (16, 16) and car.mode == "RGB"
    assert car.getpixel((0, 0)) == (255, 255, 255)  # transparent + padding -> white
    r, g, b = car.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60

    marker = out / tuxpaint.MARKER
    mtime = marker.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="demo.tuxpaint"):
        assert tuxpaint.prepare_tuxpaint(tree, out, seed=0, fractions=(0.5, 0.25, 0.25), size=16) == out
    assert marker.stat().st_mtime_ns == mtime and "up to date" in caplog.text
    tuxpaint.prepare_tuxpaint(tree, out, seed=0, fractions=(0.5, 0.25, 0.25), size=12)  # new parameters: rebuilt
    assert Image.open(next(out.glob("*/vehicles/car.png"))).size == (12, 12)
    assert json.loads(marker.read_text())["params"]["size"] == 12


def test_tuxpaint_split_is_deterministic_and_seeded():
    rels = [f"cat/{i}" for i in range(200)]
    a = tuxpaint._assign_splits(rels, 0, (0.7, 0.1, 0.2))
    assert a == tuxpaint._assign_splits(list(reversed(rels)), 0, (0.7, 0.1, 0.2))
    assert sorted(list(a.values()).count(s) for s in ("train", "val", "test")) == [20, 40, 140]
    assert a != tuxpaint._assign_splits(rels, 1, (0.7, 0.1, 0.2))


def test_tuxpaint_refuses_foreign_folder_and_bad_args(tmp_path):
    tree = make_tuxpaint_tree(tmp_path / "tree")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and holds no"):
        tuxpaint.prepare_tuxpaint(tree, tmp_path / "busy")
    with pytest.raises(DatasetError, match="summing to 1"):
        tuxpaint.prepare_tuxpaint(tree, tmp_path / "o", fractions=(0.5, 0.5, 0.5))
    with pytest.raises(DatasetError, match="no Tux Paint stamps"):
        tuxpaint.prepare_tuxpaint(tmp_path / "busy", tmp_path / "o")


def test_old_module_path_still_runs_the_preparation(tmp_path):
    """`python -m extract.tuxpaint` (the documented command before demo/ existed) forwards to demo.tuxpaint."""
    deb = make_tuxpaint_deb(tmp_path)
    res = subprocess.run([sys.executable, "-m", "extract.tuxpaint", str(deb), str(tmp_path / "out"), "--size", "8"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "moved to `python -m demo.tuxpaint`" in res.stderr, res.stderr
    assert json.loads(res.stdout)["pairs"] == 4


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_prepare_tuxpaint_from_deb_and_cli(tmp_path, capsys):
    deb = make_tuxpaint_deb(tmp_path)
    assert tuxpaint.fetch_tuxpaint_deb(tmp_path) == deb  # already there: no download
    assert tuxpaint.main([str(deb), str(tmp_path / "out"), "--size", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 4 and sum(summary["splits"].values()) == 4
    assert json.loads((tmp_path / "out" / tuxpaint.MARKER).read_text())["source"]["kind"] == "deb"
    assert tuxpaint.main([str(tmp_path / "missing.deb"), str(tmp_path / "o2")]) == 2


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("zstd") is None, reason="needs dpkg-deb and zstd")
@pytest.mark.parametrize("compression", ["xz", "zstd", "none"])
def test_prepare_tuxpaint_from_dpkg_built_debs(tmp_path, compression):
    deb = make_tuxpaint_deb(tmp_path, compression=compression)
    assert tuxpaint.read_summary(tuxpaint.prepare_tuxpaint(deb, tmp_path / "out", size=8))["pairs"] == 4


@pytest.mark.parametrize("compression", ["gz", "xz", "bz2"])
def test_prepare_tuxpaint_reads_deb_without_dpkg(tmp_path, compression):
    deb = pack_deb(make_tuxpaint_tree(tmp_path / "tree"), tmp_path / "pkg.deb", compression=compression)
    out = tuxpaint.prepare_tuxpaint(deb, tmp_path / "out", fractions=(0.5, 0.25, 0.25), size=8)
    captions = {it.id: it.captions for s in ("train", "val", "test") for it in load_split("imagefolder", out, s).items}
    assert captions == {k: (v,) for k, v in TUXPAINT_FAKE_CAPTIONS.items()}
    assert tuxpaint.read_summary(out)["skipped"]["txt read as Latin-1 (not UTF-8)"] == 1


@pytest.mark.parametrize("kind,target,what", [
    ("sym", "/etc/hostname", "a symbolic link to '/etc/hostname'"),
    ("sym", "../../../../../../etc/hostname", "a symbolic link"),
    ("hard", f"{STAMPS}/animals/cat.txt", "a hard link"),
    ("fifo", "", "a device, FIFO or other special file"),
])
def test_deb_with_link_or_device_stamp_is_refused(tmp_path, kind, target, what):
    tree = make_tuxpaint_tree(tmp_path / "tree")
    Image.new("RGB", (8, 8)).save(tree / "usr/share/tuxpaint/stamps/animals/dog.png")
    deb = pack_deb(tree, tmp_path / "evil.deb", links={f"{STAMPS}/animals/dog.txt": (kind, target)})
    with pytest.raises(DatasetError, match=rf"stamp file usr/share/tuxpaint/stamps/animals/dog\.txt is {what}.*refusing"):
        tuxpaint.prepare_tuxpaint(deb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_deb_links_outside_the_stamps_are_ignored(tmp_path):
    deb = pack_deb(make_tuxpaint_tree(tmp_path / "tree"), tmp_path / "pkg.deb",
                   links={"./usr/share/doc/tuxpaint-stamps-default/changelog.gz": ("sym", "/etc/hostname"),
                          f"{STAMPS}/animals/cat.ogg": ("sym", "/etc/hostname")})
    assert tuxpaint.read_summary(tuxpaint.prepare_tuxpaint(deb, tmp_path / "out", size=8))["pairs"] == 4


def test_deb_member_leaving_the_package_is_refused(tmp_path):
    tree = make_tuxpaint_tree(tmp_path / "tree")
    deb = pack_deb(tree, tmp_path / "evil.deb", links={f"{STAMPS}/../../../../../tmp/x.txt": ("sym", "/etc/hostname")})
    with pytest.raises(DatasetError, match=r"points outside the package"):
        tuxpaint.prepare_tuxpaint(deb, tmp_path / "out")


def test_unpacked_tree_with_symlinked_caption_is_refused(tmp_path):
    tree = make_tuxpaint_tree(tmp_path / "tree")
    (tmp_path / "secret.txt").write_text("A secret.\n")
    stamps = tree / "usr/share/tuxpaint/stamps"
    Image.new("RGB", (8, 8)).save(stamps / "animals/dog.png")
    (stamps / "animals/dog.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(DatasetError, match=r"dog\.txt is a symbolic link .*refusing"):
        tuxpaint.prepare_tuxpaint(tree, tmp_path / "out")


def test_not_a_deb(tmp_path):
    (tmp_path / "x.deb").write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(DatasetError, match=r"not a Debian package"):
        tuxpaint.prepare_tuxpaint(tmp_path / "x.deb", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DEB.is_file(), reason=f"real .deb not at {REAL_DEB} (set TUXPAINT_DEB)")
def test_prepare_tuxpaint_real_deb(tmp_path):
    out = tuxpaint.prepare_tuxpaint(REAL_DEB, tmp_path / "tux")
    summary = tuxpaint.read_summary(out)
    assert summary["pairs"] == 538 and summary["distinct_captions"] == 498
    assert summary["splits"] == {"train": 377, "val": 53, "test": 108}
    s = load_split("imagefolder", out, "test")
    assert len(s) == summary["splits"]["test"] and s.load_image(0).size == (256, 256)
