"""The ``onnx-int8`` backend: ONNX Runtime with dynamic int8 quantization.

The exported graph (:mod:`broadfast.serving.export`) gets int8 weights (QInt8, one scale per output channel)
from ONNX Runtime's ``quantize_dynamic``; activations are quantized at run time. Per-channel scales
keep weak students' small score spreads: per-tensor ones cost a demo student 17 % of its dev
Spearman (0.135 → 0.112), per-channel 2 % (0.133), at the same speed.

It runs one pair at a time (``ROWS_PER_RUN``): dynamic quantization scales the activations by the
range of the whole input tensor, so in a batch a pair's score would move with its neighbours and
their padding (measured on a trained student, runs of 8 against alone: mean |Δscore| 0.011, max
0.09 — as large as int8's own error against fp32); alone, a pair gets the same score however it is
served. Measured on MiniLM-L6, 50 Home Depot pairs: a request takes 1.2-1.35× as long as in
length-sorted runs of 8 pairs (``benchmarks/results/student_backends*.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.serving.export import OPSET, Int8Backend

NAME = "onnx-int8"
CACHE_DIR = "onnx-int8"
MODEL_FILE = "model.onnx"
FILES = (MODEL_FILE,)
FORMAT = 3  # bump when the export or the quantization changes: older caches are rebuilt (2: per-channel weights; 3: meta lists files)
ROWS_PER_RUN = 1  # pairs per run: 1 keeps scores independent of batch neighbours (see above)


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return False
    return True


def versions() -> dict[str, Any]:
    """What a cached conversion must have been made with to be reused."""
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "opset": OPSET}


def quantize(fp32: Path, out: Path, student: Any) -> dict[str, Any]:
    """Quantize the fp32 graph into ``out``/MODEL_FILE; returns what the cache's meta records."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    if not any(isinstance(f, _QuantizerChatter) for f in root.filters):
        root.addFilter(_QuantizerChatter())
    quantize_dynamic(str(fp32), str(out / MODEL_FILE), weight_type=QuantType.QInt8, per_channel=True)
    return {"weight_type": "QInt8", "per_channel": True}


class _QuantizerChatter(logging.Filter):
    """Drops the quantizer's per-tensor notes and its pre-processing advice, which it logs on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("onnxruntime" in record.pathname and "quantization" in record.pathname and record.levelno <= logging.WARNING)


class OnnxInt8Backend(Int8Backend):
    """An ONNX Runtime session over the int8 model; the student's tokenizer feeds it."""

    name = NAME
    runtime = "onnxruntime"

    def __init__(self, student: Any, path: Path, threads: int, meta: dict[str, Any], rows_per_run: int = ROWS_PER_RUN) -> None:
        import onnxruntime as ort

        super().__init__(student, path, threads, meta, rows_per_run)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]


BACKEND = OnnxInt8Backend
