"""Inference backends of the served student: PyTorch, or an int8 model (OpenVINO or ONNX Runtime).

A backend turns (query, ad text) pairs into grade probabilities, like
:meth:`broadfast.model.student.Student.predict_proba`; tokenisation stays in Python either way.

* ``torch``: the student itself (fp32 on CPU, bf16 autocast on a GPU).
* ``openvino-int8`` (:mod:`broadfast.serving.openvino_int8`): static int8 (weights and activations) by NNCF,
  run by OpenVINO, several pairs a run. The fastest on a CPU, and ``auto``'s choice there.
* ``onnx-int8`` (:mod:`broadfast.serving.onnx_int8`): dynamic int8 (weights) by ONNX Runtime, one pair a run.

Both int8 backends start from the whole scoring model (encoder, latent reasoning extractor, head)
exported to ONNX (:mod:`broadfast.serving.export`). A version is converted once and cached in
``<model folder>/<backend>/`` with ``meta.json`` recording the source weights' sha256, each converted
file's sha256 and the runtime versions; a cache that does not match on every count is rebuilt,
never trusted.

Before it serves, a converted model must agree with PyTorch on the probe pairs: relevance
scores (``P(exact) + ½·P(partial)``) within ``MAX_SCORE_DIFF`` of fp32 on every pair and within
``MAX_MEAN_SCORE_DIFF`` on average, and a Spearman of at least ``MIN_SPEARMAN`` when the fp32 scores
spread at least ``RANK_SPREAD`` (closer than that, int8 rounding reorders near-ties and rank
correlation is noise). The bounds are set from int8's measured error on trained students, with room
(see the constants), so they catch a broken conversion, not int8's rounding.
A failure raises :class:`~broadfast.serving.errors.BackendError`, which serving turns into a refused swap.

>>> resolve_backend("auto", "cuda")
'torch'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from broadfast.serving import export, onnx_int8, openvino_int8
from broadfast.serving.errors import BackendError
from broadfast.core.events import score_from_probs

log = logging.getLogger(__name__)

# The int8 backends, fastest first (``auto`` takes the first one installed). Each module has NAME, CACHE_DIR,
# MODEL_FILE, FILES, FORMAT, available(), versions(), quantize(fp32, out, student) and a backend class.
INT8 = {m.NAME: m for m in (openvino_int8, onnx_int8)}
BACKENDS = ("torch", *INT8)
META_FILE = "meta.json"
# Agreement of int8 with fp32 on the probe pairs, per-channel weights (benchmarks/int8_agreement.py, results/int8_agreement.md).
# On six trained MiniLM-L6 students (five versions of a demo run, probe spread 0.03-0.10, and one trained on 6k Home
# Depot pairs, spread 0.49) the worst onnx-int8 figures were max |Δscore| 0.033, mean 0.010, Spearman 0.977; per-tensor
# weights gave up to 0.031 / 0.015 / 0.903 there and 0.054-0.058 (Spearman 0.886) on versions trained longer online,
# which is why the weights are quantized per channel. The bounds leave about 3× room over the worst measured
# rounding; a broken conversion (wrong graph, spoilt weights) moves scores by 0.1-1.
MAX_SCORE_DIFF = 0.1
MAX_MEAN_SCORE_DIFF = 0.03
MIN_SPEARMAN = 0.9
RANK_SPREAD = 0.1
# Where export and quantization run. Tracing the model and rewriting its graph hold the GIL for seconds, which in the
# serving process stalls the requests the live version answers meanwhile; a child process (ISOLATE) avoids that.
# Measured under 8 saturating clients (hd6k, benchmarks/serving.py --swap-only, onnx-int8): child at equal priority,
# live 16.6 s after the announcement with p99 during the swap 1.7× steady state; at nice 10, 84 s and 1.2×; in-process
# (another run) 12.5 s and 2.6×. But in the 5-minute demo each child, importing torch afresh, took 14-22 s a version
# (in-process 3-4 s): swaps fell behind the publishes and the demo's freshness p50 went from 30 s to 105 s, while its
# server p99 fell from 659 to 238 ms. Freshness is what the loop exists for, so conversion stays in-process until a
# long-lived converter process (torch imported once) removes the start-up cost.
ISOLATE = False
CHILD_NICE = 0
CONVERT_TIMEOUT_S = 600


class Backend(Protocol):
    """What the batcher, the probe and ``predict`` score with."""

    name: str

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


class TorchBackend:
    """The PyTorch student as it is."""

    name = "torch"

    def __init__(self, student: Any) -> None:
        self.student = student

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.student.predict_proba(queries, texts, batch_size=batch_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": str(self.student.device)}


# -- choosing ---------------------------------------------------------------------------------
def resolve_backend(setting: str, device: str) -> str:
    """The backend a ``serve_backend`` setting means on ``device``: ``auto`` is the fastest int8 backend installed
    (openvino-int8, then onnx-int8) on a CPU, else torch."""
    if setting == "auto":
        if device != "cpu":
            return "torch"
        return next((name for name, kind in INT8.items() if kind.available()), "torch")
    if setting not in BACKENDS:
        raise BackendError("convert", f"unknown inference backend {setting!r}: one of auto, {', '.join(BACKENDS)}")
    return setting


def load_backend(student: Any, folder: Path, setting: str, device: str, threads: int) -> Backend:
    """The backend ``setting`` names for ``student`` (whose model folder is ``folder``), checked
    against PyTorch before it is returned; raises :class:`BackendError`."""
    name = resolve_backend(setting, device)
    if name == "torch":
        return TorchBackend(student)
    kind = INT8[name]
    if not kind.available():
        raise BackendError("convert", f"the {name} backend is not installed (pip install 'broadfast[serving]'), or set BROADFAST_SERVE_BACKEND=torch")
    started = time.perf_counter()
    folder = Path(folder)
    path, meta, cached = convert(student, folder, name)
    try:
        backend = kind.BACKEND(student, path, threads, meta)
    except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types for an unreadable graph
        _discard(folder / kind.CACHE_DIR)
        raise BackendError("convert", f"{name} cannot load {path}: {type(exc).__name__}: {exc}") from exc
    try:
        backend.check = check_agreement(backend, student)
    except BackendError:
        _discard(folder / kind.CACHE_DIR)  # a retry converts afresh
        raise
    backend.check |= {"cached": cached, "ready_s": round(time.perf_counter() - started, 3)}
    log.info("%s backend ready for %s (%s): %s", name, folder, "cached conversion" if cached else "converted now", backend.check)
    return backend


# -- converting -------------------------------------------------------------------------------
def convert(student: Any, folder: Path, name: str) -> tuple[Path, dict[str, Any], bool]:
    """(converted model path, its meta, whether the cache was reused) for the int8 backend ``name``;
    converts when the cache is missing or stale."""
    from broadfast.model.registry import sha256_file
    from broadfast.model.student import WEIGHTS_FILE

    kind = INT8[name]
    cache = folder / kind.CACHE_DIR
    try:
        source = sha256_file(folder / WEIGHTS_FILE)
    except OSError as exc:
        raise BackendError("convert", f"cannot read the weights to convert in {folder}: {exc}") from exc
    meta = _valid_cache(kind, cache, source)
    if meta is not None:
        return cache / kind.MODEL_FILE, meta, True
    started = time.perf_counter()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as tmp:
            done = build(student, folder, name, Path(tmp))
            for file in kind.FILES:
                os.replace(Path(tmp) / file, cache / file)
        meta = {"format": kind.FORMAT, "backend": name, "source_sha256": source, **kind.versions(), **done,
                "files": {file: sha256_file(cache / file) for file in kind.FILES}, "converted_at": time.time(), "convert_s": round(time.perf_counter() - started, 3)}  # fmt: skip
        tmp_meta = cache / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, cache / META_FILE)
    except BackendError:
        _discard(cache)
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter and the quantizers raise many types
        _discard(cache)
        raise BackendError("convert", f"converting {folder} to {name} failed: {type(exc).__name__}: {exc}") from exc
    size = sum((cache / file).stat().st_size for file in kind.FILES) / 1e6
    log.info("converted %s to %s in %.1f s (%.1f MB)", folder, name, meta["convert_s"], size)
    return cache / kind.MODEL_FILE, meta, False


def _valid_cache(kind: ModuleType, cache: Path, source_sha256: str) -> dict[str, Any] | None:
    """The cache's meta when it belongs to these weights and these runtimes and its files are intact; else None (logged)."""
    from broadfast.model.registry import sha256_file

    meta_path = cache / META_FILE
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        expected = {"format": kind.FORMAT, "source_sha256": source_sha256, **kind.versions()}
        stale = [k for k, v in expected.items() if meta.get(k) != v]
        if not stale:
            files = meta.get("files") or {}
            stale = [file for file in kind.FILES if not (cache / file).is_file() or sha256_file(cache / file) != files.get(file)]
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s cache at %s is unreadable (%s): converting again", kind.NAME, cache, exc)
        return None
    if stale:
        log.warning("%s cache at %s is stale (%s differ): converting again", kind.NAME, cache, ", ".join(stale))
        return None
    return meta


