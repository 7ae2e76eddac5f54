"""Simulated A/B traffic for tests, benchmarks and demos (no scoring service needed).

Requests come from a relevance data set through the replay planner
(:func:`broadfast.simulation.replay.plan_requests`); each request goes to the arm the experiment
assigns (:meth:`broadfast.core.experiments.Experiment.arm_for`); the arm's *simulated model*
gives grade probabilities; ads are ranked by score and the replay click model
(:class:`broadfast.simulation.replay.ClickModel`, driven by the true grade) draws the clicks. The
result is two frames with the fields of the ``Scored`` and ``Click`` events.

Simulated models (named as such: they read the human grade, they are not students):

- :func:`noisy_oracle` — probabilities peaked on the true grade, with Gaussian noise;
- :func:`shuffled` — another model's outputs shuffled across the request's ads (what a
  broken challenger looks like: same score distribution, no ranking signal).

>>> import pandas as pd
>>> from broadfast.core.experiments import Experiment
>>> df = pd.DataFrame({"query": ["q1"] * 3 + ["q2"] * 3, "ad_id": list("abcdef"), "title": list("abcdef"),
...                    "text": [""] * 6, "grade": [2, 1, 0, 0, 1, 2]})
>>> exp = Experiment("e1", "v1", "v2", 0.5, "salt", "running", 0.0)
>>> scored, clicks = simulate_ab(df, exp, {"champion": noisy_oracle(), "challenger": shuffled(noisy_oracle())}, n_requests=4)
>>> len(scored), sorted(set(scored["arm"])) <= ["challenger", "champion"], set(clicks.columns) >= {"request_id", "ad_id", "clicked"}
(12, True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from broadfast.monitoring.window import PROB_COLUMNS, score_columns
from broadfast.core.events import Click, Scored
from broadfast.simulation.replay import ClickModel, plan_requests

# A simulated model: (true grades of the request's ads, rng) -> (n, 3) grade probabilities.
SimModel = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def noisy_oracle(strength: float = 2.0, noise: float = 1.0) -> SimModel:
    """Softmax of (strength on the true grade + Gaussian noise): a good, imperfect model."""

    def model(grades: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        logits = rng.normal(0.0, noise, (len(grades), 3))
        logits[np.arange(len(grades)), grades] += strength
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return model


def shuffled(base: SimModel) -> SimModel:
    """``base``'s outputs, shuffled across the ads of each request."""

    def model(grades: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        probs = base(grades, rng)
        return probs[rng.permutation(len(probs))]

    return model


def score_pairs(df: pd.DataFrame, model: SimModel, seed: int = 0) -> pd.DataFrame:
    """``df`` (pairs with a ``grade``) plus ``score`` and ``p_*`` columns from a simulated model."""
    probs = model(df["grade"].to_numpy(dtype=int), np.random.default_rng(seed))
    out = df.copy()
    for name, col in score_columns(probs).items():
        out[name] = col
    return out


def simulate_ab(
    df: pd.DataFrame,
    experiment: Any,
    models: dict[str, SimModel],
    *,
    n_requests: int,
    seed: int = 0,
    latency_ms: dict[str, float] | None = None,
    click_model: ClickModel | None = None,
    start_ts: float = 1.7e9,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scored and Click frames of ``n_requests`` simulated requests split by the experiment."""
    rng = np.random.default_rng(seed)
    clicks_model = click_model or ClickModel()
    median = latency_ms or {"champion": 20.0, "challenger": 20.0}
    scored_parts: dict[str, list[Any]] = {k: [] for k in ("request_id", "ts", "query", "ad_id", "title", "position", "arm", "latency_ms", "user_id", "model_version")}
    probs_all: list[np.ndarray] = []
    click_rows: dict[str, list[Any]] = {k: [] for k in ("request_id", "ts", "query", "ad_id", "position", "clicked", "user_id")}
    for planned in plan_requests(df, limit=n_requests, seed=seed, run_id=f"sim{seed}"):
        req = planned.request
        arm = experiment.arm_for(req.user_id, req.request_id)
        grades = np.array([planned.grades[a.ad_id] for a in req.ads], dtype=int)
        probs = models[arm](grades, rng)
        scores = probs[:, 2] + 0.5 * probs[:, 1]
        order = np.argsort(-scores, kind="stable")
        rank = np.empty(len(order), dtype=int)
        rank[order] = np.arange(len(order))
        ts = start_ts + planned.index * 0.01
        lat = float(rng.lognormal(np.log(median[arm]), 0.3))
        n = len(req.ads)
        scored_parts["request_id"] += [req.request_id] * n
        scored_parts["ts"] += [ts] * n
        scored_parts["query"] += [req.query] * n
        scored_parts["ad_id"] += [a.ad_id for a in req.ads]
        scored_parts["title"] += [a.title for a in req.ads]
        scored_parts["position"] += rank.tolist()
        scored_parts["arm"] += [arm] * n
        scored_parts["latency_ms"] += [lat] * n
        scored_parts["user_id"] += [req.user_id] * n
        scored_parts["model_version"] += [experiment.version_of(arm)] * n
        probs_all.append(probs)
        shown = clicks_model.draw([int(grades[i]) for i in order], np.random.default_rng([seed, planned.index]))
        for r, clicked in enumerate(shown):
            click_rows["request_id"].append(req.request_id)
            click_rows["ts"].append(ts + 1.0)
            click_rows["query"].append(req.query)
            click_rows["ad_id"].append(req.ads[int(order[r])].ad_id)
            click_rows["position"].append(r)
            click_rows["clicked"].append(bool(clicked))
            click_rows["user_id"].append(req.user_id)
    scored = pd.DataFrame(scored_parts)
    probs = np.concatenate(probs_all) if probs_all else np.zeros((0, 3))
    for name, col in score_columns(probs).items():
        scored[name] = col
    scored["experiment_id"] = experiment.experiment_id
    return scored, pd.DataFrame(click_rows)


def to_events(scored: pd.DataFrame, clicks: pd.DataFrame) -> Iterator[Scored | Click]:
    """The frames as contract events (for publishing to a real broker)."""
    for row in scored.itertuples(index=False):
        probs = [float(getattr(row, c)) for c in PROB_COLUMNS]
        probs[2] = max(0.0, 1.0 - probs[0] - probs[1])  # exact sum after float rounding
        yield Scored(
            request_id=row.request_id, ts=row.ts, query=row.query, ad_id=row.ad_id, title=row.title,
            position=int(row.position), score=min(1.0, max(0.0, float(row.score))), grade_probs=tuple(probs),
            model_version=row.model_version, arm=row.arm, experiment_id=row.experiment_id,
            latency_ms=float(row.latency_ms), user_id=row.user_id,
        )
    for row in clicks.itertuples(index=False):
        yield Click(request_id=row.request_id, ts=row.ts, query=row.query, ad_id=row.ad_id, position=int(row.position), clicked=bool(row.clicked), user_id=row.user_id)
