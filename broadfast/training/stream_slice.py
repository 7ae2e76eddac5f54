"""Validation that follows the traffic: the latest teacher labels of held-out queries.

The gate's fixed slice (:mod:`broadfast.training.gate`) is a file of human-labelled pairs: it does not move
when the traffic does. The online trainer also sees labels of *held-out* queries on the stream
(the queries :func:`broadfast.training.online.is_held_out` keeps out of training) and used to only count
them. :class:`StreamSlice` keeps the newest ``capacity`` of them, so every candidate can also be
measured on the traffic the model actually serves: after a shift to new queries and products, the
slice fills with them within a few hundred labels.

Each label is a pair with a graded relevance: the teacher's expected grade (``p_partial + 2 ·
p_exact``, on the 0–2 scale of the grades) and its grade (the human one where the teacher has one,
the oracle's; else the argmax of its probabilities). What is measured is the student's agreement
with the teacher on queries it never trained on: with the oracle that is human relevance, with an
LLM teacher it is that teacher's view.

>>> s = StreamSlice(capacity=3)
>>> for i, q in enumerate(["a", "a", "b", "b"]):
...     s.add(LabelRow(str(i), q, "t", [0.1, 0.2, 0.7], grade=2))
>>> len(s), s.frame()["query"].tolist(), s.ready
(3, ['a', 'b', 'b'], False)
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from broadfast.training.learner import LabelRow

MIN_LABELS = 100  # a stream slice is measured once it holds this many labels …
MIN_QUERIES = 10  # … of this many queries (NDCG and Spearman need whole queries, and some of them)


class StreamSlice:
    """The newest ``capacity`` held-out labels, as a validation frame."""

    def __init__(self, capacity: int) -> None:
        self.rows: deque[LabelRow] = deque(maxlen=max(capacity, 0) or None)
        self.capacity = capacity
        self.seen = 0

    def add(self, row: LabelRow) -> None:
        if self.capacity > 0:
            self.rows.append(row)
            self.seen += 1

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ready(self) -> bool:
        return len(self.rows) >= MIN_LABELS and len({r.query for r in self.rows}) >= MIN_QUERIES

    def frame(self) -> pd.DataFrame:
        """``query``, ``title`` (the ad text the student reads), ``description``, ``relevance``, ``grade``."""
        probs = np.array([r.probs for r in self.rows], dtype=float).reshape(-1, 3)
        expected = probs[:, 1] + 2.0 * probs[:, 2]
        grades = [r.grade if r.grade >= 0 else int(np.argmax(r.probs)) for r in self.rows]
        return pd.DataFrame({"query": [r.query for r in self.rows], "title": [r.text for r in self.rows], "text": "", "relevance": expected, "grade": grades})

    def measure(self, model: Any, metric: str) -> dict[str, float]:
        """``model``'s figures on the slice (``stream_<metric>``, plus ``stream_labels`` and
        ``stream_queries``), or nothing while the slice is too small to say anything."""
        from broadfast.training.gate import Gate, GateConfig

        if not self.ready:
            return {}
        frame = self.frame()
        measured = Gate(frame, GateConfig(metric=metric)).measure(model)  # type: ignore[arg-type]
        figures = {f"stream_{k}": v for k, v in measured.metrics.items() if k in ("spearman", "ndcg@10", "macro_f1")}
        return figures | {"stream_labels": float(len(frame)), "stream_queries": float(frame["query"].nunique())}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.rows])

    def load_frame(self, df: pd.DataFrame) -> None:
        from broadfast.training.learner import ReplayBuffer

        buffer = ReplayBuffer(capacity=0)
        buffer.load_frame(df.assign(fresh=True))
        for row in buffer.fresh:
            self.add(row)
