"""Each LRKD loss term falls when optimised on a fixed batch; the terms mean what they say."""

from __future__ import annotations

import pytest
import torch

from broadfast.training.losses import LossConfig, align_loss, ce_loss, kd_loss, lrkd_loss
from broadfast.model.student import StudentConfig, build_student

QUERIES = ["cordless drill", "paint roller", "angle bracket", "toilet seat"]
TEXTS = ["18V cordless drill kit", "9 in. roller cover", "simpson 90 degree angle", "ceramic floor tile"]


def _fixed_batch(student):
    enc = student.tokenizer(QUERIES, TEXTS, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    teacher = torch.tensor([[0.05, 0.15, 0.8], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.85, 0.1, 0.05]])
    grades = torch.tensor([2, 1, 0, -1])  # the last row has no human grade
    rationale = torch.nn.functional.normalize(torch.randn(4, 3, 384, generator=g), dim=-1)
    has = torch.tensor([True, True, False, True])
    return enc, teacher, grades, rationale, has


def _loss_curve(term: str, steps: int = 40) -> list[float]:
    torch.manual_seed(0)
    student = build_student(StudentConfig.tiny(extractor="mlp", dropout=0.0)).train()
    enc, teacher, grades, rationale, has = _fixed_batch(student)
    weights = {"kd": (1.0, 0.0, 0.0), "ce": (0.0, 1.0, 0.0), "align": (0.0, 0.0, 1.0)}[term]
    cfg = LossConfig(kd_weight=weights[0], ce_weight=weights[1], align_weight=weights[2])
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    curve = []
    for _ in range(steps):
        out = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        loss, parts = lrkd_loss(out, teacher, grades, rationale, has, cfg)
        curve.append(parts[term])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


@pytest.mark.parametrize("term", ["kd", "ce", "align"])
def test_each_loss_falls_on_a_fixed_batch(term: str) -> None:
    curve = _loss_curve(term)
    assert curve[-1] < 0.5 * curve[0], f"{term}: {curve[0]:.4f} → {curve[-1]:.4f}"


def test_kd_is_zero_only_at_the_teacher() -> None:
    teacher = torch.tensor([[0.2, 0.3, 0.5]])
    assert kd_loss(teacher.log(), teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(torch.zeros(1, 3), teacher, temperature=2.0).item() > 0.01


def test_ce_ignores_rows_without_a_grade() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert ce_loss(logits, torch.tensor([-1, -1])).item() == 0.0
    assert ce_loss(logits, torch.tensor([0, -1])).item() == pytest.approx(ce_loss(logits[:1], torch.tensor([0])).item())


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_alignment_uses_only_rows_with_rationales(kind: str) -> None:
    target = torch.nn.functional.normalize(torch.randn(2, 3, 384), dim=-1)
    aligned = target.clone()
    aligned[1] = -target[1]  # row 1 is far off, but has no rationale
    has = torch.tensor([True, False])
    assert align_loss(aligned, target, has, kind).item() == pytest.approx(0.0, abs=1e-6)
    assert align_loss(aligned, target, torch.tensor([True, True]), kind).item() > 0.1
    assert align_loss(aligned, target, torch.tensor([False, False]), kind).item() == 0.0


def test_ablation_switches() -> None:
    torch.manual_seed(0)
    enc = None
    for extractor, align_weight, expected in (("none", 0.5, {"kd", "ce", "total"}), ("mlp", 0.0, {"kd", "ce", "total"}), ("mlp", 0.5, {"kd", "ce", "align", "total"})):
        student = build_student(StudentConfig.tiny(extractor=extractor)).train()
        enc, teacher, grades, rationale, has = _fixed_batch(student)
        out = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        _, parts = lrkd_loss(out, teacher, grades, rationale, has, LossConfig(align_weight=align_weight))
        assert set(parts) == expected, (extractor, align_weight)


def test_row_weights_weigh_the_kd_and_ce_terms() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    grades = torch.tensor([2, 0])
    only_first = torch.tensor([1.0, 0.0])  # the second row counts in the mean's denominator, not its sum
    assert kd_loss(logits, teacher, 2.0, weights=only_first).item() == pytest.approx(kd_loss(logits[:1], teacher[:1], 2.0).item() / 2)
    assert ce_loss(logits, grades, only_first).item() == pytest.approx(ce_loss(logits[:1], grades[:1]).item() / 2)
    half = torch.tensor([0.5, 0.5])  # a batch of unsure labels takes half the step
    assert kd_loss(logits, teacher, 2.0, weights=half).item() == pytest.approx(kd_loss(logits, teacher, 2.0).item() / 2)
    assert kd_loss(logits, teacher, 2.0, weights=torch.ones(2)).item() == pytest.approx(kd_loss(logits, teacher, 2.0).item())
    assert kd_loss(logits, teacher, 2.0, weights=torch.zeros(2)).item() == 0.0
