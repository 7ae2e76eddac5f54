"""The CLI end to end: `train offline` (with a labels file) → `predict`, and the predict output schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

from broadfast.cli.training import predict, train


def test_train_offline_then_predict(pairs: pd.DataFrame, labels_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.parquet"
    pairs.to_parquet(data, index=False)
    out = tmp_path / "model"
    runner = CliRunner()
    result = runner.invoke(
        train,
        ["offline", "--data", str(data), "--labels", str(labels_file), "--out", str(out), "--from-scratch-tiny",
         "--epochs", "1", "--batch-size", "16", "--max-length", "32", "--eval", str(data)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads(result.stdout)
    assert summary["steps"] == 3 and summary["metrics"]["pairs"] == 48
    report = json.loads((out / "training.json").read_text())
    assert report["targets"] == "labels" and report["rationale_rows"] == 48
    assert report["trained_on"]["labels"] == str(labels_file) and len(report["trained_on"]["data_sha256"]) == 64
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    scored = tmp_path / "scored.parquet"
    shuffled = pairs.sample(frac=1.0, random_state=3).reset_index(drop=True)
    shuffled.to_parquet(data, index=False)
    result = runner.invoke(predict, ["--model", str(out), "--data", str(data), "--out", str(scored), "--batch-size", "7"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    got = pd.read_parquet(scored)
    assert list(got.columns) == list(shuffled.columns) + ["score", "p_irrelevant", "p_partial", "p_exact"]
    pd.testing.assert_frame_equal(got[shuffled.columns], shuffled)  # input rows kept, in order
    probs = got[["p_irrelevant", "p_partial", "p_exact"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got["score"], got["p_exact"] + 0.5 * got["p_partial"], atol=1e-6)
    assert got["score"].between(0, 1).all() and got["score"].nunique() > 1


def test_predict_refuses_a_broken_model_and_missing_data(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    result = CliRunner().invoke(predict, ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "o.parquet")])
    assert result.exit_code != 0 and "config.json is missing" in str(result.exception)
    assert not (tmp_path / "o.parquet").exists()


def test_train_offline_without_labels_needs_a_target(pairs: pd.DataFrame, tmp_path: Path) -> None:
    data = tmp_path / "pairs.parquet"
    pairs.drop(columns=["relevance", "grade"]).to_parquet(data, index=False)
    result = CliRunner().invoke(train, ["offline", "--data", str(data), "--out", str(tmp_path / "m"), "--from-scratch-tiny"])
    assert result.exit_code != 0 and "relevance" in str(result.exception)
