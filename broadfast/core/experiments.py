"""The A/B experiment store (Redis) and the sticky arm assignment.

One experiment runs at a time: a *champion* model version serves most traffic, a
*challenger* version serves ``share`` of it. Which arm a request goes to is a pure
function of the experiment's ``salt`` and a key (the user id, else the request id), so a
user keeps seeing the same arm, and anyone (serving, monitoring, a notebook) can
recompute it without asking Redis.

Redis keys (all under one namespace, by default the topic prefix, e.g. ``relevance``)
are named in :class:`ExperimentKeys` and nowhere else:

- ``<ns>:experiment:current`` — id of the running experiment (absent when none runs)
- ``<ns>:experiment:<id>`` — hash: champion, challenger, share, salt, status, reason, started_ts, ended_ts
- ``<ns>:experiment:<id>:counts`` — hash of serving outcomes: ``<arm>:requests``, ``<arm>:errors``
- ``<ns>:experiment:history`` — list of experiment ids, newest first

Which version is *the* champion outside an experiment is the model registry's business
(``broadfast.model.registry``): whoever promotes here also promotes the challenger there.

Transitions are atomic (WATCH/MULTI): a promotion and an automatic rollback racing each
other cannot both win.

>>> assign("user-42", share=0.0, salt="s") , assign("user-42", share=1.0, salt="s")
('champion', 'challenger')
>>> assign("user-42", 0.3, "s") == assign("user-42", 0.3, "s")   # sticky
True
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from broadfast.core.settings import Settings
from broadfast.core.errors import BroadfastError
from broadfast.core.keys import experiment_key

log = logging.getLogger(__name__)

Arm = Literal["champion", "challenger"]
Status = Literal["running", "promoted", "rolled_back"]
ARMS: tuple[Arm, Arm] = ("champion", "challenger")


class ExperimentError(BroadfastError):
    """An experiment transition is not possible (none running, one already running, bad share)."""


def bucket(key: str, salt: str) -> float:
    """A uniform number in [0, 1) from a key and a salt (blake2b, stable across processes).

    >>> 0.0 <= bucket("u1", "salt") < 1.0
    True
    """
    digest = hashlib.blake2b(f"{salt}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign(key: str, share: float, salt: str) -> Arm:
    """The arm of a request: ``challenger`` for a ``share`` of keys, sticky per key."""
    return "challenger" if bucket(key, salt) < share else "champion"


def assignment_key(user_id: str | None, request_id: str) -> str:
    """The key a request is assigned by: its user when known, else the request itself."""
    return f"user:{user_id}" if user_id else f"request:{request_id}"


@dataclass(frozen=True)
class ExperimentKeys:
    """Every Redis key name of the store, derived from one namespace."""

    namespace: str = "relevance"

    @property
    def current(self) -> str:
        return experiment_key(self.namespace, "current")

    @property
    def history(self) -> str:
        return experiment_key(self.namespace, "history")

    def experiment(self, experiment_id: str) -> str:
        return experiment_key(self.namespace, experiment_id)

    def counts(self, experiment_id: str) -> str:
        return experiment_key(self.namespace, experiment_id, "counts")


@dataclass(frozen=True)
class Experiment:
    """One A/B experiment as stored."""

    experiment_id: str
    champion: str
    challenger: str
    share: float
    salt: str
    status: Status
    started_ts: float
    ended_ts: float | None = None
    reason: str = ""

    def arm_for(self, user_id: str | None, request_id: str) -> Arm:
        """The arm of a request in this experiment (see :func:`assign`)."""
        return assign(assignment_key(user_id, request_id), self.share, self.salt)

    def version_of(self, arm: Arm) -> str:
        return self.champion if arm == "champion" else self.challenger

    def to_redis(self) -> dict[str, str]:
        return {k: ("" if v is None else str(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict[bytes | str, bytes | str]) -> Experiment:
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
        return cls(
            experiment_id=d["experiment_id"],
            champion=d["champion"],
            challenger=d["challenger"],
            share=float(d["share"]),
            salt=d["salt"],
            status=d["status"],  # type: ignore[arg-type]
            started_ts=float(d["started_ts"]),
            ended_ts=float(d["ended_ts"]) if d.get("ended_ts") else None,
            reason=d.get("reason", ""),
        )


class ExperimentStore:
    """Start, read, promote and roll back the experiment kept in Redis.

    ``client`` is a redis-py client (``redis.Redis.from_url(settings.redis.redis_url)``);
    ``namespace`` defaults to the settings' topic prefix in :meth:`from_settings`.
    """

    def __init__(self, client: Any, namespace: str = "relevance") -> None:
        self.client = client
        self.keys = ExperimentKeys(namespace)

    @classmethod
    def from_settings(cls, settings: Settings) -> ExperimentStore:
        from broadfast.core.connections import redis_client

        return cls(redis_client(settings), namespace=settings.kafka.topic_prefix)

    # -- reading ---------------------------------------------------------------------------
    def get(self, experiment_id: str | None = None) -> Experiment | None:
        """One experiment by id, or the running one (None when none runs)."""
        if experiment_id is None:
            current = self.client.get(self.keys.current)
            if current is None:
                return None
            experiment_id = current.decode()
        raw = self.client.hgetall(self.keys.experiment(experiment_id))
        return Experiment.from_redis(raw) if raw else None

    def running(self) -> Experiment | None:
        """The running experiment, if any."""
        exp = self.get()
        return exp if exp is not None and exp.status == "running" else None

    def history(self, limit: int = 20) -> list[Experiment]:
        ids = [i.decode() for i in self.client.lrange(self.keys.history, 0, limit - 1)]
        return [e for e in (self.get(i) for i in ids) if e is not None]

    # -- writing ---------------------------------------------------------------------------
    def start(self, champion: str, challenger: str, share: float, *, salt: str | None = None, experiment_id: str | None = None) -> Experiment:
        """Start an experiment; refuses while another one runs."""
        if not 0.0 < share < 1.0:
            raise ExperimentError(f"the challenger's traffic share must be within (0, 1), got {share}")
        if champion == challenger:
            raise ExperimentError(f"champion and challenger are the same version ({champion})")
        exp = Experiment(
            experiment_id=experiment_id or f"exp-{int(time.time())}-{secrets.token_hex(3)}",
            champion=champion,
            challenger=challenger,
            share=float(share),
            salt=salt or secrets.token_hex(8),
            status="running",
            started_ts=time.time(),
        )

        def txn(pipe: Any) -> None:
            current = pipe.get(self.keys.current)
            if current is not None:
                running = pipe.hget(self.keys.experiment(current.decode()), "status")
                if running is not None and running.decode() == "running":
                    raise ExperimentError(f"experiment {current.decode()} is still running: promote or roll it back first")
            pipe.multi()
            pipe.hset(self.keys.experiment(exp.experiment_id), mapping=exp.to_redis())
            pipe.set(self.keys.current, exp.experiment_id)
            pipe.lpush(self.keys.history, exp.experiment_id)

        self.client.transaction(txn, self.keys.current)
        log.info("experiment %s started: champion %s, challenger %s on %.0f%% of traffic", exp.experiment_id, champion, challenger, share * 100)
        return exp

    def promote(self, reason: str = "promoted by operator") -> Experiment:
        """The experiment ends with the challenger as the winner (promote it in the registry too)."""
        return self._end("promoted", reason)

    def rollback(self, reason: str = "rolled back by operator") -> Experiment:
        """The experiment ends; the champion takes all traffic again."""
        return self._end("rolled_back", reason)

    def _end(self, status: Status, reason: str) -> Experiment:
        ended: list[Experiment] = []

        def txn(pipe: Any) -> None:
            ended.clear()
            current = pipe.get(self.keys.current)
            raw = pipe.hgetall(self.keys.experiment(current.decode())) if current is not None else None
            exp = Experiment.from_redis(raw) if raw else None
            if exp is None or exp.status != "running":
                raise ExperimentError("no experiment is running")
            done = Experiment(**(asdict(exp) | {"status": status, "ended_ts": time.time(), "reason": reason}))
            pipe.multi()
            pipe.hset(self.keys.experiment(exp.experiment_id), mapping=done.to_redis())
            pipe.delete(self.keys.current)
            ended.append(done)

        self.client.transaction(txn, self.keys.current)
        exp = ended[0]
        log.info("experiment %s %s: %s", exp.experiment_id, status.replace("_", " "), reason)
        return exp

    # -- serving outcomes --------------------------------------------------------------------
    def record(self, experiment_id: str, arm: Arm, *, ok: bool, n: int = 1) -> None:
        """Count ``n`` served requests of an arm (and errors when ``ok`` is false)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(self.keys.counts(experiment_id), f"{arm}:requests", n)
        if not ok:
            pipe.hincrby(self.keys.counts(experiment_id), f"{arm}:errors", n)
        pipe.execute()

    def counts(self, experiment_id: str) -> dict[str, dict[str, int]]:
        """Requests and errors per arm: ``{"champion": {"requests": n, "errors": e}, ...}``."""
        raw = self.client.hgetall(self.keys.counts(experiment_id))
        out = {arm: {"requests": 0, "errors": 0} for arm in ARMS}
        for k, v in raw.items():
            arm, _, what = (k.decode() if isinstance(k, bytes) else k).partition(":")
            if arm in out and what in out[arm]:
                out[arm][what] = int(v)
        return out