def _discard(cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)


def build(student: Any, folder: Path, name: str, out: Path) -> dict[str, Any]:
    """Export ``student`` (whose weights are ``folder``'s) and quantize it for ``name`` into the folder ``out``;
    returns what the quantizer records. In a child process when ``ISOLATE`` (it loads the student from ``folder``)."""
    if not ISOLATE:
        return export_and_quantize(student, name, out)
    try:
        proc = subprocess.run(child_command(folder, name, out), capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BackendError("convert", f"converting {folder} took longer than {CONVERT_TIMEOUT_S} s") from exc
    said = [line for line in (proc.stderr or proc.stdout or "").strip().splitlines() if line.strip()]
    if proc.returncode != 0 or not all((out / file).is_file() for file in INT8[name].FILES):
        raise BackendError("convert", f"the converter process for {folder} exited with {proc.returncode}: {' | '.join(said[-3:]) or 'no output'}")
    for line in reversed(proc.stdout.strip().splitlines()):  # the child's last word is one JSON line; libraries may print before it
        try:
            return dict(json.loads(line))
        except (ValueError, TypeError):
            continue
    raise BackendError("convert", f"the converter process for {folder} said nothing it could be understood by: {' | '.join(said[-3:]) or 'no output'}")


def export_and_quantize(student: Any, name: str, out: Path) -> dict[str, Any]:
    fp32 = out / "fp32.onnx"
    export.export_onnx(student, fp32)
    done = INT8[name].quantize(fp32, out, student)
    fp32.unlink(missing_ok=True)
    return done


def child_command(folder: Path, name: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "broadfast.serving.backends", str(folder), name, str(out)]


def _convert_main(argv: list[str]) -> int:
    """The child process: ``python -m broadfast.serving.backends MODEL_FOLDER BACKEND OUT_FOLDER``; prints what the quantizer records."""
    import torch

    from broadfast.model.student import load_student

    os.nice(CHILD_NICE)
    torch.set_num_threads(1)
    folder, name, out = Path(argv[0]), argv[1], Path(argv[2])
    done = export_and_quantize(load_student(folder, "cpu"), name, out)
    print(json.dumps(done))
    return 0


# -- checking ---------------------------------------------------------------------------------
def check_agreement(backend: Backend, student: Any) -> dict[str, Any]:
    """Compare ``backend`` with the PyTorch student on the probe pairs; raises :class:`BackendError` (stage ``backend``)."""
    from scipy.stats import spearmanr

    from broadfast.serving.probe import PROBE_PAIRS

    queries, texts = [q for q, _ in PROBE_PAIRS], [t for _, t in PROBE_PAIRS]
    try:
        got = backend.predict_proba(queries, texts)
    except Exception as exc:  # noqa: BLE001
        raise BackendError("convert", f"the {backend.name} model fails on the probe pairs: {type(exc).__name__}: {exc}") from exc
    ref = student.predict_proba(queries, texts)
    if not (np.isfinite(got).all() and np.isfinite(ref).all()):
        raise BackendError("backend", f"non-finite probabilities on the probe pairs ({backend.name} or PyTorch)")
    new = np.array([score_from_probs(p) for p in got])
    old = np.array([score_from_probs(p) for p in ref])
    diff = float(np.abs(new - old).max())
    mean_diff = float(np.abs(new - old).mean())
    spread = float(old.max() - old.min())
    rho = float(spearmanr(new, old).statistic) if spread >= RANK_SPREAD else None
    report = {"pairs": len(queries), "max_score_diff": round(diff, 5), "mean_score_diff": round(mean_diff, 5), "spearman": None if rho is None else round(rho, 5),
              "fp32_spread": round(spread, 5), "max_score_diff_allowed": MAX_SCORE_DIFF, "mean_score_diff_allowed": MAX_MEAN_SCORE_DIFF, "min_spearman": MIN_SPEARMAN}  # fmt: skip
    if not diff <= MAX_SCORE_DIFF:
        raise BackendError("backend", f"the {backend.name} model disagrees with PyTorch: max |Δscore| {diff:.4f} over {len(queries)} probe pairs, more than {MAX_SCORE_DIFF}")
    if not mean_diff <= MAX_MEAN_SCORE_DIFF:
        raise BackendError("backend", f"the {backend.name} model disagrees with PyTorch: mean |Δscore| {mean_diff:.4f} over {len(queries)} probe pairs, more than {MAX_MEAN_SCORE_DIFF}")
    if rho is not None and not rho >= MIN_SPEARMAN:
        raise BackendError("backend", f"the {backend.name} model ranks the probe pairs unlike PyTorch: Spearman {rho:.3f}, below {MIN_SPEARMAN}")
    return report


if __name__ == "__main__":
    sys.exit(_convert_main(sys.argv[1:]))
