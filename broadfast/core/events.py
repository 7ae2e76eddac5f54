"""Event contracts: the eight events of the design map and the topic table.

Every event is a frozen pydantic model with a ``schema_version``; :func:`encode` turns
one into JSON bytes and :func:`decode` turns bytes from a topic back into the event the
topic table names, raising :class:`~broadfast.core.errors.EventValidationError` (naming the
field and the reason) for anything that does not validate: not UTF-8, not JSON, too
large, a wrong type, a missing field, an unknown field, a bad probability vector.

>>> ev = Click(request_id="r1", ts=1.0, query="drill", ad_id="a1", position=0, clicked=True)
>>> decode("clicks", encode(ev)) == ev
True
>>> TOPICS["clicks"].key_of(ev)
'drill'
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from broadfast.core.errors import EventValidationError

SCHEMA_VERSION = 1
GRADES = ("irrelevant", "partial", "exact")
PROB_TOLERANCE = 1e-3

NonEmpty = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"\S")]  # at least one character that is not whitespace
ShortId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"\S")]  # a user, experiment or parent id
VersionName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]  # a model name or version: never a path
Text = Annotated[str, Field(max_length=100_000)]
MAX_TS = 4_102_444_800.0  # 2100-01-01: an event time past it is an error, not a date (and overflows what consumes it)
Timestamp = Annotated[float, Field(ge=0, le=MAX_TS, allow_inf_nan=False)]
FEATURE_BOUND = 1e12  # a feature value beyond it is an error (and no float32 feature store overflows on it)
Finite = Annotated[float, Field(ge=-FEATURE_BOUND, le=FEATURE_BOUND, allow_inf_nan=False)]
MAX_ADS = 1000  # ads in one search request (so a position is below it)
EMBEDDING_BOUND = 100.0  # rationale embeddings are unit vectors; a coordinate beyond it poisons training (1e39 is inf in float32)


def now() -> float:
    """Event time: seconds since the epoch."""
    return time.time()


_WS = re.compile(r"\s+")


def normalize_query(query: str) -> str:
    """Lower case, trimmed, inner whitespace collapsed."""
    return _WS.sub(" ", query.strip().lower())


def pair_id(query: str, ad_id: str) -> str:
    """Stable id of a query–ad pair: a hash of the normalised query and the ad id.

    >>> pair_id("Cordless  Drill ", "a1") == pair_id("cordless drill", "a1")
    True
    """
    digest = hashlib.blake2b(f"{normalize_query(query)}\x1f{ad_id}".encode(), digest_size=10)
    return digest.hexdigest()


def score_from_probs(probs: tuple[float, float, float] | list[float]) -> float:
    """Relevance score: P(exact) + ½·P(partial)."""
    return float(probs[2]) + 0.5 * float(probs[1])


def _check_probs(value: tuple[float, float, float]) -> tuple[float, float, float]:
    for p in value:
        if not math.isfinite(p) or p < 0.0 or p > 1.0:
            raise ValueError(f"each probability must be finite and within [0, 1], got {p!r}")
    total = sum(value)
    if abs(total - 1.0) > PROB_TOLERANCE:
        raise ValueError(f"the three grade probabilities must sum to 1, got {total:.6f}")
    return value


Probs = tuple[float, float, float]


def _twice(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


def _finite_tree(value: Any, path: str = "") -> Any:
    """A free-form JSON value (``details``, ``trained_on``) whose every number is finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path or 'value'} is {value!r}: every number must be finite")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_tree(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_tree(v, f"{path}[{i}]")
    return value


FiniteTree = Annotated[dict[str, Any], AfterValidator(_finite_tree)]


def finite_or_null(value: Any) -> Any:
    """A free-form value made fit for ``details``/``trained_on``: non-finite numbers become None (JSON null).

    >>> finite_or_null({"ctr": float("nan"), "n": [1.0, float("inf")], "ok": 0.5})
    {'ctr': None, 'n': [1.0, None], 'ok': 0.5}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


class Event(BaseModel):
    """Base of every event: strict about unknown fields, immutable, versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    topic_name: ClassVar[str]


