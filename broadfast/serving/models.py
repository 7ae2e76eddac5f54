"""Model versions as the server holds them, and the checks a version passes before it goes live.

A version goes live only after: its files match the registry manifest's sha256 (and the
announcement's), the checkpoint loads with the shapes its config names
(:func:`broadfast.model.student.load_student`), its config is servable (three grades, token ids
within the vocabulary, ``max_length`` within the position table), its inference backend
(``BROADFAST_SERVE_BACKEND``, :mod:`broadfast.serving.backends`) is built and agrees with PyTorch, and a *probe batch*
of fixed pairs gives finite probabilities in [0, 1] that agree with the live model:

    agreement = 1 - mean |score_new - score_live|   (over the probe pairs)

which must be at least ``BROADFAST_SERVE_PROBE_AGREEMENT_FLOOR``. A failed check raises
:class:`~broadfast.serving.errors.SwapRefused` naming the stage.

>>> agreement(np.array([0.2, 0.8]), np.array([0.3, 0.7]))
0.9
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.core.settings import Settings
from broadfast.serving.errors import SwapRefused
from broadfast.serving.probe import PROBE_PAIRS
from broadfast.core.events import score_from_probs

log = logging.getLogger(__name__)



MIN_PROBE_SPREAD = 1e-6  # probe scores closer together than this: the model scores everything alike (e.g. a stub tokenizer)


@dataclass(eq=False)
class LiveModel:
    """One resident version: the student, the backend that scores with it, and where it came from."""

    version: str
    student: Any  # broadfast.model.student.Student
    sha256: str
    source: str
    loaded_at: float = field(default_factory=time.time)
    backend: Any | None = None  # broadfast.serving.backends.Backend; None: the PyTorch student itself

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else "torch"

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Grade probabilities (n, 3) from the backend in use."""
        return (self.backend or self.student).predict_proba(queries, texts, batch_size=batch_size)

    def info(self) -> dict[str, Any]:
        cfg = self.student.config
        backend = self.backend.describe() if self.backend is not None else {"name": "torch"}
        return {"version": self.version, "sha256": self.sha256, "source": self.source, "loaded_at": self.loaded_at,
                "extractor": cfg.extractor, "max_length": cfg.max_length, "backend": backend}  # fmt: skip


def device_of(settings: Settings) -> str:
    """The torch device models are served on (``BROADFAST_SERVE_DEVICE``, else cuda when available)."""
    if settings.serving.serve_device:
        return settings.serving.serve_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_folder(path: str | Path, settings: Settings) -> LiveModel:
    """A model folder (``--model DIR``); its version is the manifest's, else ``<folder>-<sha8>``."""
    from broadfast.model.errors import CheckpointError
    from broadfast.model.registry import MANIFEST_FILE, sha256_file
    from broadfast.model.student import WEIGHTS_FILE, load_student

    path = Path(path)
    name = path.name or str(path)
    try:
        student = load_student(path, device_of(settings))
    except CheckpointError as exc:
        raise SwapRefused(name, "load", str(exc)) from exc
    sha = sha256_file(path / WEIGHTS_FILE)
    manifest = path / MANIFEST_FILE
    version = json.loads(manifest.read_text()).get("version") if manifest.exists() else None
    model = LiveModel(version or f"{name}-{sha[:8]}", student, sha, str(path.resolve()))
    check_config(model)
    attach_backend(model, path, settings)
    return model


def load_version(registry: Any, version: str, settings: Settings, expected_sha256: str | None = None) -> LiveModel:
    """A registry version: checksums against the manifest (and the announcement), then load."""
    from broadfast.model.errors import CheckpointError, RegistryError
    from broadfast.model.student import load_student

    try:
        manifest = registry.show(version)
    except RegistryError as exc:
        raise SwapRefused(version, "registry", str(exc)) from exc
    try:
        if expected_sha256 is not None and manifest.sha256 != expected_sha256:
            raise SwapRefused(version, "checksum", f"the announcement's sha256 {expected_sha256[:16]}… differs from the registry manifest's {manifest.sha256[:16]}…")
        folder = registry.verify(version)
    except RegistryError as exc:  # ChecksumMismatch included
        raise SwapRefused(version, "checksum", str(exc)) from exc
    try:
        student = load_student(folder, device_of(settings))
    except CheckpointError as exc:
        raise SwapRefused(version, "load", str(exc)) from exc
    model = LiveModel(version, student, manifest.sha256, manifest.uri or str(folder))
    check_config(model)
    attach_backend(model, folder, settings)
    return model


