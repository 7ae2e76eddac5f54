"""Fixtures of the serving tests: tiny students built from scratch, servers on free ports, a registry."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr

from broadfast.core.settings import Settings
from broadfast.model.student import StudentConfig, build_student, load_student, save_student

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny two-layer student (random weights, MiniLM's tokenizer), saved as a model folder."""
    torch.manual_seed(0)
    return save_student(build_student(StudentConfig.tiny()), tmp_path_factory.mktemp("tiny") / "model")


def variant(source: Path, out: Path, *, noise: float = 0.0, head_bias: tuple[float, float, float] | None = None, seed: int = 1) -> Path:
    """A copy of a model folder with its weights nudged (``noise``) or its head biased (scores pushed away)."""
    student = load_student(source)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if noise:
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
        if head_bias is not None:
            student.head[-1].bias.copy_(torch.tensor(head_bias))
    return save_student(student, out)


@pytest.fixture
def make_variant(tiny_model: Path, tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, **kw: object) -> Path:
        return variant(tiny_model, tmp_path / name, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def serve_settings(bus_settings: Settings, tmp_path: Path) -> Settings:
    """Settings on the test's own topics and Redis db, a registry of its own, an admin token."""
    return bus_settings.model_copy(update={"registry_root": tmp_path / "registry", "admin_token": SecretStr(ADMIN_TOKEN), "serve_experiment_poll_s": 0.3})


@contextmanager
def running(settings: Settings, model_dir: Path | None = None, *, wait_watcher: bool = False) -> Iterator[tuple[str, object]]:
    """A real server (uvicorn on a free loopback port, in a thread): yields (base URL, engine)."""
    from broadfast.serving.app import create_app
    from broadfast.serving.engine import ScoringEngine
    from broadfast.serving.server import ServerThread

    engine = ScoringEngine(settings, model_dir)
    with ServerThread(create_app(settings, engine=engine), keep_alive_s=settings.serving.serve_keep_alive_s) as server:
        if wait_watcher:
            assert engine.watcher_ready.wait(30), "the model watcher did not get its partitions"
        yield server.url, engine


def score_body(query: str, titles: list[str], user_id: str | None = None) -> dict:
    return {"query": query, "user_id": user_id, "request_id": uuid.uuid4().hex, "ads": [{"ad_id": f"ad{i}", "title": t} for i, t in enumerate(titles)]}


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples in a Prometheus text page (optionally only those with ``labels``)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
