"""The scoring engine: resident models, routing (A/B), hot swap, and the background threads.

One :class:`ScoringEngine` per server process. Its state that requests read is a single
immutable :class:`Routing` (champion, challenger, experiment) replaced whole under a lock,
so a request sees one consistent picture and keeps the model it was routed to even if a
swap happens while it waits in the micro-batcher.

Background threads: the micro-batcher, the scored-event log, the ``relevance.models``
watcher (hot swap) and the experiment follower (A/B state from Redis, per-arm counts).

>>> # engine = ScoringEngine(get_settings(), model_dir=Path("runs/hd")); engine.start(); ...; engine.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from broadfast.core.settings import Settings
from broadfast.serving.batcher import BatchParams, MicroBatcher
from broadfast.serving.errors import NotReady, SwapRefused
from broadfast.serving.metrics import ServingMetrics
from broadfast.serving.models import LiveModel, device_of, load_folder, load_version, probe
from broadfast.serving.scoredlog import BusLink, ScoredLog
from broadfast.core.events import Alert, now

log = logging.getLogger(__name__)

FEATURES_RETRY_S = 30.0
PROMETHEUS_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class Routing:
    """What requests are routed by (replaced whole, never mutated)."""

    champion: LiveModel | None = None
    challenger: LiveModel | None = None
    experiment: Any | None = None  # broadfast.core.experiments.Experiment, running, with its challenger resident

    def route(self, user_id: str | None, request_id: str) -> tuple[LiveModel, str, str | None]:
        """(model, arm, experiment id) of a request."""
        if self.champion is None:
            raise NotReady("no model is loaded yet")
        exp = self.experiment
        if exp is None or self.challenger is None:
            return self.champion, "champion", None
        arm = exp.arm_for(user_id, request_id)
        return (self.challenger if arm == "challenger" else self.champion), arm, exp.experiment_id


class ScoringEngine:
    """Models, routing and background work of one scoring server."""

    def __init__(self, settings: Settings, model_dir: Path | None = None, *, follow: bool = True) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.follow = follow  # watch relevance.models and follow the experiment in Redis
        self.metrics = ServingMetrics()
        self.params = BatchParams.from_settings(settings.serving)
        self.batcher = MicroBatcher(self.params, self.metrics)
        self.link = BusLink(settings)
        self.scored = ScoredLog(settings, self.link, self.metrics)
        self.routing = Routing()
        self.refused: dict[str, str] = {}  # version -> reason (not retried)
        self.watcher_ready = threading.Event()
        self._lock = threading.RLock()  # writers of routing; one candidate checked at a time
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._arm_counts: Counter[tuple[str, str, bool]] = Counter()
        self._counts_lock = threading.Lock()
        self._registry: Any | None = None
        self._store: Any | None = None
        self._features: Any | None = None
        self._features_retry_at = 0.0
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if device_of(self.settings) == "cpu":
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self.batcher.start()
        self.scored.start()
        self._load_initial()
        if self.follow:
            for target, name in ((self._watch_models, "model-watcher"), (self._follow_experiments, "experiment-follower")):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
        log.info("engine started (replica %s): champion %s", self.replica, self.champion_version or "none yet")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)  # daemons: one still waiting on the broker must not hold the shutdown
        self.batcher.stop()
        self.scored.stop()
        try:
            self._flush_counts()
        except Exception as exc:  # noqa: BLE001
            log.warning("per-arm counts not written to Redis at stop: %s", exc)
        self.link.close()

    def _load_initial(self) -> None:
        if self.model_dir is not None:
            model = load_folder(self.model_dir, self.settings)
            probe(model, None, self.settings.serving.serve_probe_agreement_floor)
            self._set(champion=model)
            return
        try:
            version = self.registry.champion()
        except Exception as exc:  # noqa: BLE001 - the registry index (Redis) may be away: not ready yet
            log.error("cannot read the registry's champion: %s; not ready until a version is published", exc)
            return
        if version is None:
            log.warning("the registry has no champion yet: not ready until a version is published")
            return
        try:
            self.offer(version)
        except SwapRefused as exc:
            log.error("the registry's champion could not be loaded: %s", exc)

    # -- state ----------------------------------------------------------------------------------
    @property
    def champion_version(self) -> str | None:
        return self.routing.champion.version if self.routing.champion else None

    @property
    def ready(self) -> bool:
        return self.routing.champion is not None

    def _set(self, **changes: Any) -> None:
        with self._lock:
            old = self.routing
            self.routing = replace(old, **changes)
            new = self.routing
        self.metrics.set_live(new.champion.version if new.champion else None, new.challenger.version if new.challenger else None)
        if old.champion is not new.champion and new.champion is not None:
            if old.champion is not None:
                self.metrics.swaps.inc()
            log.info("champion is now %s (was %s)", new.champion.version, old.champion.version if old.champion else "none")

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from broadfast.model.registry import Registry

            self._registry = Registry(self.settings)
        return self._registry

    @property
    def store(self) -> Any:
        if self._store is None:
            from broadfast.core.connections import redis_client
            from broadfast.core.experiments import ExperimentStore

            client = redis_client(self.settings, timeout_s=3)
            self._store = ExperimentStore(client, namespace=self.settings.kafka.topic_prefix)
        return self._store

    # -- hot swap ---------------------------------------------------------------------------------
    def candidate(self, version: str, expected_sha256: str | None = None) -> tuple[LiveModel, dict[str, Any]]:
        """Load and check a registry version against the live champion (not put live)."""
        started = time.perf_counter()
        try:
            model = load_version(self.registry, version, self.settings, expected_sha256)
            report = probe(model, self.routing.champion, self.settings.serving.serve_probe_agreement_floor)
        except SwapRefused as exc:
            self._refuse(exc)
            raise
        report["check_s"] = round(time.perf_counter() - started, 3)
        return model, report

    def offer(self, version: str, expected_sha256: str | None = None) -> dict[str, Any]:
        """Load ``version`` aside, check it, and make it the champion; raises SwapRefused."""
        with self._lock:
            if self.champion_version == version:
                return {"version": version, "status": "already live"}
            model, report = self.candidate(version, expected_sha256)
            self._set(champion=model)
        log.info("swapped to %s (probe: %s)", version, report)
        return {"version": version, "status": "live", "probe": report}

    def _refuse(self, exc: SwapRefused) -> None:
        self.refused[exc.version] = str(exc)
        self.metrics.refusals.labels(exc.stage).inc()
        log.error("%s; %s keeps serving", exc, self.champion_version or "nothing")
        alert = Alert(kind="swap_failed", severity="critical", ts=now(),
                      details={"version": exc.version, "stage": exc.stage, "reason": exc.reason[:2000], "live_version": self.champion_version, "replica": self.replica})  # fmt: skip
        self.link.publish(alert, "swap_failed alert")

    def _watch_models(self) -> None:
        """Consume relevance.models from its end (own consumer group per replica) and swap."""
        from broadfast.core.bus import consume
        from broadfast.core.deadletter import DeadLetters
        from broadfast.core.events import ModelPublished

        while not self._stop.is_set():
            consumer = self._models_consumer()
            if consumer is None:
                self._stop.wait(2.0)
                continue
            deadletters = DeadLetters(self.settings, _LinkPublisher(self.link), f"serving-{self.replica}")
            try:
                for delivery in consume(self.settings, consumer, deadletters, poll_timeout_ms=300):
                    if self._stop.is_set():
                        break
                    if delivery is None or not isinstance(delivery.event, ModelPublished):
                        continue
                    self._on_published(delivery.event)
            except Exception:
                log.exception("model watcher failed; reconnecting")
                self._stop.wait(2.0)
            finally:
                try:
                    consumer.close()
                except Exception:
                    log.debug("closing the model consumer failed", exc_info=True)

    def _models_consumer(self) -> Any | None:
        from kafka import TopicPartition

        from broadfast.core.bus import make_consumer

        topic = self.settings.topic("models")
        try:
            consumer = make_consumer(self.settings, (), f"broadfast-serving-{self.replica}", auto_offset_reset="latest", bootstrap_timeout_ms=3000)
            deadline = time.monotonic() + 30
            partitions = consumer.partitions_for_topic(topic)
            while not partitions and time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(0.5)
                partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                consumer.close()
                log.warning("topic %s not found; model watcher retrying", topic)
                return None
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)  # every partition, from its end: each replica sees every announcement once
            consumer.seek_to_end(*tps)
            for tp in tps:
                consumer.position(tp)
        except Exception as exc:  # noqa: BLE001
            log.warning("model watcher cannot reach the broker at %s (%s); retrying", self.settings.kafka.kafka_bootstrap, exc)
            return None
        self.watcher_ready.set()
        log.info("watching %s for new versions", topic)
        return consumer

    def _on_published(self, event: Any) -> None:
        if event.name != self.settings.training.registry_name:
            log.info("ignoring %s %s: this server serves %r", event.name, event.version, self.settings.training.registry_name)
            return
        if not self.settings.serving.serve_swap_on_publish:
            log.info("version %s published; swap on publish is off", event.version)
            return
        if self.routing.experiment is not None:
            log.info("version %s published while experiment %s runs: left for a rollout", event.version, self.routing.experiment.experiment_id)
            return
        log.info("version %s published: loading it aside", event.version)
        try:
            self.offer(event.version, event.sha256)
        except SwapRefused:
            pass  # logged, counted and alerted in _refuse

    # -- A/B ---------------------------------------------------------------------------------------
    def _follow_experiments(self) -> None:
        last_error = 0.0
        while not self._stop.wait(self.settings.serving.serve_experiment_poll_s):
            try:
                self.sync_experiment()
                self._flush_counts()
            except Exception as exc:  # noqa: BLE001 - Redis away: keep serving what we have
                if time.monotonic() - last_error > 30:
                    log.warning("cannot follow experiments in Redis at %s: %s", self.settings.redis.redis_url, exc)
                    last_error = time.monotonic()

    def sync_experiment(self) -> None:
        """Bring routing in line with the experiment in Redis (start, promotion, rollback)."""
        with self._lock:
            current = self.store.running()
            followed = self.routing.experiment
            if followed is not None and (current is None or current.experiment_id != followed.experiment_id):
                ended = self.store.get(followed.experiment_id)
                challenger = self.routing.challenger
                if ended is not None and ended.status == "promoted" and challenger is not None and challenger.version == ended.challenger:
                    self._set(champion=challenger, challenger=None, experiment=None)
                else:
                    self._set(challenger=None, experiment=None)
                log.info("experiment %s ended (%s)", followed.experiment_id, ended.status if ended else "gone")
            if current is None or (self.routing.experiment is not None and self.routing.experiment.experiment_id == current.experiment_id):
                return
            if current.challenger in self.refused:
                return  # refused once; the experiment runs champion-only here until it ends
            try:
                model, report = self.candidate(current.challenger)
            except SwapRefused:
                return
            log.info("experiment %s: challenger %s resident on %.0f%% of traffic (probe: %s)", current.experiment_id, model.version, current.share * 100, report)
            self._set(challenger=model, experiment=current)

    def start_experiment(self, challenger: str, share: float, salt: str | None = None) -> Any:
        """Check ``challenger`` against the live champion, then start the experiment and route to it now."""
        from broadfast.serving import rollout

        with self._lock:
            if self.champion_version is None:
                raise NotReady("no champion is loaded")
            model, report = self.candidate(challenger)
            exp = rollout.start(self.store, self.registry, challenger, share, champion=self.champion_version, salt=salt)
            self._set(challenger=model, experiment=exp)
        log.info("experiment %s started here: challenger %s on %.0f%% of traffic (probe: %s)", exp.experiment_id, challenger, share * 100, report)
        return exp

    def count(self, experiment_id: str | None, arm: str, ok: bool) -> None:
        if experiment_id is None:
            return
        with self._counts_lock:
            self._arm_counts[(experiment_id, arm, ok)] += 1

    def _flush_counts(self) -> None:
        with self._counts_lock:
            counts, self._arm_counts = self._arm_counts, Counter()
        if not counts:
            return
        try:
            for (exp_id, arm, ok), n in list(counts.items()):
                self.store.record(exp_id, arm, ok=ok, n=n)
                del counts[(exp_id, arm, ok)]
        except Exception:
            with self._counts_lock:
                self._arm_counts.update(counts)  # keep them for the next flush
            raise

    # -- features (optional) ----------------------------------------------------------------------------
    def read_features(self, query: str, ad_ids: list[str]) -> list[dict[str, float]] | None:
        """Online features of a request's ads from Feast (``BROADFAST_SERVE_FEATURES``); None when off or failing.

        After a failure the store is not tried again for ``FEATURES_RETRY_S`` (requests go on without features).
        """
        if not self.settings.serving.serve_features or time.monotonic() < self._features_retry_at:
            return None
        try:
            if self._features is None:
                multiproc = os.environ.get(PROMETHEUS_MULTIPROC)
                from broadfast.features.store import OnlineFeatures

                if multiproc is None:  # feast sets it on import; this server's metrics are single-process
                    os.environ.pop(PROMETHEUS_MULTIPROC, None)
                self._features = OnlineFeatures(self.settings)
            return self._features.read(query, ad_ids)
        except Exception as exc:  # noqa: BLE001 - features are recorded, never required to score
            self._features_retry_at = time.monotonic() + FEATURES_RETRY_S
            self.metrics.errors.labels("features").inc()
            log.warning("online feature read failed (next try in %.0f s): %s", FEATURES_RETRY_S, exc)
            return None


class _LinkPublisher:
    """The ``publish`` that :class:`~broadfast.core.deadletter.DeadLetters` needs, through the lazily connected link."""

    def __init__(self, link: BusLink) -> None:
        self.link = link

    def publish(self, event: Any) -> None:
        if not self.link.publish(event, "dead letter"):
            raise RuntimeError("broker unreachable")
