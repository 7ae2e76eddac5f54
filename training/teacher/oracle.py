"""The ``oracle`` teacher: a simulated annotator that answers from a data set's human grades.

It exists to measure the learning loop with a teacher whose labels carry real signal (tiny
LLM teachers carry none, see docs/teacher.md). Its teacher id always starts with ``oracle:``
and names the file, so its labels are never mistaken for a model's. A pair the file does not
grade is a failure (dead letter), never a guess.

>>> import pandas as pd
>>> df = pd.DataFrame({"query": ["drill"], "product_id": ["a1"], "title": ["Drill"], "grade": [2]})
>>> t = OracleTeacher.from_frame(df, source="toy.parquet", smoothing=0.0)
>>> t.teacher_id
'oracle:human-grades(toy.parquet)'
>>> from training.teacher.mpcot import Pair
>>> t.label([Pair("x", "Drill", "a1", "Drill")])[0].probs
(0.0, 0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streams.events import GRADES
from training.teacher.mpcot import (
    Label,
    LabelFailure,
    Pair,
    PerspectiveLabel,
    Result,
    normalise,
)


@dataclass
class OracleTeacher:
    """Soft labels from human grades: the (mean) one-hot grade, smoothed by ``smoothing``."""

    grades: dict[tuple[str, str], np.ndarray]
    source: str
    smoothing: float = 0.1

    @property
    def teacher_id(self) -> str:
        return f"oracle:human-grades({self.source})"

    @classmethod
    def from_frame(cls, df: Any, source: str, smoothing: float = 0.1) -> OracleTeacher:
        from streams.events import normalize_query

        sums: dict[tuple[str, str], np.ndarray] = {}
        for q, ad, g in zip(df["query"].astype(str), df["product_id"].astype(str), df["grade"].astype(int)):
            key = (normalize_query(q), ad)
            sums.setdefault(key, np.zeros(3))[g] += 1.0
        return cls({k: v / v.sum() for k, v in sums.items()}, source, smoothing)

    @classmethod
    def from_file(cls, path: Path, smoothing: float = 0.1) -> OracleTeacher:
        from streams.datasets import load_pairs

        path = Path(path)
        df = load_pairs(path, require_grade=True)
        return cls.from_frame(df, source=f"{path.parent.name}/{path.name}", smoothing=smoothing)

    @classmethod
    def from_settings(cls, settings: Any) -> OracleTeacher:
        return cls.from_file(settings.teacher_oracle_data or settings.data, smoothing=settings.teacher_oracle_smoothing)

    def label(self, pairs: Sequence[Pair]) -> list[Result]:
        from streams.events import normalize_query

        out: list[Result] = []
        for pair in pairs:
            dist = self.grades.get((normalize_query(pair.query), pair.ad_id))
            if dist is None:
                out.append(LabelFailure(pair, f"the oracle has no human grade for this pair in {self.source}"))
                continue
            probs = normalise((1.0 - self.smoothing) * dist + self.smoothing / 3.0)
            grade = int(np.argmax(dist))
            rationale = f"Human raters graded this pair {grade} ({GRADES[grade]}) in {self.source}; this is a simulated annotator, not a model."
            out.append(Label(pair, (PerspectiveLabel("human_grade", rationale, probs),), probs, self.teacher_id))
        return out