class Ad(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ad_id: NonEmpty
    title: Text
    text: Text = ""


class SearchRequest(Event):
    """What the frontend asked to rank (``relevance.requests``, key: query)."""

    topic_name: ClassVar[str] = "requests"
    request_id: NonEmpty
    ts: Timestamp
    user_id: NonEmpty
    query: NonEmpty
    ads: list[Ad] = Field(min_length=1, max_length=MAX_ADS)


class Scored(Event):
    """One scored query–ad pair (``relevance.scored``, key: query)."""

    topic_name: ClassVar[str] = "scored"
    request_id: NonEmpty
    ts: Timestamp
    query: NonEmpty
    ad_id: NonEmpty
    title: Text
    text: Text = ""  # the start of the ad's description the student read with the title (what the teacher and the trainer get)
    position: int = Field(ge=0, lt=MAX_ADS)
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    grade_probs: Probs
    model_version: NonEmpty
    arm: Literal["champion", "challenger"] = "champion"
    experiment_id: ShortId | None = None
    latency_ms: float = Field(ge=0.0, le=3_600_000.0, allow_inf_nan=False)
    user_id: ShortId | None = None
    features: dict[str, Finite] = Field(default_factory=dict)

    _probs = field_validator("grade_probs")(_check_probs)


class Click(Event):
    """A (simulated) user's click or skip of a shown ad (``relevance.clicks``, key: query)."""

    topic_name: ClassVar[str] = "clicks"
    request_id: NonEmpty
    ts: Timestamp
    query: NonEmpty
    ad_id: NonEmpty
    position: int = Field(ge=0, lt=MAX_ADS)
    clicked: bool
    user_id: ShortId | None = None


class HardCase(Event):
    """A pair the student finds hard, sent for labelling (``relevance.hardcases``, key: pair_id)."""

    topic_name: ClassVar[str] = "hardcases"
    pair_id: NonEmpty
    query: NonEmpty
    ad_id: NonEmpty
    title: Text
    text: Text = ""
    reasons: list[NonEmpty] = Field(min_length=1)
    student_probs: Probs
    model_version: NonEmpty
    ts: Timestamp
    first_scored_ts: Timestamp | None = None

    _probs = field_validator("student_probs")(_check_probs)


Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Perspective(BaseModel):
    """One perspective's rationale and soft grade.

    ``mass``: the total probability the teacher gave the three grade tokens at the grade
    position, before ``probs`` was renormalised over them (how sure it was that it was
    writing a grade at all); None where a teacher has no such figure (older events).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NonEmpty
    rationale: Annotated[str, Field(min_length=1, max_length=20_000)]
    probs: Probs
    mass: Unit | None = Field(
        default=None, description="Total probability of the three grade tokens at the grade position, before renormalising (null: not measured)."
    )

    _probs = field_validator("probs")(_check_probs)


class FailedPerspective(BaseModel):
    """A perspective that gave no usable grade, and why (e.g. its grade-token mass was too low)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NonEmpty
    reason: Annotated[str, Field(min_length=1, max_length=8192)]


class TeacherLabel(Event):
    """The teacher's multi-perspective label of a pair (``relevance.labels``, key: pair_id)."""

    # ``probs`` aggregates the perspectives that gave a grade; those that did not are in
    # ``failed_perspectives`` (name and reason each), never given a made-up grade.

    topic_name: ClassVar[str] = "labels"
    pair_id: NonEmpty
    query: NonEmpty
    ad_id: NonEmpty
    title: Text = ""
    text: Text = ""
    perspectives: list[Perspective] = Field(min_length=1)
    probs: Probs
    rationale_embeddings: list[list[float]] | None = None
    embeddings_uri: str | None = None
    teacher_id: NonEmpty
    ts: Timestamp
    first_scored_ts: Timestamp | None = None
    confidence: Unit | None = Field(
        default=None, description="Mean grade-token mass of the perspectives used, in [0, 1] (1.0 for the oracle; null where unknown)."
    )
    grade: Annotated[int, Field(ge=0, le=2)] | None = Field(
        default=None, description="A human grade (0 irrelevant, 1 partial, 2 exact) where the teacher has one (the oracle); null for a model's label."
    )
    failed_perspectives: list[FailedPerspective] = Field(
        default_factory=list, description="Perspectives that gave no usable grade (name and reason each); the label aggregates the others."
    )

    _probs = field_validator("probs")(_check_probs)

    @field_validator("perspectives")
    @classmethod
    def _distinct_perspectives(cls, value: list[Perspective]) -> list[Perspective]:
        twice = _twice([p.name for p in value])
        if twice:
            raise ValueError(f"perspective(s) {', '.join(twice)} given more than once")
        return value

    @field_validator("failed_perspectives")
    @classmethod
    def _failed_are_not_used(cls, value: list[FailedPerspective], info: Any) -> list[FailedPerspective]:
        used = {p.name for p in info.data.get("perspectives") or ()}
        both = sorted({f.name for f in value} & used)
        if both:
            raise ValueError(f"perspective(s) {', '.join(both)} cannot both give a grade and have failed")
        twice = _twice([f.name for f in value])
        if twice:
            raise ValueError(f"perspective(s) {', '.join(twice)} failed more than once")
        return value

    @field_validator("rationale_embeddings")
    @classmethod
    def _one_per_perspective(cls, value: list[list[float]] | None, info: Any) -> list[list[float]] | None:
        if value is None:
            return value
        perspectives = info.data.get("perspectives")
        if perspectives is not None and len(value) != len(perspectives):
            raise ValueError(f"one embedding per perspective: {len(value)} embeddings for {len(perspectives)} perspectives")
        if len({len(row) for row in value}) > 1 or any(not row for row in value):
            raise ValueError(f"embeddings must all have one non-zero length, got lengths {sorted({len(row) for row in value})}")
        if any(not math.isfinite(x) or abs(x) > EMBEDDING_BOUND for row in value for x in row):
            raise ValueError(f"embedding coordinates must be finite and within ±{EMBEDDING_BOUND:g} (they are unit vectors)")
        return value


class ModelPublished(Event):
    """A new student version in the registry (``relevance.models``, key: model name)."""

    topic_name: ClassVar[str] = "models"
    name: VersionName = "student"
    version: VersionName
    parent_version: VersionName | None = None
    uri: NonEmpty
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    metrics: dict[str, Finite] = Field(default_factory=dict)
    trained_on: FiniteTree = Field(default_factory=dict)
    ts: Timestamp


class Alert(Event):
    """Something an operator should see (``relevance.alerts``, key: kind)."""

    topic_name: ClassVar[str] = "alerts"
    kind: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
    severity: Literal["info", "warning", "critical"] = "warning"
    details: FiniteTree = Field(default_factory=dict)
    ts: Timestamp


class DeadLetter(Event):
    """A message a consumer could not parse or process (``relevance.deadletter``, key: source topic)."""

    topic_name: ClassVar[str] = "deadletter"
    source_topic: NonEmpty
    partition: Annotated[int, Field(ge=0)] | None = None
    offset: Annotated[int, Field(ge=0)] | None = None
    consumer: str | None = None
    error: Annotated[str, Field(min_length=1, max_length=8192)]
    payload: str = ""
    payload_bytes: int = Field(default=0, ge=0)
    ts: Timestamp


@dataclass(frozen=True)
class TopicSpec:
    """One row of the topic table: short name, event class and the field used as key."""

    name: str
    event: type[Event]
    key_field: str

    def key_of(self, event: Event) -> str:
        return str(getattr(event, self.key_field))


# The topic–event–key table: the one place that ties topics to their contracts.
TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        TopicSpec("requests", SearchRequest, "query"),
        TopicSpec("scored", Scored, "query"),
        TopicSpec("clicks", Click, "query"),
        TopicSpec("hardcases", HardCase, "pair_id"),
        TopicSpec("labels", TeacherLabel, "pair_id"),
        TopicSpec("models", ModelPublished, "name"),
        TopicSpec("alerts", Alert, "kind"),
        TopicSpec("deadletter", DeadLetter, "source_topic"),
    )
}
EVENT_TOPIC: dict[type[Event], str] = {spec.event: spec.name for spec in TOPICS.values()}


