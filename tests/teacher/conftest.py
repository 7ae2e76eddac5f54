"""Fixtures of the teacher tests: the SmolLM2 tokenizer and a tiny from-scratch model using it.

The tiny model (a 2-layer Llama of hidden size 32 with random weights) is for mechanics —
batching, log-prob grade extraction, the worker, SFT and DPO — not for label quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer, read from the packaged GGUF (takes ~20 s once)."""
    from transformers import AutoTokenizer

    from broadfast.teacher.hf_backend import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_teacher_dir(smol_tokenizer, tmp_path_factory) -> Path:
    """A tiny causal LM with the SmolLM2 tokenizer, saved as a model folder (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    # Random weights happen to rank the lone-space token first at every step, so the grade
    # position would never come; zero the (tied) rows of whitespace-only tokens so they don't.
    blank = [i for i in range(len(smol_tokenizer)) if smol_tokenizer.decode([i]).strip() == ""]
    with torch.no_grad():
        model.get_input_embeddings().weight[blank] = 0.0
    out = tmp_path_factory.mktemp("tiny-teacher")
    model.save_pretrained(out, safe_serialization=True)
    smol_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_teacher_dir):
    from broadfast.teacher.hf_backend import TransformersEngine

    return TransformersEngine.load(tiny_teacher_dir, batch_size=12, threads=1)
