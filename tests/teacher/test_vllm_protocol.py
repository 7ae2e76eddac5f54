"""The vllm backend's HTTP client logic against a FAKE OpenAI-completions server run in the test.

This fake server exists only to test the protocol handling — batching, concurrency, retries
with backoff, time-outs, malformed and empty answers — with failures we can script. It is not
a substitute for the real-server test (tests/teacher/test_vllm_real.py), which talks to vLLM.
"""

from __future__ import annotations

from broadfast.teacher.engine import SamplingParams

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from broadfast.teacher.errors import TeacherUnavailable
from broadfast.teacher.mpcot import Label, LabelFailure, LLMTeacher, Pair
from broadfast.teacher.vllm_backend import VLLMEngine, completions_url


class FakeCompletionsServer:
    """Speaks POST /v1/completions in the OpenAI shape; behaviour scripted per request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list[str] = []  # per request in order: "ok", "503", "slow", "malformed", "empty", "400"
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.delay_s = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    action = outer.script.pop(0) if outer.script else "ok"
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    if outer.delay_s:
                        time.sleep(outer.delay_s)
                    if action == "slow":
                        time.sleep(1.0)
                    if action in ("503", "400"):
                        self._send(int(action), b'{"error": "scripted"}')
                    elif action == "malformed":
                        self._send(200, b'{"choices": "not a list"')
                    else:
                        self._send(200, json.dumps(outer.answer(body, empty=action == "empty")).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def answer(body: dict, empty: bool = False) -> dict:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            if body.get("logprobs"):
                # grade position after a lone space token, as SmolLM2 does
                top = [{" ": -0.01, "2": -5.0}, {"2": -0.2, "1": -1.8, "0": -3.5, "The": -4.0}]
                choices.append({"index": i, "text": " 2", "logprobs": {"tokens": [" ", "2"], "top_logprobs": top}})
            else:
                choices.append({"index": i, "text": "" if empty else f" Matches prompt {len(p)}.\nGrade: 2"})
        return {"choices": list(reversed(choices)), "usage": {"completion_tokens": 7 * len(prompts)}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    server = FakeCompletionsServer()
    yield server
    server.close()


PAIRS = [Pair(f"p{i}", f"query {i}", f"a{i}", f"title {i}") for i in range(4)]


def engine(url: str, **kw) -> VLLMEngine:
    return VLLMEngine(url, "served-model", **({"timeout_s": 5.0, "retries": 2, "backoff_s": 0.01} | kw))


def test_completions_url():
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"


def test_labels_through_the_protocol_with_batched_concurrent_requests(fake):
    fake.delay_s = 0.2
    teacher = LLMTeacher(engine=engine(fake.url, concurrency=4, prompts_per_request=3), backend="vllm")
    results = teacher.label(PAIRS)
    assert all(isinstance(r, Label) for r in results)
    lab = results[0]
    assert lab.perspectives[0].rationale.startswith("Matches prompt")  # cut at "Grade"
    assert lab.probs[2] > 0.7  # read after the lone space token
    gen = [r for r in fake.requests if not r.get("logprobs")]
    grade = [r for r in fake.requests if r.get("logprobs")]
    # one request per pair: its three perspectives together (shared prefix), the model named
    assert len(gen) == 4 and all(len(r["prompt"]) == 3 for r in gen)
    assert all(r["model"] == "served-model" and r["temperature"] == 0.0 for r in gen)
    assert all(r["prompt"][0][:200] == r["prompt"][1][:200] for r in gen)
    assert len(grade) == 4 and all(r["logprobs"] == 20 and r["prompt"][0].endswith("\nGrade: ") for r in grade)
    assert fake.max_in_flight > 1  # concurrent
    assert lab.tokens == 21


def test_5xx_is_retried_with_backoff(fake):
    fake.script = ["503", "503"]
    eng = engine(fake.url, concurrency=1, retries=2)
    [g] = eng.generate(["p"], SamplingParams(max_tokens=4))
    assert g.error is None and g.text.startswith(" Matches")
    assert len(fake.requests) == 3


def test_time_out_after_retries_is_a_failure_not_a_label(fake):
    fake.script = ["slow", "slow"]
    eng = engine(fake.url, concurrency=1, retries=1, timeout_s=0.3, prompts_per_request=3)
    t0 = time.perf_counter()
    [res] = LLMTeacher(engine=eng, backend="vllm").label(PAIRS[:1])
    assert isinstance(res, LabelFailure) and "timed out after 0.3 s (after 2 tries)" in res.reason
    assert time.perf_counter() - t0 < 5


def test_malformed_answer_is_a_failure_and_not_retried(fake):
    fake.script = ["malformed"]
    [res] = LLMTeacher(engine=engine(fake.url, concurrency=1), backend="vllm").label(PAIRS[:1])
    assert isinstance(res, LabelFailure) and "malformed response" in res.reason
    assert len(fake.requests) == 1


def test_client_error_is_not_retried(fake):
    fake.script = ["400"]
    [g] = engine(fake.url, concurrency=1).generate(["p"], SamplingParams(max_tokens=4))
    assert "refused with 400" in g.error and len(fake.requests) == 1


def test_empty_rationale_is_a_failure(fake):
    fake.script = ["empty"]
    results = LLMTeacher(engine=engine(fake.url, concurrency=1), backend="vllm").label(PAIRS[:2])
    assert isinstance(results[0], LabelFailure) and "empty rationale" in results[0].reason
    assert isinstance(results[1], Label)  # the other pair is unaffected


def test_unreachable_server_raises_teacher_unavailable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = engine(f"http://127.0.0.1:{port}/v1", retries=1)
    with pytest.raises(TeacherUnavailable, match="cannot be used"):
        LLMTeacher(engine=eng, backend="vllm").label(PAIRS[:2])
