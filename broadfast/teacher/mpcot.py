"""Multi-perspective chain-of-thought (MPCoT): prompts, grades from log-probs, aggregation.

A pair is judged from three perspectives (user intent, attribute matching, business rules).
For each, the model writes a short rationale; then the grade cue (``"\\nGrade: "``) is
appended and the grade is read from the log-probabilities of the next non-space token over
``"0"``, ``"1"``, ``"2"`` — a soft label per perspective, renormalised over the three, and
their total probability there, the *grade-token mass* (how sure the model was that it was
writing a grade at all). A perspective whose rationale is missing, whose engine call failed,
whose grade cannot be read, or whose mass is below ``min_mass`` (BROADFAST_TEACHER_MIN_MASS)
is a failure of that perspective, recorded with its reason, never an invented label. The pair's
label is the weighted mean (equal weights by default) of the perspectives that gave a grade,
with the failed ones carried along; its confidence is their mean mass. When every perspective
fails, the pair is a :class:`LabelFailure` with all the reasons.

The LLM backends (``vllm``, ``transformers``) implement one small contract,
:class:`~broadfast.teacher.engine.TeacherEngine` (generate rationales; top log-probs after a cue,
both with one :class:`~broadfast.teacher.engine.SamplingParams`), and :class:`LLMTeacher` does the rest.

>>> t = load_template()
>>> p = Pair(pair_id="p1", query="cordless drill", ad_id="a1", title="DEWALT 20V drill")
>>> prompts = t.render(p, rules_text="- none")
>>> sorted(prompts) == sorted(PERSPECTIVES) and all(v.startswith(t.prefix(p)) for v in prompts.values())
True
>>> read = grade_probs_from_top_logprobs([{" ": -0.1}, {"2": -0.2, "1": -1.9, "x": -3.0}], ("0", "1", "2"))
>>> read.probs[2] > 0.8, round(read.mass, 2), read.top_token
(True, 0.97, '2')
>>> aggregate([(0.0, 0.5, 0.5), (0.0, 1.0, 0.0)])
(0.0, 0.75, 0.25)
"""

from __future__ import annotations

import hashlib
import logging
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import yaml

from broadfast.teacher.engine import SamplingParams, TeacherEngine
from broadfast.teacher.errors import TemplateError

log = logging.getLogger(__name__)

PERSPECTIVES = ("user_intent", "attributes", "business_rules")
PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_TEMPLATE = "mpcot_v1"
DEFAULT_RULES = Path(__file__).parent / "rules.yaml"


# -- what goes in and what comes out -------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One query–ad pair to label (from a HardCase or a row of a data file)."""

    pair_id: str
    query: str
    ad_id: str
    title: str
    text: str = ""


@dataclass(frozen=True)
class PerspectiveLabel:
    name: str
    rationale: str
    probs: tuple[float, float, float]
    mass: float | None = None  # grade-token mass at the grade position (None: not measured)


@dataclass(frozen=True)
class PerspectiveFailure:
    """A perspective that gave no usable grade, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Label:
    """A teacher's label of one pair: one soft label per perspective that gave one, their
    aggregate, the perspectives that failed (with reasons), the mean grade-token mass of those
    used (``confidence``) and, from an oracle only, the human ``grade``."""

    pair: Pair
    perspectives: tuple[PerspectiveLabel, ...]
    probs: tuple[float, float, float]
    teacher_id: str
    tokens: int = 0  # generated tokens (for throughput figures)
    confidence: float | None = None
    grade: int | None = None
    failed_perspectives: tuple[PerspectiveFailure, ...] = ()


@dataclass(frozen=True)
class LabelFailure:
    """A pair the teacher could not label, and why (goes to the dead-letter topic)."""

    pair: Pair
    reason: str


Result = Label | LabelFailure


class Teacher(Protocol):
    """What the labeler needs from any backend."""

    teacher_id: str

    def label(self, pairs: Sequence[Pair]) -> list[Result]:
        """One result per pair, in order. Raises TeacherUnavailable when nothing can be reached."""
        ...


# -- templates and rules -------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """A versioned MPCoT prompt template (a YAML file under ``prompts/``)."""

    id: str
    prefix_text: str
    perspectives: Mapping[str, str]
    grade_cue: str = "\nGrade: "
    grade_tokens: tuple[str, str, str] = ("0", "1", "2")
    stop: tuple[str, ...] = ("Grade", "\n\n")
    max_rationale_chars: int = 1200

    def prefix(self, pair: Pair) -> str:
        """The part shared by the three perspectives of ``pair``."""
        return string.Template(self.prefix_text).substitute(
            query=_clean(pair.query), title=_clean(pair.title), description=_clean(pair.text) or "(none)"
        )

    def render(self, pair: Pair, rules_text: str) -> dict[str, str]:
        """Prompt of each perspective: the shared prefix, then the perspective's question."""
        head = self.prefix(pair)
        return {name: head + string.Template(body).substitute(rules=rules_text) for name, body in self.perspectives.items()}

    def grade_prompt(self, prompt: str, rationale: str) -> str:
        """The prompt whose next (non-space) token is the grade."""
        return prompt + " " + rationale + self.grade_cue


