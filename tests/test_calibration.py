"""calibrate: hand-computed thresholds, p-values and calibrated scores, ties, threshold = max."""

from __future__ import annotations

import numpy as np
import pytest

from analyze.calibration import CalibrationError, calibrate, calibrate_array, threshold_rank
from analyze.metrics import calibrate as calibrate_from_metrics
from pipeline.errors import PipelineError


def test_reachable_from_analyze_metrics():
    assert calibrate_from_metrics is calibrate


def test_hand_computed_values():
    # K = 19 null scores 0.01..0.19, observed 0.6: rank ceil(0.95 * 20) = 19 -> the 19th smallest of the
    # 20 values {0.01, ..., 0.19, 0.6} is 0.19; p = (1 + 0) / 20; calibrated = (0.6 - 0.19) / (1 - 0.19)
    null = np.arange(1, 20) / 100
    c = calibrate(0.6, null)
    assert threshold_rank(19, 0.05) == 19
    assert c.score == 0.6 and c.threshold == pytest.approx(0.19)
    assert c.p_value == pytest.approx(1 / 20)
    assert c.calibrated == pytest.approx(0.41 / 0.81)
    # observed inside the null: 0.105 has 9 null values >= it (0.11..0.19) -> p = 10/20; the 19th smallest of
    # {0.01, ..., 0.10, 0.105, 0.11, ..., 0.19} is 0.18 (the observed value shifts the order) -> calibrated 0
    c = calibrate(0.105, null)
    assert c.p_value == pytest.approx(10 / 20) and c.threshold == pytest.approx(0.18) and c.calibrated == 0.0


def test_small_k_and_alpha():
    # K = 3, alpha = 0.25: rank ceil(0.75 * 4) = 3 of {0.1, 0.2, 0.3, 0.5} -> 0.3
    c = calibrate(0.5, [0.3, 0.1, 0.2], alpha=0.25)
    assert (c.threshold, c.p_value) == (pytest.approx(0.3), pytest.approx(0.25))
    assert c.calibrated == pytest.approx(0.2 / 0.7)
    # K = 3, alpha = 0.05: rank ceil(0.95 * 4) = 4 -> the maximum, i.e. the observed score itself
    c = calibrate(0.5, [0.3, 0.1, 0.2], alpha=0.05)
    assert c.threshold == 0.5 and c.calibrated == 0.0 and c.p_value == pytest.approx(0.25)


def test_ties_count_against_the_observed_score():
    # null {0.2, 0.5, 0.5, 0.5}, observed 0.5: three ties -> p = (1 + 3) / 5; rank ceil(0.8 * 5) = 4 of
    # {0.2, 0.5, 0.5, 0.5, 0.5} -> 0.5 = observed -> calibrated 0
    c = calibrate(0.5, [0.2, 0.5, 0.5, 0.5], alpha=0.2)
    assert c.p_value == pytest.approx(4 / 5) and c.threshold == 0.5 and c.calibrated == 0.0
    # ties below the observed score: null {0.3, 0.3, 0.3, 0.3}, observed 0.9, alpha 0.2 -> threshold 0.3
    c = calibrate(0.9, [0.3] * 4, alpha=0.2)
    assert c.threshold == 0.3 and c.p_value == pytest.approx(1 / 5) and c.calibrated == pytest.approx(0.6 / 0.7)
    # everything equal: threshold = observed, calibrated 0, p = 1
    c = calibrate(0.4, [0.4] * 9)
    assert (c.threshold, c.p_value, c.calibrated) == (0.4, 1.0, 0.0)


def test_threshold_at_or_above_max_value_gives_zero():
    c = calibrate(1.0, [1.0] * 19)  # a metric saturated at its maximum: no room above the null
    assert c.threshold == 1.0 and c.calibrated == 0.0
    c = calibrate(1.2, [1.1] * 19, max_value=1.0)  # threshold above max_value
    assert c.calibrated == 0.0
    c = calibrate(1.0, [0.0] * 19)  # the maximal score above a zero null -> 1
    assert c.calibrated == 1.0 and c.threshold == 0.0


def test_clipped_to_unit_interval_and_max_value():
    assert calibrate(2.0, [0.0] * 19, max_value=1.0).calibrated == 1.0
    assert calibrate(5.0, [1.0] * 19, max_value=9.0).calibrated == pytest.approx(4 / 8)


def test_array_version_equals_scalar_version():
    rng = np.random.default_rng(0)
    obs, null = rng.random((3, 4)), rng.random((29, 3, 4))
    out = calibrate_array(obs, null, alpha=0.1)
    for i in range(3):
        for j in range(4):
            c = calibrate(obs[i, j], null[:, i, j], alpha=0.1)
            assert (out["threshold"][i, j], out["p_value"][i, j], out["calibrated"][i, j]) == \
                (c.threshold, c.p_value, c.calibrated)


def test_no_null_gives_nan_and_bad_arguments_are_errors():
    c = calibrate(0.3, [])
    assert np.isnan(c.threshold) and np.isnan(c.p_value) and np.isnan(c.calibrated)
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.0}):
        with pytest.raises(CalibrationError, match="alpha"):
            calibrate(0.3, [0.1], **kwargs)
    with pytest.raises(PipelineError, match="NaN"):
        calibrate(0.3, [0.1, float("nan")])
    with pytest.raises(CalibrationError, match="shape"):
        calibrate_array(np.zeros(3), np.zeros((5, 4)))


def test_level_under_the_null():
    """Exchangeable observed and null scores: calibrated > 0 (and p <= alpha) about alpha of the time."""
    rng = np.random.default_rng(1)
    draws = rng.random((4000, 20))
    out = calibrate_array(draws[:, 0], draws[:, 1:].T, alpha=0.05)
    assert abs((out["calibrated"] > 0).mean() - 0.05) < 0.015
    assert np.array_equal(out["calibrated"] > 0, out["p_value"] <= 0.05)
