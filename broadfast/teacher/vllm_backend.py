"""The ``vllm`` engine: vLLM's OpenAI-compatible completions API over HTTP (httpx only).

vLLM cannot share an environment with faust-streaming, so the teacher never imports vLLM: it
talks to a server (``BROADFAST_TEACHER_URL``). Each HTTP request carries a batch of prompts
(by default the three perspectives of one pair, which share a prompt prefix, so the server's
prefix cache reuses it); up to ``teacher_concurrency`` requests are in flight at once. Time-outs,
connection errors, 429 and 5xx answers are retried with exponential backoff; what still fails
becomes a per-prompt error (a dead letter upstream), and a server that cannot be reached at all
raises :class:`~broadfast.teacher.errors.TeacherUnavailable`.

>>> e = VLLMEngine("http://127.0.0.1:1/v1", "m", timeout_s=0.2, retries=0)
>>> e.generate(["hi"], SamplingParams(max_tokens=4))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
broadfast.teacher.errors.TeacherUnavailable: ...
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from broadfast.core.settings import TeacherSettings
from broadfast.core.errors import ConfigError
from broadfast.teacher.errors import TeacherUnavailable
from broadfast.teacher.engine import Generation, SamplingParams, TopLogprobs

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class _Failed(Exception):
    def __init__(self, reason: str, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable


def completions_url(base_url: str) -> str:
    """``http://h:p`` or ``http://h:p/v1`` → ``http://h:p/v1/completions``."""
    base = base_url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/completions"


@dataclass
class VLLMEngine:
    """Batched, concurrent completions against one OpenAI-compatible server."""

    base_url: str
    model: str
    concurrency: int = 16
    prompts_per_request: int = 3
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 0.5

    @classmethod
    def from_settings(cls, teacher: TeacherSettings) -> VLLMEngine:
        if not teacher.teacher_url:
            raise ConfigError("the vllm teacher needs BROADFAST_TEACHER_URL (the OpenAI-compatible base URL of the vLLM server)")
        return cls(
            base_url=teacher.teacher_url,
            model=teacher.teacher_model,
            concurrency=teacher.teacher_concurrency,
            prompts_per_request=teacher.teacher_prompts_per_request,
            timeout_s=teacher.teacher_timeout_s,
            retries=teacher.teacher_retries,
            backoff_s=teacher.teacher_backoff_s,
        )

    @property
    def model_name(self) -> str:
        return self.model

    # -- the TeacherEngine contract --------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature, "stop": list(params.stop)}
        if params.seed is not None:
            body["seed"] = params.seed
        out: list[Generation] = []
        for chunk in self._run(prompts, body):
            out.extend(chunk)
        return out

    def top_logprobs(self, prompts: list[str], params: SamplingParams) -> list[TopLogprobs | str]:
        """The server's top-``params.logprobs`` log-probs per greedy step (``params.logprob_tokens``
        cannot be forced over HTTP; ignored)."""
        body = {"max_tokens": params.max_tokens, "temperature": 0.0, "logprobs": max(1, params.logprobs)}
        out: list[TopLogprobs | str] = []
        for chunk in self._run(prompts, body, want_logprobs=True):
            out.extend(chunk)
        return out

    # -- HTTP ------------------------------------------------------------------------------
    def _run(self, prompts: list[str], body: dict[str, Any], want_logprobs: bool = False) -> list[list[Any]]:
        """Send ``prompts`` in chunks, concurrently; one list of per-prompt results per chunk."""
        if not prompts:
            return []
        size = max(1, self.prompts_per_request)
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        url = completions_url(self.base_url)
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(timeout=timeout, limits=limits) as client, ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            results = list(pool.map(lambda c: self._request(client, url, c, body, want_logprobs), chunks))
        failures = [r for r in results if isinstance(r, _Failed)]
        if failures and len(failures) == len(results) and all(f.unreachable for f in failures):
            raise TeacherUnavailable(f"the vLLM server at {self.base_url} cannot be used: {failures[0].reason}")
        out: list[list[Any]] = []
        for chunk, r in zip(chunks, results):
            if isinstance(r, _Failed):
                out.append([r.reason if want_logprobs else Generation(None, 0, r.reason)] * len(chunk))
            else:
                out.append(r)
        return out

    def _request(self, client: httpx.Client, url: str, chunk: list[str], body: dict[str, Any], want_logprobs: bool) -> list[Any] | _Failed:
        payload = {"model": self.model, "prompt": chunk, **body}
        last = "no attempt"
        unreachable = False
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_s * (2 ** (attempt - 1)) * (1.0 + 0.25 * random.random())
                time.sleep(delay)
            try:
                resp = client.post(url, json=payload)
            except httpx.TimeoutException:
                last, unreachable = f"timed out after {self.timeout_s:g} s", False
                continue
            except httpx.TransportError as exc:
                last, unreachable = f"unreachable ({type(exc).__name__}: {exc})", True
                continue
            if resp.status_code in RETRYABLE_STATUS:
                last, unreachable = f"server answered {resp.status_code}: {resp.text[:200]}", False
                continue
            if resp.status_code == 404:
                return _Failed(f"server answered 404 (is the model {self.model!r} served there?): {resp.text[:200]}", unreachable=True)
            if resp.status_code >= 400:
                return _Failed(f"request refused with {resp.status_code}: {resp.text[:300]}")
            try:
                return parse_completions(resp.json(), len(chunk), want_logprobs)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                return _Failed(f"malformed response from the server: {exc}")
        tries = self.retries + 1
        log.warning("vLLM request failed after %d tr%s: %s", tries, "y" if tries == 1 else "ies", last)
        return _Failed(f"{last} (after {tries} tr{'y' if tries == 1 else 'ies'})", unreachable=unreachable)


def parse_completions(data: Any, n: int, want_logprobs: bool) -> list[Any]:
    """Per-prompt results of an OpenAI completions response (choices matched by ``index``).

    Generation mode gives :class:`Generation` (completion tokens split over the choices, from
    ``usage``); log-prob mode gives each choice's ``logprobs.top_logprobs`` (a list of dicts).
    Raises ValueError/KeyError/TypeError for anything that is not that shape.
    """
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise TypeError("no 'choices' list")
    choices = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
    if len(choices) != n or [int(c.get("index", i)) for i, c in enumerate(choices)] != list(range(n)):
        raise ValueError(f"expected {n} choices indexed 0..{n - 1}, got {len(choices)}")
    if want_logprobs:
        out: list[Any] = []
        for c in choices:
            top = (c.get("logprobs") or {}).get("top_logprobs")
            if not isinstance(top, list) or not all(isinstance(t, dict) or t is None for t in top):
                raise ValueError("a choice lacks logprobs.top_logprobs")
            out.append([{str(k): float(v) for k, v in (t or {}).items()} for t in top])
        return out
    texts = [c["text"] for c in choices]
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("a choice's text is not a string")
    total = int((data.get("usage") or {}).get("completion_tokens") or 0)
    share = [total // n + (1 if i < total % n else 0) for i in range(n)]
    return [Generation(t, s) for t, s in zip(texts, share)]
