"""The student: a MiniLM cross-encoder with a latent reasoning extractor (LRKD).

The encoder reads ``[CLS] query [SEP] ad title + text [SEP]``. The *latent reasoning
extractor* turns its token states into K latent vectors, one per teacher perspective;
the relevance head reads [CLS] together with those K vectors and gives logits of the
three grades (0 irrelevant, 1 partial, 2 exact). During training an alignment
projection maps each latent vector to the 384-d space of the teacher's rationale
embeddings (see :mod:`broadfast.training.losses`); it is not used at inference.

Extractor variants (``StudentConfig.extractor``):

* ``"mlp"`` (default): [CLS] and the masked mean of the token states → a small MLP →
  K × ``latent_dim``.
* ``"attention"``: poly-encoder style: K learned codes attend over the token states;
  each attended vector → ``latent_dim``.
* ``"none"``: no extractor; the head reads [CLS] alone (the plain cross-encoder).

A model folder is self-contained: ``model.safetensors``, ``config.json`` (the
:class:`StudentConfig`) and the tokenizer files.

>>> cfg = StudentConfig.tiny(extractor="attention")
>>> student = build_student(cfg)
>>> student.predict_proba(["drill"], ["cordless drill"]).shape
(1, 3)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from broadfast.model.embedder import EMBED_DIM, minilm_path
from broadfast.model.errors import CheckpointError

log = logging.getLogger(__name__)

N_GRADES = 3
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"  # the fast tokenizer: a model folder without it is refused (transformers would fall back to a stub)
FORMAT = "broadfast.student"
FORMAT_VERSION = 1
DESCRIPTION_CHARS = 2000  # enough for any max_length; keeps tokenising HTML-ish descriptions cheap

Extractor = Literal["none", "mlp", "attention"]


@dataclass
class StudentConfig:
    """Everything needed to rebuild a student's architecture (saved in ``config.json``)."""

    encoder: dict[str, Any] = field(default_factory=dict)  # a BertConfig as a dict
    init_from: str = "minilm"  # where the weights came from: "minilm", "scratch" or "student" (a shrunk copy of a trained student, broadfast/training/shrink.py)
    max_length: int = 128
    n_perspectives: int = 3
    extractor: Extractor = "mlp"
    latent_dim: int = 128
    extractor_hidden: int = 256
    rationale_dim: int = EMBED_DIM
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.extractor not in ("none", "mlp", "attention"):
            raise ValueError(f"extractor must be 'none', 'mlp' or 'attention', got {self.extractor!r}")
        if self.n_perspectives < 1 or self.latent_dim < 1 or self.max_length < 8:
            raise ValueError("n_perspectives and latent_dim must be ≥ 1 and max_length ≥ 8")

    @classmethod
    def minilm(cls, **overrides: Any) -> StudentConfig:
        """The packaged all-MiniLM-L6-v2 encoder (weights loaded by :func:`build_student`)."""
        encoder = json.loads((minilm_path() / "config.json").read_text())
        return cls(encoder=encoder, init_from="minilm", **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> StudentConfig:
        """A two-layer, 32-wide BERT built from scratch (MiniLM's vocabulary): for tests."""
        encoder = {
            "model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2,
        }  # fmt: skip
        overrides.setdefault("max_length", 64)
        overrides.setdefault("latent_dim", 16)
        overrides.setdefault("extractor_hidden", 32)
        return cls(encoder=encoder, init_from="scratch", **overrides)

    @property
    def layers(self) -> int:
        """Encoder layers."""
        return int(self.encoder["num_hidden_layers"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown student config field(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class StudentOutput:
    logits: torch.Tensor  # (B, 3)
    latents: torch.Tensor | None  # (B, K, latent_dim)
    aligned: torch.Tensor | None  # (B, K, rationale_dim): latents in the rationale embedding space


class MLPExtractor(nn.Module):
    """[CLS] ⊕ mean of token states → hidden → K latent vectors."""

    def __init__(self, hidden: int, k: int, latent: int, width: int, dropout: float) -> None:
        super().__init__()
        self.k, self.latent = k, latent
        self.net = nn.Sequential(nn.Linear(2 * hidden, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, k * latent))
        self.norm = nn.LayerNorm(latent)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(states.dtype)
        mean = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
        z = self.net(torch.cat([states[:, 0], mean], dim=-1))
        return self.norm(z.view(-1, self.k, self.latent))


class AttentionExtractor(nn.Module):
    """Poly-encoder pooling: K learned codes attend over the token states."""

    def __init__(self, hidden: int, k: int, latent: int, dropout: float) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.randn(k, hidden) * 0.02)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, latent))
        self.norm = nn.LayerNorm(latent)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("kh,bth->bkt", self.codes.to(states.dtype), states) * self.scale
        scores = scores.masked_fill(~mask.bool().unsqueeze(1), torch.finfo(scores.dtype).min)
        pooled = torch.einsum("bkt,bth->bkh", scores.softmax(-1), states)
        return self.norm(self.out(pooled))


class Student(nn.Module):
    """Cross-encoder + latent reasoning extractor + relevance head.

    ``tokenizer`` is kept as a plain attribute (not a module) so the model can score text.
    """

    def __init__(self, config: StudentConfig, tokenizer: Any | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = config
        self.tokenizer = tokenizer
        enc_cfg = BertConfig.from_dict({k: v for k, v in config.encoder.items() if k not in ("architectures", "_name_or_path")})
        self.encoder = BertModel(enc_cfg, add_pooling_layer=False)
        h, k, d = enc_cfg.hidden_size, config.n_perspectives, config.latent_dim
        if config.extractor == "mlp":
            self.extractor: nn.Module | None = MLPExtractor(h, k, d, config.extractor_hidden, config.dropout)
        elif config.extractor == "attention":
            self.extractor = AttentionExtractor(h, k, d, config.dropout)
        else:
            self.extractor = None
        head_in = h + (k * d if self.extractor is not None else 0)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(head_in, h), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(h, N_GRADES))
        # Training only: latent vector → the rationale embedding space (alignment loss).
        self.align_proj = nn.Linear(d, config.rationale_dim) if self.extractor is not None else None

    # -- sizes ---------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part; ``inference`` excludes the training-only alignment projection."""

        def n(mod: nn.Module | None) -> int:
            return sum(p.numel() for p in mod.parameters()) if mod is not None else 0

        counts = {"encoder": n(self.encoder), "extractor": n(self.extractor), "head": n(self.head), "align_proj": n(self.align_proj)}
        counts["inference"] = counts["encoder"] + counts["extractor"] + counts["head"]
        return counts

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- forward -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> StudentOutput:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        cls = states[:, 0]
        if self.extractor is None:
            return StudentOutput(self.head(cls), None, None)
        latents = self.extractor(states, attention_mask)
        logits = self.head(torch.cat([cls, latents.flatten(1)], dim=-1))
        aligned = self.align_proj(latents) if self.training else None
        return StudentOutput(logits, latents, aligned)

    # -- text in, probabilities out ----------------------------------------------------
    def tokenize(self, queries: list[str], texts: list[str], max_length: int | None = None) -> dict[str, Any]:
        """Token ids (unpadded lists) of (query, ad text) pairs."""
        if self.tokenizer is None:
            raise CheckpointError("this student has no tokenizer; build it with build_student() or load_student()")
        return self.tokenizer(
            list(queries), list(texts), truncation="longest_first", max_length=max_length or self.config.max_length,
            return_attention_mask=False, return_token_type_ids=True,
        )  # fmt: skip

    def predict_proba(self, queries: list[str], texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Grade probabilities (n, 3) of (query, ad text) pairs, in input order.

        Tokenises once, sorts by length so batches pad little, runs under
        ``torch.inference_mode`` (bf16 autocast on a GPU).
        """
        if len(queries) != len(texts):
            raise ValueError(f"{len(queries)} queries but {len(texts)} texts")
        n = len(queries)
        if n == 0:
            return np.zeros((0, N_GRADES), dtype=np.float32)
        enc = self.tokenize(queries, texts)
        ids, types = enc["input_ids"], enc["token_type_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.empty((n, N_GRADES), dtype=np.float32)
        was_training = self.training
        self.eval()
        dev = self.device
        try:
            with torch.inference_mode(), autocast(dev):
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    batch = pad_batch([ids[i] for i in idx], [types[i] for i in idx], self.tokenizer.pad_token_id or 0, dev)
                    out[idx] = self(**batch).logits.float().softmax(-1).cpu().numpy()
        finally:
            self.train(was_training)
        return out


def autocast(device: torch.device) -> Any:
    """bf16 autocast on a GPU; a no-op context on CPU."""
    import contextlib

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pad_batch(ids: list[list[int]], types: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a list of token-id lists into tensors on ``device``."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (x, t) in enumerate(zip(ids, types)):
        input_ids[row, : len(x)] = torch.tensor(x)
        token_type_ids[row, : len(t)] = torch.tensor(t)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "token_type_ids": token_type_ids.to(device)}


def text_read(text: str | None) -> str:
    """The part of an ad's text (its description) the student reads: stripped, at most ``DESCRIPTION_CHARS``."""
    return (text or "").strip()[:DESCRIPTION_CHARS]


def student_text(title: str, text: str = "") -> str:
    """What the student reads of an ad: its title, then the start of its text."""
    read = text_read(text)
    return f"{title} {read}" if read else title


def pair_texts(df: Any) -> tuple[list[str], list[str]]:
    """(queries, what the student reads of each ad) of a pairs frame (columns ``query``, ``title``[, ``text``])."""
    texts = df["text"] if "text" in df.columns else [""] * len(df)
    return df["query"].astype(str).tolist(), [student_text(t, d) for t, d in zip(df["title"], texts)]


def load_tokenizer(path: Path | None = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or minilm_path()))


def build_student(config: StudentConfig, device: str | torch.device | None = None) -> Student:
    """A fresh student: encoder weights from the packaged MiniLM (``init_from="minilm"``) or random.

    ``init_from="student"`` (a student shrunk from a trained one) builds the architecture at
    random too: its weights come from the source student (:func:`broadfast.training.shrink.shrink_student`)
    or, once saved, from its own folder (:func:`load_student`).
    """
    torch_device = torch.device(device or "cpu")
    student = Student(config, tokenizer=load_tokenizer())
    if config.init_from == "minilm":
        from safetensors.torch import load_file

        weights = load_file(str(minilm_path() / "model.safetensors"))
        weights = {k.removeprefix("bert."): v for k, v in weights.items() if not k.removeprefix("bert.").startswith("pooler.")}
        missing, _ = student.encoder.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise CheckpointError(f"the packaged MiniLM lacks encoder weights: {missing[:5]}")
    elif config.init_from not in ("scratch", "student"):
        raise ValueError(f"init_from must be 'minilm', 'scratch' or 'student', got {config.init_from!r}")
    return student.to(torch_device)


# -- checkpoint --------------------------------------------------------------------------
def save_student(student: Student, directory: str | Path) -> Path:
    """Write a self-contained model folder: weights, config, tokenizer. Returns the folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    tmp.replace(directory / WEIGHTS_FILE)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "student": student.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
    if student.tokenizer is not None:
        student.tokenizer.save_pretrained(str(directory))
    return directory


def read_config(directory: str | Path) -> StudentConfig:
    """The :class:`StudentConfig` in a model folder, or :class:`CheckpointError`."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} is not a student model folder: {CONFIG_FILE} is missing")
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"format is {payload.get('format')!r}, expected {FORMAT!r}")
        if payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {payload.get('format_version')!r} is not {FORMAT_VERSION}")
        return StudentConfig.from_dict(payload["student"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid student config: {exc}") from None


def load_student(directory: str | Path, device: str | torch.device | None = None) -> Student:
    """Load a model folder, refusing a corrupt or mismatched checkpoint with :class:`CheckpointError`.

    Checks: the config parses; the safetensors file reads; ``tokenizer.json`` is there and the
    tokenizer's vocabulary is the encoder's; ``max_length`` fits the position table; its tensors are exactly the ones the config's
    architecture has, with the same shapes; every weight is finite.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {exc}") from None
    if not (directory / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{directory}: {TOKENIZER_FILE} is missing (a model is refused without the tokenizer it was trained with)")
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as exc:  # noqa: BLE001 - tokenizer loaders raise many types
        raise CheckpointError(f"{directory}: the tokenizer files cannot be loaded: {exc}") from None
    positions = int(config.encoder.get("max_position_embeddings", 0))
    if positions and config.max_length > positions:
        raise CheckpointError(f"{directory}: max_length {config.max_length} exceeds the encoder's {positions} positions")
    vocab = int(config.encoder.get("vocab_size", 0))
    if len(tokenizer) != vocab:
        raise CheckpointError(f"{directory}: the tokenizer has {len(tokenizer):,} tokens but the encoder's vocabulary {vocab:,}: they do not belong together")
    student = Student(config, tokenizer=tokenizer)
    expected = student.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part for part in (
                f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                f"shape mismatch {shapes[:3]}" if shapes else "",
            ) if part
        )  # fmt: skip
        raise CheckpointError(f"{weights} does not match its config ({config.extractor} extractor, K={config.n_perspectives}): {detail}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{weights} holds non-finite values in {bad[:4]}")
    student.load_state_dict(state, strict=True)
    return student.to(torch.device(device or "cpu")).eval()
