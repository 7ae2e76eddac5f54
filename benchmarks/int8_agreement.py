"""How far int8 moves a student's scores: ONNX Runtime dynamic int8 (per-tensor, per-channel weights) and
OpenVINO static int8 (NNCF), fp32 the baseline.

For each trained model folder: the whole scoring model is exported once (``broadfast.serving.export.export_onnx``),
quantized three ways (ONNX Runtime's dynamic quantization with per-tensor and per-channel weights, as
``onnx-int8`` serves; NNCF's static quantization calibrated on the probe set, as ``openvino-int8`` serves),
and scored as served (onnx-int8 one pair per run, openvino-int8 runs of 8) on
the 24 probe pairs the swap checks (max and mean |Δscore|, Spearman against fp32, the fp32 spread) and
on whole dev queries (mean, p99 and max |Δscore|; dev Spearman and NDCG@10 of fp32 and of each int8).
The probe figures are what ``broadfast.serving.backends.MAX_SCORE_DIFF`` / ``MAX_MEAN_SCORE_DIFF`` /
``MIN_SPEARMAN`` were set from.

    python benchmarks/int8_agreement.py --models runs/v0001 runs/v0009 runs/hd6k [--pairs 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import invocation, markdown_table, write_result
from benchmarks.student import quality_slice
from broadfast.core.datasets import load_pairs
from broadfast.core.events import score_from_probs
from broadfast.model.student import pair_texts
from broadfast.training.metrics import evaluate
from broadfast.model.student import load_student

WAYS = {"onnx-int8, per-tensor": False, "onnx-int8, per-channel": True, "openvino-int8 (static)": None}


def relevance(probs: np.ndarray) -> np.ndarray:
    """The served relevance score of each row (``broadfast.core.events.score_from_probs``)."""
    return np.array([score_from_probs(p) for p in probs])


def measure(folder: Path, dev, work: Path) -> list[list[object]]:  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from scipy.stats import spearmanr

    from broadfast.serving import openvino_int8
    from broadfast.serving.export import export_onnx
    from broadfast.serving.onnx_int8 import OnnxInt8Backend
    from broadfast.serving.models import PROBE_PAIRS

    student = load_student(folder)
    student.eval()
    pq, pt = [q for q, _ in PROBE_PAIRS], [t for _, t in PROBE_PAIRS]
    dq, dt = pair_texts(dev)
    fp32 = work / "fp32.onnx"
    export_onnx(student, fp32)
    ref_probe, ref_dev = relevance(student.predict_proba(pq, pt)), student.predict_proba(dq, dt)
    base = evaluate(dev, ref_dev)
    rows: list[list[object]] = [[folder.name, "fp32 (baseline)", f"{np.ptp(ref_probe):.3f}", "", "", "", "", "", "", float(base["spearman"]), float(base["ndcg@10"])]]
    for way, per_channel in WAYS.items():
        if per_channel is None:
            (work / "ov").mkdir(exist_ok=True)
            openvino_int8.quantize(fp32, work / "ov", student)
            backend = openvino_int8.OpenVinoInt8Backend(student, work / "ov" / openvino_int8.MODEL_FILE, threads=torch.get_num_threads(), meta={})
        else:
            int8 = work / f"per-channel-{per_channel}.onnx"
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=per_channel)
            backend = OnnxInt8Backend(student, int8, threads=torch.get_num_threads(), meta={})
        probe = np.abs(relevance(backend.predict_proba(pq, pt)) - ref_probe)
        rho = spearmanr(relevance(backend.predict_proba(pq, pt)), ref_probe).statistic
        got = backend.predict_proba(dq, dt)
        dev_diff = np.abs(relevance(got) - relevance(ref_dev))
        m = evaluate(dev, got)
        figures = [probe.max(), probe.mean(), rho, dev_diff.mean(), np.percentile(dev_diff, 99), dev_diff.max(), m["spearman"], m["ndcg@10"]]
        rows.append([folder.name, way, "", *(float(x) for x in figures)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="Trained student folders (left untouched: conversions go to a temporary folder).")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/homedepot/dev.parquet"))
    parser.add_argument("--pairs", type=int, default=1000, help="Dev pairs (whole queries) to score; 0 = the whole file.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--notes", default="", help="How the models were made (goes under the table).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's per-tensor chatter
    dev = load_pairs(args.data) if args.pairs == 0 else quality_slice(args.data, args.pairs, 0)
    rows: list[list[object]] = []
    for folder in tqdm(args.models, desc="models", unit="model"):
        with tempfile.TemporaryDirectory(prefix="broadfast-int8-") as tmp:
            rows.extend(measure(folder, dev, Path(tmp)))
    headers = ["model", "int8", "probe fp32 spread", "probe max abs Δ", "probe mean abs Δ", "probe Spearman vs fp32",
               "dev mean abs Δ", "dev p99 abs Δ", "dev max abs Δ", "dev Spearman", "dev NDCG@10"]  # fmt: skip
    body = (
        f"{len(dev):,} dev pairs of {dev['query'].nunique()} whole queries of `{args.data.name}`; 24 probe pairs (`broadfast/serving/models.py: PROBE_PAIRS`); "
        f"abs Δ = abs(relevance score int8 − fp32), relevance = P(exact) + ½·P(partial); onnx-int8 served one pair per run, openvino-int8 runs of 8, {args.threads} thread(s).\n\n"
        f"{markdown_table(headers, rows)}\n"
    )
    notes = ("onnx-int8: ONNX Runtime `quantize_dynamic`, QInt8 weights, per tensor or per output channel; activations quantized at run time. "
             "openvino-int8: `nncf.quantize(model_type=TRANSFORMER)` calibrated on the probe queries × probe ad texts (broadfast/serving/openvino_int8.py), "
             "run with f32 inference precision. " + args.notes)  # fmt: skip
    write_result("int8_agreement", "int8 against fp32: ONNX Runtime dynamic (per-tensor, per-channel) and OpenVINO static", invocation(), body, notes)


if __name__ == "__main__":
    main()
