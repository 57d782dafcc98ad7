"""Replay every bad-input kind found by the adversarial review (issue "No silent wrong data") and count
how many now end in a clear error, a correct recomputation or a documented skip.

Each kind is replayed by one or more tests (generated data, tiny encoders, the real CLIs where the
user would type a command); a kind counts as handled when all of its tests pass. The script runs
those tests in one pytest call and prints one row per kind:

    .venv/bin/python benchmarks/bad_inputs.py [-- extra pytest args]
    .venv/bin/python benchmarks/bad_inputs.py --quick    # only checks that every replay test exists

Exit status 1 when any kind is not handled, so it can gate a release. --quick collects the replay
tests without running them (the test suite runs them anyway) and fails when one is missing, e.g.
renamed: the table then says which kind lost its replay.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (kind as found, what the user gets now, tests that replay it: "file::function" runs every parameter)
KINDS = [
    ("images replaced under the same names", "stale entry, naming the first changed ids",
     ["test_integrity.py::test_changed_images_make_the_entry_stale_naming_them"]),
    ("--data-dir pointed at a copy with other images", "entries of their own (data folder + content in the key)",
     ["test_integrity.py::test_other_data_folder_gets_its_own_entries"]),
    ("two datasets of one format in one cache, joined", "a folder per dataset; joins refuse, naming both",
     ["test_integrity.py::test_two_datasets_of_one_format_never_mix",
      "test_integrity.py::test_aligned_entries_carry_their_source_data"]),
    ("a lost Zarr chunk (features or ids)", "DamagedEntryError naming the entry and `extract --repair`",
     ["test_integrity.py::test_lost_zarr_chunk_is_an_error_not_zeros"]),
    ("a flipped byte or a truncated HDF5 entry", "DamagedEntryError (per-block checksums)",
     ["test_integrity.py::test_flipped_h5_byte_is_an_error", "test_integrity.py::test_truncated_entry_is_damaged"]),
    ("`extract --force` racing another request", "staging keyed by request; the discarded writer stops cleanly",
     ["test_integrity.py::test_racing_force_with_another_request_never_mixes",
      "test_integrity.py::test_staging_is_keyed_by_request_and_a_discarded_writer_stops"]),
    ("kill -9 during fit-adapters reusing a run name", "the old run or the new one, never a mix",
     ["test_run_safety.py::test_kill_9_during_fit_adapters_never_leaves_a_mixed_run",
      "test_run_safety.py::test_failure_at_any_write_leaves_the_old_run",
      "test_run_safety.py::test_load_run_refuses_a_folder_that_mixes_trainings"]),
    ("aligned entries of another training used by analyze", "refused: adapter hash differs from the run's",
     ["test_run_safety.py::test_tampered_aligned_entry_is_refused_by_analyze",
      "test_run_safety.py::test_aligned_entry_without_its_run_folder_is_refused",
      "test_run_safety.py::test_pairs_refuses_a_run_whose_metrics_are_of_other_adapters"]),
    ("corrupt / truncated / empty / decompression-bomb image in a worker", "the one-line ImageError of --workers 0",
     ["test_extract.py::test_broken_image_in_a_worker_is_one_line_on_the_cli",
      "test_extract.py::test_corrupt_image_errors_or_is_skipped_and_recorded"]),
    ("--set extract.device=tpu", "one line naming the choices, before any work",
     ["test_extract.py::test_bad_extract_values_are_refused_before_any_work"]),
    ("--set train.adapter=cnn (or train.device=tpu)", "one line naming the choices, before any work",
     ["test_train.py::test_cli_bad_names_in_config_are_one_line_errors_before_any_work"]),
    ("--set extract.precision=fp64 leaving a staging manifest", "refused before anything is written",
     ["test_extract.py::test_bad_extract_values_are_refused_before_any_work",
      "test_extract.py::test_values_set_in_code_are_checked_too"]),
    ("orphan .partial after a kill during finalisation", "removed on rerun, or reported",
     ["test_integrity.py::test_orphans_of_killed_writers_are_removed_or_reported"]),
    ("`#` in an image file name", "refused when the dataset is loaded, naming the file",
     ["test_datasets.py::test_imagefolder_refuses_hash_in_file_names"]),
    ("hints naming library arguments (caption_column=, on_empty='skip')", "hints name --set keys a user can type",
     ["test_datasets.py::test_missing_caption_column", "test_datasets.py::test_empty_captions_error_and_skip",
      "test_analyze_edges.py::test_messages_name_flags_and_config_keys"]),
    ("bad analyze.kernel_rows reported as max_rows", "the message names the key the user set",
     ["test_analyze_edges.py::test_bad_kernel_rows_names_the_key_the_user_set"]),
    ("`analyze cka` dropping an unreadable entry with a warning", "fails naming the entry and --entries (pairs too)",
     ["test_integrity.py::test_analyze_refuses_an_unreadable_entry"]),
    ("symlink / hard link / device inside the Tux Paint .deb", "refused",
     ["test_tuxpaint.py::test_deb_with_link_or_device_stamp_is_refused",
      "test_tuxpaint.py::test_deb_member_leaving_the_package_is_refused",
      "test_tuxpaint.py::test_unpacked_tree_with_symlinked_caption_is_refused"]),
    ("HDF5 external storage / links / virtual datasets (and Zarr symlinks)", "refused: entries hold plain data only",
     ["test_integrity.py::test_h5_external_storage_and_links_are_refused",
      "test_integrity.py::test_zarr_symlinks_are_refused"]),
    ("mutual-kNN fast path on tied (duplicate) captions", "equals the library metric; no slow fallback",
     ["test_knn_ties.py::test_mutual_knn_fast_path_equals_the_library_on_duplicate_rows",
      "test_knn_ties.py::test_no_fallback_and_identical_test_results_on_duplicate_rows"]),
    ("CLIP checkpoint whose projection size differs from the spec", "EncoderSpecError naming both sizes",
     ["test_encoder_specs.py::test_clip_tower_with_another_projection_size_is_refused"]),
]

# Found by a second adversarial pass (after the first 21 were fixed): stale or mismatched data reused.
SECOND_PASS = [
    ("an entry in both h5 and zarr (the stale copy read first)", "extract refuses or, with --force, replaces; readers refuse two",
     ["test_integrity.py::test_an_entry_never_lives_in_two_formats"]),
    ("study cells and runs reused after the data were re-extracted", "cells run again; runs retrain on new train entries",
     ["test_study.py::test_a_study_notices_changed_data_and_mismatched_requests"]),
    ("study axis over data.captions reading the first cell's entries", "the cell fails with the stale-entry error",
     ["test_study.py::test_a_study_notices_changed_data_and_mismatched_requests"]),
    ("fit-adapters with data.captions other than the entries'", "refused, naming both policies and the fix",
     ["test_integrity.py::test_training_refuses_text_entries_of_another_caption_policy"]),
    ("report showing matching/zero-shot results of older features/labels", "'Not available', naming the command",
     ["test_evaluation.py::test_zeroshot_matching_and_report_through_the_cli"]),
    ("saved outputs reused for another data folder; report in a 2-dataset cache",
     "outputs record their data folder; report reads the one configured",
     ["test_integrity.py::test_two_datasets_of_one_format_never_mix"]),
]

# Found by a third pass: runs on hidden layers, re-extracted sources, null labels.
THIRD_PASS = [
    ("Platonic test of a run trained on hidden layers (before/controls on final features)",
     "before terms and controls use the layers the adapters read",
     ["test_evaluation.py::test_platonic_of_a_layer_run_compares_the_layers_it_read"]),
    ("source re-extracted with other settings, compared with its aligned entry", "refused: the aligned entry names its source's key",
     ["test_evaluation.py::test_platonic_of_a_layer_run_compares_the_layers_it_read"]),
    ("JSON null label read as a class called 'None'", "a missing label, named",
     ["test_evaluation.py::test_a_null_label_is_missing_not_a_class"]),
]

# The review's other rough edges (not bad input, listed so that they stay fixed).
ROUGH_EDGES = [
    ("`analyze pairs` said 'needs >= 3 runs (found 11)'", "says what is missing",
     ["test_analyze_edges.py::test_pairs_says_what_is_missing_for_a_rank_correlation"]),
    ("heatmap titles cut off", "titles wrapped to the figure",
     ["test_analyze_edges.py::test_long_titles_are_wrapped_to_fit_their_figure"]),
    ("COCO Karpathy restval could not be trained on", "--set data.options.restval=train",
     ["test_end_to_end.py::test_coco_train_plus_restval_is_trained_on"]),
]


def _outcomes(report: Path) -> dict[str, list[bool]]:
    """'file::function' -> pass/fail of each of its test cases (parameters included)."""
    out: dict[str, list[bool]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        file = case.get("classname", "").rpartition(".")[2] + ".py"
        func = case.get("name", "").partition("[")[0]
        bad = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        out.setdefault(f"{file}::{func}", []).append(not bad and not skipped)
    return out


def _collected(nodes: list[str], extra: list[str]) -> dict[str, list[bool]]:
    """'file::function' -> [True] per collected case of the test files holding ``nodes`` (none run)."""
    files = sorted({n.partition("::")[0] for n in nodes})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files,
                          *extra], cwd=ROOT, capture_output=True, text=True)
    found: dict[str, list[bool]] = {}
    for line in out.stdout.splitlines():
        file, sep, func = line.partition("::")
        if sep and file.startswith("tests/"):
            found.setdefault(f"{Path(file).name}::{func.partition('[')[0]}", []).append(True)
    return found


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    extra = [a for a in argv if a not in ("--quick", "--")]
    groups = (("bad-input kinds", KINDS), ("second-pass findings", SECOND_PASS), ("third-pass findings", THIRD_PASS),
              ("other rough edges", ROUGH_EDGES))
    nodes = sorted({f"tests/{t}" for _, rows in groups for *_, tests in rows for t in tests})
    start = time.perf_counter()
    if quick:
        results = _collected(nodes, extra)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.xml"
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                            *nodes, *extra], cwd=ROOT, stdout=subprocess.DEVNULL)
            results = _outcomes(report)
    seconds = time.perf_counter() - start
    failed = 0
    for title, rows in groups:
        print(f"\n{title}")
        print(f"{'':3} {'kind':<68} {'cases':>5}  now")
        ok = 0
        for i, (kind, now, tests) in enumerate(rows, 1):
            cases = [r for t in tests for r in results.get(t, [False])]
            good = all(cases)
            ok += good
            if quick:
                now = "replay tests found (not run: --quick)" if good else "MISSING: a replay test is not in tests/"
            elif not good:
                now = "NOT HANDLED: a replay test failed"
            print(f"{i:>2}. {kind:<68} {len(cases):>5}  {now}")
        print(f"{ok} of {len(rows)} {title} " + ("have their replay tests" if quick else
                                                  f"handled; {len(rows) - ok} silent or failing"))
        failed += len(rows) - ok
    print(f"\n{len(nodes)} replay tests {'collected' if quick else 'run'} in {seconds:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
