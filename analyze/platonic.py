"""The Platonic alignment test (``analyze platonic``): after training, are the aligned
representations closer to a reference model's kernel than the frozen encoders were?

For each metric m (rows joined by image id, one row per image; X: image encoder, Y: text
encoder, R_X = ``<image>@<run>`` and R_Y = ``<text>@<run>`` the adapters' outputs, ref: the
reference model), four terms:

    before_image = m(X, ref)    before_text = m(Y, ref)
    after_image  = m(R_X, ref)  after_text  = m(R_Y, ref)

and, per side s in {image, text}, the quantity the design asks about:

    delta_s = after_s - (before_image + before_text) / 2

Uncertainty
-----------
* Resampling, the SAME rows for every term (so the delta's interval is paired):
  - metrics without a neighbour count k (CKA, CCA, ...): the ordinary bootstrap, n rows drawn
    with replacement;
  - mutual kNN (the kNN metric with a fast path): the same bootstrap, but a drawn row's
    neighbours are found among the OTHER distinct drawn rows and each row's overlap counts as
    often as it was drawn (in the library metric on the resampled rows a copy would be its own
    nearest neighbour in every representation and inflate the score);
  - other kNN metrics (those with a ``k`` parameter, no fast path): subsampling WITHOUT
    replacement of m = ``SUBSAMPLE_FRACTION`` x n rows (the delete-d jackknife of Shao & Wu
    1989, d = n - m); the spread of the subsample scores is scaled by sqrt(m / d) to the spread
    of an n-row estimate. This is conservative for kNN scores, which are not smooth functions
    of the rows (benchmarks/coverage_platonic.py measured 98-99% coverage of the nominal 95%
    for mutual kNN), and the reason mutual kNN uses the distinct-neighbour bootstrap (except
    on tiny samples where a bootstrap draw has no more than k distinct rows).
* Interval of a term: the 2.5th and 97.5th percentiles of theta + s (theta_b - mean_b theta_b), i.e. the
  resampling distribution re-centred on the full-sample estimate theta (s = 1 for the
  bootstrap, sqrt(m/d) for subsamples). Re-centring removes the shift that resampling itself
  causes (duplicates raise CKA a little; fewer distinct rows change every kNN score), which is
  not uncertainty about theta.
* Interval of a difference (each delta, and trained minus control): for CKA and unbiased CKA
  (the Gram fast path) the normal interval delta +- 1.96 SE with the jackknife SE (all n
  leave-one-out values in closed form, ``engines._LinearCKA.jackknife``); otherwise the
  re-centred percentile interval above. In benchmarks/coverage_platonic.py (n = 300) the
  percentile interval covered the delta's population value 91.5-93.5% of the time for the two
  CKAs (the bootstrap SE of these ratio statistics is a few percent low, and 200 resamples
  leave the 2.5% tails noisy); the jackknife normal interval and the mutual-kNN bootstrap
  cover 93-97%: see the README for the figures.
* Null: the reference's rows permuted relative to the other representation (the pairing
  shuffled), the same permutations for every term; p = (1 + #{null >= observed}) / (1 + draws).
* Calibrated scores (``analyze.calibration``, Groeger, Wen & Brbic 2026): every term's score
  measured against its own shuffled-pairing null, 0 at or below the null's conformal 95%
  quantile, 1 at the metric's maximum; comparable across encoders of different width, depth
  and across sample sizes. ``calibrated_delta_s`` = calibrated after_s - mean of the two
  calibrated before-scores (a point value: no interval).
* Controls (``analyze.controls``): the same four-term statistics for embeddings not trained
  with InfoNCE (untrained adapters, CCA, Procrustes) on the same rows, resamples and
  permutations; each side's trained delta minus the control's delta gets a paired 95%
  interval, and the sentence says whether the trained delta exceeds every control.

Verdict, per metric and side, at ``ALPHA`` = 0.05:
  supported      the delta's 95% interval lies above 0 AND the after-score beats its
                 shuffled-pairing null (p <= ALPHA);
  not supported  the delta's 95% interval lies below 0 (alignment to the reference fell);
  inconclusive   anything else (the interval contains 0, or the after-score is not above chance).
Small samples (``analyze.resampling``): below ``MIN_ROWS`` rows the verdict is "too few rows";
a percentile interval from fewer than ``MIN_BOOTSTRAP`` resamples, or scores of a degenerate
representation (``similarity.degenerate``: constant features, a kNN graph decided by ties; listed
under ``degenerate``), give "inconclusive"; with few rows the null enumerates every pairing
(an exact p-value); intervals are clipped to the metric's range (listed under ``clipped``).
No correction is made for testing several metrics and both sides. The verdict does not use
the controls; ``beats_controls`` (per side) and the sentence report them next to it.

Flat names (``flat_results``; platonic.json "flat" and the one-row platonic_summary.csv), for
each metric m, side s in {image, text} and control c in {random, cca, procrustes}:
  m.before_s, m.after_s                      raw scores
  m.delta_s, m.delta_s_ci_lo, m.delta_s_ci_hi   the delta and its 95% interval
  m.p_s                                      p-value of after_s against the shuffled-pairing null
  m.calibrated_before_s, m.calibrated_after_s, m.calibrated_delta_s   calibrated scores
  m.verdict_s                                supported | not supported | inconclusive
  m.beats_controls_s                         1.0 / 0.0 (empty without controls or resamples)
  m.control_c.after_s, m.control_c.calibrated_after_s   the control's scores (mean over seeds)
  m.control_c.delta_s, m.control_c.delta_s_ci_lo, m.control_c.delta_s_ci_hi   its delta
  m.control_c.excess_s, m.control_c.excess_s_ci_lo, m.control_c.excess_s_ci_hi
                                             trained delta minus control delta, paired 95% CI
  m.control_c.exceeds_s                      1.0 when that interval lies above 0, else 0.0

Speed: CKA, unbiased CKA and mutual kNN have fast paths that precompute, once, each
representation's (n, n) Gram matrix (CKA) or sorted neighbour lists (mutual kNN) and reuse
them for every resample and permutation (O(n^2) per draw instead of O(n d^2) or O(n^2 d);
the CKA bootstrap is a few batched matrix products);
before each use a fast path is checked against the library metric on ``CHECK_ROWS`` rows
(``analyze.engines``). Other metrics call the library once per draw.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from analyze import plots
from analyze.calibration import calibrate_array
from analyze.compare import (AnalyzeError, accepts_k, check_k, check_paired, degenerate_reasons, header, kernel_figure,
                             load_joined, metric_kwargs, output_dir, read_rows, resolve_metrics, write_csv)
from analyze.controls import (control_columns, control_embeddings, control_stats, open_trained, run_layers,
                             versus_controls)
from analyze.engines import FAST_PATHS, build_engine, is_generic  # noqa: F401  (FAST_PATHS: re-exported)
from analyze.resampling import (ALPHA, MIN_BOOTSTRAP, MIN_ROWS, SUBSAMPLE_FRACTION,  # noqa: F401 (re-exported)
                                TOO_FEW_ROWS, _deltas, _draws, _null_summary, _resampling, clipper, interval,
                                jackknife_interval, small_sample, verdict)
from pipeline.cache import CacheError, find_entry
from pipeline.config import PipelineConfig
from pipeline.runs import aligned_name, run_name
from pipeline.runtime import write_json
from similarity.metrics import value_range
from train.api import Run

log = logging.getLogger(__name__)

SLOW_WARNING_S = 60.0  # warn (with the estimate) when a metric without a fast path will take longer, seconds
TERMS = ("before_image", "before_text", "after_image", "after_text")
SIDES = ("image", "text")
TERM_COLORS = {"before_image": "#9ecae1", "before_text": "#fdae6b", "after_image": "#3182bd", "after_text": "#e6550d"}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def sentence(metric: str, side: str, r: Mapping) -> str:
    """One plain sentence for one metric and side (used by the CLI and the report)."""
    t, d = r["terms"], r["delta"][side]
    after = t[f"after_{side}"]
    before = (t["before_image"]["score"] + t["before_text"]["score"]) / 2
    text = (f"{metric}, {side} side: {d['verdict']}. Alignment to the reference went from {before:.3f} "
            f"(mean of before-image {_fmt(t['before_image']['score'])} [{_fmt(t['before_image']['ci_lo'])}, "
            f"{_fmt(t['before_image']['ci_hi'])}] and before-text {_fmt(t['before_text']['score'])} "
            f"[{_fmt(t['before_text']['ci_lo'])}, {_fmt(t['before_text']['ci_hi'])}]) to {after['score']:.3f} "
            f"[{_fmt(after['ci_lo'])}, {_fmt(after['ci_hi'])}]; difference {d['delta']:+.3f} "
            f"(95% CI {_fmt(d['ci_lo'])} to {_fmt(d['ci_hi'])}); the shuffled-pairing null's 95th percentile is "
            f"{_fmt(after['null_q95'])} (p = {_fmt(after['p_value'])}): {d['reason']}. "
            f"Calibrated against that null the after-score is {_fmt(after.get('calibrated'))} (before: image "
            f"{_fmt(t['before_image'].get('calibrated'))}, text {_fmt(t['before_text'].get('calibrated'))}). "
            f"Against the {side} encoder alone before training ({_fmt(t[f'before_{side}']['score'])}) "
            f"the aligned {side} embedding moved by {after['score'] - t[f'before_{side}']['score']:+.3f}.")
    if r.get("controls"):
        text += f" Controls: {d['vs_controls']}."
    return text


def _summarise(point: np.ndarray, boot: np.ndarray, null: np.ndarray, scale: float,
               controls: Mapping[str, Sequence], first_control: int, jack: np.ndarray | None = None,
               bounds: tuple[float, float] = (0.0, 1.0)) -> dict:
    """The statistics of one metric from its scores: point (R,), boot (B, R), null (P, R),
    jack (n, R) leave-one-out scores or None; columns 0-3 are TERMS, then the controls'
    (image, text) pairs from ``first_control``. Differences (deltas, trained minus control) get
    jackknife normal intervals when ``jack`` is given, else re-centred percentile intervals.
    Intervals are clipped to the metric's ``bounds`` (differences to their difference), and
    ``clipped`` lists the kinds that were ("terms", "differences")."""
    low, high = bounds
    clipped: list[str] = []
    lo, hi = clipper(low, high, clipped, "terms")(lambda th, dr: interval(th, dr, scale))(point, boot)
    q95, null_mean = _null_summary(null, point.shape)
    cal = calibrate_array(point, null, alpha=ALPHA)
    delta = _deltas(point)
    if jack is not None:
        draws, diff_interval = jack, jackknife_interval
    else:
        draws, diff_interval = boot, (lambda th, dr: interval(th, dr, scale))
    diff_interval = clipper(low - high, high - low, clipped, "differences")(diff_interval)
    dlo, dhi = diff_interval(delta, _deltas(draws))
    res: dict = {"terms": {}, "delta": {}, "clipped": clipped}
    for t, term in enumerate(TERMS):
        res["terms"][term] = {"score": point[t], "ci_lo": lo[t], "ci_hi": hi[t], "null_mean": null_mean[t],
                              "null_q95": q95[t], "p_value": cal["p_value"][t], "threshold": cal["threshold"][t],
                              "calibrated": cal["calibrated"][t]}
    before = ((point[0] + point[1]) / 2, (draws[:, 0] + draws[:, 1]) / 2)
    after = (point[2:4], draws[:, 2:4])
    cols = control_columns(controls, first_control)
    res["controls"] = {name: control_stats(name, c, point, draws, cal, before, after, diff_interval)
                       for name, c in cols.items()}
    cal_before = (cal["calibrated"][0] + cal["calibrated"][1]) / 2
    for s, side in enumerate(SIDES):
        v, why = verdict(dlo[s], dhi[s], cal["p_value"][2 + s])
        beats, clause = versus_controls(res["controls"], side)
        res["delta"][side] = {"delta": delta[s], "ci_lo": dlo[s], "ci_hi": dhi[s], "verdict": v, "reason": why,
                              "calibrated_delta": cal["calibrated"][2 + s] - cal_before,
                              "beats_controls": beats, "vs_controls": clause}
    return res


def hypothesis_test(X: np.ndarray, Y: np.ndarray, RX: np.ndarray, RY: np.ndarray, ref: np.ndarray,
                    metrics: Mapping[str, Callable], k: int, bootstrap: int, permutations: int,
                    seed: int = 0, use_fast: bool = True,
                    controls: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]] | None = None) -> dict:
    """The test on paired features (rows joined by sample id).

    X: (n, d_x) image encoder, Y: (n, d_y) text encoder, RX: (n, e) and RY: (n, e) the
    aligned image / text embeddings, ref: (n, d_ref) the reference. metrics: {name: metric}.
    bootstrap / permutations: number of draws (0 skips the interval / null). controls:
    {name: [(image (n, e_c), text (n, e_c)) per seed]} scored on the same draws. Returns
    {metric: {"terms": {term: {score, ci_lo, ci_hi, null_mean, null_q95, p_value, threshold,
    calibrated}}, "delta": {side: {delta, ci_lo, ci_hi, verdict, reason, calibrated_delta,
    beats_controls, vs_controls}}, "controls": {name: analyze.controls.control_stats},
    "resampling", "seconds"}}.
    """
    controls = dict(controls or {})
    reps = [X, Y, RX, RY] + [A for pairs in controls.values() for pair in pairs for A in pair]
    named = {"image": X, "text": Y, "image aligned": RX, "text aligned": RY, "reference": ref}
    named.update({f"control {c} {i}": A for c, pairs in controls.items() for i, pair in enumerate(pairs) for A in pair})
    n = check_paired(named)
    if bootstrap < 0 or permutations < 0:
        raise AnalyzeError(f"--bootstrap ({bootstrap}) and --permutations ({permutations}) must be >= 0 "
                           f"(0 skips the intervals / the null); set them with --set analyze.bootstrap=N "
                           f"and --set analyze.permutations=N.")
    if 0 < bootstrap < MIN_BOOTSTRAP:
        log.warning("analyze.bootstrap = %d: fewer than %d resamples cannot place a 95%% interval's 2.5%% tails; the "
                    "percentile intervals are not meaningful and verdicts resting on them are inconclusive",
                    bootstrap, MIN_BOOTSTRAP)
    m_sub = int(round(SUBSAMPLE_FRACTION * n))
    boot_rows, sub_rows, perms = _draws(n, bootstrap, permutations, seed, m_sub)
    check_k(metrics, k, m_sub if bootstrap else n, f"rows in each {SUBSAMPLE_FRACTION:.0%} subsample")
    distinct = min((len(np.unique(r)) for r in boot_rows), default=n)  # fewest distinct rows in a bootstrap draw
    flagged = degenerate_reasons({k_: v for k_, v in named.items() if not k_.startswith("control ")}, metrics, k)
    out = {}
    for name, fn in metrics.items():
        t0 = time.perf_counter()
        kwargs = metric_kwargs(fn, k)
        engine = build_engine(name, fn, kwargs, reps, ref, use_fast)
        t1 = time.perf_counter()
        point = engine.resample(np.arange(n)[None])[0]  # the full-sample estimates
        eta = (time.perf_counter() - t1) * (bootstrap + permutations)
        if is_generic(engine) and eta > SLOW_WARNING_S:
            log.warning("%s has no fast path: about %.0f s for %d resamples + %d permutations at n=%d; lower "
                        "--bootstrap/--permutations or --max-rows for a quicker answer", name, eta, bootstrap,
                        permutations, n)
        knn = accepts_k(fn)
        subsample = knn and not (getattr(engine, "distinct_bootstrap", False) and distinct > k)
        rows, scale = (sub_rows, math.sqrt(m_sub / max(1, n - m_sub))) if subsample else (boot_rows, 1.0)
        boot = engine.resample(rows) if bootstrap else np.zeros((0, len(reps)))
        null = engine.permuted(perms) if permutations else np.zeros((0, len(reps)))
        jack = engine.jackknife() if bootstrap and hasattr(engine, "jackknife") else None
        res = _summarise(point, boot, null, scale, controls, 4, jack, value_range(name))
        override = small_sample(n, bootstrap, jack is None)
        if name in flagged:  # not a measurement: no verdict either way
            res["degenerate"] = flagged[name]
            why = "; ".join(f"{rep}: {reason}" for rep, reason in flagged[name].items())
            override = override or ("inconclusive", f"the scores are not measurements ({why})")
        for side in SIDES:
            if override:
                res["delta"][side].update(verdict=override[0], reason=override[1])
        res["difference_interval"] = ("normal, jackknife standard error" if jack is not None else
                                      "re-centred percentile of the resamples")
        res.update({"engine": type(engine).__name__.lstrip("_"), "k": k if knn else None, "null_draws": len(perms),
                    "null_exact": 0 < len(perms) and n <= 12 and len(perms) == math.factorial(n) - 1,
                    "resampling": _resampling(knn, subsample, n, m_sub, scale),
                    "seconds": time.perf_counter() - t0})
        out[name] = res
    return out


def headline(results: Mapping[str, Mapping]) -> str:
    """The one-line overall verdict over every metric and side."""
    verdicts = {(m, s): r["delta"][s]["verdict"] for m, r in results.items() for s in SIDES}
    n_sup = sum(v == "supported" for v in verdicts.values())
    n_not = sum(v == "not supported" for v in verdicts.values())
    overall = ("supported" if n_sup == len(verdicts) else "partly supported" if n_sup else
               "not supported" if n_not else
               f"not tested ({TOO_FEW_ROWS})" if all(v == TOO_FEW_ROWS for v in verdicts.values()) else "inconclusive")
    detail = "; ".join(f"{m}: image {r['delta']['image']['verdict']}, text {r['delta']['text']['verdict']}"
                       for m, r in results.items())
    text = f"Platonic hypothesis {overall} ({n_sup} of {len(verdicts)} metric x side tests supported): {detail}."
    beats = [r["delta"][s]["beats_controls"] for r in results.values() for s in SIDES]
    if any(b is not None for b in beats):
        text += (f" The trained delta exceeds every control in {sum(b is True for b in beats)} of {len(beats)} "
                 f"metric x side tests.")
    return text


def _flag(x: bool | None) -> float:
    return float("nan") if x is None else float(x)


def flat_results(results: Mapping[str, Mapping]) -> dict:
    """The flat ``<metric>.<name>`` columns of the module docstring, one value each."""
    flat: dict = {}
    for m, r in results.items():
        t = r["terms"]
        for term in TERMS:
            flat[f"{m}.{term}"] = t[term]["score"]
        for side in SIDES:
            d = r["delta"][side]
            flat.update({f"{m}.delta_{side}": d["delta"], f"{m}.delta_{side}_ci_lo": d["ci_lo"],
                         f"{m}.delta_{side}_ci_hi": d["ci_hi"], f"{m}.p_{side}": t[f"after_{side}"]["p_value"]})
        for term in TERMS:
            flat[f"{m}.calibrated_{term}"] = t[term]["calibrated"]
        for side in SIDES:
            d = r["delta"][side]
            flat.update({f"{m}.calibrated_delta_{side}": d["calibrated_delta"], f"{m}.verdict_{side}": d["verdict"],
                         f"{m}.beats_controls_{side}": _flag(d["beats_controls"])})
        for c, cr in r.get("controls", {}).items():
            p = f"{m}.control_{c}"
            for side in SIDES:
                ct, cd = cr["terms"][f"after_{side}"], cr["delta"][side]
                flat.update({f"{p}.after_{side}": ct["score"], f"{p}.calibrated_after_{side}": ct["calibrated"],
                             f"{p}.delta_{side}": cd["delta"], f"{p}.delta_{side}_ci_lo": cd["ci_lo"],
                             f"{p}.delta_{side}_ci_hi": cd["ci_hi"], f"{p}.excess_{side}": cd["excess"],
                             f"{p}.excess_{side}_ci_lo": cd["excess_ci_lo"],
                             f"{p}.excess_{side}_ci_hi": cd["excess_ci_hi"], f"{p}.exceeds_{side}": _flag(cd["exceeds"])})
    return flat


def _long_rows(results: Mapping[str, Mapping]) -> list[dict]:
    """platonic.csv: one row per metric and term, delta, and control quantity."""
    rows = []
    for m, r in results.items():
        for term, t in r["terms"].items():
            rows.append({"metric": m, "term": term, **t})
        for side, d in r["delta"].items():
            rows.append({"metric": m, "term": f"delta_{side}", "score": d["delta"], "ci_lo": d["ci_lo"],
                         "ci_hi": d["ci_hi"], "verdict": d["verdict"], "calibrated": d["calibrated_delta"],
                         "beats_controls": d["beats_controls"]})
        for c, cr in r.get("controls", {}).items():
            for side in SIDES:
                ct, cd = cr["terms"][f"after_{side}"], cr["delta"][side]
                rows.append({"metric": m, "term": f"control_{c}.after_{side}", "score": ct["score"],
                             "p_value": ct["p_value"], "threshold": ct["threshold"], "calibrated": ct["calibrated"]})
                rows.append({"metric": m, "term": f"control_{c}.delta_{side}", "score": cd["delta"],
                             "ci_lo": cd["ci_lo"], "ci_hi": cd["ci_hi"]})
                rows.append({"metric": m, "term": f"control_{c}.excess_{side}", "score": cd["excess"],
                             "ci_lo": cd["excess_ci_lo"], "ci_hi": cd["excess_ci_hi"], "exceeds": cd["exceeds"]})
    return rows


def _bar_groups(results: Mapping[str, Mapping]) -> dict[str, list[dict]]:
    """platonic.png: per metric the four terms, then each control's after-scores (grey)."""
    groups = {}
    for m, r in results.items():
        items = [{"label": term.replace("_", " "), "value": t["score"], "lo": t["ci_lo"], "hi": t["ci_hi"],
                  "null_q95": t["null_q95"], "color": TERM_COLORS[term]} for term, t in r["terms"].items()]
        for c, cr in r.get("controls", {}).items():
            items += [{"label": f"{c} {side}", "value": cr["terms"][f"after_{side}"]["score"],
                       "color": "#bdbdbd" if side == "image" else "#969696"} for side in SIDES]
        groups[m] = items
    return groups


