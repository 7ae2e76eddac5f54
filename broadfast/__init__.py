"""broadfast: think broad, act fast.

A streaming online-learning relevance system for search advertising. A slow, broad
teacher labels the query–ad pairs a fast student finds hard; the student keeps
distilling those labels and is hot-swapped into serving.

The shared contracts live in two places: :mod:`broadfast.core.settings` (one frozen
settings object per process) and :mod:`broadfast.core.events` (the event schemas and the
topic table). Components talk only through Kafka topics, Redis keys and the registry.
"""

__version__ = "0.1.0"
