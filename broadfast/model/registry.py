"""The model registry: versioned student folders, a manifest each, an index in Redis.

A version is a copy of a model folder (weights, config, tokenizer, ``training.json``)
under the registry root with a ``manifest.json``: version, parent, sha256 of the
weights and of every file, metrics, what it was trained on, when it was created. The
index (versions, manifests, the champion) lives in Redis under
``<topic_prefix>:registry:<name>:…``; publishing announces a :class:`ModelPublished`
on ``relevance.models``. Loading recomputes every checksum and refuses a mismatch.

The *champion* is the version serving should use: the latest promoted one. The first
version published becomes champion; later ones only with ``champion=True`` (or
:meth:`Registry.promote`).

Storage goes through :class:`ArtifactStore`; :class:`LocalStore` keeps versions in a
folder (``settings.registry_path``). An object store only needs the same four methods.

>>> reg = Registry(get_settings())                         # doctest: +SKIP
>>> m = reg.publish("runs/hd", metrics={"spearman": 0.52})  # doctest: +SKIP
>>> reg.load(m.version).predict_proba(["drill"], ["cordless drill"])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from broadfast.core.keys import registry_key
from broadfast.core.settings import Settings
from broadfast.core.events import ModelPublished, finite_or_null
from broadfast.model.errors import ChecksumMismatch, RegistryError
from broadfast.model.student import WEIGHTS_FILE, Student, load_student

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """What the registry knows about one version."""

    name: str
    version: str
    parent: str | None
    sha256: str  # of model.safetensors
    files: dict[str, str]  # file name → sha256
    metrics: dict[str, float] = field(default_factory=dict)
    trained_on: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    uri: str = ""
    student: dict[str, Any] = field(default_factory=dict)  # extractor, K, max_length, encoder layers, init_from, parameters

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls(**json.loads(text))


class ArtifactStore(Protocol):
    """Where version folders live (a local folder here; an object store admits the same calls)."""

    def put(self, name: str, version: str, files: list[Path]) -> str:
        """Store ``files`` as version ``version``; returns its URI. Refuses an existing version."""

    def write_manifest(self, name: str, version: str, manifest: Manifest) -> None: ...

    def local_copy(self, name: str, version: str) -> Path:
        """A local folder holding the version's files (the folder itself for a local store)."""

    def versions(self, name: str) -> list[str]: ...


