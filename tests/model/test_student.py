"""The student's architecture, probabilities and checkpoint format (tiny config, from scratch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from broadfast.model.errors import CheckpointError
from broadfast.model.student import StudentConfig, build_student, load_student, save_student

QUERIES = ["cordless drill", "paint roller", "angle bracket"]
TEXTS = ["18V cordless drill kit with battery", "9 in. roller cover", "simpson strong-tie 90 degree angle"]


def _batch(student):
    enc = student.tokenizer(QUERIES, TEXTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


@pytest.mark.parametrize("extractor", ["none", "mlp", "attention"])
def test_output_shapes(extractor: str) -> None:
    torch.manual_seed(0)
    cfg = StudentConfig.tiny(extractor=extractor, n_perspectives=4, latent_dim=8)
    student = build_student(cfg).train()
    out = student(*_batch(student))
    assert out.logits.shape == (3, 3)
    if extractor == "none":
        assert out.latents is None and out.aligned is None
        assert student.parameter_counts()["extractor"] == 0
    else:
        assert out.latents.shape == (3, 4, 8)
        assert out.aligned.shape == (3, 4, 384)  # projected to the rationale embedding size
        assert student.parameter_counts()["extractor"] > 0
    student.eval()
    assert student(*_batch(student)).aligned is None  # the projection is training-only


def test_latents_depend_on_the_pair() -> None:
    torch.manual_seed(0)
    student = build_student(StudentConfig.tiny(extractor="attention", dropout=0.0)).eval()
    out = student(*_batch(student))
    assert not torch.allclose(out.latents[0], out.latents[1])


def test_padding_does_not_change_predictions() -> None:
    torch.manual_seed(0)
    student = build_student(StudentConfig.tiny(extractor="attention")).eval()
    alone = student.predict_proba(QUERIES[:1], TEXTS[:1])
    together = student.predict_proba(QUERIES, TEXTS)  # batched with longer pairs: padded
    np.testing.assert_allclose(alone[0], together[0], atol=1e-5)


def test_predict_proba_is_a_distribution_in_input_order() -> None:
    torch.manual_seed(0)
    student = build_student(StudentConfig.tiny())
    probs = student.predict_proba(QUERIES, TEXTS, batch_size=2)
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    reversed_probs = student.predict_proba(QUERIES[::-1], TEXTS[::-1], batch_size=2)
    np.testing.assert_allclose(reversed_probs[::-1], probs, atol=1e-5)
    assert student.predict_proba([], []).shape == (0, 3)


@pytest.mark.parametrize("extractor", ["mlp", "attention"])
def test_checkpoint_round_trips_exactly(tmp_path: Path, extractor: str) -> None:
    torch.manual_seed(1)
    student = build_student(StudentConfig.tiny(extractor=extractor))
    save_student(student, tmp_path / "m")
    loaded = load_student(tmp_path / "m")
    assert loaded.config == student.config
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(student.predict_proba(QUERIES, TEXTS), loaded.predict_proba(QUERIES, TEXTS))
    # self-contained: the tokenizer travelled with it
    assert loaded.tokenizer(QUERIES[0])["input_ids"] == student.tokenizer(QUERIES[0])["input_ids"]


def test_corrupt_weights_are_refused(tmp_path: Path) -> None:
    save_student(build_student(StudentConfig.tiny()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_student(tmp_path / "m")


def test_mismatched_config_is_refused(tmp_path: Path) -> None:
    save_student(build_student(StudentConfig.tiny(n_perspectives=3)), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    payload = json.loads(config.read_text())
    payload["student"]["n_perspectives"] = 5
    config.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_student(tmp_path / "m")


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    save_student(build_student(StudentConfig.tiny(extractor="mlp")), tmp_path / "mlp")
    save_student(build_student(StudentConfig.tiny(extractor="attention")), tmp_path / "att")
    (tmp_path / "mlp" / "model.safetensors").write_bytes((tmp_path / "att" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="missing|unexpected"):
        load_student(tmp_path / "mlp")


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    student = build_student(StudentConfig.tiny())
    with torch.no_grad():
        student.head[-1].weight[0, 0] = float("nan")
    save_student(student, tmp_path / "m")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_student(tmp_path / "m")


def test_missing_or_foreign_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_student(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="not a valid student config"):
        load_student(tmp_path)


def test_a_folder_without_its_tokenizer_or_with_a_foreign_one_is_refused(tmp_path: Path) -> None:
    save_student(build_student(StudentConfig.tiny()), tmp_path / "m")
    load_student(tmp_path / "m")  # whole: loads
    (tmp_path / "m" / "tokenizer.json").unlink()  # transformers would fall back to a stub tokenizer that scores everything alike
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_student(tmp_path / "m")
    save_student(build_student(StudentConfig.tiny()), tmp_path / "n")
    config = tmp_path / "n" / "config.json"
    payload = json.loads(config.read_text())
    payload["student"]["encoder"]["vocab_size"] = 50_000  # an encoder of another vocabulary
    config.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_student(tmp_path / "n")
