"""Teacher SFT and DPO end to end on a tiny model (CPU); examples built from label files."""

from __future__ import annotations

from broadfast.teacher.engine import SamplingParams

import json

import pandas as pd
import pytest
import torch

from broadfast.core.events import pair_id
from broadfast.teacher.errors import LabelDataError
from broadfast.teacher.mpcot import Rules, load_template
from broadfast.teacher.train import (
    CONFIG_FILE,
    TeacherTrainConfig,
    _batch,
    _load,
    _tokenize,
    dpo_examples,
    sequence_logps,
    sft_examples,
    train_dpo,
    train_sft,
)

DATA = pd.DataFrame(
    {
        "query": ["cordless drill", "paint roller", "deck screws"],
        "ad_id": ["a1", "a2", "a3"],
        "title": ["DEWALT Cordless Drill", "Roller Frame", "Wood Glue"],
        "text": ["", "", ""],
        "grade": [2, 1, 0],
    }
)
NAMES = ["user_intent", "attributes", "business_rules"]
ONE_HOT = {0: [0.8, 0.1, 0.1], 1: [0.1, 0.8, 0.1], 2: [0.1, 0.1, 0.8]}


def label_frame(grades_per_row: list[list[int]], tag: str) -> pd.DataFrame:
    rows = []
    for (q, a), grades in zip(zip(DATA["query"], DATA["ad_id"]), grades_per_row):
        rows.append(
            {
                "query": q,
                "ad_id": a,
                "pair_id": pair_id(q, a),
                "perspectives": NAMES,
                "rationales": [f"{tag} rationale {n} says {g}." for n, g in zip(NAMES, grades)],
                "perspective_probs": [ONE_HOT[g] for g in grades],
            }
        )
    return pd.DataFrame(rows)


T, R = load_template(), Rules.load()
RIGHT = label_frame([[2, 2, 1], [1, 0, 1], [0, 0, 0]], "good")  # 7 of 9 agree
WRONG = label_frame([[0, 0, 0], [2, 2, 2], [0, 1, 0]], "bad")  # agrees on two of pair 3


def test_sft_examples_keep_only_agreeing_rationales_with_the_human_grade():
    ex = sft_examples([RIGHT], DATA, T, R)
    assert len(ex) == 7
    prompt, completion = ex[0]
    assert prompt.startswith(T.prefix(pd.Series(DATA.iloc[0]).pipe(lambda r: __import__("broadfast.teacher.mpcot", fromlist=["Pair"]).Pair(pair_id(r.query, r.ad_id), r.query, r.ad_id, r.title))))
    assert completion == " good rationale user_intent says 2.\nGrade: 2<|im_end|>"
    assert not any("says 1." in c for p, c in ex if "cordless drill" in p and "store rules" in p)


def test_dpo_examples_pair_agreeing_and_disagreeing_rationales_of_one_prompt():
    ex = dpo_examples([RIGHT, WRONG], DATA, T, R)
    # per (pair, perspective), prompts with one agreeing and one disagreeing rationale:
    # pair 1: user_intent, attributes; pair 2: user_intent, business_rules; pair 3: attributes
    assert len(ex) == 5
    for prompt, chosen, rejected in ex:
        assert prompt.rstrip().endswith("Reason:")
        assert chosen.endswith("<|im_end|>") and rejected.endswith("<|im_end|>")
        assert chosen[-len("X<|im_end|>") :] != rejected[-len("X<|im_end|>") :]  # different grades
    with pytest.raises(LabelDataError, match="human grades"):
        dpo_examples([RIGHT], DATA.drop(columns=["grade"]), T, R)


def test_sft_runs_end_to_end_and_lowers_the_loss(tiny_teacher_dir, tmp_path):
    out = tmp_path / "sft"
    cfg = TeacherTrainConfig("sft", str(tiny_teacher_dir), epochs=6, lr=3e-3, batch_size=4, seed=0)
    cfg = train_sft(sft_examples([RIGHT], DATA, T, R), cfg, out, progress=False)
    assert cfg.metrics["loss_last"] < cfg.metrics["loss_first"]
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["kind"] == "sft" and saved["examples"] == 7
    assert (out / "model.safetensors").exists()
    # the saved folder is a teacher the transformers backend loads
    from broadfast.teacher.hf_backend import TransformersEngine

    eng = TransformersEngine.load(out)
    assert eng.model_name == "sft" and eng.generate(["Query: drill"], SamplingParams(max_tokens=3))[0].tokens > 0


def test_dpo_runs_end_to_end_and_prefers_the_chosen(tiny_teacher_dir, tmp_path):
    examples = dpo_examples([RIGHT, WRONG], DATA, T, R)
    out = tmp_path / "dpo"
    cfg = TeacherTrainConfig("dpo", str(tiny_teacher_dir), epochs=4, lr=2e-3, batch_size=4, beta=0.5, seed=0)
    cfg = train_dpo(examples, cfg, out, progress=False)
    assert cfg.metrics["loss_last"] < cfg.metrics["loss_first"]

    def margin(model_dir) -> float:
        model, tok = _load(model_dir)
        ch = [_tokenize(tok, p, c, 768) for p, c, _ in examples]
        rj = [_tokenize(tok, p, r, 768) for p, _, r in examples]
        with torch.no_grad():
            a = sequence_logps(model, *_batch(tok, ch))
            b = sequence_logps(model, *_batch(tok, rj))
        return float((a - b).mean())

    assert margin(out) > margin(tiny_teacher_dir) + 0.5
    assert json.loads((out / CONFIG_FILE).read_text())["beta"] == 0.5


def test_nothing_to_train_on_is_refused(tiny_teacher_dir, tmp_path):
    with pytest.raises(LabelDataError, match="nothing to prefer"):
        train_dpo([], TeacherTrainConfig("dpo", str(tiny_teacher_dir)), tmp_path / "x", progress=False)


def test_cli_sft_then_dpo_on_label_files(tiny_teacher_dir, tmp_path):
    from click.testing import CliRunner

    from broadfast.cli.main import main

    data = tmp_path / "pairs.parquet"
    DATA.to_parquet(data)
    l1, l2 = tmp_path / "l1.parquet", tmp_path / "l2.parquet"
    RIGHT.to_parquet(l1)
    WRONG.to_parquet(l2)
    runner = CliRunner()
    res = runner.invoke(main, ["teacher", "sft", "--labels", str(l1), "--data", str(data), "--out", str(tmp_path / "sft"), "--base", str(tiny_teacher_dir), "--max-steps", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "sft" / CONFIG_FILE).read_text())["metrics"]["steps"] == 2
    res = runner.invoke(main, ["teacher", "dpo", "--labels", str(l1), "--labels", str(l2), "--data", str(data), "--out", str(tmp_path / "dpo"), "--base", str(tmp_path / "sft"), "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "dpo" / CONFIG_FILE).read_text())
    assert cfg["kind"] == "dpo" and cfg["base"] == str(tmp_path / "sft") and cfg["examples"] == 5
    # no grades: a clear error, exit status 1
    DATA.drop(columns=["grade"]).to_parquet(data)
    res = runner.invoke(main, ["teacher", "sft", "--labels", str(l1), "--data", str(data), "--out", str(tmp_path / "x"), "--base", str(tiny_teacher_dir)])
    assert res.exit_code == 1 and "grade" in res.output
