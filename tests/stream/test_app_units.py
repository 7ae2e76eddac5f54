"""Unit tests of the stream app's pure parts: hardness, token bucket, counter increments, faust config."""

from __future__ import annotations

import math

import pytest

from broadfast.core.settings import Settings
from broadfast.core.connections import faust_config
from broadfast.stream.app import faust_app_id
from broadfast.stream.counters import CounterValues, increments, window_start
from broadfast.core.events import Click, Scored
from broadfast.core.budget import refill, TokenBucket
from broadfast.core.keys import labelled_pairs_key
from broadfast.stream.sampler import DISAGREEMENT, LONG_TAIL, NOVEL, UNCERTAINTY, hardness_reasons, HardnessConfig, is_hard, margin, normalized_entropy

CFG = HardnessConfig(entropy_threshold=0.9, margin_threshold=0.1, disagreement_threshold=0.25, long_tail_max_requests=1, long_tail_min_traffic=10)


def test_entropy_and_margin() -> None:
    assert normalized_entropy((1 / 3, 1 / 3, 1 / 3)) == pytest.approx(1.0)
    assert normalized_entropy((1.0, 0.0, 0.0)) == 0.0
    assert margin((0.45, 0.10, 0.45)) == pytest.approx(0.0)
    assert margin((0.7, 0.2, 0.1)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("probs", "kwargs", "expected"),
    [
        ((0.34, 0.33, 0.33), {}, [UNCERTAINTY, NOVEL]),  # flat: entropy
        ((0.45, 0.45, 0.10), {}, [UNCERTAINTY, NOVEL]),  # two grades tie: margin (entropy 0.86 < 0.9)
        ((0.9, 0.05, 0.05), {}, [NOVEL]),
        ((0.9, 0.05, 0.05), {"score": 0.075, "other_arm_score": 0.875}, [DISAGREEMENT, NOVEL]),
        ((0.9, 0.05, 0.05), {"score": 0.075, "other_arm_score": 0.3}, [NOVEL]),  # 0.225 < 0.25
        ((0.9, 0.05, 0.05), {"query_requests": 1, "window_requests": 10}, [LONG_TAIL, NOVEL]),
        ((0.9, 0.05, 0.05), {"query_requests": 2, "window_requests": 10}, [NOVEL]),
        ((0.9, 0.05, 0.05), {"query_requests": 1, "window_requests": 9}, [NOVEL]),  # too little traffic to judge
    ],
)
def test_reasons(probs, kwargs, expected) -> None:
    assert hardness_reasons(probs, CFG, labelled=False, **kwargs) == expected


def test_labelled_pairs_are_never_hard_and_novelty_alone_is_opt_in() -> None:
    flat = hardness_reasons((0.34, 0.33, 0.33), CFG, labelled=True)
    assert flat == [UNCERTAINTY] and not is_hard(flat, CFG)
    only_novel = hardness_reasons((0.9, 0.05, 0.05), CFG, labelled=False)
    assert not is_hard(only_novel, CFG)
    assert is_hard(only_novel, HardnessConfig(sample_novel=True))


def test_token_bucket_refills_at_rate_up_to_capacity() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3.0, tokens=3.0, last=0.0)
    assert bucket.take_upto(0.0, 5) == 3
    assert bucket.take_upto(0.25, 1) == 0  # half a token
    assert bucket.take_upto(0.5, 2) == 1
    assert bucket.take_upto(100.0, 10) == 3  # capped
    assert refill(0.0, 10.0, 5.0, 1.0, 3.0) == 0.0  # a clock going back adds nothing


def test_counter_increments_and_window() -> None:
    sc = Scored(request_id="r", ts=7201.0, query=" Drill  Bit", ad_id="a1", title="t", position=0, score=0.5, grade_probs=(0.25, 0.5, 0.25), model_version="v", latency_ms=1)
    assert increments(sc) == [("ad", "a1", "scored"), ("query", "drill bit", "scored")]
    click = Click(request_id="r", ts=1.0, query="x", ad_id="a1", position=0, clicked=True)
    assert {f for _, _, f in increments(click)} == {"impressions", "clicks"}
    skip = Click(request_id="r", ts=1.0, query="x", ad_id="a1", position=0, clicked=False)
    assert {f for _, _, f in increments(skip)} == {"impressions"}
    assert window_start(7201.0, 3600) == 7200
    assert CounterValues().ctr == 0.0 and math.isclose(CounterValues(impressions=3, clicks=1).ctr, 1 / 3)


def test_faust_config_switches_tansu_workarounds_by_flavor_only() -> None:
    tansu = faust_config(Settings(kafka_bootstrap="a:1", kafka_flavor="tansu", topic_prefix="p"))
    kafka = faust_config(Settings(kafka_bootstrap="a:1", kafka_flavor="kafka", topic_prefix="p"))
    assert tansu["broker_session_timeout"] == 6 and tansu["broker_heartbeat_interval"] == 2 and tansu["producer_max_batch_size"] == 1
    for key in ("broker_session_timeout", "broker_heartbeat_interval", "producer_max_batch_size"):
        assert key not in kafka  # Kafka's (faust's) defaults
    assert tansu["processing_guarantee"] == kafka["processing_guarantee"] == "at_least_once"
    assert kafka["id"] == faust_app_id(Settings(topic_prefix="p")) == "p.stream"
    # faust accepts the rendered config as it is
    import faust

    app = faust.App(**tansu)
    assert app.conf.broker_session_timeout == 6 and app.conf.producer_max_batch_size == 1


def test_labelled_set_key_is_per_prefix() -> None:
    assert labelled_pairs_key(Settings(topic_prefix="relevance")) == "relevance:labelled_pairs"
    assert labelled_pairs_key(Settings(topic_prefix="t1")) != labelled_pairs_key(Settings(topic_prefix="t2"))
