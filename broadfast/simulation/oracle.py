"""The ``oracle`` teacher: a simulated annotator that answers from a data set's human judgements.

It exists to measure the learning loop with a teacher whose labels carry real signal (tiny
LLM teachers carry none, see docs/teacher.md). A pair the file does not grade is a failure
(dead letter), never a guess.

Its soft label: where the file has a ``relevance`` column (the mean of several raters'
judgements), the pair's relevance spread linearly over the two neighbouring grades with
:func:`broadfast.training.targets.relevance_to_probs` on the file's own scale (the min and max of
``relevance`` in the file), so P(exact) + ½·P(partial) is linear in the raters' mean; without
one, the one-hot human ``grade``. Either is then smoothed by ``smoothing``
(BROADFAST_TEACHER_ORACLE_SMOOTHING): ``(1 - s)·p + s/3``. A pair listed more than once gets
the mean. Each label also carries the human ``grade`` (the most common one of the pair), a
confidence of 1.0 and a grade-token mass of 1.0 (a human judgement, not a model's guess).

Its teacher id always starts with ``oracle:`` and says what it answers from and which file:
``oracle:human-relevance(<folder>/<file>)`` or ``oracle:human-grades(<folder>/<file>)``, so its
labels are never mistaken for a model's.

>>> import pandas as pd
>>> from broadfast.teacher.mpcot import Pair
>>> df = pd.DataFrame({"query": ["drill"], "ad_id": ["a1"], "title": ["Drill"], "grade": [2]})
>>> t = OracleTeacher.from_frame(df, source="toy.parquet", smoothing=0.0)
>>> t.teacher_id
'oracle:human-grades(toy.parquet)'
>>> lab = t.label([Pair("x", "Drill", "a1", "Drill")])[0]
>>> lab.probs, lab.grade, lab.confidence
((0.0, 0.0, 1.0), 2, 1.0)
>>> df = pd.DataFrame({"query": ["drill", "saw", "nail"], "ad_id": ["a1", "a2", "a3"], "title": ["Drill", "Saw", "Nail"],
...                    "relevance": [2.5, 1.0, 3.0], "grade": [2, 0, 2]})
>>> t = OracleTeacher.from_frame(df, source="toy.parquet", smoothing=0.0)
>>> t.teacher_id
'oracle:human-relevance(toy.parquet)'
>>> lab = t.label([Pair("x", "Drill", "a1", "Drill")])[0]
>>> [round(p, 2) for p in lab.probs], lab.grade
([0.0, 0.5, 0.5], 2)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.core.settings import Settings
from broadfast.core.events import GRADES
from broadfast.teacher.errors import TeacherError
from broadfast.teacher.mpcot import (
    Label,
    LabelFailure,
    Pair,
    PerspectiveLabel,
    Result,
    normalise,
)

log = logging.getLogger(__name__)


@dataclass
class OracleTeacher:
    """Soft labels from human judgements (see the module docstring), smoothed by ``smoothing``.

    ``targets``: per (normalised query, ad id), the unsmoothed soft label; ``grades``: the
    human grade of each; ``kind``: ``"relevance"`` or ``"grades"``; ``scale``: the relevance
    scale (min, max) of the file, where ``kind`` is ``"relevance"``.
    """

    targets: dict[tuple[str, str], np.ndarray]
    grades: dict[tuple[str, str], int]
    source: str
    smoothing: float = 0.1
    kind: str = "grades"
    scale: tuple[float, float] | None = None

    @property
    def teacher_id(self) -> str:
        return f"oracle:human-{self.kind}({self.source})"

    @classmethod
    def from_frame(cls, df: Any, source: str, smoothing: float = 0.1) -> OracleTeacher:
        from broadfast.core.events import normalize_query
        from broadfast.training.targets import relevance_to_probs

        keys = [(normalize_query(q), ad) for q, ad in zip(df["query"].astype(str), df["ad_id"].astype(str))]
        grades = df["grade"].astype(int).to_numpy()
        onehot = np.eye(3)[grades]
        kind, scale, soft = "grades", None, onehot
        if "relevance" in df.columns:
            rel = df["relevance"].to_numpy(dtype=np.float64)
            finite = np.isfinite(rel)
            low, high = (float(rel[finite].min()), float(rel[finite].max())) if finite.any() else (0.0, 0.0)
            if finite.all() and high > low:
                kind, scale = "relevance", (low, high)
                soft = relevance_to_probs(rel, low, high).astype(np.float64)
            else:
                log.warning("oracle %s: 'relevance' is %s; answering from the one-hot grades", source,
                            "not finite in every row" if not finite.all() else f"constant ({low:g})")
        sums: dict[tuple[str, str], np.ndarray] = {}
        counts: dict[tuple[str, str], np.ndarray] = {}
        for key, s, g in zip(keys, soft, onehot):
            sums[key] = sums.get(key, 0.0) + s
            counts[key] = counts.get(key, 0.0) + g
        targets = {k: v / v.sum() for k, v in sums.items()}
        human = {k: int(np.argmax(v)) for k, v in counts.items()}
        return cls(targets, human, source, smoothing, kind, scale)

    @classmethod
    def from_file(cls, path: Path, smoothing: float = 0.1) -> OracleTeacher:
        from broadfast.core.datasets import load_pairs

        path = Path(path)
        df = load_pairs(path, require_grade=True)
        return cls.from_frame(df, source=f"{path.parent.name}/{path.name}", smoothing=smoothing)

    @classmethod
    def from_files(cls, paths: Sequence[Path], smoothing: float = 0.1) -> OracleTeacher:
        """One oracle over several files (e.g. the two data sets of a shift): each file's soft labels on its own
        relevance scale; a pair graded in more than one file takes the later file's label."""
        oracles = [cls.from_file(p, smoothing=smoothing) for p in paths]
        if not oracles:
            raise TeacherError("the oracle needs at least one file of human-graded pairs (BROADFAST_TEACHER_ORACLE_DATA or BROADFAST_DATA)")
        if len(oracles) == 1:
            return oracles[0]
        kinds = {o.kind for o in oracles}
        targets = {k: v for o in oracles for k, v in o.targets.items()}
        grades = {k: v for o in oracles for k, v in o.grades.items()}
        return cls(targets, grades, "+".join(o.source for o in oracles), smoothing, kinds.pop() if len(kinds) == 1 else "grades-and-relevance", None)

    @classmethod
    def from_settings(cls, settings: Settings) -> OracleTeacher:
        """From ``teacher_oracle_data`` (one file or several, comma-separated), else ``data``."""
        paths = [Path(p.strip()).expanduser() for p in str(settings.teacher.teacher_oracle_data or settings.data).split(",") if p.strip()]
        return cls.from_files(paths, smoothing=settings.teacher.teacher_oracle_smoothing)

    def label(self, pairs: Sequence[Pair]) -> list[Result]:
        from broadfast.core.events import normalize_query

        out: list[Result] = []
        for pair in pairs:
            key = (normalize_query(pair.query), pair.ad_id)
            dist = self.targets.get(key)
            if dist is None:
                out.append(LabelFailure(pair, f"the oracle has no human grade for this pair in {self.source}"))
                continue
            probs = normalise((1.0 - self.smoothing) * dist + self.smoothing / 3.0)
            grade = self.grades[key]
            rationale = f"Human raters graded this pair {grade} ({GRADES[grade]}) in {self.source}"
            if self.scale is not None:
                rationale += f" (mean relevance spread over the neighbouring grades on the scale [{self.scale[0]:g}, {self.scale[1]:g}])"
            rationale += "; this is a simulated annotator, not a model."
            out.append(Label(pair, (PerspectiveLabel("human_grade", rationale, probs, mass=1.0),), probs, self.teacher_id, confidence=1.0, grade=grade))
        return out