def spec_for(event: Event | type[Event]) -> TopicSpec:
    cls = event if isinstance(event, type) else type(event)
    return TOPICS[EVENT_TOPIC[cls]]


def encode(event: Event) -> bytes:
    """JSON bytes of an event (compact, UTF-8)."""
    return event.model_dump_json().encode("utf-8")


def encode_key(event: Event) -> bytes:
    return spec_for(event).key_of(event).encode("utf-8")


def _field_of(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    return ".".join(loc) if loc else "<payload>"


def validate(event_cls: type[Event], data: Any) -> Event:
    """Validate a parsed payload against one contract, or raise EventValidationError."""
    name = event_cls.__name__
    if not isinstance(data, dict):
        raise EventValidationError(name, "<payload>", f"expected a JSON object, got {type(data).__name__}")
    try:
        return event_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise EventValidationError(name, _field_of(first), first.get("msg", "invalid")) from None


def decode(topic: str, raw: bytes | None, *, max_bytes: int = 1_000_000) -> Event:
    """Parse and validate raw bytes from a topic (short name, e.g. ``"scored"``).

    Validation is strict: a string is not a number, ``1`` is not ``true``.
    """
    if topic not in TOPICS:
        raise KeyError(f"unknown topic {topic!r}; known: {', '.join(TOPICS)}")
    event_cls = TOPICS[topic].event
    name = event_cls.__name__
    if raw is None:
        raise EventValidationError(name, "<payload>", "empty message (null value)")
    if len(raw) > max_bytes:
        raise EventValidationError(name, "<payload>", f"payload of {len(raw):,} bytes exceeds the limit of {max_bytes:,}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventValidationError(name, "<payload>", f"not valid UTF-8 at byte {exc.start}") from None
    try:
        return event_cls.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        kind = first.get("type", "")
        if kind == "json_invalid":
            reason = f"not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
            raise EventValidationError(name, "<payload>", reason) from None
        if kind == "model_type" or (not first.get("loc") and kind.endswith("_type")):
            raise EventValidationError(name, "<payload>", "expected a JSON object") from None
        raise EventValidationError(name, _field_of(first), first.get("msg", "invalid")) from None


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every event, keyed by topic short name (for docs and other languages)."""
    return {name: spec.event.model_json_schema() for name, spec in TOPICS.items()}
