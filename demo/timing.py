"""How long ``make install`` and ``make demo`` took, recorded by the Makefile for the README.

    python -m demo.timing start --config configs/demo.toml    # before the demo's first step
    python -m demo.timing stop --config configs/demo.toml     # after its last step
    python -m demo.timing install                             # at the end of the install step

``stop`` writes ``<analyze.out>/demo-timing.json`` (wall seconds, CPU cores, load average) only
when this demo computed the whole pipeline (the run's aligned entries and the extracted
entries are newer than ``start``): a rerun that reuses the cache keeps the record of the last
full run. ``install`` writes ``.venv/install-timing.json`` (seconds since ``build/install-start``,
which the Makefile writes first, and the size of ``.venv``). ``demo.numbers`` reads both.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pipeline.cache import CacheError, find_entry, list_splits
from pipeline.config import PipelineConfig, load_config
from pipeline.runs import aligned_name
from pipeline.runtime import cpu_count, utc_now, write_json

INSTALL_START = Path("build/install-start")  # written by the Makefile's install step (date +%s)
INSTALL_RECORD = Path(".venv/install-timing.json")


def demo_record(cfg: PipelineConfig) -> Path:
    return Path(cfg.analyze.out) / "demo-timing.json"


def _start_file(cfg: PipelineConfig) -> Path:
    return Path(cfg.analyze.out) / ".demo-start"


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (links not followed)."""
    return sum(p.lstat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def computed_since(cfg: PipelineConfig, start: float) -> bool:
    """True when every entry the demo extracts or trains was written after ``start``."""
    tc = cfg.train
    names = [*cfg.extract.encoders, aligned_name(tc.image, tc.name), aligned_name(tc.text, tc.name)]
    splits = list_splits(cfg.data.cache, cfg.data.dataset, cfg.data.data_dir)
    try:
        mtimes = [find_entry(cfg.data.cache, cfg.data.dataset, s, n, cfg.data.data_dir).path.stat().st_mtime
                  for s in splits for n in names]
    except CacheError:  # a missing entry: not a full run
        return False
    return bool(mtimes) and min(mtimes) >= start


def start(cfg: PipelineConfig) -> None:
    path = _start_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(time.time()), encoding="utf-8")


def stop(cfg: PipelineConfig) -> Path | None:
    """Write the record of a full run (module docstring); None when the cache was reused."""
    began = float(_start_file(cfg).read_text(encoding="utf-8"))
    if not computed_since(cfg, began):
        print("demo timing: the cache was reused, so the record of the last full run is kept")
        return None
    doc = {"seconds": time.time() - began, "cpus": cpu_count(), "load_average": os.getloadavg()[0],
           "finished": utc_now(), "what": "make demo after make install: data preparation, extraction, training, "
           "analyze platonic, zeroshot, matching, report"}
    return write_json(demo_record(cfg), doc)


def install() -> Path:
    began = float(INSTALL_START.read_text(encoding="utf-8").strip())
    doc = {"seconds": time.time() - began, "venv_bytes": folder_bytes(INSTALL_RECORD.parent), "cpus": cpu_count(),
           "finished": utc_now()}
    return write_json(INSTALL_RECORD, doc)


def read(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("start", "stop", "install"))
    parser.add_argument("--config", default="configs/demo.toml",
                        help="The demo's config file. [default: configs/demo.toml]")
    args = parser.parse_args(argv)
    if args.step == "install":
        install()
        return
    cfg = load_config(args.config)
    start(cfg) if args.step == "start" else stop(cfg)


if __name__ == "__main__":
    main()
