"""A smaller student distilled from a trained one: the same architecture with fewer encoder layers.

``broadfast train offline --from-student DIR --layers N`` builds the smaller student with
:func:`shrink_student` (the source's config with ``num_hidden_layers=N`` and
``init_from="student"``; the embeddings, the N layers :func:`keep_layers` picks, the extractor,
the head and the alignment projection copied from the source), takes the source's grade
probabilities on the training pairs as the soft targets (:func:`student_targets`, together with
the human grade where the data has one) and trains it with the ordinary offline loop.

>>> keep_layers(6, 3), keep_layers(6, 2)
([0, 1, 2], [0, 1])
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from broadfast.model.student import WEIGHTS_FILE, Student
from broadfast.training.targets import Targets

log = logging.getLogger(__name__)

INIT_FROM = "student"  # StudentConfig.init_from of a shrunk student: its weights came from another student
_LAYER = re.compile(r"^encoder\.encoder\.layer\.(\d+)\.(.*)$")


def keep_layers(source_layers: int, layers: int) -> list[int]:
    """Which of the source's encoder layers (0-based) a ``layers``-layer student starts from: the bottom ``layers``.

    Measured (docs/student.md, "A smaller student"): shrinking the Home Depot MiniLM-L6 student
    and training briefly, keeping the bottom layers beat evenly spaced ones that end at the top
    layer (6→3: 0,1,2 > 0,2,4 > 0,2,5 > 1,3,5; 6→2: 0,1 ≥ 0,2 > 0,3, 1,4, 2,5, 0,5), as
    dropping the top layers did for the fine-tuned BERTs of Sajjad et al. (2020).
    """
    if not 1 <= layers < source_layers:
        raise ValueError(f"a shrunk student keeps between 1 and {source_layers - 1} of the source's {source_layers} layers, not {layers}")
    return list(range(layers))


def shrink_student(source: Student, layers: int, keep: Sequence[int] | None = None) -> tuple[Student, list[int]]:
    """A ``layers``-layer copy of ``source`` and the source layers it kept (default :func:`keep_layers`).

    Embeddings, the kept layers (in order), the extractor, the head and the alignment
    projection are copied; nothing is left at random. The copy is in training mode on the
    source's device and shares no tensor with the source.
    """
    total = source.config.layers
    kept = list(keep) if keep is not None else keep_layers(total, layers)
    if len(kept) != layers or sorted(set(kept)) != kept or not all(0 <= k < total for k in kept):
        raise ValueError(f"keep must be {layers} increasing layer indices of 0–{total - 1}, got {kept}")
    if layers >= total:
        raise ValueError(f"the source has {total} layers; a shrunk student needs fewer, not {layers}")
    config = dataclasses.replace(source.config, encoder={**source.config.encoder, "num_hidden_layers": layers}, init_from=INIT_FROM)
    student = Student(config, tokenizer=source.tokenizer)
    new_index = {old: new for new, old in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    for key, value in source.state_dict().items():
        match = _LAYER.match(key)
        if match is None:
            state[key] = value.detach().clone()
        elif int(match.group(1)) in new_index:
            state[f"encoder.encoder.layer.{new_index[int(match.group(1))]}.{match.group(2)}"] = value.detach().clone()
    student.load_state_dict(state, strict=True)  # every tensor of the smaller student comes from the source
    return student.to(source.device).train(), kept


def student_targets(source: Student, df: pd.DataFrame, batch_size: int = 128, chunk: int = 2048, progress: bool = True) -> Targets:
    """The source student's grade probabilities on ``df``'s pairs as soft targets; the human
    ``grade`` where the data has one (for the CE term), -1 elsewhere; no rationales."""
    from tqdm.auto import tqdm

    from broadfast.model.student import pair_texts

    queries, texts = pair_texts(df)
    probs = np.empty((len(df), 3), dtype=np.float32)
    with tqdm(total=len(df), desc="source student's soft labels", unit="pair", disable=not progress, leave=False) as bar:
        for start in range(0, len(df), chunk):
            stop = min(start + chunk, len(df))
            probs[start:stop] = source.predict_proba(queries[start:stop], texts[start:stop], batch_size=batch_size)
            bar.update(stop - start)
            log.info("source student's soft labels: %d of %d pairs", stop, len(df))
    grades = df["grade"].to_numpy(dtype=np.int64) if "grade" in df.columns else np.full(len(df), -1, dtype=np.int64)
    return Targets(probs, grades, None, np.zeros(len(df), dtype=bool), INIT_FROM)


def lineage(source_dir: Path, source: Student, kept: list[int]) -> dict[str, Any]:
    """What ``training.json`` (``trained_on["from_student"]``) records of the source."""
    from broadfast.model.registry import MANIFEST_FILE, sha256_file

    record: dict[str, Any] = {
        "folder": str(source_dir.resolve()), "sha256": sha256_file(source_dir / WEIGHTS_FILE),
        "source_layers": source.config.layers, "kept_layers": kept,
    }  # fmt: skip
    manifest = source_dir / MANIFEST_FILE
    if manifest.is_file():  # a registry version folder: name the version too
        import json

        try:
            record["version"] = json.loads(manifest.read_text()).get("version")
        except ValueError:
            pass
    return record