def _clean(text: str) -> str:
    # Keep user text from closing the chat turn or injecting a role marker.
    return " ".join(str(text).replace("<|", "< |").split())[:2000]


def template_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PROMPTS_DIR / f"{name}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml")))
        raise TemplateError(f"unknown prompt template {name!r} (known: {known}; or give a path to a .yaml file)")
    return candidate


@lru_cache(maxsize=8)
def load_template(name: str = DEFAULT_TEMPLATE) -> Template:
    """Read a template by name (``mpcot_v1``) or path, checking it has every perspective."""
    path = template_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path}: not valid YAML: {exc}") from exc
    for key in ("id", "prefix", "perspectives"):
        if key not in raw:
            raise TemplateError(f"{path}: missing '{key}'")
    missing = [p for p in PERSPECTIVES if p not in raw["perspectives"]]
    if missing:
        raise TemplateError(f"{path}: missing perspective(s) {', '.join(missing)}")
    tokens = tuple(str(t) for t in raw.get("grade_tokens", ("0", "1", "2")))
    if len(tokens) != 3:
        raise TemplateError(f"{path}: grade_tokens must list three tokens (irrelevant, partial, exact)")
    return Template(
        id=str(raw["id"]),
        prefix_text=raw["prefix"],
        perspectives={p: raw["perspectives"][p] for p in PERSPECTIVES},
        grade_cue=raw.get("grade_cue", "\nGrade: "),
        grade_tokens=tokens,  # type: ignore[arg-type]
        stop=tuple(raw.get("stop", ("Grade", "\n\n"))),
        max_rationale_chars=int(raw.get("max_rationale_chars", 1200)),
    )


