"""The A/B experiment store on real Redis, and the sticky assignment."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis

from broadfast.core.experiments import (
    ExperimentError,
    ExperimentKeys,
    ExperimentStore,
    assign,
    assignment_key,
    bucket,
)


def test_assignment_is_sticky_and_follows_the_share() -> None:
    keys = [f"user:u{i}" for i in range(20_000)]
    arms = [assign(k, 0.2, "salt-a") for k in keys]
    share = arms.count("challenger") / len(arms)
    assert 0.19 < share < 0.21
    assert arms == [assign(k, 0.2, "salt-a") for k in keys]  # same key, same arm
    # another salt reshuffles who is in the challenger arm
    other = [assign(k, 0.2, "salt-b") for k in keys]
    assert sum(a != b for a, b in zip(arms, other)) > 1000
    # growing the share only moves champion users to the challenger, never back
    wider = [assign(k, 0.4, "salt-a") for k in keys]
    assert all(w == "challenger" for a, w in zip(arms, wider) if a == "challenger")
    assert 0.0 <= min(bucket(k, "s") for k in keys[:100]) and max(bucket(k, "s") for k in keys[:100]) < 1.0


def test_assignment_key_prefers_the_user() -> None:
    assert assignment_key("u1", "r1") == "user:u1"
    assert assignment_key(None, "r1") == "request:r1"


def test_keys_are_namespaced() -> None:
    keys = ExperimentKeys("ns")
    assert keys.current == "ns:experiment:current"
    assert keys.experiment("e1") == "ns:experiment:e1" and keys.counts("e1") == "ns:experiment:e1:counts"


@pytest.mark.integration
def test_start_promote_rollback_on_redis(bus_settings) -> None:
    store = ExperimentStore.from_settings(bus_settings)
    assert store.running() is None
    with pytest.raises(ExperimentError):
        store.rollback()
    with pytest.raises(ExperimentError, match="share"):
        store.start("v1", "v2", 1.5)
    exp = store.start("v1", "v2", 0.25, salt="s1")
    got = store.running()
    assert got == exp and got.status == "running" and got.share == 0.25 and got.salt == "s1"
    assert got.arm_for("u7", "r1") == assign("user:u7", 0.25, "s1")
    with pytest.raises(ExperimentError, match="still running"):
        store.start("v1", "v3", 0.1)
    store.record(exp.experiment_id, "challenger", ok=True, n=9)
    store.record(exp.experiment_id, "challenger", ok=False)
    assert store.counts(exp.experiment_id)["challenger"] == {"requests": 10, "errors": 1}
    ended = store.rollback("too slow")
    assert ended.status == "rolled_back" and ended.reason == "too slow" and ended.ended_ts is not None
    assert store.running() is None and store.get(exp.experiment_id).status == "rolled_back"
    second = store.start("v1", "v3", 0.1)
    assert store.promote("better CTR").status == "promoted"
    assert [e.experiment_id for e in store.history()] == [second.experiment_id, exp.experiment_id]
    # keys live under the settings' namespace only
    client = redis.Redis.from_url(bus_settings.redis.redis_url)
    assert all(k.decode().startswith(bus_settings.kafka.topic_prefix + ":") for k in client.keys("*"))


@pytest.mark.integration
def test_concurrent_transitions_have_one_winner(bus_settings) -> None:
    store = ExperimentStore.from_settings(bus_settings)
    store.start("v1", "v2", 0.5)
    outcomes: list[str] = []

    def end(fn) -> None:
        try:
            outcomes.append(fn().status)
        except ExperimentError:
            outcomes.append("refused")

    threads = [threading.Thread(target=end, args=(f,)) for f in [store.promote, store.rollback] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes).count("refused") == 7
    assert np.isin(outcomes, ["promoted", "rolled_back", "refused"]).all()
