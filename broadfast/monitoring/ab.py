"""A/B comparison of a running experiment's two arms, with guardrails and a verdict.

From the experiment's ``Scored`` events (arm, request, score, grade probabilities,
latency), the ``Click`` events of the same requests, teacher labels and the serving
outcome counters kept with the experiment (:mod:`broadfast.core.experiments`), per arm:

- **CTR** = clicks / impressions (a shown ad is one impression), with a 95% Wilson
  interval; the two arms are compared by a two-sided **two-proportion z-test** (pooled);
- **scores**: mean and quantiles (and an Evidently drift report, challenger against
  champion, for the full distributions);
- **teacher agreement**: share of labelled pairs whose predicted grade equals the label;
  Evidently classification reports per arm where enough labels exist;
- **latency** p50 / p99 per request; **error rate** from the serving counters.

These figures are also saved as an Evidently report (``arms``, :func:`arms_report`), so that
the workspace dashboards (:mod:`broadfast.monitoring.dashboards`) can plot them round by round.

Verdict, in this order:

1. **roll back** when a guardrail trips: the challenger's CTR is significantly below the
   champion's (p < ``ab_alpha``); its error rate exceeds ``guardrail_max_error_rate``; its
   p99 exceeds both ``guardrail_max_p99_ms`` and ``guardrail_p99_ratio`` × the champion's;
2. **keep running** while either arm has fewer than ``ab_min_impressions`` impressions;
3. **promote** when the challenger's CTR is significantly above the champion's;
4. **keep running** otherwise (no significant difference yet).

>>> two_proportion_z(100, 1000, 100, 1000)
(0.0, 1.0)
>>> lo, hi = wilson_interval(50, 100); round(lo, 3), round(hi, 3)
(0.404, 0.596)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from broadfast.core.settings import Settings
from broadfast.monitoring.window import PROB_COLUMNS, pair_ids, sample

log = logging.getLogger(__name__)

Verdict = Literal["keep_running", "promote", "roll_back"]
MIN_LABELLED = 30  # labelled pairs an arm needs for its classification report
ARMS = ("champion", "challenger")
# ArmStats figures kept in the ``arms`` report (one column per arm and figure; see arms_report)
ARM_FIGURES = ("ctr", "ctr_ci95_low", "ctr_ci95_high", "teacher_agreement", "score_mean", "latency_p99_ms", "error_rate")
Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z statistic of (x2/n2 − x1/n1) and its two-sided p-value."""
    if n1 == 0 or n2 == 0:
        return (0.0, 1.0)
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return (0.0, 1.0)
    z = (x2 / n2 - x1 / n1) / se
    return (z, math.erfc(abs(z) / math.sqrt(2)))


@dataclass
class ArmStats:
    """What one arm did in the window."""

    arm: str
    model_version: str | None
    requests: int
    scored_pairs: int
    impressions: int
    clicks: int
    ctr: float
    ctr_ci95: tuple[float, float]
    score_mean: float | None
    score_quantiles: dict[str, float]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    labelled_pairs: int
    teacher_agreement: float | None
    served_requests: int
    errors: int
    error_rate: float | None


@dataclass
class ABResult:
    """The comparison of one experiment's arms and its verdict."""

    experiment_id: str
    arms: dict[str, ArmStats]
    ctr_lift: float | None
    z: float
    p_value: float
    verdict: Verdict
    reason: str
    guardrails: list[str] = field(default_factory=list)
    snapshots: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "verdict": self.verdict,
            "reason": self.reason,
            "guardrails_tripped": self.guardrails,
            "ctr_lift": self.ctr_lift,
            "z": round(self.z, 4),
            "p_value": self.p_value,
            "arms": {k: vars(v) for k, v in self.arms.items()},
            "reports": sorted(self.snapshots),
        }


def _arm_stats(arm: str, scored: pd.DataFrame, shown: pd.DataFrame, counts: dict[str, int]) -> ArmStats:
    per_request = scored.drop_duplicates("request_id")
    lat = per_request["latency_ms"].to_numpy(dtype=float)
    impressions, clicks = len(shown), int(shown["clicked"].sum()) if len(shown) else 0
    scores = scored["score"].to_numpy(dtype=float)
    labelled = scored[scored["label"].notna()] if "label" in scored.columns else scored.iloc[:0]
    agree = None
    if len(labelled) and all(c in labelled.columns for c in PROB_COLUMNS):
        pred = labelled[list(PROB_COLUMNS)].to_numpy(dtype=float).argmax(axis=1)
        agree = float((pred == labelled["label"].to_numpy(dtype=float)).mean())
    served, errors = counts.get("requests", 0), counts.get("errors", 0)
    versions = scored["model_version"].value_counts()
    return ArmStats(
        arm=arm,
        model_version=str(versions.index[0]) if len(versions) else None,
        requests=len(per_request),
        scored_pairs=len(scored),
        impressions=impressions,
        clicks=clicks,
        ctr=clicks / impressions if impressions else 0.0,
        ctr_ci95=wilson_interval(clicks, impressions),
        score_mean=float(scores.mean()) if len(scores) else None,
        score_quantiles={f"p{q}": float(np.quantile(scores, q / 100)) for q in (10, 50, 90)} if len(scores) else {},
        latency_p50_ms=float(np.percentile(lat, 50)) if len(lat) else None,
        latency_p99_ms=float(np.percentile(lat, 99)) if len(lat) else None,
        labelled_pairs=len(labelled),
        teacher_agreement=agree,
        served_requests=served,
        errors=errors,
        error_rate=errors / served if served else None,
    )


