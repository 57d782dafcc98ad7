"""Replay every known kind of bad input and stale or mismatched data, and count how many end in a clear
error, a correct recomputation or a documented skip.

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

# (kind of input, what the user gets, tests that replay it: "file::function" runs every parameter)
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
      "test_run_safety.py::test_pairs_leaves_out_a_run_whose_metrics_are_of_other_adapters"]),
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
    ("a missing caption column or empty captions", "hints name --set keys a user can type",
     ["test_datasets.py::test_missing_caption_column", "test_datasets.py::test_empty_captions_error_and_skip",
      "test_analyze_edges.py::test_messages_name_flags_and_config_keys"]),
    ("a bad analyze.kernel_rows", "the message names the key the user set",
     ["test_analyze_edges.py::test_bad_kernel_rows_names_the_key_the_user_set"]),
    ("an unreadable entry among those `analyze cka` compares", "fails naming the entry and --entries (pairs too)",
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

# Stale or mismatched data reused by the report, studies and training.
STALE_DATA = [
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

# Runs on hidden layers, re-extracted sources beside their aligned entries, labels.
SOURCES_AND_LABELS = [
    ("Platonic test of a run trained on hidden layers (before/controls on final features)",
     "before terms and controls use the layers the adapters read",
     ["test_evaluation.py::test_platonic_of_a_layer_run_compares_the_layers_it_read"]),
    ("source re-extracted with other settings, compared with its aligned entry", "refused: the aligned entry names its source's key",
     ["test_evaluation.py::test_platonic_of_a_layer_run_compares_the_layers_it_read"]),
    ("JSON null label read as a class called 'None'", "a missing label, named",
     ["test_evaluation.py::test_a_null_label_is_missing_not_a_class"]),
]

# Unsafe names, lost runs and numbers wrong with exit 0: one row per kind (numbered as they were
# found, 1-17), each replayed by its tests.
NAMES_RUNS_NUMBERS = [
    # 1
    ("split `../../victim/x` or `/abs` in metadata.jsonl / Karpathy JSON",
     "refused naming the row; nothing written or deleted outside the cache",
     ["test_safe_names.py::test_a_split_name_from_data_never_leaves_the_cache",
      "test_safe_names.py::test_safe_name_refuses_what_is_not_one_short_path_component",
      "test_safe_names.py::test_every_path_built_from_a_name_is_checked"]),
    # 2
    ("`fit-adapters --name good --set train.lr=inf` replacing the old run",
     "non-finite floats refused; a diverged retrain keeps the old run; broken runs left out",
     ["test_run_safety.py::test_a_diverging_retrain_leaves_the_previous_complete_run_untouched",
      "test_run_safety.py::test_non_finite_hyperparameters_are_refused_up_front",
      "test_run_safety.py::test_a_broken_run_folder_never_breaks_commands_about_other_runs",
      "test_run_safety.py::test_tampered_aligned_entry_is_refused_by_analyze",
      "test_run_safety.py::test_pairs_leaves_out_a_run_whose_metrics_are_of_other_adapters"]),
    # 3
    ("`<script>` in captions, names, labels copied into report/study.md",
     "escaped (analyze.markdown); inert as CommonMark",
     ["test_hostile_text.py::test_md_text_makes_user_text_inert_and_keeps_it_readable",
      "test_hostile_text.py::test_every_markdown_block_is_escaped",
      "test_hostile_text.py::test_study_md_escapes_axis_values_run_names_and_errors",
      "test_hostile_text.py::test_reports_and_figures_of_hostile_names_through_the_commands"]),
    # 4
    ("ties counted as retrieval hits (identical embeddings: R@1 1.0)",
     "ties count against the query everywhere; collapsed embeddings flagged",
     ["test_ties.py::test_fully_tied_inputs_score_at_the_floor_not_one",
      "test_ties.py::test_partial_ties_by_hand_with_several_captions",
      "test_ties.py::test_identical_rows_tie_exactly_whatever_their_position",
      "test_ties.py::test_zero_shot_uses_the_same_rule_and_exact_scores",
      "test_ties.py::test_gallery_lists_a_tied_wrong_item_first",
      "test_ties.py::test_collapsed_baselines_of_two_train_pairs_sit_at_chance",
      "test_ties.py::test_report_sentence_names_ties_and_collapsed_methods"]),
    # 5
    ("baselines of a fraction-trained run fitted on every train pair", "refitted on the run's own train pairs",
     ["test_run_inputs.py::test_matching_baselines_are_fitted_on_the_runs_train_pairs",
      "test_run_inputs.py::test_subset_pairs_is_the_rule_fit_adapters_uses",
      "test_run_inputs.py::test_a_run_whose_train_pairs_changed_is_refused"]),
    # 6
    ("a fixed temperature below 0.01 trained at 0.01", "used as given; a learnable one below the clamp refused",
     ["test_run_inputs.py::test_a_fixed_temperature_is_used_as_given"]),
    # 7
    ("Platonic verdicts from 3 rows, 1 resample, CIs past the range",
     "'too few rows', exact nulls, clipped intervals",
     ["test_platonic_small.py::test_three_rows_say_too_few_rows_with_an_exact_null",
      "test_platonic_small.py::test_exact_null_p_value_equals_the_share_of_all_pairings",
      "test_platonic_small.py::test_exact_permutations_are_every_other_pairing_once",
      "test_platonic_small.py::test_few_resamples_make_a_percentile_verdict_inconclusive",
      "test_platonic_small.py::test_intervals_never_leave_the_metrics_range",
      "test_platonic_small.py::test_clipper_clips_and_records"]),
    # 8
    ("constant features gave mutual kNN = 1.000", "marked: NaN with a reason (cka), inconclusive (platonic)",
     ["test_platonic_small.py::test_constant_features_are_degenerate_and_their_knn_graph_is_ties",
      "test_platonic_small.py::test_platonic_marks_a_constant_representation_inconclusive",
      "test_platonic_small.py::test_analyze_cka_marks_scores_of_a_constant_entry"]),
    # 9
    ("zero-shot classes 'big_cat' and 'big cat' (identical prompts)", "refused, naming both",
     ["test_data_checks.py::test_classes_with_the_same_display_name_are_refused_naming_both"]),
    # 10
    ("gallery showing captions edited after extraction", "refused as stale (fingerprint, image content)",
     ["test_data_checks.py::test_the_gallery_refuses_data_edited_after_extraction"]),
    # 11
    ("duplicate images under different ids", "warned at extraction; analyze.duplicates = drop | keep",
     ["test_data_checks.py::test_duplicate_images_are_warned_at_extraction_and_dropped_or_kept"]),
    # 12
    ("a failed model load (NAME.weights) blocking the corrected request", "staging made once the model loaded",
     ["test_extract.py::test_a_failed_model_load_leaves_no_staging_so_the_fix_is_not_refused"]),
    # 13
    ("study axis values refused only when their cell ran; a study of failed cells exited 0",
     "every cell's config checked before the first cell; exit 1 when cells failed",
     ["test_study.py::test_every_cell_is_checked_before_the_first_cell_runs",
      "test_study.py::test_a_study_with_failed_cells_exits_non_zero_with_its_summary_written"]),
    # 14
    ("`$\\undefinedmacro$`, `cat $5 and $` in labels and names as mathtext",
     "drawn literally by every figure writer",
     ["test_hostile_text.py::test_every_function_that_creates_a_figure_draws_text_literally",
      "test_hostile_text.py::test_figure_writers_draw_hostile_labels_literally",
      "test_hostile_text.py::test_reports_and_figures_of_hostile_names_through_the_commands"]),
    # 15
    ("matching --seeds >= rows; a stored null crashing the report", "one line before work; null read as n/a",
     ["test_data_checks.py::test_matching_seeds_leaving_nothing_to_match_are_one_line",
      "test_data_checks.py::test_the_report_reads_a_stored_null_accuracy"]),
    # 16
    ("identical captions, 1-image train split: ValueError, baselines",
     "one line before training; tokenizer merges warned",
     ["test_run_inputs.py::test_identical_captions_are_one_line_before_training",
      "test_run_inputs.py::test_too_few_train_images_are_refused_before_training",
      "test_run_inputs.py::test_a_one_image_train_split_is_refused",
      "test_run_inputs.py::test_a_baseline_that_maps_rows_to_zero_is_left_out_with_a_warning",
      "test_data_checks.py::test_captions_made_identical_by_the_tokenizer_are_warned"]),
    # 17
    ("tracebacks: --seeds inf, `{}}`, long names, /dev/null, bad weights",
     "one line naming the value, file or folder",
     ["test_one_line_errors.py::test_non_finite_seeds_are_one_line_errors",
      "test_one_line_errors.py::test_a_template_with_a_lone_brace_is_one_line_before_any_work",
      "test_one_line_errors.py::test_weights_that_are_not_a_checkpoint_are_one_line_naming_the_file",
      "test_safe_names.py::test_names_too_long_for_a_file_are_one_line_errors_before_any_work",
      "test_safe_names.py::test_a_folder_that_cannot_be_written_is_one_line_naming_it"]),
]

# Curated training subsets and the sigmoid loss (docs/curation.md).
CURATION = [
    ("train.loss = sigmoid with a one-directional loss_direction, or sigmoid_scale outside [1, 100]",
     "one line before any work, saying why and the fix",
     ["test_sigmoid_loss.py::test_pair_loss_builds_the_sigmoid_loss_and_refuses_a_direction"]),
    ("a concept list with blank lines or repeated names", "refused, naming the lines",
     ["test_curate.py::test_read_concepts_refuses_blank_lines_and_repeats",
      "test_curate.py::test_bad_command_lines_are_one_line"]),
    ("concepts that no pool pair matches", "listed under the coverage table's answer; none at all: one line",
     ["test_curate.py::test_curate_assigns_each_pair_its_concept_and_reports_the_unmatched",
      "test_curate.py::test_the_command_writes_subset_and_figure_and_fit_adapters_trains_on_it"]),
    ("train.subset ids not in the train split, a subset of another dataset or split, a malformed line",
     "refused before training, naming the ids, the dataset or the line",
     ["test_subset.py::test_ids_not_in_the_train_split_are_named",
      "test_subset.py::test_a_subset_of_another_dataset_or_split_is_refused",
      "test_subset.py::test_bad_subset_files_are_refused_naming_the_line"]),
    ("baselines of a train.subset run fitted on every train pair; its subset file edited later",
     "refitted on the run's copy of the subset; an edited copy refused",
     ["test_subset.py::test_a_run_trains_on_exactly_the_listed_pairs",
      "test_subset.py::test_an_edited_copy_is_refused_at_evaluation"]),
]

# Caption languages and the numpy / GGUF text encoders (docs/languages.md).
LANGUAGES = [
    ("a caption language the data does not have; pt_BR vs pt-br", "one line naming the languages present with "
     "coverage; codes normalised (one language)",
     ["test_languages.py::test_codes_are_normalised",
      "test_languages.py::test_imagefolder_reads_caption_columns_and_coverage"]),
    ("text entries of two languages joined", "refused like two caption policies",
     ["test_languages.py::test_language_entries_keep_default_keys_and_join_with_images"]),
    ("zero-shot in a language without templates or class names", "refused; never English templates in disguise",
     ["test_languages_eval.py::test_english_run_evaluated_per_language"]),
    ("a truncated GGUF file; a numpy-only encoder asked for --layers all", "one line naming the file / the encoder",
     ["test_decoder_encoders.py::test_truncated_gguf_is_one_line",
      "test_numpy_encoders.py::test_extract_resume_and_layers_all_refused",
      "test_numpy_encoders.py::test_tiny_numpy_encoder_batches_equal_single_rows"]),
]

# Token features and token projectors (docs/tokens.md).
TOKENS = [
    ("--tokens for an encoder without token output (CLIP towers)", "refused before any work, naming the encoder",
     ["test_tokens_extract.py::test_refusals_before_anything_is_written"]),
    ("--tokens all whose estimated size exceeds extract.max_token_bytes", "the size printed, then refused with the "
     "--set to raise it; nothing staged", ["test_tokens_extract.py::test_refusals_before_anything_is_written",
                                          "test_tokens_extract.py::test_cli_prints_the_estimate_and_the_token_count"]),
    ("--tokens grid:0 / --tokens with --layers all", "one line naming the forms / the conflict",
     ["test_tokens_extract.py::test_token_modes_parse", "test_tokens_extract.py::test_refusals_before_anything_is_written"]),
    ("a pooled entry reused for a token request (and token chunks mixed with pooled ones)",
     "stale entry naming tokens; --force recomputes", ["test_tokens_extract.py::test_a_pooled_entry_is_stale_for_a_token_request",
                                                      "test_cache.py::test_token_chunks_must_match_their_rows"]),
    ("a changed byte in stored tokens", "DamagedEntryError for the rows it covers",
     ["test_cache.py::test_damaged_tokens_are_refused"]),
    ("train.adapter = token on a pooled entry (tokens read from a pooled entry)",
     "one line naming the `extract --tokens` command", ["test_tokens_train.py::test_bad_inputs_are_refused",
                                                        "test_tokens_extract.py::test_pooled_entries_refuse_token_reads"]),
    ("train.token typo / patch on unequal widths / patch of an identity projector", "one line naming the key and the fix",
     ["test_tokens_train.py::test_bad_inputs_are_refused"]),
]

# Messages and figures that must stay clear (not bad input).
MESSAGES = [
    ("`analyze pairs` with too few runs for a rank correlation", "says what is missing",
     ["test_analyze_edges.py::test_pairs_says_what_is_missing_for_a_rank_correlation"]),
    ("long heatmap titles", "wrapped to the figure",
     ["test_analyze_edges.py::test_long_titles_are_wrapped_to_fit_their_figure"]),
    ("COCO Karpathy restval as training data", "--set data.options.restval=train",
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
    groups = (("kinds of bad input", KINDS), ("kinds of stale or mismatched data", STALE_DATA),
              ("kinds of layer runs, re-extracted sources and labels", SOURCES_AND_LABELS),
              ("kinds of unsafe names, lost runs and wrong numbers", NAMES_RUNS_NUMBERS),
              ("kinds of bad curation, subset and loss input", CURATION),
              ("kinds of bad token input", TOKENS),
              ("kinds of bad language and text-encoder input", LANGUAGES),
              ("messages and figures", MESSAGES))
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
        print(f"{'':3} {'kind':<68} {'cases':>5}  what the user gets")
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