class LocalStore:
    """Versions as folders: ``<root>/<name>/<version>/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def put(self, name: str, version: str, files: list[Path]) -> str:
        final = self._dir(name, version)
        if final.exists():
            raise FileExistsError(final)
        tmp = final.with_name(f".{version}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, tmp / f.name)
        tmp.rename(final)  # atomic: a version is there whole or not at all
        return final.resolve().as_uri()

    def write_manifest(self, name: str, version: str, manifest: Manifest) -> None:
        (self._dir(name, version) / MANIFEST_FILE).write_text(manifest.to_json())

    def local_copy(self, name: str, version: str) -> Path:
        path = self._dir(name, version)
        if not path.is_dir():
            raise RegistryError(f"version {version} of {name!r} is not in the registry at {self.root}")
        return path

    def versions(self, name: str) -> list[str]:
        base = self.root / name
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.exists() else []


class Registry:
    """Publish, list, show, verify and load student versions."""

    def __init__(self, settings: Settings, store: ArtifactStore | None = None, redis_client: Any | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or settings.training.registry_name
        self.store = store if store is not None else LocalStore(settings.registry_path)
        self._redis = redis_client

    # -- the index -----------------------------------------------------------------------
    @property
    def redis(self) -> Any:
        if self._redis is None:
            from broadfast.core.connections import redis_client

            self._redis = redis_client(self.settings, timeout_s=5)
        return self._redis

    def _key(self, *parts: str) -> str:
        return registry_key(self.settings, self.name, *parts)

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise RegistryError(f"the registry index (Redis at {self.settings.redis.redis_url}) failed to {what}: {exc}") from exc

    def _index(self, manifest: Manifest) -> None:
        pipe = self.redis.pipeline()
        pipe.set(self._key("manifest", manifest.version), manifest.to_json())
        pipe.zadd(self._key("versions"), {manifest.version: manifest.created_at})
        self._call("index a version", pipe.execute)

    def _next_version(self) -> str:
        existing = set(self.store.versions(self.name))
        while True:
            n = int(self._call("allocate a version number", self.redis.incr, self._key("seq")))
            version = f"v{n:04d}"
            if version not in existing:
                return version

    # -- publish -------------------------------------------------------------------------
    def publish(
        self,
        model_dir: str | Path,
        *,
        parent: str | None = None,
        metrics: dict[str, Any] | None = None,
        trained_on: dict[str, Any] | None = None,
        champion: bool = False,
        announce: bool = True,
    ) -> Manifest:
        """Register a model folder as a new version, index it, and announce it on ``relevance.models``.

        The folder is loaded first: a corrupt or mismatched checkpoint is refused before
        anything is written. Metrics and ``trained_on`` default to its ``training.json``.
        """
        model_dir = Path(model_dir)
        student = load_student(model_dir)
        if parent is not None and self._manifest_or_none(parent) is None:
            raise RegistryError(f"parent version {parent!r} is not in the registry")
        report = _training_report(model_dir)
        metrics = _numeric(metrics if metrics is not None else report.get("metrics", {}))
        trained_on = trained_on if trained_on is not None else report.get("trained_on", {})
        files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp"))
        version = self._next_version()
        uri = self.store.put(self.name, version, files)
        stored = self.store.local_copy(self.name, version)
        checksums = {p.name: sha256_file(stored / p.name) for p in files}
        counts = student.parameter_counts()
        cfg = student.config
        manifest = Manifest(
            name=self.name, version=version, parent=parent, sha256=checksums[WEIGHTS_FILE], files=checksums,
            metrics=metrics, trained_on=trained_on, created_at=time.time(), uri=uri,
            student={"extractor": cfg.extractor, "n_perspectives": cfg.n_perspectives, "max_length": cfg.max_length,
                     "layers": cfg.layers, "init_from": cfg.init_from,
                     "parameters": counts["inference"], "extractor_parameters": counts["extractor"]},
        )  # fmt: skip
        self.store.write_manifest(self.name, version, manifest)
        self._index(manifest)
        if champion or self.champion() is None:
            self.promote(version)
        log.info("published %s %s (parent %s, sha256 %s…) at %s", self.name, version, parent, manifest.sha256[:12], uri)
        if announce:
            self.announce(manifest)
        return manifest

    def announce(self, manifest: Manifest) -> None:
        """Send the :class:`ModelPublished` event of a version."""
        from broadfast.core.bus import EventBus

        event = ModelPublished(
            name=manifest.name, version=manifest.version, parent_version=manifest.parent, uri=manifest.uri,
            sha256=manifest.sha256, metrics=_numeric(manifest.metrics),  # older manifests may hold non-finite ones
            trained_on=finite_or_null(manifest.trained_on), ts=manifest.created_at,
        )  # fmt: skip
        from kafka.errors import KafkaError

        try:
            with EventBus(self.settings) as bus:
                bus.publish(event).get(timeout=30)
        except KafkaError as exc:
            raise RegistryError(
                f"{manifest.name} {manifest.version} is registered but its ModelPublished event was not sent "
                f"(broker {self.settings.kafka.kafka_bootstrap}: {exc}); Registry.announce() can send it again"
            ) from exc

    # -- read ----------------------------------------------------------------------------
    def _manifest_or_none(self, version: str) -> Manifest | None:
        raw = self._call("read a manifest", self.redis.get, self._key("manifest", version))
        return Manifest.from_json(raw) if raw is not None else None

    def show(self, version: str) -> Manifest:
        manifest = self._manifest_or_none(version)
        if manifest is None:
            known = ", ".join(self.versions()[-5:]) or "none"
            raise RegistryError(f"no version {version!r} of {self.name!r} in the registry (latest: {known})")
        return manifest

    def versions(self) -> list[str]:
        return [v.decode() for v in self._call("list versions", self.redis.zrange, self._key("versions"), 0, -1)]

    def manifests(self) -> list[Manifest]:
        """Every version, oldest first."""
        return [self.show(v) for v in self.versions()]

    def champion(self) -> str | None:
        raw = self._call("read the champion", self.redis.get, self._key("champion"))
        return raw.decode() if raw is not None else None

    def promote(self, version: str) -> None:
        """Make ``version`` the champion (the version serving loads by default)."""
        self.show(version)
        self._call("set the champion", self.redis.set, self._key("champion"), version)
        log.info("champion of %s is now %s", self.name, version)

    def reindex(self) -> int:
        """Rebuild the Redis index from the manifests in the store (after losing Redis)."""
        count = 0
        for version in self.store.versions(self.name):
            path = self.store.local_copy(self.name, version) / MANIFEST_FILE
            if path.exists():
                self._index(Manifest.from_json(path.read_text()))
                count += 1
        return count

    # -- load ----------------------------------------------------------------------------
    def verify(self, version: str) -> Path:
        """The version's local folder after checking every file against the manifest's sha256."""
        manifest = self.show(version)
        folder = self.store.local_copy(self.name, version)
        for fname, expected in manifest.files.items():
            path = folder / fname
            if not path.exists():
                raise ChecksumMismatch(f"{self.name} {version}: {fname} is missing from {folder}")
            actual = sha256_file(path)
            if actual != expected:
                raise ChecksumMismatch(f"{self.name} {version}: sha256 of {fname} is {actual[:16]}…, the manifest says {expected[:16]}…; refusing to load it")
        return folder

    def load(self, version: str | None = None, device: str | None = None) -> tuple[Student, Manifest]:
        """Load a verified version (default: the champion)."""
        version = version or self.champion()
        if version is None:
            raise RegistryError(f"the registry has no champion of {self.name!r} yet: publish a model first")
        folder = self.verify(version)
        return load_student(folder, device), self.show(version)


def _training_report(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "training.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON: ignored", path)
        return {}


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as finite floats (the ModelPublished contract); other entries are dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out



# -- display (``broadfast registry list / show``) ------------------------------------------
def teacher_counts(trained_on: dict[str, Any]) -> dict[str, int]:
    """``trained_on["teachers"]`` (teacher id → labels trained on), most labels first; {} when absent.

    >>> teacher_counts({"teachers": {"vllm:m@t": 3, "oracle:human-grades(a.parquet)": 5}, "rows": 8})
    {'oracle:human-grades(a.parquet)': 5, 'vllm:m@t': 3}
    """
    raw = trained_on.get("teachers") if isinstance(trained_on, dict) else None
    if not isinstance(raw, dict):
        return {}
    counts = {str(k): int(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def short_teacher_id(teacher_id: str) -> str:
    """A teacher id cut to what tells teachers apart in a listing: the backend and the model's
    last name part (``vllm:SmolLM2-135M-Instruct``), or the oracle's kind (``oracle:human-relevance``).

    >>> short_teacher_id("vllm:HuggingFaceTB/SmolLM2-135M-Instruct@mpcot-v1+rules-1a2b3c4d")
    'vllm:SmolLM2-135M-Instruct'
    >>> short_teacher_id("oracle:human-relevance(homedepot/dev.parquet)")
    'oracle:human-relevance'
    """
    backend, sep, rest = teacher_id.partition(":")
    if not sep:
        return teacher_id[:40]
    model = rest.split("@", 1)[0].split("(", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return f"{backend}:{model}" if model else backend


def teachers_column(trained_on: dict[str, Any]) -> str:
    """The short teachers column of ``registry list``: ``oracle:human-relevance(480)``, or ``—``.

    >>> teachers_column({"teachers": {"oracle:human-relevance(hd/dev.parquet)": 480, "vllm:org/M@t+rules-1": 32}})
    'oracle:human-relevance(480),vllm:M(32)'
    >>> teachers_column({"data": "hd.parquet"})
    '—'
    """
    counts: dict[str, int] = {}
    for tid, n in teacher_counts(trained_on).items():
        short = short_teacher_id(tid)
        counts[short] = counts.get(short, 0) + n
    return ",".join(f"{t}({n})" for t, n in counts.items()) or "—"


def describe(manifest: Manifest, champion: bool = False) -> str:
    """A readable view of a manifest for ``registry show``: what it is, how good, what it learnt
    from, and which teachers labelled its training data (ids and label counts)."""
    import datetime as dt

    when = dt.datetime.fromtimestamp(manifest.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    rows = [
        ("version", f"{manifest.name} {manifest.version}" + ("  (champion)" if champion else "")),
        ("parent", manifest.parent or "—"),
        ("created", when),
        ("sha256", manifest.sha256),
        ("uri", manifest.uri or "—"),
        ("metrics", "  ".join(f"{k}={v:.4g}" for k, v in sorted(manifest.metrics.items())) or "—"),
    ]
    if manifest.student:
        rows.append(("student", "  ".join(f"{k}={_compact(v)}" for k, v in sorted(manifest.student.items()))))
    other = {k: v for k, v in manifest.trained_on.items() if k != "teachers"}
    rows.append(("trained on", "  ".join(f"{k}={_compact(v)}" for k, v in sorted(other.items())) or "—"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    counts = teacher_counts(manifest.trained_on)
    if not counts:
        lines.append(f"{'teachers':<{width}}  — (not recorded: this version's trainer did not say which teachers labelled its data)")
        return "\n".join(lines)
    total = sum(counts.values())
    lines.append(f"{'teachers':<{width}}  {len(counts)} teacher(s), {total:,} label(s) trained on:")
    digits = len(f"{total:,}")
    for tid, n in counts.items():
        share = f"{100 * n / total:.0f} %" if total else "–"
        kind = "simulated annotator (human judgements)" if tid.startswith("oracle:") else "model"
        lines.append(f"{'':<{width}}    {n:>{digits},}  {share:>5}  {tid}  [{kind}]")
    return "\n".join(lines)


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        return text if len(text) <= 120 else text[:117] + "…"
    return str(value)
