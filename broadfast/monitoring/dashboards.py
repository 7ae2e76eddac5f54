"""Dashboards of the workspace projects: the panels the Evidently UI plots round by round.

Every panel reads metric results that the saved snapshots hold; a point is one snapshot (one
monitoring round, or one ``broadfast drift``), and a panel with no snapshot yet shows no data.

``broadfast drift`` (:mod:`broadfast.monitoring.drift`, snapshots tagged ``drift``):

- share of drifted columns and number of drifted columns (``DriftedColumnsCount``);
- drift score of each input column and of each model column (``ValueDrift``);
- the serving version's mean score, teacher–student label agreement and hard-case rate over
  the current window (``MeanValue`` of ``score``, ``label_agreement``, ``hard_case``);
- teacher labels and hard cases per minute, and the serving version's validation quality
  (:mod:`broadfast.monitoring.loop`, snapshots tagged ``loop``).

``broadfast A/B`` (:mod:`broadfast.monitoring.ab`):

- CTR of each arm with its 95% Wilson interval, the last round's CTRs and the CTR test's
  p-value, from the ``arms`` report (tagged ``arms``: one ``MeanValue`` per figure);
- teacher agreement, mean score, p99 latency and error rate of each arm (``arms`` report);
- F1 of each arm against the teacher labels (the per-arm classification reports);
- drift of the challenger's score, latency and grade distribution against the champion's
  (the ``scores`` report).

:func:`ensure_dashboard` writes a project's panels when the project is created or opened
(:func:`broadfast.monitoring.workspace.project_id`). Panels are matched by title: running it again changes
nothing, a changed definition replaces the stored one (keeping its id), and panels added in
the UI are kept.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from evidently.sdk.models import DashboardModel, DashboardPanelPlot, PanelMetric
from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel

from broadfast.monitoring.ab import ARMS, arm_column
from broadfast.monitoring.window import COLUMNS

log = logging.getLogger(__name__)

DRIFT_PROJECT = "broadfast drift"
AB_PROJECT = "broadfast A/B"
PROJECTS = {
    DRIFT_PROJECT: "Drift of the scored traffic against the reference window of the serving model.",
    AB_PROJECT: "A/B experiments: score distributions and classification quality per arm.",
}

DRIFTED = "DriftedColumnsCount"
VALUE_DRIFT = "ValueDrift"
MEAN = "MeanValue"
F1 = "F1Score"


def _drift_scores(role: str) -> list[PanelMetric]:
    return [PanelMetric(legend=c.name, metric=VALUE_DRIFT, metric_labels={"column": c.name}, tags=["drift"]) for c in COLUMNS if c.role == role]


def _per_arm(figure: str) -> list[PanelMetric]:
    return [PanelMetric(legend=arm, metric=MEAN, metric_labels={"column": arm_column(arm, figure)}, tags=["arms"]) for arm in ARMS]


DRIFT_PANELS: tuple[DashboardPanelPlot, ...] = (
    line_plot_panel(
        "Share of drifted columns",
        [PanelMetric(legend="drifted share", metric=DRIFTED, metric_labels={"value_type": "share"}, tags=["drift"])],
        "Share of the tested columns that drifted. A round drifts when it reaches BROADFAST_DRIFT_SHARE (0.25 by default); a new line starts when the set of tested columns changes.",
    ),
    bar_plot_panel(
        "Drifted columns per round",
        [PanelMetric(legend="drifted columns", metric=DRIFTED, metric_labels={"value_type": "count"}, tags=["drift"])],
        "Number of tested columns whose distance to the reference reached its threshold.",
    ),
    line_plot_panel(
        "Drift score of the input columns",
        _drift_scores("input"),
        "Distance to the traffic's reference: normed Wasserstein (numerical), Jensen–Shannon (query_freq). A column drifts at 0.2 by default.",
        size="half",
    ),
    line_plot_panel(
        "Drift score of the model columns",
        _drift_scores("model"),
        "Distance of the serving version's rows to its own first window (a model swap is not drift).",
        size="half",
    ),
    line_plot_panel(
        "Mean student score",
        [PanelMetric(legend="mean score", metric=MEAN, metric_labels={"column": "score"}, tags=["drift"])],
        "Mean score of the serving version's rows in each round's current window.",
    ),
    line_plot_panel(
        "Teacher–student label agreement",
        [PanelMetric(legend="agreement", metric=MEAN, metric_labels={"column": "label_agreement"}, tags=["drift"])],
        "The serving version's quality: share of its labelled pairs whose predicted grade is the teacher's label (the human grade for a file of pairs).",
        size="half",
    ),
    line_plot_panel(
        "Hard-case rate",
        [PanelMetric(legend="hard-case rate", metric=MEAN, metric_labels={"column": "hard_case"}, tags=["drift"])],
        "Share of the serving version's pairs the stream sent to the teacher as hard cases.",
        size="half",
    ),
    line_plot_panel(
        "Teacher labels and hard cases per minute",
        [PanelMetric(legend=legend, metric=MEAN, metric_labels={"column": column}, tags=["loop"])
         for legend, column in (("labels / min", "labels_per_min"), ("hard cases / min", "hard_cases_per_min"))],  # fmt: skip
        "Over each monitoring round's interval: labels the teacher wrote and hard cases the stream sent it. Labels falling behind hard cases means the teacher is the bottleneck (the labelling budget then admits fewer).",
        size="half",
    ),
    line_plot_panel(
        "Serving version's validation quality",
        [PanelMetric(legend=legend, metric=MEAN, metric_labels={"column": column}, tags=["loop"])
         for legend, column in (("Spearman (fixed slice)", "val_spearman"), ("NDCG@10 (fixed slice)", "val_ndcg_at_10"), ("Spearman (newest held-out traffic)", "stream_spearman"))],  # fmt: skip
        "The version serving at each round, as the online trainer measured it when it published it: on its fixed slice of held-out queries and on the newest held-out traffic labels.",
        size="half",
    ),
)

AB_PANELS: tuple[DashboardPanelPlot, ...] = (
    line_plot_panel(
        "CTR per arm with its 95% interval",
        [m for arm in ARMS for m in (
            PanelMetric(legend=f"{arm} CTR", metric=MEAN, metric_labels={"column": arm_column(arm, "ctr")}, tags=["arms"]),
            PanelMetric(legend=f"{arm} 95% low", metric=MEAN, metric_labels={"column": arm_column(arm, "ctr_ci95_low")}, tags=["arms"]),
            PanelMetric(legend=f"{arm} 95% high", metric=MEAN, metric_labels={"column": arm_column(arm, "ctr_ci95_high")}, tags=["arms"]),
        )],  # fmt: skip
        "Clicks / impressions of each arm in the monitor's window, with its Wilson interval.",
    ),
    counter_panel("CTR, last round", _per_arm("ctr"), "Clicks / impressions of each arm.", size="half"),
    line_plot_panel(
        "CTR test p-value",
        [PanelMetric(legend="p-value", metric=MEAN, metric_labels={"column": "p_value"}, tags=["arms"])],
        "Two-sided pooled two-proportion z-test of the arms' CTRs. A verdict needs p < BROADFAST_AB_ALPHA (0.05 by default) and enough impressions in both arms.",
        size="half",
    ),
    line_plot_panel("Teacher agreement per arm", _per_arm("teacher_agreement"), "Share of the arm's labelled pairs whose predicted grade is the teacher's label.", size="half"),
    bar_plot_panel(
        "F1 per arm against the teacher labels",
        [PanelMetric(legend=arm, metric=F1, metric_labels={"classification_name": arm}, tags=["classification"]) for arm in ARMS],
        "From each arm's Evidently classification report (arms with at least 30 labelled pairs; one report per arm and round).",
        size="half",
    ),
    line_plot_panel("Mean score per arm", _per_arm("score_mean"), "Mean student score of each arm's scored pairs.", size="half"),
    line_plot_panel("p99 latency per arm (ms)", _per_arm("latency_p99_ms"), "Per-request p99 latency; the challenger's guardrail is BROADFAST_GUARDRAIL_MAX_P99_MS.", size="half"),
    line_plot_panel("Error rate per arm", _per_arm("error_rate"), "Failed / served requests, from the serving counters.", size="half"),
    line_plot_panel(
        "Score distribution drift, challenger vs champion",
        [PanelMetric(legend="{{column}}", metric=VALUE_DRIFT, tags=["scores"])],
        "Evidently's drift score of the challenger's score, latency and predicted grade against the champion's.",
        size="half",
    ),
)

PANELS: dict[str, tuple[DashboardPanelPlot, ...]] = {DRIFT_PROJECT: DRIFT_PANELS, AB_PROJECT: AB_PANELS}


def ensure_dashboard(workspace: Any, project_id: Any, name: str) -> bool:
    """Write the panels of project ``name`` (see :data:`PANELS`) into its dashboard, matched by title:
    ours first, in their order, then any other panel; returns whether the dashboard changed."""
    panels = PANELS.get(name)
    if not panels:
        return False
    stored = workspace.get_dashboard(project_id)
    ids = {p.title: p.id for p in stored.panels}
    ours = [p.copy(update={"id": ids.get(p.title) or uuid.uuid4()}) for p in panels]  # a new panel gets a new id
    titles = {p.title for p in panels}
    merged = ours + [p for p in stored.panels if p.title not in titles]
    if [p.dict() for p in merged] == [p.dict() for p in stored.panels]:
        return False
    workspace.save_dashboard(project_id, DashboardModel(tabs=stored.tabs, panels=merged))
    log.info("dashboard of %r: %d panels written (%d others kept)", name, len(ours), len(merged) - len(ours))
    return True
