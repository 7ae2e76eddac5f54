"""`broadfast label --data FILE --out FILE`: the parquet that `train offline --labels` reads."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from click.testing import CliRunner

from broadfast.core.datasets import load_pairs
from broadfast.cli.main import main
from broadfast.core.events import pair_id
from broadfast.teacher.labels import LABEL_COLUMNS, failures_path, label_file
from broadfast.teacher.mpcot import LLMTeacher
from broadfast.simulation.oracle import OracleTeacher
from broadfast.training.targets import relevance_to_probs


def test_cli_batch_labels_a_file_with_the_oracle(shared_data, tmp_path, monkeypatch):
    data = shared_data / "homedepot" / "dev.parquet"
    out = tmp_path / "labels.parquet"
    monkeypatch.setenv("BROADFAST_TEACHER_ORACLE_DATA", str(data))
    res = CliRunner().invoke(main, ["label", "--teacher", "oracle", "--data", str(data), "--out", str(out), "--limit", "12"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["labelled"] == 12 and summary["failed"] == 0
    df = pd.read_parquet(out)
    assert set(LABEL_COLUMNS) <= set(df.columns)
    truth = load_pairs(data).head(12)
    assert list(df["query"]) == list(truth["query"]) and list(df["ad_id"]) == list(truth["ad_id"].astype(str))
    assert list(df["pair_id"]) == [pair_id(q, a) for q, a in zip(truth["query"], truth["ad_id"].astype(str))]
    # the raters' mean relevance spread over the neighbouring grades on the file's own scale, smoothed 0.1
    whole = pd.read_parquet(data)["relevance"]
    spread = relevance_to_probs(truth["relevance"].to_numpy(), whole.min(), whole.max())
    assert np.allclose(np.stack(df["probs"].to_numpy()), 0.9 * spread + 0.1 / 3, atol=1e-6)
    assert np.allclose(df[["p_irrelevant", "p_partial", "p_exact"]].sum(axis=1), 1.0)
    assert list(df["human_grade"]) == list(truth["grade"]) and (df["confidence"] == 1.0).all()
    assert all(list(m) == [1.0] for m in df["perspective_mass"]) and all(len(f) == 0 for f in df["failed_perspectives"])
    assert all(len(e) == len(r) == 1 and len(e[0]) == 384 for e, r in zip(df["rationale_embeddings"], df["rationales"]))
    assert df["teacher_id"].iloc[0] == "oracle:human-relevance(homedepot/dev.parquet)"


def test_cli_refuses_data_without_out(tmp_path):
    res = CliRunner().invoke(main, ["label", "--teacher", "oracle", "--data", str(tmp_path / "x.parquet")])
    assert res.exit_code == 1 and "both --data and --out" in res.output


def test_failures_are_kept_apart_never_invented(tmp_path, tiny_engine):
    data = tmp_path / "pairs.parquet"
    pd.DataFrame({"query": ["drill", "saw", "hammer"], "ad_id": ["1", "2", "3"], "title": ["Drill", "Saw", "Hammer"]}).to_parquet(data)
    oracle = OracleTeacher.from_frame(pd.DataFrame({"query": ["drill"], "ad_id": ["1"], "grade": [0]}), source="toy")
    out = tmp_path / "labels.parquet"
    summary = label_file(oracle, data, out, batch_size=2, progress=False)
    assert (summary["labelled"], summary["failed"]) == (1, 2)
    assert list(pd.read_parquet(out)["query"]) == ["drill"]
    failed = pd.read_parquet(failures_path(out))
    assert list(failed["query"]) == ["saw", "hammer"] and failed["reason"].str.contains("no human grade").all()

    # the transformers backend writes K=3 perspectives per row (the random tiny model is unsure of
    # its grades: with no mass minimum every perspective counts, and its mass is written)
    out2 = tmp_path / "tiny.parquet"
    teacher = LLMTeacher(engine=tiny_engine, backend="transformers", max_tokens=6, min_mass=0.0)
    summary = label_file(teacher, data, out2, batch_size=3, progress=False)
    df = pd.read_parquet(out2)
    assert summary["labelled"] == len(df) == 3 and summary["partial"] == 0 and not failures_path(out2).exists()
    assert all(len(e) == 3 and all(len(v) == 384 for v in e) for e in df["rationale_embeddings"])
    assert list(df["perspectives"].iloc[0]) == ["user_intent", "attributes", "business_rules"]
    assert summary["tokens"] > 0
    masses = np.stack(df["perspective_mass"].to_numpy())
    assert masses.shape == (3, 3) and ((masses > 0) & (masses < 0.5)).all()
    assert np.allclose(df["confidence"], masses.mean(axis=1)) and (df["human_grade"] == -1).all()

    # with the default minimum (0.5) that model's grades are all too unsure: failures with reasons, no labels
    out3 = tmp_path / "tiny-strict.parquet"
    strict = LLMTeacher(engine=tiny_engine, backend="transformers", max_tokens=6)
    summary = label_file(strict, data, out3, batch_size=3, progress=False)
    assert (summary["labelled"], summary["failed"]) == (0, 3) and pd.read_parquet(out3).empty
    reasons = pd.read_parquet(failures_path(out3))["reason"]
    assert reasons.str.count("< BROADFAST_TEACHER_MIN_MASS 0.5; the most likely token was").eq(3).all()
