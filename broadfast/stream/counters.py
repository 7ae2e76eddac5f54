"""Windowed stream counters, counted exactly once per source offset.

Per ad and per (normalised) query, in tumbling event-time windows of
``stream_counter_window_s`` seconds:

* ``scored`` — scored pairs (``relevance.scored``);
* ``impressions`` — shown ads (every ``Click`` event: the frontend logs one per shown ad);
* ``clicks`` — shown ads that were clicked (``Click.clicked``);
* ``ctr`` = clicks / impressions (0 with no impression).

**Idempotence.** The worker commits Kafka offsets after processing (at least once), so after
a crash a batch may be read again. Each batch of one partition is applied by one Lua script
that reads the partition's high-water mark (``<prefix>:stream:hwm`` field
``<topic>:<partition>``), applies only the events whose offset is above it, and raises the mark
— all inside Redis' single-threaded script execution, so the counts and the mark change
together or not at all. A replayed event is therefore never counted twice, and kill -9 at any
point leaves counts equal to exactly the events before the mark.

>>> window_start(7205.0, 3600)
7200
>>> CounterValues(impressions=4, clicks=1, scored=10).ctr
0.25
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from broadfast.core.settings import Settings
from broadfast.core.events import Click, Event, Scored, normalize_query
from broadfast.core.keys import stream_key
from broadfast.stream.sampler import Source

log = logging.getLogger(__name__)

KINDS = ("ad", "query")
FIELDS = ("scored", "impressions", "clicks")

# KEYS[1]: the high-water-mark hash; KEYS[2..]: counter hashes (one per window).
# ARGV[1]: hwm field (topic:partition); ARGV[2]: counter TTL (s); then per event:
#   offset, n, and n triples (counter key index into KEYS, field, increment).
# Returns the number of events applied (those above the mark).
_APPLY = """
local mark = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
local top = mark
local applied = 0
local i = 3
while i <= #ARGV do
  local off = tonumber(ARGV[i])
  local n = tonumber(ARGV[i + 1])
  i = i + 2
  if off > mark then
    for j = 1, n do
      redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], tonumber(ARGV[i + 2]))
      i = i + 3
    end
    applied = applied + 1
    if off > top then top = off end
  else
    i = i + 3 * n
  end
end
redis.call('HSET', KEYS[1], ARGV[1], top)
for k = 2, #KEYS do redis.call('EXPIRE', KEYS[k], tonumber(ARGV[2])) end
return applied
"""


def window_start(ts: float, window_s: int) -> int:
    """Start (epoch seconds) of the tumbling window holding event time ``ts``."""
    return int(ts // window_s) * window_s


@dataclass(frozen=True)
class CounterValues:
    scored: int = 0
    impressions: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0


def increments(event: Event) -> list[tuple[str, str, str]]:
    """(kind, entity id, field) to add one to for an event; empty for other events."""
    if isinstance(event, Scored):
        fields = ["scored"]
    elif isinstance(event, Click):
        fields = ["impressions"] + (["clicks"] if event.clicked else [])
    else:
        return []
    ad_id, query = event.ad_id, normalize_query(event.query)  # type: ignore[attr-defined]
    return [(kind, ent, f) for f in fields for kind, ent in (("ad", ad_id), ("query", query))]


def _field(kind: str, entity: str, name: str) -> str:
    return f"{kind}:{entity}:{name}"


class StreamCounters:
    """Applies batches of events to the Redis counters, once per source offset."""

    def __init__(self, settings: Settings, client: Any) -> None:
        self.settings = settings
        self.client = client
        self.window_s = settings.stream.stream_counter_window_s
        self._hwm = stream_key(settings, "hwm")
        self._ids = stream_key(settings, "hwm_topic_id")  # the topic id each mark was set under
        self._script = client.register_script(_APPLY)

    def counter_key(self, window: int) -> str:
        return stream_key(self.settings, "counters", str(window))

    def apply(self, batch: Sequence[tuple[Event, Source]]) -> tuple[int, dict[tuple[str, str], int]]:
        """Count a batch; returns (events applied, {(kind, entity): latest window touched}).

        The touched entities include replayed (skipped) events, so the caller re-pushes
        their current values after a crash.
        """
        by_tp: dict[tuple[str, int], list[tuple[Event, Source]]] = defaultdict(list)
        for item in batch:
            by_tp[(item[1].topic, item[1].partition)].append(item)
        applied = 0
        touched: dict[tuple[str, str], int] = {}
        ttl = self.window_s * 3
        for (topic, partition), items in by_tp.items():
            keys = [self._hwm]
            key_index: dict[int, int] = {}
            argv: list[Any] = [f"{topic}:{partition}", ttl]
            for ev, src in items:
                incs = increments(ev)
                win = window_start(ev.ts, self.window_s)  # type: ignore[attr-defined]
                if win not in key_index:
                    keys.append(self.counter_key(win))
                    key_index[win] = len(keys)
                argv += [src.offset, len(incs)]
                for kind, ent, name in incs:
                    argv += [key_index[win], _field(kind, ent, name), 1]
                    touched[(kind, ent)] = max(touched.get((kind, ent), win), win)
            applied += int(self._script(keys=keys, args=argv))
        return applied, touched

    def read(self, entities: dict[tuple[str, str], int]) -> dict[tuple[str, str], CounterValues]:
        """Current values of (kind, entity) in the given windows (one round trip)."""
        items = list(entities.items())
        pipe = self.client.pipeline(transaction=False)
        for (kind, ent), win in items:
            pipe.hmget(self.counter_key(win), [_field(kind, ent, f) for f in FIELDS])
        out = {}
        for ((kind, ent), _), values in zip(items, pipe.execute()):
            out[(kind, ent)] = CounterValues(*(int(v) if v is not None else 0 for v in values))
        return out

    def check_incarnations(self, lowest: dict[tuple[str, int], int], topic_ids: Callable[[list[str]], dict[str, str]]) -> list[str]:
        """Forget the high-water marks of partitions whose topic is not the one they were set on.

        ``lowest``: the lowest offset per (topic, partition) of the batch about to be applied. A
        partition is checked when its topic's id was never recorded, or when the batch reaches at or
        below its mark — a replay after a crash, or a log that starts again from 0 (a recreated topic,
        an embedded broker that restarted empty). ``topic_ids`` asks the broker. Returns the
        ``topic:partition`` marks forgotten (their events are counted, not skipped as replays).
        """
        pipe = self.client.pipeline(transaction=False)  # one round trip on the hot path
        pipe.hgetall(self._hwm)
        pipe.hgetall(self._ids)
        raw_marks, raw_ids = pipe.execute()
        marks = {k.decode(): int(v) for k, v in raw_marks.items()}
        known = {k.decode(): v.decode() for k, v in raw_ids.items()}
        check = [(t, p) for (t, p), low in lowest.items() if f"{t}:{p}" not in known or low <= marks.get(f"{t}:{p}", -1)]
        if not check:
            return []
        ids = topic_ids(sorted({t for t, _ in check}))
        forgotten = []
        for topic, partition in check:
            field, now = f"{topic}:{partition}", ids.get(topic)
            if now is None:
                continue
            if field in known and known[field] != now:
                self.client.hdel(self._hwm, field)
                forgotten.append(field)
            self.client.hset(self._ids, field, now)
        return forgotten

    def high_water_marks(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(self._hwm).items()}
