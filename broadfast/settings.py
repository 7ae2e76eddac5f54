"""Settings: one frozen object per process, from ``BROADFAST_…`` variables and flags.

Everything that points somewhere (broker, Redis, ports, paths, the teacher) is a
setting; code never carries literals for hosts, ports or paths. Flags on the command
line override the environment, which overrides the defaults below.

>>> s = Settings(kafka_bootstrap="127.0.0.1:9999", topic_prefix="test", kafka_flavor="tansu")
>>> s.topic("requests")
'test.requests'
>>> s.kafka_consumer_config("g")["session_timeout_ms"] > 0
True
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BROADFAST_"


class Settings(BaseSettings):
    """All process settings. Each field is read from ``BROADFAST_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # -- where state lives -------------------------------------------------------------
    home: Path = Field(
        default=Path("~/.broadfast"),
        description="Working folder: embedded stack state and logs, default registry and reports.",
    )
    registry_root: Path | None = Field(
        default=None, description="Model registry root (a folder). Default: <home>/registry."
    )
    data: Path = Field(
        default=Path("../shared/data/homedepot/dev.parquet"),
        description="Default relevance data set (parquet) for replay and the demo.",
    )

    # -- Kafka -------------------------------------------------------------------------
    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers (host:port[,host:port]).")
    kafka_flavor: Literal["kafka", "tansu"] = Field(
        default="kafka",
        description="Broker workarounds: 'kafka' uses Kafka's client defaults; 'tansu' switches on the "
        "embedded broker's (short sessions, no idempotent producer).",
    )
    topic_prefix: str = Field(default="relevance", description="Prefix of every topic name: <prefix>.<name>.")
    topic_partitions: int = Field(default=3, ge=1, description="Partitions of each topic created by the stack.")
    max_event_bytes: int = Field(default=1_000_000, ge=1024, description="Largest accepted event payload (bytes).")
    deadletter_payload_bytes: int = Field(
        default=4096, ge=64, description="How much of a refused payload a dead letter keeps (bytes)."
    )

    # -- Redis -------------------------------------------------------------------------
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis URL (online features, registry index, experiments).")

    # -- serving -----------------------------------------------------------------------
    scoring_url: str | None = Field(default=None, description="Base URL of the scoring API, used by the frontend (replay, demo).")
    serve_host: str = Field(default="127.0.0.1", description="Scoring API bind address.")
    serve_port: int = Field(default=8080, ge=0, le=65535, description="Scoring API port.")
    admin_token: SecretStr | None = Field(default=None, description="Bearer token for the admin endpoints (never logged).")

    # -- teacher -----------------------------------------------------------------------
    teacher_backend: Literal["vllm", "transformers", "oracle"] = Field(default="transformers", description="Teacher backend.")
    teacher_url: str | None = Field(default=None, description="OpenAI-compatible base URL of the vLLM server.")
    teacher_model: str = Field(default="HuggingFaceTB/SmolLM2-135M-Instruct", description="Teacher model name.")

    # -- monitoring --------------------------------------------------------------------
    ui_host: str = Field(default="127.0.0.1", description="Evidently UI bind address.")
    ui_port: int = Field(default=8000, ge=0, le=65535, description="Evidently UI port.")

    # -- training (issue 3): add fields below this line --------------------------------

    # -- teacher worker (issue 4): add fields below this line ---------------------------

    # -- stream app and features (issue 6): add fields below this line ------------------

    # -- monitoring (issue 8): add fields below this line --------------------------------

    # -- process -----------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    torch_threads: int = Field(default=1, ge=1, description="Torch intra-op threads on CPU.")

    @field_validator("home", "registry_root", "data", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in " /\\") or value.endswith("."):
            raise ValueError("must be non-empty, without spaces or slashes, and not end with '.'")
        return value

    # -- derived -------------------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self.registry_root if self.registry_root is not None else self.home / "registry"

    @property
    def stack_state_path(self) -> Path:
        return self.home / "stack" / "state.json"

    def topic(self, name: str) -> str:
        """Full topic name for a short name of the topic table (``requests`` → ``relevance.requests``)."""
        return f"{self.topic_prefix}.{name}"

    # -- client configs (rendered here, used everywhere) -----------------------------------
    def kafka_common_config(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.kafka_bootstrap.split(",")}

    def kafka_producer_config(self) -> dict[str, Any]:
        cfg = self.kafka_common_config() | {"acks": 1, "linger_ms": 5, "max_request_size": max(self.max_event_bytes * 6, 1_048_576)}
        return cfg

    def kafka_consumer_config(self, group_id: str | None) -> dict[str, Any]:
        cfg = self.kafka_common_config() | {
            "group_id": group_id,
            "auto_offset_reset": "earliest",
            "enable_auto_commit": False,
            "fetch_max_bytes": max(self.max_event_bytes * 6, 52_428_800),
            "max_partition_fetch_bytes": max(self.max_event_bytes * 6, 1_048_576),
        }
        if self.kafka_flavor == "tansu":
            # Short sessions: the embedded broker rebalances faster with these (measured).
            cfg |= {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}
        return cfg

    def public_env(self) -> dict[str, str]:
        """Non-secret settings as ``BROADFAST_…`` environment variables."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(exclude={"admin_token"}).items():
            if value is None:
                continue
            out[ENV_PREFIX + name.upper()] = str(value)
        return out


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return Settings()


def get_settings(**overrides: Any) -> Settings:
    """The process settings; keyword overrides (from flags) win over the environment."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean) if clean else _cached()
