"""Redis key names: the one place that names every key the components share in Redis (the stream
worker, the labelers, the registry index, the A/B experiment store, the demo).

Every key starts with the topic prefix (``relevance`` by default), so two systems on one Redis
never meet.
"""

from __future__ import annotations

from broadfast.core.settings import Settings


def namespaced(prefix: str, *parts: str) -> str:
    """``<prefix>:<part>:…``: every key of this module is built by it.

    >>> namespaced("relevance", "experiment", "current")
    'relevance:experiment:current'
    """
    return ":".join((prefix, *parts))


def labelled_pairs_key(settings: Settings) -> str:
    """The Redis set of pair ids the teacher has labelled (``SADD`` by the labeler).

    >>> labelled_pairs_key(Settings(topic_prefix="relevance"))
    'relevance:labelled_pairs'
    """
    return namespaced(settings.kafka.topic_prefix, "labelled_pairs")


def stream_key(settings: Settings, *parts: str) -> str:
    """A key of the stream worker's own state: ``<prefix>:stream:<part>:…``."""
    return namespaced(settings.kafka.topic_prefix, "stream", *parts)


def labeler_key(settings: Settings, *parts: str) -> str:
    """A key the labeling workers write for the stream (and the demo) to read: ``<prefix>:labeler:<part>:…``."""
    return namespaced(settings.kafka.topic_prefix, "labeler", *parts)


def claim_key(settings: Settings, pid: str) -> str:
    """The de-dup claim of a pair (value: the source offset that claimed it); the labeler
    deletes it when it drops the pair as stale, so the pair may be sampled again."""
    return stream_key(settings, "claim", pid)


def backlog_key(settings: Settings) -> str:
    """Sorted set of the hard cases admitted and not yet labelled, failed or dropped:
    pair id → admission time (the hard case's ``ts``). ``ZADD`` by the sampler, ``ZREM`` by the labeler.

    >>> backlog_key(Settings(topic_prefix="relevance"))
    'relevance:stream:backlog'
    """
    return stream_key(settings, "backlog")


def teacher_rate_key(settings: Settings) -> str:
    """Hash of the labelers' measured rates: field worker id → JSON ``{"rate", "ts", "expires", "teacher_id"}``
    (pairs the teacher answered per busy second; a report counts until its ``expires``).

    >>> teacher_rate_key(Settings(topic_prefix="relevance"))
    'relevance:labeler:rate'
    """
    return labeler_key(settings, "rate")


def labeler_counts_key(settings: Settings) -> str:
    """Hash of the labelers' running counts: ``labelled``, ``failed``, ``dropped_stale`` (``HINCRBY``).

    >>> labeler_counts_key(Settings(topic_prefix="relevance"))
    'relevance:labeler:counts'
    """
    return labeler_key(settings, "counts")


def labelled_key(settings: Settings, teacher_id: str) -> str:
    """Hash of the pairs ``teacher_id`` has labelled: field pair_id → label time (epoch s); the
    labeler's idempotence.

    >>> labelled_key(Settings(topic_prefix="relevance"), "oracle:human-grades(dev.parquet)")
    'relevance:labelled:oracle:human-grades(dev.parquet)'
    """
    return namespaced(settings.kafka.topic_prefix, "labelled", teacher_id)


def registry_key(settings: Settings, name: str, *parts: str) -> str:
    """A key of the model registry's index of model ``name``: ``<prefix>:registry:<name>:…``
    (manifests, the version list, the version counter, the champion).

    >>> registry_key(Settings(topic_prefix="relevance"), "student", "champion")
    'relevance:registry:student:champion'
    """
    return namespaced(settings.kafka.topic_prefix, "registry", name, *parts)


def experiment_key(namespace: str, *parts: str) -> str:
    """A key of the A/B experiment store: ``<namespace>:experiment:…`` (the namespace is the topic prefix)."""
    return namespaced(namespace, "experiment", *parts)

