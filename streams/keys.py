"""Redis key names: the one place that names the keys the stream worker, the labelers and the demo share.

Every key starts with the topic prefix (``relevance`` by default), so two systems on one Redis
never meet.
"""

from __future__ import annotations

from broadfast.settings import Settings


def labelled_pairs_key(settings: Settings) -> str:
    """The Redis set of pair ids the teacher has labelled (``SADD`` by the labeler).

    >>> labelled_pairs_key(Settings(topic_prefix="relevance"))
    'relevance:labelled_pairs'
    """
    return f"{settings.topic_prefix}:labelled_pairs"


def stream_key(settings: Settings, *parts: str) -> str:
    """A key of the stream worker's own state: ``<prefix>:stream:<part>:…``."""
    return ":".join((settings.topic_prefix, "stream", *parts))


def labeler_key(settings: Settings, *parts: str) -> str:
    """A key the labeling workers write for the stream (and the demo) to read: ``<prefix>:labeler:<part>:…``."""
    return ":".join((settings.topic_prefix, "labeler", *parts))


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
