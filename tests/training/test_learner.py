"""The online learner on its own: it learns a learnable stream, its steps follow the labels, weights count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from broadfast.training.learner import LabelRow, LearnerConfig, OnlineLearner
from broadfast.training.metrics import evaluate
from broadfast.model.student import StudentConfig, build_student

WORDS = ["drill", "hose", "lamp", "paint", "saw", "rake", "tile", "fan", "sink", "door", "bolt", "pipe"]


def learnable_pairs(n_queries: int, seed: int) -> pd.DataFrame:
    """Each query is a product word; an ad is relevant (3) when its title has that word, else not (1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        word = WORDS[q % len(WORDS)]
        for a in range(6):
            relevant = a % 2 == 0
            other = WORDS[(q + 1 + int(rng.integers(0, len(WORDS) - 1))) % len(WORDS)]
            other = other if other != word else WORDS[(WORDS.index(word) + 1) % len(WORDS)]
            title = f"{word} {other} model {a}" if relevant else f"{other} model {a}"
            rows.append({"query": f"{word} {q}", "title": title, "text": "", "relevance": 3.0 if relevant else 1.0, "grade": 2 if relevant else 0})
    return pd.DataFrame(rows)


def rows_of(df: pd.DataFrame) -> list[LabelRow]:
    out = []
    for i, r in enumerate(df.itertuples()):
        probs = [0.9, 0.05, 0.05] if r.grade == 0 else [0.05, 0.05, 0.9]
        out.append(LabelRow(pair_id=str(i), query=r.query, text=r.title, probs=probs, grade=r.grade, teacher_id="oracle:test"))
    return out


def spearman(learner: OnlineLearner, val: pd.DataFrame) -> float:
    return evaluate(val, learner.predict_proba(val["query"].tolist(), val["title"].tolist()))["spearman"]


@pytest.mark.parametrize("lr", [3e-3, 0.0])
def test_the_learner_improves_a_tiny_student_on_a_learnable_stream(lr: float) -> None:
    """It fails if the learner stops learning: with a zero learning rate the same stream must not help."""
    torch.manual_seed(0)
    stream, val = learnable_pairs(60, seed=0), learnable_pairs(12, seed=1)
    learner = OnlineLearner(build_student(StudentConfig.tiny(extractor="none")), LearnerConfig(passes=3, batch_size=16, lr=lr, head_lr=lr, warmup_steps=5, seed=0))
    before = spearman(learner, val)
    rows = rows_of(stream)
    for k in range(0, len(rows), 60):  # six rounds of 60 labels
        learner.learn_many(rows[k : k + 60])
    after = spearman(learner, val)
    if lr > 0:
        assert after - before > 0.3, (before, after)
    else:
        assert abs(after - before) < 0.05, (before, after)


def test_steps_follow_the_labels_and_each_fresh_label_is_trained_passes_times(monkeypatch: pytest.MonkeyPatch) -> None:
    learner = OnlineLearner(build_student(StudentConfig.tiny()), LearnerConfig(passes=3, batch_size=8, replay_fraction=0.25, seed=0))
    seen: list[list[str]] = []
    original = learner.to_batch

    def spy(rows: list[LabelRow]) -> dict:
        seen.append([r.pair_id for r in rows])
        return original(rows)

    monkeypatch.setattr(learner, "to_batch", spy)
    first = rows_of(learnable_pairs(4, seed=0))  # 24 labels, empty reservoir: 8 fresh a step
    stats = learner.learn_many(first)
    assert stats.steps == 9 and stats.labels == 24 and stats.teachers == {"oracle:test": 24}
    counts = pd.Series([p for batch in seen for p in batch]).value_counts()
    assert set(counts) == {3} and len(counts) == 24
    seen.clear()
    fresh = [LabelRow(pair_id=f"new{i}", query="q", text="t", probs=[0.1, 0.1, 0.8]) for i in range(12)]
    stats = learner.learn_many(fresh)  # 6 fresh + 2 replayed a step: 36 fresh slots -> 6 steps
    assert stats.steps == 6 and all(len(b) == 8 for b in seen)
    fresh_counts = pd.Series([p for b in seen for p in b if p.startswith("new")]).value_counts()
    assert set(fresh_counts) == {3} and len(fresh_counts) == 12
    assert all(sum(not p.startswith("new") for p in b) == 2 for b in seen)  # replayed old labels in every batch
    assert learner.steps == 15


def test_a_non_finite_label_skips_its_step_and_never_reaches_the_weights() -> None:
    learner = OnlineLearner(build_student(StudentConfig.tiny()), LearnerConfig(passes=1, batch_size=4, seed=0))
    before = {k: v.clone() for k, v in learner.student.state_dict().items()}
    bad = [LabelRow(pair_id=str(i), query="q", text="t", probs=[float("nan"), 0.5, 0.5]) for i in range(4)]
    stats = learner.learn_many(bad)
    assert stats.skipped == stats.steps == 1
    after = learner.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_labels_that_poison_a_step_are_named_and_never_replayed() -> None:
    learner = OnlineLearner(build_student(StudentConfig.tiny()), LearnerConfig(passes=1, batch_size=8, replay_fraction=0.0, seed=0))
    rows = rows_of(learnable_pairs(4, seed=5))[:6]
    poison = [LabelRow(pair_id=f"bad{i}", query="q", text="t", probs=[float("nan"), 0.5, 0.5], offset=100 + i) for i in range(2)]
    stats = learner.learn_many(rows + poison)  # one step of 8: skipped, because of the two
    assert stats.skipped == stats.steps == 1
    assert sorted(r.pair_id for r in stats.rejected) == ["bad0", "bad1"]  # only the poisonous ones are blamed
    assert all(r.pair_id.startswith("bad") is False for r in learner.buffer.reservoir) and len(learner.buffer.reservoir) == 6
    again = learner.learn_many(rows_of(learnable_pairs(2, seed=6))[:8])  # the next round trains: nothing poisoned is replayed
    assert again.skipped == 0 and not again.rejected


def test_the_settings_reach_the_optimizer() -> None:
    """The learner's AdamW takes the stream's β2 and the extractor/head rate ratio from the settings."""
    from broadfast.core.settings import Settings

    cfg = LearnerConfig.from_settings(Settings(online_lr=1e-4, online_head_lr_ratio=3.0, online_adam_beta2=0.97).training)
    learner = OnlineLearner(build_student(StudentConfig.tiny()), cfg)
    groups = learner.opt.param_groups
    assert {g["betas"] for g in groups} == {(0.9, 0.97)}
    assert sorted({round(g["lr"] / 1e-4, 6) for g in groups}) == [1.0, 3.0]
    defaults = LearnerConfig.from_settings(Settings().training)
    assert (defaults.adam_beta2, defaults.head_lr / defaults.lr) == (LearnerConfig.adam_beta2, LearnerConfig.head_lr / LearnerConfig.lr)
