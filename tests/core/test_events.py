"""Event contracts: round trips and refusals that name the field."""

from __future__ import annotations

import json

import pytest

from broadfast.core.errors import EventValidationError
from broadfast.core import events as ev

PROBS = (0.2, 0.5, 0.3)


def sample_events() -> list[ev.Event]:
    """One valid instance of each of the eight events."""
    return [
        ev.SearchRequest(request_id="r1", ts=1.5, user_id="u1", query="cordless drill", ads=[ev.Ad(ad_id="a1", title="Drill 18V", text="kit")]),
        ev.Scored(request_id="r1", ts=2.0, query="cordless drill", ad_id="a1", title="Drill 18V", position=0, score=ev.score_from_probs(PROBS), grade_probs=PROBS, model_version="v1", arm="challenger", experiment_id="e1", latency_ms=3.2, features={"ctr": 0.1}),
        ev.Click(request_id="r1", ts=3.0, query="cordless drill", ad_id="a1", position=0, clicked=True, user_id="u1"),
        ev.HardCase(pair_id=ev.pair_id("cordless drill", "a1"), query="cordless drill", ad_id="a1", title="Drill 18V", reasons=["uncertain", "novel"], student_probs=PROBS, model_version="v1", ts=4.0, first_scored_ts=2.0),
        ev.TeacherLabel(pair_id="p1", query="q", ad_id="a1", perspectives=[ev.Perspective(name=n, rationale=f"{n} says so", probs=PROBS) for n in ("intent", "attributes", "rules")], probs=PROBS, rationale_embeddings=[[0.1, 0.2]] * 3, teacher_id="smollm2-135m@mpcot-v1", ts=5.0),
        ev.ModelPublished(version="v2", parent_version="v1", uri="file:///reg/v2", sha256="a" * 64, metrics={"ndcg@10": 0.9}, trained_on={"relevance.labels": {"0": 41}}, ts=6.0),
        ev.Alert(kind="swap_failed", details={"version": "v3", "reason": "checksum"}, ts=7.0),
        ev.DeadLetter(source_topic="relevance.scored", partition=1, offset=42, error="bad", payload="{", payload_bytes=1, ts=8.0),
    ]


def test_table_covers_the_eight_events() -> None:
    assert set(ev.TOPICS) == {"requests", "scored", "clicks", "hardcases", "labels", "models", "alerts", "deadletter"}
    assert {type(e) for e in sample_events()} == {spec.event for spec in ev.TOPICS.values()}


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: type(e).__name__)
def test_round_trip(event: ev.Event) -> None:
    spec = ev.spec_for(event)
    raw = ev.encode(event)
    assert json.loads(raw)["schema_version"] == ev.SCHEMA_VERSION
    assert ev.decode(spec.name, raw) == event
    assert ev.encode_key(event) == str(getattr(event, spec.key_field)).encode()


def _scored_dict() -> dict:
    return json.loads(ev.encode(sample_events()[1]))


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda d: d.update(score="0.5"), "score", "valid number"),
        (lambda d: d.update(position=True), "position", "valid integer"),
        (lambda d: d.update(position=-1), "position", "greater than or equal"),
        (lambda d: d.pop("query"), "query", "Field required"),
        (lambda d: d.update(grade_probs=[0.5, 0.6, 0.2]), "grade_probs", "sum to 1"),
        (lambda d: d.update(grade_probs=[0.5, 0.5]), "grade_probs.2", "required"),
        (lambda d: d.update(grade_probs=[1.5, -0.5, 0.0]), "grade_probs", "within [0, 1]"),
        (lambda d: d.update(arm="treatment"), "arm", "champion"),
        (lambda d: d.update(surprise=1), "surprise", "Extra inputs"),
        (lambda d: d.update(schema_version=2), "schema_version", "1"),
        (lambda d: d.update(ts=None), "ts", "valid number"),
        (lambda d: d.update(ts=1e300), "ts", "less than or equal"),  # passed before, then overflowed the feature push
        (lambda d: d.update(features={"ctr": 1e300}), "features.ctr", "less than or equal"),
    ],
)
def test_invalid_field_is_named(mutate, field: str, reason: str) -> None:
    data = _scored_dict()
    mutate(data)
    with pytest.raises(EventValidationError) as info:
        ev.decode("scored", json.dumps(data).encode())
    assert info.value.field == field
    assert reason in info.value.reason
    assert f"'{field}'" in str(info.value) and "Scored" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json at all", "not valid JSON"),
        (b"[1, 2, 3]", "expected a JSON object"),
        (b"\xff\xfe{\"a\": 1}", "not valid UTF-8"),
        (None, "empty message"),
        (b"{" + b" " * (5 * 1024 * 1024) + b"}", "exceeds the limit"),
    ],
    ids=["not-json", "not-object", "bad-utf8", "null", "5MB"],
)
def test_malformed_payload_is_refused(raw: bytes | None, reason: str) -> None:
    with pytest.raises(EventValidationError) as info:
        ev.decode("clicks", raw)
    assert info.value.field == "<payload>"
    assert reason in info.value.reason