@dataclass(frozen=True)
class Rules:
    """The operator's business rules (YAML); ``digest`` goes into the teacher id."""

    text: str
    digest: str

    @classmethod
    def load(cls, path: Path | None = None) -> Rules:
        path = Path(path) if path is not None else DEFAULT_RULES
        if not path.exists():
            raise TemplateError(f"rules file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TemplateError(f"{path}: not valid YAML: {exc}") from exc
        rules = raw.get("rules") or []
        if not isinstance(rules, list) or not all(isinstance(r, dict) and r.get("text") for r in rules):
            raise TemplateError(f"{path}: 'rules' must be a list of {{name, text}} entries")
        text = "\n".join(f"- {r['text']}" for r in rules)
        return cls(text=text, digest=hashlib.sha256(text.encode()).hexdigest()[:8])


def teacher_id_for(backend: str, model: str, template: Template, rules: Rules) -> str:
    """``<backend>:<model>@<template id>+rules-<digest>``: what made a label, in one string."""
    return f"{backend}:{model}@{template.id}+rules-{rules.digest}"


# -- grades and aggregation ----------------------------------------------------------------------
class GradeRead(NamedTuple):
    """What the log-probs at the grade position say.

    ``probs``: the three grade tokens' probabilities renormalised over them (None when none of
    them is there: an unreadable grade). ``mass``: their total probability before renormalising,
    in [0, 1] (0 when unreadable). ``top_token``: the most likely token at the grade position
    (None when there is no grade position: nothing but whitespace, or no log-probs).
    """

    probs: tuple[float, float, float] | None
    mass: float
    top_token: str | None


def grade_probs_from_top_logprobs(positions: Sequence[Mapping[str, float]], grade_tokens: Sequence[str] = ("0", "1", "2")) -> GradeRead:
    """Soft grade and grade-token mass from the top log-probs of the positions after the grade cue.

    The first position whose most likely token is not whitespace is the grade position (small
    models often emit a lone space token before the digit). The three grade tokens' probabilities
    there (matching after stripping spaces; missing ones count as 0) are summed into the mass and
    renormalised into ``probs``. From a server's top-k only, the mass is a lower bound.
    """
    for top in positions:
        if not top:
            continue
        best = max(top.items(), key=lambda kv: kv[1])[0]
        if best.strip() == "":
            continue
        per_grade = [0.0, 0.0, 0.0]
        for tok, lp in top.items():
            stripped = tok.strip()
            if stripped in grade_tokens and lp is not None and math.isfinite(lp):
                per_grade[list(grade_tokens).index(stripped)] += math.exp(lp)
        total = sum(per_grade)
        if total <= 0.0:
            return GradeRead(None, 0.0, best)
        return GradeRead(normalise(per_grade), min(1.0, total), best)
    return GradeRead(None, 0.0, None)


def grade_failure(read: GradeRead, grade_tokens: Sequence[str], min_mass: float) -> str | None:
    """Why a grade read is not a usable grade, or None when it is.

    >>> grade_failure(GradeRead((0.2, 0.3, 0.5), 0.03, "The"), ("0", "1", "2"), 0.5)
    "grade-token mass 0.03 < BROADFAST_TEACHER_MIN_MASS 0.5; the most likely token was 'The'"
    """
    if read.probs is None:
        if read.top_token is None:
            return "unreadable grade: the model wrote nothing but whitespace after the grade cue"
        return f"unreadable grade: none of {list(grade_tokens)} among the top log-probs after the rationale; the most likely token was {read.top_token!r}"
    if read.mass < min_mass:
        shown = next(f"{read.mass:.{d}g}" for d in (2, 4, 8, 17) if float(f"{read.mass:.{d}g}") < min_mass or d == 17)
        return f"grade-token mass {shown} < BROADFAST_TEACHER_MIN_MASS {min_mass:g}; the most likely token was {read.top_token!r}"
    return None


def normalise(values: Sequence[float]) -> tuple[float, float, float]:
    total = float(sum(values))
    out = [float(v) / total for v in values]
    # Round-off safety for the event contract (sum within 1e-3 of 1).
    return (out[0], out[1], max(0.0, 1.0 - out[0] - out[1]))


def aggregate(probs: Sequence[Sequence[float]], weights: Sequence[float] | None = None) -> tuple[float, float, float]:
    """Weighted mean of per-perspective soft labels (equal weights when ``weights`` is None)."""
    if not probs:
        raise ValueError("nothing to aggregate")
    w = list(weights) if weights is not None else [1.0] * len(probs)
    if len(w) != len(probs) or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be {len(probs)} non-negative numbers with a positive sum, got {w}")
    mean = [sum(wi * p[g] for wi, p in zip(w, probs)) / sum(w) for g in range(3)]
    return normalise(mean)


def clean_rationale(text: str, template: Template) -> str:
    """The rationale as generated, cut at the first stop string, trimmed."""
    cut = len(text)
    for s in template.stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()[: template.max_rationale_chars]


# -- the LLM teacher over an engine --------------------------------------------------------------
@dataclass
class LLMTeacher:
    """MPCoT labels from any :class:`~broadfast.teacher.engine.TeacherEngine` (vLLM over HTTP, or a local transformers model)."""

    engine: TeacherEngine
    backend: str
    template: Template = field(default_factory=load_template)
    rules: Rules = field(default_factory=Rules.load)
    weights: Mapping[str, float] | None = None
    max_tokens: int = 48
    temperature: float = 0.0
    seed: int | None = None
    min_mass: float = 0.5  # BROADFAST_TEACHER_MIN_MASS: least grade-token mass of a usable perspective

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_mass <= 1.0):
            raise ValueError(f"min_mass must be within [0, 1], got {self.min_mass!r}")

    @property
    def teacher_id(self) -> str:
        return teacher_id_for(self.backend, self.engine.model_name, self.template, self.rules)

    def label(self, pairs: Sequence[Pair]) -> list[Result]:
        names = list(self.template.perspectives)
        prompts: list[str] = []
        for pair in pairs:
            rendered = self.template.render(pair, self.rules.text)
            prompts.extend(rendered[n] for n in names)  # the three of a pair side by side: shared prefix
        gens = self.engine.generate(prompts, SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed, stop=tuple(self.template.stop)))
        errors: dict[int, str] = {}
        rationales: list[str] = []
        for i, g in enumerate(gens):
            text = clean_rationale(g.text, self.template) if g.text is not None else ""
            if g.error is not None:
                errors[i] = g.error
            elif not text:
                errors[i] = "empty rationale (the model wrote nothing before the grade)"
            rationales.append(text)
        live = [i for i in range(len(prompts)) if i not in errors]
        grade = SamplingParams(max_tokens=3, logprobs=20, logprob_tokens=tuple(self.template.grade_tokens))
        tops = self.engine.top_logprobs([self.template.grade_prompt(prompts[i], rationales[i]) for i in live], grade) if live else []
        reads: dict[int, GradeRead] = {}
        for i, top in zip(live, tops):
            if isinstance(top, str):
                errors[i] = top
                continue
            read = grade_probs_from_top_logprobs(top, self.template.grade_tokens)
            why = grade_failure(read, self.template.grade_tokens, self.min_mass)
            if why is not None:
                errors[i] = why
            else:
                reads[i] = read
        weight = {n: float((self.weights or {}).get(n, 1.0)) for n in names}
        out: list[Result] = []
        for j, pair in enumerate(pairs):
            idx = range(j * len(names), (j + 1) * len(names))
            tokens = sum(gens[i].tokens for i in idx)
            failed = tuple(PerspectiveFailure(names[i - j * len(names)], errors[i]) for i in idx if i in errors)
            persp = tuple(
                PerspectiveLabel(names[i - j * len(names)], rationales[i], reads[i].probs, reads[i].mass)  # type: ignore[arg-type]
                for i in idx
                if i not in errors
            )
            w = [weight[p.name] for p in persp]
            if not persp or sum(w) <= 0.0:
                reasons = [f"{f.name}: {f.reason}" for f in failed]
                if persp:
                    reasons.append(f"the perspectives that gave a grade ({', '.join(p.name for p in persp)}) all have weight 0")
                out.append(LabelFailure(pair, "; ".join(reasons)))
                continue
            confidence = sum(p.mass for p in persp) / len(persp)  # type: ignore[misc]
            out.append(Label(pair, persp, aggregate([p.probs for p in persp], w), self.teacher_id, tokens=tokens, confidence=confidence, failed_perspectives=failed))
        return out
