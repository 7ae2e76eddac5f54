"""The teacher engine contract: what an LLM backend provides, and the one params object its calls take.

An engine is batched and each prompt may fail on its own (the failure is a value, never an
exception, unless the whole engine is unreachable: :class:`~broadfast.teacher.errors.TeacherUnavailable`).
Two engines implement it: :class:`~broadfast.teacher.vllm_backend.VLLMEngine` (a vLLM server over
HTTP) and :class:`~broadfast.teacher.hf_backend.TransformersEngine` (a local transformers model).
A new backend is a class with these two methods and a ``model_name``; nothing else changes.

Both calls take one :class:`SamplingParams`, as vLLM's own calls do:

>>> rationale = SamplingParams(max_tokens=48, stop=("Grade:",))
>>> grade = SamplingParams(max_tokens=3, logprobs=20, logprob_tokens=("0", "1", "2"))
>>> grade.temperature, grade.seed
(0.0, None)
>>> SamplingParams(max_tokens=0)
Traceback (most recent call last):
...
ValueError: max_tokens must be at least 1, got 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How one batched engine call samples (the teacher's ``BROADFAST_TEACHER_…`` settings fill it).

    ``max_tokens`` is the most tokens generated per prompt (for :meth:`TeacherEngine.top_logprobs`:
    the greedy steps reported); ``logprobs`` is the top-k reported per step; ``logprob_tokens`` are
    tokens an engine that has the whole distribution reports at every step even outside its top-k.
    """

    max_tokens: int = 48
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    logprob_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be at least 0, got {self.temperature}")
        if self.logprobs < 0:
            raise ValueError(f"logprobs must be at least 0, got {self.logprobs}")


@dataclass(frozen=True)
class Generation:
    """A generated rationale (or the error that stopped it) and its token count."""

    text: str | None
    tokens: int = 0
    error: str | None = None


TopLogprobs = list[dict[str, float]]
"""The top log-probs of each greedy step of one prompt: token text → log-prob."""


class TeacherEngine(Protocol):
    """The two calls an LLM backend provides, batched; each item may fail on its own."""

    model_name: str

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        """One rationale per prompt (text up to a stop string or ``params.max_tokens``)."""
        ...

    def top_logprobs(self, prompts: list[str], params: SamplingParams) -> list[TopLogprobs | str]:
        """The top-``params.logprobs`` log-probs of the next ``params.max_tokens`` greedy tokens per
        prompt, or an error string; an engine with the whole distribution also reports
        ``params.logprob_tokens``."""
        ...