def compare(
    experiment: Any,
    scored: pd.DataFrame,
    clicks: pd.DataFrame,
    settings: Settings,
    *,
    labels: pd.DataFrame | None = None,
    counts: dict[str, dict[str, int]] | None = None,
    reports: bool = True,
) -> ABResult:
    """Compare the arms of ``experiment`` (an :class:`~broadfast.core.experiments.Experiment`).

    ``scored``: Scored events as a frame (``p_*`` columns split out, see
    :mod:`broadfast.monitoring.traffic`); ``clicks``: Click events; ``labels``: ``pair_id``, ``label``;
    ``counts``: served requests and errors per arm (``ExperimentStore.counts``).
    """
    exp_id = experiment.experiment_id
    mine = scored[scored["experiment_id"] == exp_id].copy() if len(scored) else scored
    if labels is not None and len(labels) and len(mine):
        teacher = labels.drop_duplicates("pair_id", keep="last").set_index("pair_id")["label"]
        mine["label"] = pd.Series(pair_ids(mine["query"], mine["ad_id"]), index=mine.index).map(teacher)
    # A request is served by one arm: its clicks are that arm's impressions.
    arm_of = mine.drop_duplicates("request_id").set_index("request_id")["arm"] if len(mine) else pd.Series(dtype=object)
    shown = pd.DataFrame({"arm": clicks["request_id"].map(arm_of), "clicked": clicks["clicked"]}).dropna(subset=["arm"]) if len(clicks) and len(arm_of) else pd.DataFrame(columns=["arm", "clicked"])
    counts = counts or {}
    arms = {arm: _arm_stats(arm, mine[mine["arm"] == arm] if len(mine) else mine, shown[shown["arm"] == arm], counts.get(arm, {})) for arm in ("champion", "challenger")}
    champ, chall = arms["champion"], arms["challenger"]
    z, p = two_proportion_z(champ.clicks, champ.impressions, chall.clicks, chall.impressions)
    lift = (chall.ctr - champ.ctr) / champ.ctr if champ.ctr > 0 else None
    enough = min(champ.impressions, chall.impressions) >= settings.monitoring.ab_min_impressions

    tripped: list[str] = []
    if enough and p < settings.monitoring.ab_alpha and chall.ctr < champ.ctr:
        tripped.append(f"challenger CTR {chall.ctr:.4f} is significantly below the champion's {champ.ctr:.4f} (z={z:.2f}, p={p:.2g} < {settings.monitoring.ab_alpha})")
    if chall.error_rate is not None and chall.served_requests >= 20 and chall.error_rate > settings.monitoring.guardrail_max_error_rate:
        tripped.append(f"challenger error rate {chall.error_rate:.3f} exceeds {settings.monitoring.guardrail_max_error_rate} ({chall.errors}/{chall.served_requests} requests)")
    if chall.latency_p99_ms is not None and chall.requests >= 20:
        budget = max(settings.monitoring.guardrail_max_p99_ms, settings.monitoring.guardrail_p99_ratio * (champ.latency_p99_ms or 0.0))
        if chall.latency_p99_ms > budget:
            tripped.append(f"challenger p99 latency {chall.latency_p99_ms:.1f} ms exceeds {budget:.1f} ms")

    verdict: Verdict
    if tripped:
        verdict, reason = "roll_back", "guardrail: " + "; ".join(tripped)
    elif not enough:
        verdict, reason = "keep_running", f"not enough impressions yet ({champ.impressions} champion, {chall.impressions} challenger; need {settings.monitoring.ab_min_impressions} each)"
    elif p < settings.monitoring.ab_alpha and chall.ctr > champ.ctr:
        verdict, reason = "promote", f"challenger CTR {chall.ctr:.4f} is significantly above the champion's {champ.ctr:.4f} (z={z:.2f}, p={p:.2g} < {settings.monitoring.ab_alpha})"
    else:
        verdict, reason = "keep_running", f"no significant CTR difference yet ({chall.ctr:.4f} vs {champ.ctr:.4f}, p={p:.2g})"
    result = ABResult(exp_id, arms, lift, z, p, verdict, reason, tripped)
    if reports and len(mine):
        result.snapshots = evidently_reports(mine, experiment, settings.monitoring.monitor_sample_rows)
        result.snapshots["arms"] = arms_report(result, experiment)
    log.info("A/B %s: %s — %s", exp_id, verdict, reason)
    return result