# ----------------------------------------------------------------------------- the command
def _before(cfg: PipelineConfig, trained: Run | None, joined) -> tuple[np.ndarray, np.ndarray]:
    """The unaligned image and text representations of the test: the features the run's adapters
    read (a stored hidden layer when it was trained on one), from entries checked to be the ones it
    was trained on (same encoder settings: a source re-extracted with, e.g., another pooling is
    refused). A run whose adapters cannot be loaded (None) is compared on the entries' features."""
    out = []
    for side, name in zip(SIDES, (cfg.train.image, cfg.train.text)):
        layer = None
        if trained is not None:
            trained.check_entry(side, joined.entries[name])
            layer = run_layers(trained)[side]
        out.append(joined.features[name] if layer is None else read_rows(joined, name, layer))
    return out[0], out[1]


def platonic_test(cfg: PipelineConfig, run: str | None = None, kernels: bool = True) -> dict:
    """``analyze platonic``: the hypothesis test for one fit-adapters run.

    Entries (split ``analyze.split``): ``train.image``, ``train.text``, ``analyze.reference``
    and the run's aligned ``<image>@<run>``, ``<text>@<run>``; run = ``run`` or
    ``train.name`` or fit-adapters' default name. Writes ``runs/<run>/platonic.json``,
    ``platonic.csv`` (long: one row per metric and term), ``platonic_summary.csv`` (one row of
    ``flat_results`` columns), ``platonic.png`` (bars with 95% CIs and the null's 95th percentile)
    and, with ``kernels``, ``kernels.png``. Returns the JSON document plus ``out``."""
    a, tc = cfg.analyze, cfg.train
    run = run_name(tc, run)
    ri, rt = aligned_name(tc.image, run), aligned_name(tc.text, run)
    names = [tc.image, tc.text, ri, rt, a.reference]
    if a.reference in (tc.image, tc.text):
        log.warning("the reference %r is also the %s encoder: its before-score is trivially 1",
                    a.reference, "image" if a.reference == tc.image else "text")
    for name in (ri, rt):
        try:
            find_entry(cfg.data.cache, cfg.data.dataset, a.split, name, cfg.data.data_dir)
        except CacheError as exc:
            raise CacheError(f"{exc} The aligned entries of run {run!r} are written by `fit-adapters --image "
                             f"{tc.image} --text {tc.text} --name {run}`; pass --run to pick another run.") from None
    joined = load_joined(cfg, names)
    metrics = resolve_metrics(a.metrics)
    F = joined.features
    trained, reason = open_trained(cfg, run)
    if trained is None:
        log.warning("run %r: its adapters cannot be loaded (%s); 'before' uses the entries' features", run, reason)
    X, Y = _before(cfg, trained, joined)
    t0 = time.perf_counter()
    controls = control_embeddings(cfg, run, X, Y, (trained, reason))
    results = hypothesis_test(X, Y, F[ri], F[rt], F[a.reference], metrics, a.k,
                              a.bootstrap, a.permutations, a.seed, controls=controls.embeddings)
    seconds = time.perf_counter() - t0
    out = output_dir(cfg, "runs", run)
    doc = {**header(cfg, "platonic"), "run": run, "n": joined.n, "duplicates": joined.duplicates, "bootstrap": a.bootstrap,
           "permutations": a.permutations, "alpha": ALPHA,
           "entries": {"image": tc.image, "text": tc.text, "image_aligned": ri, "text_aligned": rt,
                       "reference": a.reference},
           "controls": controls.notes, "results": results, "headline": headline(results),
           "sentences": {m: {s: sentence(m, s, r) for s in SIDES} for m, r in results.items()},
           "flat": flat_results(results), "seconds": seconds, "figures": {}}
    doc["figures"]["bars"] = plots.grouped_bars(
        _bar_groups(results), f"Alignment to {a.reference} before/after run {run} (n={joined.n}; bars: 95% CI; "
                              f"dashes: shuffled-pairing null, 95th pct; grey: controls)", out / "platonic.png").name
    if kernels:
        panels = {f"K_X ({tc.image})": X, f"K_Y ({tc.text})": Y, f"K_repr image ({ri})": F[ri],
                  f"K_repr text ({rt})": F[rt], f"K_ref ({a.reference})": F[a.reference]}
        doc["figures"]["kernels"] = kernel_figure(panels, f"K_ref ({a.reference})", a.kernel_rows, a.seed,
                                                  out / "kernels.png").name
    write_json(out / "platonic.json", doc)
    write_csv(out / "platonic.csv", _long_rows(results))
    write_csv(out / "platonic_summary.csv", [{"run": run, "n": joined.n, **doc["flat"]}])
    return {**doc, "out": out}
