"""Teacher training recipes: SFT on agreeing rationales, then DPO (own loss, no TRL).

Both read label files written by ``broadfast label --data FILE --out FILE`` joined to the
human grades of the data file by pair id.

* **SFT** — every (pair, perspective) whose rationale's grade (argmax of the perspective's
  soft label) equals the human grade becomes a completion ``" <rationale>\\nGrade: <g><|im_end|>"``
  after its perspective prompt; loss on the completion tokens only.
* **DPO** — for a (pair, perspective) with at least one agreeing and one disagreeing rationale
  (several label files, e.g. sampled with different ``--seed``), the agreeing one (with its
  grade) is *chosen* and the disagreeing one (with its wrong grade) is *rejected*; loss
  ``-log σ(β·[(log π_c − log ref_c) − (log π_r − log ref_r)])`` against a frozen copy of the
  starting model (Rafailov et al. 2023).

The run's :class:`TeacherTrainConfig` and metrics are saved as ``teacher_train.json`` beside
the safetensors weights and tokenizer; the folder is a model the ``transformers`` backend loads
(``BROADFAST_TEACHER_MODEL_PATH``). Built for a GPU; runs end to end on a tiny model on CPU.

TRL was not used: installing it pulls ``datasets``, which downgrades ``fsspec`` in the shared
environment; the DPO loss is the few lines of :func:`dpo_loss`.

>>> import torch
>>> round(float(dpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1)[0]), 4)
0.6931
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broadfast.core.settings import Settings
from broadfast.teacher.errors import LabelDataError
from broadfast.teacher.mpcot import Pair, Rules, Template, load_template

log = logging.getLogger(__name__)

CONFIG_FILE = "teacher_train.json"
END = "<|im_end|>"


@dataclass
class TeacherTrainConfig:
    kind: str  # "sft" or "dpo"
    base: str
    template: str = "mpcot_v1"
    epochs: int = 1
    lr: float = 1e-5
    batch_size: int = 4
    max_length: int = 768
    beta: float = 0.1
    max_steps: int | None = None
    seed: int = 0
    examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


# -- examples ------------------------------------------------------------------------------------
def _joined(labels: list[Any], data: Any) -> Any:
    import pandas as pd

    from broadfast.core.events import pair_id

    if "grade" not in data.columns:
        raise LabelDataError("teacher training needs human grades: the data file lacks a 'grade' column")
    truth = data.assign(pair_id=[pair_id(q, a) for q, a in zip(data["query"], data["ad_id"])])
    truth = truth.drop_duplicates("pair_id")[["pair_id", "title", "text", "grade"]]
    frames = []
    for lab in labels:
        need = {"pair_id", "query", "ad_id", "perspectives", "rationales", "perspective_probs"}
        missing = need - set(lab.columns)
        if missing:
            raise LabelDataError(f"a label file lacks {', '.join(sorted(missing))} (write it with `broadfast label --data … --out …`)")
        frames.append(lab)
    joined = pd.concat(frames, ignore_index=True).merge(truth, on="pair_id", how="inner")
    if joined.empty:
        raise LabelDataError("no labelled pair has a human grade in the data file (different files?)")
    return joined


def _rationales(joined: Any, template: Template, rules: Rules) -> list[dict[str, Any]]:
    """One record per (labelled pair, template perspective): prompt, rationale, its grade, the truth."""
    out = []
    for row in joined.itertuples(index=False):
        pair = Pair(row.pair_id, row.query, row.ad_id, row.title, row.text)
        prompts = template.render(pair, rules.text)
        for name, rationale, probs in zip(row.perspectives, row.rationales, row.perspective_probs):
            if name not in prompts or not str(rationale).strip():
                continue  # e.g. the oracle's "human_grade": not a perspective of this template
            out.append({"key": (row.pair_id, name), "prompt": prompts[name], "rationale": str(rationale).strip(), "grade": int(np.argmax(probs)), "truth": int(row.grade)})
    return out


def completion(rationale: str, grade: int, template: Template) -> str:
    return " " + rationale + template.grade_cue + template.grade_tokens[grade] + END


def sft_examples(labels: list[Any], data: Any, template: Template, rules: Rules) -> list[tuple[str, str]]:
    """(prompt, completion) for each rationale whose grade agrees with the human grade."""
    recs = _rationales(_joined(labels, data), template, rules)
    return [(r["prompt"], completion(r["rationale"], r["truth"], template)) for r in recs if r["grade"] == r["truth"]]


def dpo_examples(labels: list[Any], data: Any, template: Template, rules: Rules) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): an agreeing and a disagreeing rationale of the same prompt."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in _rationales(_joined(labels, data), template, rules):
        groups.setdefault(r["key"], []).append(r)
    out = []
    for recs in groups.values():
        good = [r for r in recs if r["grade"] == r["truth"]]
        bad = [r for r in recs if r["grade"] != r["truth"]]
        for g, b in zip(good, bad):
            out.append((g["prompt"], completion(g["rationale"], g["truth"], template), completion(b["rationale"], b["grade"], template)))
    return out


# -- tensors and losses --------------------------------------------------------------------------
def _tokenize(tok: Any, prompt: str, completion_text: str, max_length: int) -> tuple[list[int], int]:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion_text, add_special_tokens=False)["input_ids"]
    ids = (p + c)[-max_length:]
    return ids, min(len(c), len(ids))


def _batch(tok: Any, items: list[tuple[list[int], int]]) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in items)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.bool)  # completion tokens (the targets)
    for i, (ids, n_completion) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        mask[i, len(ids) - n_completion : len(ids)] = True
    return input_ids, attn, mask


def completion_logps(model: Any, input_ids: Any, attn: Any, mask: Any) -> tuple[Any, Any]:
    """Log-probability of each completion token, and the row it belongs to.

    The vocabulary projection runs only at the positions that predict a completion token (a
    prompt is hundreds of tokens, a completion a few dozen): much less memory and time.
    """
    import torch

    hidden = model.base_model(input_ids=input_ids, attention_mask=attn).last_hidden_state
    predict = mask[:, 1:]  # position t predicts token t+1
    logits = model.get_output_embeddings()(hidden[:, :-1][predict]).float()
    targets = input_ids[:, 1:][predict]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(predict)[predict]
    return lp, rows


def sequence_logps(model: Any, input_ids: Any, attn: Any, mask: Any) -> Any:
    """Sum of log-probabilities of the completion tokens of each row."""
    import torch

    lp, rows = completion_logps(model, input_ids, attn, mask)
    return torch.zeros(input_ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def dpo_loss(pi_chosen: Any, pi_rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> tuple[Any, Any]:
    """DPO loss per row and the implicit reward margin."""
    import torch.nn.functional as F

    margin = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


# -- the loops -----------------------------------------------------------------------------------
def _load(base: str | Path) -> tuple[Any, Any]:
    from broadfast.teacher.hf_backend import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(Path(base))
    model.hf_quantizer = None  # a dequantised GGUF trains and saves as plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _save(model: Any, tok: Any, out: Path, cfg: TeacherTrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))


def _steps(n: int, cfg: TeacherTrainConfig) -> list[list[int]]:
    rng = random.Random(cfg.seed)
    batches = []
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        batches.extend(order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size))
    return batches[: cfg.max_steps] if cfg.max_steps else batches


def train_sft(examples: list[tuple[str, str]], cfg: TeacherTrainConfig, out: Path, progress: bool = True) -> TeacherTrainConfig:
    """Fine-tune ``cfg.base`` on (prompt, completion) pairs; save to ``out``."""
    import torch
    from tqdm import tqdm

    if not examples:
        raise LabelDataError("no rationale agrees with the human grade: nothing to fine-tune on")
    torch.manual_seed(cfg.seed)
    model, tok = _load(cfg.base)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    items = [_tokenize(tok, p, c, cfg.max_length) for p, c in examples]
    losses = []
    for idx in tqdm(_steps(len(items), cfg), desc="teacher SFT", unit="step", disable=not progress):
        input_ids, attn, mask = _batch(tok, [items[i] for i in idx])
        lp, _ = completion_logps(model, input_ids, attn, mask)
        loss = -lp.mean()  # token-level cross-entropy on the completion
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    cfg.examples = len(examples)
    cfg.metrics = {"loss_first": losses[0], "loss_last": losses[-1], "steps": float(len(losses))}
    model.eval()
    _save(model, tok, out, cfg)
    log.info("teacher SFT: %d examples, %d steps, loss %.4f -> %.4f, saved to %s", len(examples), len(losses), losses[0], losses[-1], out)
    return cfg


def train_dpo(examples: list[tuple[str, str, str]], cfg: TeacherTrainConfig, out: Path, progress: bool = True) -> TeacherTrainConfig:
    """DPO from ``cfg.base`` (usually the SFT output) on (prompt, chosen, rejected); save to ``out``."""
    import copy

    import torch
    from tqdm import tqdm

    if not examples:
        raise LabelDataError("no prompt has both an agreeing and a disagreeing rationale: nothing to prefer (label twice with different --seed)")
    torch.manual_seed(cfg.seed)
    model, tok = _load(cfg.base)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    chosen = [_tokenize(tok, p, c, cfg.max_length) for p, c, _ in examples]
    rejected = [_tokenize(tok, p, r, cfg.max_length) for p, _, r in examples]
    losses, accs = [], []
    for idx in tqdm(_steps(len(examples), cfg), desc="teacher DPO", unit="step", disable=not progress):
        input_ids, attn, mask = _batch(tok, [chosen[i] for i in idx] + [rejected[i] for i in idx])
        n = len(idx)
        with torch.no_grad():
            ref_lp = sequence_logps(ref, input_ids, attn, mask)
        pi_lp = sequence_logps(model, input_ids, attn, mask)
        loss_rows, margin = dpo_loss(pi_lp[:n], pi_lp[n:], ref_lp[:n], ref_lp[n:], cfg.beta)
        loss = loss_rows.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        accs.append(float((margin > 0).float().mean()))
    cfg.examples = len(examples)
    cfg.metrics = {"loss_first": losses[0], "loss_last": losses[-1], "reward_accuracy_last": accs[-1], "steps": float(len(losses))}
    model.eval()
    _save(model, tok, out, cfg)
    log.info("teacher DPO: %d pairs, %d steps, loss %.4f -> %.4f, saved to %s", len(examples), len(losses), losses[0], losses[-1], out)
    return cfg


def read_labels(paths: list[Path]) -> list[Any]:
    import pandas as pd

    out = []
    for p in paths:
        if not Path(p).exists():
            raise LabelDataError(f"label file not found: {p}")
        out.append(pd.read_parquet(p))
    return out


def default_base() -> Path:
    from broadfast.teacher.hf_backend import smollm2_gguf_path

    return smollm2_gguf_path()


def template_and_rules(settings: Settings) -> tuple[Template, Rules]:
    return load_template(settings.teacher.teacher_template), Rules.load(settings.teacher.teacher_rules)
