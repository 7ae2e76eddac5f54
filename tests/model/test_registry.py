"""The model registry on the real broker and Redis: publish → list/show → verified load → ModelPublished."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from broadfast.core import settings as settings_module
from broadfast.core.settings import Settings
from broadfast.core.events import decode
from tests.conftest import read_topic
from broadfast.model.errors import CheckpointError, ChecksumMismatch, RegistryError
from broadfast.model.registry import Registry
from broadfast.model.student import StudentConfig, build_student, load_student, save_student

pytestmark = pytest.mark.integration


@pytest.fixture
def reg_settings(bus_settings: Settings, tmp_path: Path) -> Settings:
    return bus_settings.model_copy(update={"registry_root": tmp_path / "registry"})


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = save_student(build_student(StudentConfig.tiny()), tmp_path / "model")
    (path / "training.json").write_text(json.dumps({"metrics": {"spearman": 0.41, "pairs": 48, "note": "x"}, "trained_on": {"data": "hd.parquet", "rows": 48}}))
    return path


def test_publish_list_show_load_and_announce(reg_settings: Settings, model_dir: Path) -> None:
    reg = Registry(reg_settings)
    first = reg.publish(model_dir)
    second = reg.publish(model_dir, parent=first.version, metrics={"spearman": 0.5})
    assert [m.version for m in reg.manifests()] == [first.version, second.version]
    assert first.version != second.version and second.parent == first.version
    assert first.metrics == {"spearman": 0.41, "pairs": 48.0}  # from training.json; non-numbers dropped
    assert first.trained_on == {"data": "hd.parquet", "rows": 48}
    assert reg.champion() == first.version  # the first version is champion; later ones only when promoted
    shown = reg.show(second.version)
    assert shown.sha256 == second.sha256 and shown.metrics == {"spearman": 0.5} and len(shown.sha256) == 64

    student, manifest = reg.load()  # the champion, checksums verified
    assert manifest.version == first.version
    original = load_student(model_dir)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in original.state_dict().items())
    q, t = ["cordless drill"], ["18v drill kit"]
    np.testing.assert_array_equal(student.predict_proba(q, t), original.predict_proba(q, t))

    reg.promote(second.version)
    assert reg.champion() == second.version

    records = read_topic(reg_settings, "models", expect=2)
    events = sorted((decode("models", r.value) for r in records), key=lambda e: e.version)
    assert [e.version for e in events] == [first.version, second.version]
    assert events[1].parent_version == first.version and events[1].sha256 == second.sha256
    assert events[0].uri == first.uri and Path(events[0].uri.removeprefix("file://")).is_dir()
    assert {r.key for r in records} == {b"student"}


def test_tampered_weights_are_refused(reg_settings: Settings, model_dir: Path) -> None:
    reg = Registry(reg_settings)
    m = reg.publish(model_dir, announce=False)
    weights = Path(m.uri.removeprefix("file://")) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: still loads as safetensors, but not what was published
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="sha256 of model.safetensors"):
        reg.load(m.version)


def test_bad_publish_leaves_nothing_behind(reg_settings: Settings, model_dir: Path) -> None:
    reg = Registry(reg_settings)
    (model_dir / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        reg.publish(model_dir)
    assert reg.manifests() == [] and reg.champion() is None
    assert not (reg_settings.registry_path / "student").exists()
    with pytest.raises(RegistryError, match="no version"):
        reg.show("v0001")
    with pytest.raises(RegistryError, match="no champion"):
        reg.load()


def test_unknown_parent_is_refused(reg_settings: Settings, model_dir: Path) -> None:
    with pytest.raises(RegistryError, match="parent version"):
        Registry(reg_settings).publish(model_dir, parent="v9999", announce=False)


def test_index_rebuilds_from_the_store(reg_settings: Settings, model_dir: Path) -> None:
    import redis

    reg = Registry(reg_settings)
    m = reg.publish(model_dir, announce=False)
    redis.Redis.from_url(reg_settings.redis.redis_url).flushdb()
    assert reg.manifests() == []
    assert reg.reindex() == 1
    assert reg.show(m.version).sha256 == m.sha256
    assert reg.publish(model_dir, announce=False).version != m.version  # numbering skips what the store holds


def test_registry_cli(reg_settings: Settings, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broadfast.cli.training import registry

    for key, value in reg_settings.public_env().items():
        monkeypatch.setenv(key, value)
    settings_module._cached.cache_clear()
    try:
        runner = CliRunner()
        out = runner.invoke(registry, ["publish", str(model_dir), "--metrics", '{"ndcg@10": 0.9}'])
        assert out.exit_code == 0, out.output + repr(out.exception)
        version = json.loads(out.stdout)["version"]
        listed = runner.invoke(registry, ["list"])
        assert listed.exit_code == 0 and f"* {version}" in listed.stdout and "ndcg@10=0.9" in listed.stdout
        shown = json.loads(runner.invoke(registry, ["show", version, "--json"]).stdout)
        assert shown["version"] == version and shown["champion"] is True and shown["metrics"] == {"ndcg@10": 0.9}
        readable = runner.invoke(registry, ["show", version])
        assert readable.exit_code == 0 and f"student {version}  (champion)" in readable.stdout and "ndcg@10=0.9" in readable.stdout
        bad = runner.invoke(registry, ["publish", str(model_dir), "--metrics", "{oops"])
        assert bad.exit_code != 0 and "not valid JSON" in str(bad.exception)
    finally:
        settings_module._cached.cache_clear()


ORACLE = "oracle:human-relevance(homedepot/dev.parquet)"
SMOL = "vllm:HuggingFaceTB/SmolLM2-135M-Instruct@mpcot-v1+rules-1a2b3c4d"


def test_show_and_list_say_which_teachers_labelled_the_training_data(reg_settings: Settings, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broadfast.cli.training import registry

    reg = Registry(reg_settings)
    plain = reg.publish(model_dir, announce=False)  # trained_on from training.json: no teachers recorded
    taught = reg.publish(model_dir, parent=plain.version, announce=False, trained_on={"labels": 512, "teachers": {SMOL: 32, ORACLE: 480}})
    assert reg.show(taught.version).trained_on["teachers"] == {SMOL: 32, ORACLE: 480}  # stored as given
    for key, value in reg_settings.public_env().items():
        monkeypatch.setenv(key, value)
    settings_module._cached.cache_clear()
    try:
        runner = CliRunner()
        shown = runner.invoke(registry, ["show", taught.version])
        assert shown.exit_code == 0, shown.output + repr(shown.exception)
        lines = shown.stdout.splitlines()
        # one line per teacher, most labels first: count, share, the full id, what kind of teacher it is
        [head] = [i for i, line in enumerate(lines) if line.startswith("teachers")]
        assert "2 teacher(s), 512 label(s)" in lines[head]
        assert lines[head + 1].split() == ["480", "94", "%", ORACLE, "[simulated", "annotator", "(human", "judgements)]"]
        assert lines[head + 2].split() == ["32", "6", "%", SMOL, "[model]"]
        assert "labels=512" in shown.stdout and "parent" in shown.stdout and plain.version in shown.stdout

        untaught = runner.invoke(registry, ["show", plain.version])
        assert untaught.exit_code == 0 and "teachers" in untaught.stdout and "not recorded" in untaught.stdout

        listed = runner.invoke(registry, ["list"]).stdout.splitlines()
        assert "teachers=—" in listed[0]
        assert "teachers=oracle:human-relevance(480),vllm:SmolLM2-135M-Instruct(32)" in listed[1]
    finally:
        settings_module._cached.cache_clear()


def test_a_version_without_its_tokenizer_is_refused_at_publish(reg_settings: Settings, model_dir: Path) -> None:
    reg = Registry(reg_settings)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        reg.publish(model_dir)
    assert reg.manifests() == []
