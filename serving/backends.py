"""Inference backends of the served student: PyTorch, or ONNX Runtime with int8 weights.

A backend turns (query, ad text) pairs into grade probabilities, like
:meth:`training.student.Student.predict_proba`; tokenisation stays in Python either way.

* ``torch``: the student itself (fp32 on CPU, bf16 autocast on a GPU).
* ``onnx-int8``: the whole scoring model (encoder, latent reasoning extractor, head; from
  ``input_ids``/``attention_mask``/``token_type_ids`` to grade logits, dynamic batch and
  sequence axes) exported with the TorchScript exporter and quantized with ONNX Runtime's
  dynamic int8 quantization (QInt8 weights, one scale per output channel). Converted once per model version and cached in
  ``<model folder>/onnx-int8/`` with ``meta.json`` recording the source weights' sha256, the
  converted file's sha256 and the onnxruntime version; a cache that does not match on every
  count is rebuilt, never trusted.

Before it serves, a converted model must agree with PyTorch on the probe pairs: relevance
scores (``P(exact) + ½·P(partial)``) within ``MAX_SCORE_DIFF`` of fp32 on every pair and within
``MAX_MEAN_SCORE_DIFF`` on average, and a Spearman of at least ``MIN_SPEARMAN`` when the fp32 scores
spread at least ``RANK_SPREAD`` (closer than that, int8 rounding reorders near-ties and rank
correlation is noise). The bounds are set from int8's measured error on trained students, with room
(see the constants), so they catch a broken conversion, not int8's rounding.
A failure raises :class:`~serving.errors.BackendError`, which serving turns into a refused swap.

The int8 model runs one pair at a time (``ROWS_PER_RUN``): dynamic quantization scales the
activations by the range of the whole input tensor, so in a batch a pair's score would move with
its neighbours and their padding (measured on a trained student, runs of 8 against alone: mean
|Δscore| 0.011, max 0.09 — as large as int8's own error against fp32); alone, a pair gets the same score however
it is served (one request or a micro-batch, the API or ``predict``). Measured on MiniLM-L6, 50
Home Depot pairs: a request takes 1.2-1.35× as long as in length-sorted runs of 8 pairs, and
about as long as in one padded 50-pair run (``benchmarks/results/student_backends*.md``).

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
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from serving.errors import BackendError
from streams.events import score_from_probs

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx-int8")
CACHE_DIR = "onnx-int8"
ONNX_FILE = "model.onnx"
META_FILE = "meta.json"
CACHE_FORMAT = 2  # bump when the export or the quantization changes: older caches are rebuilt (2: per-channel weights)
OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Agreement of int8 with fp32 on the probe pairs, per-channel weights (benchmarks/int8_agreement.py, results/int8_agreement.md).
# On six trained MiniLM-L6 students (five versions of a demo run, probe spread 0.03-0.10, and one trained on 6k Home
# Depot pairs, spread 0.49) the worst figures were max |Δscore| 0.033, mean 0.010, Spearman 0.977; per-tensor
# weights gave up to 0.031 / 0.015 / 0.903 there and 0.054-0.058 (Spearman 0.886) on versions trained longer online,
# which is why the weights are quantized per channel. The bounds leave about 3× room over the worst measured
# rounding; a broken conversion (wrong graph, spoilt weights) moves scores by 0.1-1.
MAX_SCORE_DIFF = 0.1
MAX_MEAN_SCORE_DIFF = 0.03
MIN_SPEARMAN = 0.9
RANK_SPREAD = 0.1
# Where export and quantization run. Tracing the model and rewriting its graph hold the GIL for seconds, which in the
# serving process stalls the requests the live version answers meanwhile; a child process (ISOLATE) avoids that.
# Measured under 8 saturating clients (hd6k, benchmarks/serving.py --swap-only): child at equal priority, live 16.6 s
# after the announcement with p99 during the swap 1.7× steady state; at nice 10, 84 s and 1.2×; in-process (another
# run) 12.5 s and 2.6×. But in the 5-minute demo each child, importing torch afresh, took 14-22 s a version (in-process
# 3-4 s): swaps fell behind the publishes and the demo's freshness p50 went from 30 s to 105 s, while its server p99
# fell from 659 to 238 ms. Freshness is what the loop exists for, so conversion stays in-process until a long-lived
# converter process (torch imported once) removes the start-up cost.
ISOLATE = False
CHILD_NICE = 0
CONVERT_TIMEOUT_S = 600
ROWS_PER_RUN = 1  # pairs per ONNX Runtime run: 1 keeps scores independent of batch neighbours (see above)


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


class OnnxInt8Backend:
    """An ONNX Runtime session over the int8 model; the student's tokenizer feeds it."""

    name = "onnx-int8"

    def __init__(self, student: Any, path: Path, threads: int, meta: dict[str, Any], rows_per_run: int = ROWS_PER_RUN) -> None:
        import onnxruntime as ort

        self.student = student  # its tokenizer and config (and the PyTorch reference it was checked against)
        self.path = path
        self.meta = meta
        self.check: dict[str, Any] = {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.threads = threads
        self.rows_per_run = rows_per_run

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Grade probabilities (n, 3), in input order; ``rows_per_run`` length-sorted pairs per run
        (``batch_size`` is the PyTorch path's and does not apply)."""
        if len(queries) != len(texts):
            raise ValueError(f"{len(queries)} queries but {len(texts)} texts")
        n = len(queries)
        out = np.empty((n, 3), dtype=np.float32)
        if n == 0:
            return out
        enc = self.student.tokenize(queries, texts)
        ids, types = enc["input_ids"], enc["token_type_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        pad = self.student.tokenizer.pad_token_id or 0
        for start in range(0, n, self.rows_per_run):
            idx = order[start : start + self.rows_per_run]
            feeds = _pad([ids[i] for i in idx], [types[i] for i in idx], pad)
            logits = self.session.run(None, feeds)[0].astype(np.float32)
            logits -= logits.max(axis=1, keepdims=True)
            exp = np.exp(logits)
            out[idx] = exp / exp.sum(axis=1, keepdims=True)
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threads": self.threads, "rows_per_run": self.rows_per_run, "onnxruntime": self.meta.get("onnxruntime"), "converted_at": self.meta.get("converted_at"), "check": self.check}


def _pad(ids: list[list[int]], types: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, (x, t) in enumerate(zip(ids, types)):
        input_ids[row, : len(x)] = x
        token_type_ids[row, : len(t)] = t
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids}


# -- choosing ---------------------------------------------------------------------------------
def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(setting: str, device: str) -> str:
    """The backend a ``serve_backend`` setting means on ``device``: ``auto`` is onnx-int8 on a CPU
    when onnxruntime is installed, else torch."""
    if setting == "auto":
        return "onnx-int8" if device == "cpu" and onnxruntime_available() else "torch"
    if setting not in BACKENDS:
        raise BackendError("convert", f"unknown inference backend {setting!r}: one of auto, {', '.join(BACKENDS)}")
    return setting


def load_backend(student: Any, folder: Path, setting: str, device: str, threads: int) -> Backend:
    """The backend ``setting`` names for ``student`` (whose model folder is ``folder``), checked
    against PyTorch before it is returned; raises :class:`BackendError`."""
    name = resolve_backend(setting, device)
    if name == "torch":
        return TorchBackend(student)
    if not onnxruntime_available():
        raise BackendError("convert", "the onnx-int8 backend needs onnxruntime and onnx (pip install 'broadfast[serving]'), or set BROADFAST_SERVE_BACKEND=torch")
    started = time.perf_counter()
    path, meta, cached = convert(student, Path(folder))
    try:
        backend = OnnxInt8Backend(student, path, threads, meta)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for an unreadable graph
        _discard(Path(folder) / CACHE_DIR)
        raise BackendError("convert", f"onnxruntime cannot load {path}: {type(exc).__name__}: {exc}") from exc
    try:
        backend.check = check_agreement(backend, student)
    except BackendError:
        _discard(Path(folder) / CACHE_DIR)  # a retry converts afresh
        raise
    backend.check |= {"cached": cached, "ready_s": round(time.perf_counter() - started, 3)}
    log.info("onnx-int8 backend ready for %s (%s): %s", folder, "cached conversion" if cached else "converted now", backend.check)
    return backend


# -- converting -------------------------------------------------------------------------------
def convert(student: Any, folder: Path) -> tuple[Path, dict[str, Any], bool]:
    """(int8 model path, its meta, whether the cache was reused); converts when the cache is missing or stale."""
    from training.registry import sha256_file
    from training.student import WEIGHTS_FILE

    cache = folder / CACHE_DIR
    try:
        source = sha256_file(folder / WEIGHTS_FILE)
    except OSError as exc:
        raise BackendError("convert", f"cannot read the weights to convert in {folder}: {exc}") from exc
    meta = _valid_cache(cache, source)
    if meta is not None:
        return cache / ONNX_FILE, meta, True
    started = time.perf_counter()
    try:
        import onnxruntime as ort

        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as tmp:
            int8 = Path(tmp) / ONNX_FILE
            build(student, folder, int8)
            os.replace(int8, cache / ONNX_FILE)
        meta = {"format": CACHE_FORMAT, "source_sha256": source, "onnx_sha256": sha256_file(cache / ONNX_FILE), "onnxruntime": ort.__version__,
                "opset": OPSET, "weight_type": "QInt8", "per_channel": True, "converted_at": time.time(), "convert_s": round(time.perf_counter() - started, 3)}  # fmt: skip
        tmp_meta = cache / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, cache / META_FILE)
    except BackendError:
        _discard(cache)
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter and the quantizer raise many types
        _discard(cache)
        raise BackendError("convert", f"converting {folder} to onnx-int8 failed: {type(exc).__name__}: {exc}") from exc
    log.info("converted %s to onnx-int8 in %.1f s (%.1f MB)", folder, meta["convert_s"], (cache / ONNX_FILE).stat().st_size / 1e6)
    return cache / ONNX_FILE, meta, False


def _valid_cache(cache: Path, source_sha256: str) -> dict[str, Any] | None:
    """The cache's meta when it belongs to these weights and this onnxruntime and its file is intact; else None (logged)."""
    from training.registry import sha256_file

    meta_path, model_path = cache / META_FILE, cache / ONNX_FILE
    if not meta_path.exists():
        return None
    import onnxruntime as ort

    try:
        meta = json.loads(meta_path.read_text())
        expected = {"format": CACHE_FORMAT, "source_sha256": source_sha256, "onnxruntime": ort.__version__, "opset": OPSET}
        stale = [k for k, v in expected.items() if meta.get(k) != v]
        if not stale and sha256_file(model_path) != meta.get("onnx_sha256"):
            stale = ["onnx_sha256"]
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("onnx-int8 cache at %s is unreadable (%s): converting again", cache, exc)
        return None
    if stale:
        log.warning("onnx-int8 cache at %s is stale (%s differ): converting again", cache, ", ".join(stale))
        return None
    return meta


def _discard(cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)


def build(student: Any, folder: Path, int8: Path) -> None:
    """Export ``student`` (whose weights are ``folder``'s) and quantize it into ``int8``: in a child process when
    ``ISOLATE`` (it loads the student from ``folder``), else in this one."""
    if not ISOLATE:
        fp32 = int8.with_name("fp32.onnx")
        export_onnx(student, fp32)
        quantize(fp32, int8)
        return
    try:
        proc = subprocess.run(child_command(folder, int8), capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BackendError("convert", f"converting {folder} took longer than {CONVERT_TIMEOUT_S} s") from exc
    if proc.returncode != 0 or not int8.is_file():
        said = [line for line in (proc.stderr or proc.stdout or "").strip().splitlines() if line.strip()][-3:]
        raise BackendError("convert", f"the converter process for {folder} exited with {proc.returncode}: {' | '.join(said) or 'no output'}")


def child_command(folder: Path, int8: Path) -> list[str]:
    return [sys.executable, "-m", "serving.backends", str(folder), str(int8)]


def _convert_main(argv: list[str]) -> int:
    """The child process: ``python -m serving.backends MODEL_FOLDER OUT.onnx``."""
    import torch

    from training.student import load_student

    os.nice(CHILD_NICE)
    torch.set_num_threads(1)
    folder, int8 = Path(argv[0]), Path(argv[1])
    fp32 = int8.with_name("fp32.onnx")
    export_onnx(load_student(folder, "cpu"), fp32)
    quantize(fp32, int8)
    return 0


def export_onnx(student: Any, path: Path) -> None:
    """Export encoder + extractor + head (fp32) to ``path``, with dynamic batch and sequence axes."""
    import torch

    from serving.models import PROBE_PAIRS
    from training.student import pad_batch

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


def quantize(fp32: Path, int8: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights (QInt8) with one scale per output channel, activations
    quantized at run time. Per-channel scales keep weak students' small score spreads: per-tensor ones cost a demo
    student 17 % of its dev Spearman (0.135 → 0.112), per-channel 2 % (0.133), at the same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    if not any(isinstance(f, _QuantizerChatter) for f in root.filters):
        root.addFilter(_QuantizerChatter())
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)


class _QuantizerChatter(logging.Filter):
    """Drops the quantizer's per-tensor notes and its pre-processing advice, which it logs on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("onnxruntime" in record.pathname and "quantization" in record.pathname and record.levelno <= logging.WARNING)


# -- checking ---------------------------------------------------------------------------------
def check_agreement(backend: Backend, student: Any) -> dict[str, Any]:
    """Compare ``backend`` with the PyTorch student on the probe pairs; raises :class:`BackendError` (stage ``backend``)."""
    from scipy.stats import spearmanr

    from serving.models import PROBE_PAIRS

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
