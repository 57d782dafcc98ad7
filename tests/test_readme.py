"""The README stays a first screen and cannot go stale: size, links, the generated number blocks
(``demo.numbers``), and no development-history wording anywhere in the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from demo import numbers

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300
# wording about how the code came to be, not what it does
HISTORY = re.compile(r"(second|third|fourth|fifth)[- ]pass|pass findings|bad-input kinds|this session|"
                     r"adversarial review|rough edges|\(issue \d+|issue #\d+", re.I)
SCANNED = ("*.py", "*.md", "*.toml", "*.cfg", "Makefile", ".ci/run")


def test_readme_is_a_first_screen_with_the_commands_and_links_that_exist():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES
    first = "\n".join(lines[:25])
    for command in ("make demo", "make test", "make study"):
        assert command in first, command
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / link).exists(), link
    names = [m.group(2) for m in numbers.MARK.finditer(text)]
    assert {"demo-time", "demo-results"} <= set(names)


def test_every_block_names_a_renderer_and_the_files_have_no_stray_markers():
    for rel in numbers.FILES:
        text = (ROOT / rel).read_text(encoding="utf-8")
        blocks = [m.group(2) for m in numbers.MARK.finditer(text)]
        assert all(b in numbers.BLOCKS for b in blocks), rel
        assert text.count("<!-- numbers:") == len(blocks) == text.count("<!-- /numbers:"), rel


def test_numbers_compare_to_the_last_digit_shown():
    assert numbers.same_numbers("mean 0.468 (0.451 to 0.485), 1,234 rows", "mean 0.4685 (0.451 to 0.485), 1,234 rows")
    assert numbers.same_numbers("0.468", "0.469")  # half a digit of slack for another machine's rounding
    assert not numbers.same_numbers("0.468", "0.471")
    assert not numbers.same_numbers("0.468 rows", "0.468 images")


def _demo_files(tmp: Path, monkeypatch) -> None:
    """The files demo.numbers reads, made by hand for a run 'demo' (paths of configs/demo.toml)."""
    monkeypatch.chdir(tmp)
    run = tmp / "cache/demo/runs/demo"
    run.mkdir(parents=True)
    rec = {"i2t_R@1": 0.25, "i2t_R@5": 0.5, "i2t_R@10": 0.625, "t2i_R@1": 0.25, "t2i_R@5": 0.5, "t2i_R@10": 0.75,
           "mean_R": 0.479, "rsum": 287.5}
    (run / "metrics.json").write_text(json.dumps({
        "run": "demo", "best_epoch": 3, "test": {"infonce": rec, "cca": rec, "procrustes": rec},
        "sizes": {s: {"pairs": n, "image": n, "text": n} for s, n in (("train", 40), ("val", 8), ("test", 16))}}))
    out = tmp / "reports/demo/imagefolder/test/runs/demo"
    out.mkdir(parents=True)
    term = {"score": 0.5, "ci_lo": 0.4, "ci_hi": 0.6, "null_q95": 0.1}
    delta = {"delta": 0.1, "ci_lo": 0.05, "ci_hi": 0.15, "verdict": "supported", "beats_controls": None}
    (out / "platonic.json").write_text(json.dumps({
        "n": 16, "bootstrap": 10, "permutations": 10, "entries": {"reference": "ref", "image": "x", "text": "y"},
        "results": {"cka": {"terms": {t: term for t in ("before_image", "before_text", "after_image", "after_text")},
                            "delta": {"image": delta, "text": delta}}}}))
    zs = {"top1": 0.3, "top5": 0.6, "balanced": 0.25}
    (out / "zeroshot.json").write_text(json.dumps({
        "n": 16, "classes": ["a", "b"], "templates": ["a photo of a {}."], "results": {"adapters": zs, "cca": zs},
        "chance": {"top1": 0.5, "top5": 1.0, "balanced": 0.5, "majority": 0.5}}))


def test_blocks_are_rewritten_from_the_files_and_a_stale_one_is_found(tmp_path, monkeypatch):
    _demo_files(tmp_path, monkeypatch)
    cfg = numbers.load_config(ROOT / numbers.DEMO_CONFIG)
    text = "intro\n<!-- numbers: demo-results -->\nold 1.0\n<!-- /numbers: demo-results -->\n" \
           "<!-- numbers: demo-time -->\nkept\n<!-- /numbers: demo-time -->\n"
    new, stale, skipped = numbers.regenerate(text, cfg)
    assert stale == ["demo-results"] and skipped[0].startswith("demo-time")  # no timing record: left as it is
    assert "**Supported: 2 of 2 metric × side tests" in new and "| trained adapters | 0.479 |" in new
    assert "kept" in new and new.startswith("intro\n")
    again, stale, _ = numbers.regenerate(new, cfg, check=True)
    assert again == new and stale == []


def test_the_readme_and_docs_match_the_demo_run_when_there_is_one():
    """After `make demo` (and `make study`) the quoted numbers are those of the run's files."""
    cfg = numbers.load_config(ROOT / numbers.DEMO_CONFIG)
    if not (ROOT / cfg.analyze.out).is_dir():
        pytest.skip("no demo run here (make demo writes reports/demo)")
    import os

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        for rel in numbers.FILES:
            _, stale, _ = numbers.regenerate((ROOT / rel).read_text(encoding="utf-8"), cfg, check=True)
            assert not stale, f"{rel}: {stale} differ from the demo's files: run `make readme-numbers`"
    finally:
        os.chdir(here)


def _scanned_files():
    for pattern in SCANNED:
        for path in ROOT.glob(pattern) if "/" in pattern else ROOT.rglob(pattern):
            rel = path.relative_to(ROOT)
            if rel.parts[0] not in (".venv", "data", "cache", "reports", "build", ".git") and path.is_file():
                yield rel


def test_no_development_history_wording():
    found = [f"{rel}:{i}: {line.strip()[:90]}" for rel in _scanned_files() if rel.name != "test_readme.py"
             for i, line in enumerate((ROOT / rel).read_text(encoding="utf-8").splitlines(), 1) if HISTORY.search(line)]
    assert not found, "\n".join(found)