def evidently_reports(scored: pd.DataFrame, experiment: Any, sample_rows: int = 20_000) -> dict[str, Any]:
    """Evidently snapshots: score distributions (challenger vs champion) and, per arm with
    enough labelled pairs, a classification report against the teacher or human labels."""
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset, DataDriftPreset

    out: dict[str, Any] = {}
    frame = scored.copy()
    frame["pred_grade"] = frame[list(PROB_COLUMNS)].to_numpy(dtype=float).argmax(axis=1).astype(str)
    # Both kinds of report run on bounded samples of each arm (monitor_sample_rows).
    champ, chall = (sample(frame[frame["arm"] == arm], sample_rows, seed=i) for i, arm in enumerate(("champion", "challenger")))
    labelled = {arm: frame[(frame["arm"] == arm) & frame["label"].notna()] if "label" in frame.columns else frame.iloc[:0] for arm in ("champion", "challenger")}
    meta = {"experiment_id": experiment.experiment_id, "champion": experiment.champion, "challenger": experiment.challenger}
    if len(champ) >= 30 and len(chall) >= 30:
        cols = ["score", "latency_ms", "pred_grade"]
        dd = DataDefinition(numerical_columns=["score", "latency_ms"], categorical_columns=["pred_grade"])
        out["scores"] = Report([DataDriftPreset(columns=cols)], metadata=meta, tags=["ab", "scores"]).run(
            Dataset.from_pandas(chall[cols].reset_index(drop=True), data_definition=dd),
            Dataset.from_pandas(champ[cols].reset_index(drop=True), data_definition=dd),
            name=f"A/B {experiment.experiment_id}: challenger vs champion scores",
        )
    for arm, rows in labelled.items():
        rows = sample(rows, sample_rows, seed=7)
        if len(rows) < MIN_LABELLED:
            continue
        data = pd.DataFrame({"label": rows["label"].astype(int).astype(str).to_numpy(), "pred_grade": rows["pred_grade"].to_numpy()})
        # named after the arm: a dashboard series tells the arms apart by the metric's classification_name
        dd = DataDefinition(categorical_columns=["label", "pred_grade"], classification=[MulticlassClassification(name=arm, target="label", prediction_labels="pred_grade")])
        out[f"classification_{arm}"] = Report([ClassificationPreset(classification_name=arm)], metadata=meta | {"arm": arm}, tags=["ab", "classification", arm]).run(
            Dataset.from_pandas(data, data_definition=dd), None, name=f"A/B {experiment.experiment_id}: {arm} vs labels"
        )
    return out


def arm_column(arm: str, figure: str) -> str:
    """Column of the ``arms`` report holding ``figure`` (one of :data:`ARM_FIGURES`) of ``arm``."""
    return f"{arm}_{figure}"


def arms_report(result: ABResult, experiment: Any) -> Any:
    """The comparison's figures as an Evidently report: a one-row frame with a column per arm and
    figure (``champion_ctr``, ``challenger_ctr_ci95_low``, …, see :func:`arm_column`) and the
    test's ``p_value``, each under a ``MeanValue`` — the mean of one value is the value. Evidently
    keeps nothing but metric results, and this is how the dashboards plot an arm's CTR with its
    Wilson interval round by round. A figure an arm does not have yet (no labels, no served
    requests) is left out."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    row: dict[str, float] = {"p_value": float(result.p_value)}
    for arm in ARMS:
        stats = vars(result.arms[arm]) | dict(zip(("ctr_ci95_low", "ctr_ci95_high"), result.arms[arm].ctr_ci95))
        row |= {arm_column(arm, f): float(stats[f]) for f in ARM_FIGURES if stats.get(f) is not None and math.isfinite(stats[f])}
    frame = pd.DataFrame([row])
    meta = {"experiment_id": experiment.experiment_id, "champion": experiment.champion, "challenger": experiment.challenger}
    return Report([MeanValue(column=c, tests=[]) for c in frame.columns], metadata=meta, tags=["ab", "arms"]).run(
        Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(frame.columns))), None,
        name=f"A/B {experiment.experiment_id}: arms (CTR and its 95% interval, agreement, score, latency, errors)",
    )