def attach_backend(model: LiveModel, folder: Path, settings: Settings) -> None:
    """Build the backend ``BROADFAST_SERVE_BACKEND`` names (an int8 one: converted once, cached, checked
    against PyTorch); a failure refuses the version at the ``convert`` or ``backend`` check."""
    from broadfast.serving.backends import load_backend
    from broadfast.serving.errors import BackendError

    try:
        model.backend = load_backend(model.student, folder, settings.serving.serve_backend, device_of(settings), settings.torch_threads)
    except BackendError as exc:
        raise SwapRefused(model.version, exc.stage, exc.reason) from exc


def check_config(model: LiveModel) -> None:
    """The checkpoint is servable: three grades out, token ids inside the vocabulary, positions enough."""
    student = model.student
    last = [m for m in student.head.modules() if hasattr(m, "out_features")][-1]
    if last.out_features != 3:
        raise SwapRefused(model.version, "shapes", f"the head gives {last.out_features} outputs, serving needs 3 grades")
    enc = student.encoder.config
    if student.tokenizer is None:
        raise SwapRefused(model.version, "shapes", "the model folder has no tokenizer")
    if len(student.tokenizer) > enc.vocab_size:
        raise SwapRefused(model.version, "shapes", f"the tokenizer has {len(student.tokenizer)} tokens but the encoder's vocabulary only {enc.vocab_size}")
    if student.config.max_length > enc.max_position_embeddings:
        raise SwapRefused(model.version, "shapes", f"max_length {student.config.max_length} exceeds the encoder's {enc.max_position_embeddings} positions")


def probe_scores(model: LiveModel) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, scores) of the probe pairs."""
    queries = [q for q, _ in PROBE_PAIRS]
    texts = [t for _, t in PROBE_PAIRS]
    probs = model.predict_proba(queries, texts)
    return probs, np.array([score_from_probs(p) for p in probs])


def agreement(new: np.ndarray, live: np.ndarray) -> float:
    """1 - mean absolute score difference (1: identical scores)."""
    return round(1.0 - float(np.mean(np.abs(new - live))), 6)


def spearman(new: np.ndarray, live: np.ndarray) -> float | None:
    """Rank correlation of the probe scores (reported, not gated: near-constant scores make it noise)."""
    from scipy.stats import spearmanr

    value = float(spearmanr(new, live).statistic)
    return value if math.isfinite(value) else None


def probe(candidate: LiveModel, live: LiveModel | None, floor: float) -> dict[str, Any]:
    """Run the probe batch; returns its report or raises :class:`SwapRefused` (stage ``probe``)."""
    try:
        probs, scores = probe_scores(candidate)
    except Exception as exc:
        raise SwapRefused(candidate.version, "probe", f"the probe batch failed: {exc}") from exc
    if not np.isfinite(probs).all():
        raise SwapRefused(candidate.version, "probe", "non-finite probabilities on the probe pairs")
    if (probs < 0).any() or (probs > 1).any() or not np.allclose(probs.sum(1), 1.0, atol=1e-3):
        raise SwapRefused(candidate.version, "probe", "probabilities outside [0, 1] or not summing to 1 on the probe pairs")
    spread = float(scores.max() - scores.min())
    if spread < MIN_PROBE_SPREAD:
        raise SwapRefused(candidate.version, "probe", f"every probe pair gets the same score ({scores.mean():.6f}, range {spread:.1e}): a model that cannot tell a drill from a garden hose cannot rank")
    report: dict[str, Any] = {"pairs": len(PROBE_PAIRS), "mean_score": round(float(scores.mean()), 6), "spread": round(spread, 6)}
    if live is not None:
        _, live_scores = probe_scores(live)
        report |= {"against": live.version, "agreement": agreement(scores, live_scores), "spearman": spearman(scores, live_scores), "floor": floor}
        if report["agreement"] < floor:
            raise SwapRefused(
                candidate.version, "probe",
                f"agreement with the live {live.version} is {report['agreement']:.3f} (1 - mean |Δscore| over {len(PROBE_PAIRS)} probe pairs), below the floor {floor}",
            )  # fmt: skip
    return report
