"""The ``openvino-int8`` backend: OpenVINO with static int8 quantization by NNCF.

NNCF quantizes the exported graph (:mod:`broadfast.serving.export`) with ``model_type=TRANSFORMER``: int8
weights *and* activations, the activation scales fixed from a calibration set (with SmoothQuant and
bias correction), the operations that rounding hurts most kept in floating point. The calibration
set is built from the probe pairs (:data:`broadfast.serving.probe.PROBE_PAIRS`): every probe query against
every probe ad text, so the activation ranges cover relevant and irrelevant pairs alike and need no
data file at serving time. It runs with ``INFERENCE_PRECISION_HINT=f32`` (the unquantized
operations in fp32, not the bf16 OpenVINO picks by default on CPUs that have it).

Because the activation scales are fixed, a pair's score does not depend on the pairs it is run
with (unlike ``onnx-int8``'s dynamic scales), so pairs run ``ROWS_PER_RUN`` at a time, sorted by
length. Measured on MiniLM-L6 (hd6k) with 50-ad Home Depot requests, 2 threads, in one run: runs of
8 pairs 97 ms at p50, 1 pair 234 ms, 50 pairs 107 ms; onnx-int8 166 ms and PyTorch fp32 361 ms.
Calibrating on the probe pairs, on 400 Home Depot or on 400 CrowdFlower train pairs gave the same
dev Spearman within 0.002 (``benchmarks/results/serving.md`` has the figures of record).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.serving.export import OPSET, Int8Backend, pad_feeds, score_runs
from broadfast.serving.probe import PROBE_PAIRS

NAME = "openvino-int8"
CACHE_DIR = "openvino-int8"
MODEL_FILE = "model.xml"
FILES = (MODEL_FILE, "model.bin")
FORMAT = 1  # bump when the export, the calibration or the quantization changes: older caches are rebuilt
ROWS_PER_RUN = 8
CALIBRATION_ROWS = 8  # pairs per calibration batch

log = logging.getLogger(__name__)
# NNCF sends usage telemetry unless told it runs in CI: a forked process and a network send per event (up to 3 s
# each), from inside a threaded server. NNCF_CI is the switch NNCF reads at import; serving must not phone home.
os.environ.setdefault("NNCF_CI", "1")


def available() -> bool:
    """Both packages are installed (found without importing them: importing NNCF takes seconds)."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


def versions() -> dict[str, Any]:
    """What a cached conversion must have been made with to be reused."""
    import nncf
    import openvino as ov

    return {"openvino": ov.get_version(), "nncf": nncf.__version__, "opset": OPSET}


def calibration_pairs() -> list[tuple[str, str]]:
    """Every probe query against every probe ad text (the probe pairs themselves among them)."""
    queries = list(dict.fromkeys(q for q, _ in PROBE_PAIRS))
    texts = list(dict.fromkeys(t for _, t in PROBE_PAIRS))
    return [(q, t) for q in queries for t in texts]


def quantize(fp32: Path, out: Path, student: Any) -> dict[str, Any]:
    """Statically quantize the fp32 graph into ``out``/model.xml (+ .bin); returns what the cache's meta records."""
    import nncf
    import openvino as ov

    pairs = calibration_pairs()
    enc = student.tokenize([q for q, _ in pairs], [t for _, t in pairs])
    ids, types = enc["input_ids"], enc["token_type_ids"]
    pad = student.tokenizer.pad_token_id or 0
    batches = [pad_feeds(ids[i : i + CALIBRATION_ROWS], types[i : i + CALIBRATION_ROWS], pad) for i in range(0, len(ids), CALIBRATION_ROWS)]
    nncf.set_log_level(logging.WARNING)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):  # NNCF's progress bars (rich, on sys.stdout) stay out of the service's output
        model = nncf.quantize(ov.Core().read_model(str(fp32)), nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches))
    ov.save_model(model, str(out / MODEL_FILE), compress_to_fp16=False)
    return {"quantization": "static int8 (NNCF, model_type TRANSFORMER)", "calibration_pairs": len(pairs)}


class OpenVinoInt8Backend(Int8Backend):
    """An OpenVINO compiled model over the int8 graph; the student's tokenizer feeds it."""

    name = NAME
    runtime = "openvino"

    def __init__(self, student: Any, path: Path, threads: int, meta: dict[str, Any], rows_per_run: int = ROWS_PER_RUN) -> None:
        import openvino as ov

        super().__init__(student, path, threads, meta, rows_per_run)
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64) -> np.ndarray:
        request = self.compiled.create_infer_request()  # one per call: callers may score from several threads
        return score_runs(self.student, queries, texts, self.rows_per_run, lambda feeds: request.infer(feeds)[0])


BACKEND = OpenVinoInt8Backend
