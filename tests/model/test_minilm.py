"""Behaviour with the real packaged all-MiniLM-L6-v2: it loads into the student and scores pairs."""

from __future__ import annotations

import numpy as np
import torch

from broadfast.model.embedder import minilm_path
from broadfast.model.student import StudentConfig, build_student


def test_packaged_minilm_loads_into_the_student_and_gives_probabilities() -> None:
    from transformers import AutoModel

    torch.manual_seed(0)
    student = build_student(StudentConfig.minilm(max_length=64)).eval()
    counts = student.parameter_counts()
    assert 22_000_000 < counts["encoder"] < 23_000_000  # MiniLM-L6-H384
    assert 0 < counts["extractor"] < 0.02 * counts["encoder"]  # the extractor stays small

    # the encoder carries MiniLM's trained weights, not a random init
    reference = AutoModel.from_pretrained(str(minilm_path())).eval()
    enc = student.tokenizer(["cordless drill"], ["18V lithium-ion cordless drill kit"], return_tensors="pt")
    with torch.inference_mode():
        ours = student.encoder(**enc).last_hidden_state
        theirs = reference(**enc).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    probs = student.predict_proba(["cordless drill", "toilet seat"], ["18V cordless drill kit", "round closed front toilet seat in white"])
    assert probs.shape == (2, 3) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