def test_label_embeddings_must_match_perspectives() -> None:
    data = json.loads(ev.encode(sample_events()[4]))
    data["rationale_embeddings"] = [[0.1]]
    with pytest.raises(EventValidationError) as info:
        ev.decode("labels", json.dumps(data).encode())
    assert info.value.field == "rationale_embeddings"


def test_label_embeddings_finite_in_float64_but_not_float32_are_refused() -> None:
    data = json.loads(ev.encode(sample_events()[4]))
    n = len(data["perspectives"])
    data["rationale_embeddings"] = [[1e39, 0.0]] * n  # finite as a Python float, inf in float32: it poisoned the trainer
    with pytest.raises(EventValidationError) as info:
        ev.decode("labels", json.dumps(data).encode())
    assert info.value.field == "rationale_embeddings" and "within" in info.value.reason


def test_pair_id_is_stable_under_normalisation() -> None:
    assert ev.pair_id("  Cordless   DRILL", "a1") == ev.pair_id("cordless drill", "a1")
    assert ev.pair_id("cordless drill", "a1") != ev.pair_id("cordless drill", "a2")
    assert ev.pair_id("cordless drill", "a1") != ev.pair_id("cordless drills", "a1")


def test_score_is_exact_plus_half_partial() -> None:
    assert ev.score_from_probs((0.2, 0.5, 0.3)) == pytest.approx(0.55)


def test_json_schemas_describe_every_event() -> None:
    schemas = ev.json_schemas()
    assert set(schemas) == set(ev.TOPICS)
    assert "grade_probs" in schemas["scored"]["properties"]


def _label_dict(**extra) -> dict:
    return {**json.loads(ev.encode(sample_events()[4])), **extra}


def test_label_carries_mass_confidence_grade_and_failed_perspectives() -> None:
    label = ev.TeacherLabel(
        pair_id="p1", query="q", ad_id="a1", probs=PROBS, teacher_id="vllm:m@mpcot-v1+rules-x", ts=5.0,
        perspectives=[ev.Perspective(name="intent", rationale="fits", probs=PROBS, mass=0.93), ev.Perspective(name="attributes", rationale="fits", probs=PROBS, mass=0.71)],
        confidence=0.82,
        failed_perspectives=[ev.FailedPerspective(name="rules", reason="grade-token mass 0.03 < BROADFAST_TEACHER_MIN_MASS 0.5; the most likely token was 'The'")],
    )  # fmt: skip
    back = ev.decode("labels", ev.encode(label))
    assert back == label
    assert [p.mass for p in back.perspectives] == [0.93, 0.71] and back.confidence == 0.82 and back.grade is None
    assert back.failed_perspectives[0].name == "rules" and "0.03" in back.failed_perspectives[0].reason
    oracle = ev.decode("labels", json.dumps(_label_dict(grade=2, confidence=1.0)).encode())
    assert oracle.grade == 2 and oracle.confidence == 1.0


def test_a_label_without_the_new_fields_still_decodes() -> None:
    old = _label_dict()
    for key in ("confidence", "grade", "failed_perspectives"):
        old.pop(key)
    for p in old["perspectives"]:
        p.pop("mass")
    label = ev.decode("labels", json.dumps(old).encode())
    assert label.confidence is None and label.grade is None and label.failed_perspectives == []
    assert all(p.mass is None for p in label.perspectives)


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        ({"confidence": 1.5}, "confidence", "less than or equal to 1"),
        ({"confidence": -0.1}, "confidence", "greater than or equal to 0"),
        ({"confidence": "0.5"}, "confidence", "valid number"),
        ({"grade": 3}, "grade", "less than or equal to 2"),
        ({"grade": 1.0}, "grade", "valid integer"),
        ({"failed_perspectives": [{"name": "other"}]}, "failed_perspectives.0.reason", "Field required"),
        ({"failed_perspectives": [{"name": "other", "reason": ""}]}, "failed_perspectives.0.reason", "at least 1 character"),
        ({"failed_perspectives": [{"name": "other", "reason": "r", "why": 1}]}, "failed_perspectives.0.why", "Extra inputs"),
        ({"failed_perspectives": [{"name": "rules", "reason": "unsure"}]}, "failed_perspectives", "cannot both give a grade and have failed"),
    ],
)
def test_invalid_label_confidence_fields_are_named(extra: dict, field: str, reason: str) -> None:
    with pytest.raises(EventValidationError) as info:
        ev.decode("labels", json.dumps(_label_dict(**extra)).encode())
    assert info.value.field == field
    assert reason in info.value.reason


@pytest.mark.parametrize(("mass", "reason"), [(1.01, "less than or equal to 1"), (-0.2, "greater than or equal to 0"), (float("nan"), "finite number")])
def test_perspective_mass_is_a_finite_share(mass: float, reason: str) -> None:
    data = _label_dict()
    data["perspectives"][1]["mass"] = mass
    with pytest.raises(EventValidationError) as info:
        ev.decode("labels", json.dumps(data).encode())
    assert info.value.field == "perspectives.1.mass"
    assert reason in info.value.reason
