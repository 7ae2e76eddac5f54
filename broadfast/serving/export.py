"""The student as one ONNX graph: what both int8 backends start from, and how they feed it.

:func:`export_onnx` writes the whole scoring model (encoder, latent reasoning extractor, head;
from ``input_ids``/``attention_mask``/``token_type_ids`` to grade logits) in fp32 with dynamic
batch and sequence axes. :func:`pad_feeds` pads tokenised pairs into those three inputs, and
:func:`softmax_rows` turns the logits into grade probabilities.

>>> pad_feeds([[101, 7, 102], [101, 102]], [[0, 0, 0], [0, 0]], pad_id=0)["attention_mask"].tolist()
[[1, 1, 1], [1, 1, 0]]
>>> softmax_rows(np.array([[0.0, 0.0]])).tolist()
[[0.5, 0.5]]
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(student: Any, path: Path) -> None:
    """Export encoder + extractor + head (fp32) to ``path``, with dynamic batch and sequence axes."""
    import torch

    from broadfast.serving.probe import PROBE_PAIRS
    from broadfast.model.student import pad_batch

    class Scoring(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.student(input_ids, attention_mask, token_type_ids).logits

    enc = student.tokenize([q for q, _ in PROBE_PAIRS], [t for _, t in PROBE_PAIRS])
    example = pad_batch(enc["input_ids"], enc["token_type_ids"], student.tokenizer.pad_token_id or 0, student.device)
    was_training = student.training
    student.eval()
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {"logits": {0: "batch"}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on transformers' shape checks (the traced branches hold for any size)
            torch.onnx.export(Scoring().eval(), tuple(example[k] for k in INPUTS), str(path), input_names=list(INPUTS),
                              output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)  # fmt: skip
    finally:
        student.train(was_training)


def pad_feeds(ids: list[list[int]], types: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """The graph's three int64 inputs for tokenised pairs, right-padded to the longest."""
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, (x, t) in enumerate(zip(ids, types)):
        input_ids[row, : len(x)] = x
        token_type_ids[row, : len(t)] = t
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids}


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32."""
    z = logits.astype(np.float32)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def score_runs(student: Any, queries: list[str], texts: list[str], rows_per_run: int, run: Any) -> np.ndarray:
    """Grade probabilities (n, 3) in input order: the pairs tokenised by ``student``, sorted by length and fed
    ``rows_per_run`` at a time to ``run(feeds) -> logits``."""
    if len(queries) != len(texts):
        raise ValueError(f"{len(queries)} queries but {len(texts)} texts")
    n = len(queries)
    out = np.empty((n, 3), dtype=np.float32)
    if n == 0:
        return out
    enc = student.tokenize(queries, texts)
    ids, types = enc["input_ids"], enc["token_type_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    pad = student.tokenizer.pad_token_id or 0
    for start in range(0, n, rows_per_run):
        idx = order[start : start + rows_per_run]
        out[idx] = softmax_rows(run(pad_feeds([ids[i] for i in idx], [types[i] for i in idx], pad)))
    return out


class Int8Backend:
    """What the two int8 backends share: the student whose tokenizer feeds the graph (and the PyTorch reference it
    is checked against), the converted file and its meta, threads, pairs per run. A subclass opens its runtime in
    ``__init__`` and runs one padded batch in :meth:`run`."""

    name = ""
    runtime = ""  # the meta key naming the runtime's version

    def __init__(self, student: Any, path: Path, threads: int, meta: dict[str, Any], rows_per_run: int) -> None:
        self.student = student
        self.path = path
        self.meta = meta
        self.check: dict[str, Any] = {}
        self.threads = threads
        self.rows_per_run = rows_per_run

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Grade probabilities (n, 3), in input order; ``rows_per_run`` length-sorted pairs per run
        (``batch_size`` is the PyTorch path's and does not apply)."""
        return score_runs(self.student, queries, texts, self.rows_per_run, self.run)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threads": self.threads, "rows_per_run": self.rows_per_run, self.runtime: self.meta.get(self.runtime), "converted_at": self.meta.get("converted_at"), "check": self.check}
