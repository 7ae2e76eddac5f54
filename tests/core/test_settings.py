from __future__ import annotations

import pytest
from pydantic import ValidationError

from broadfast.core.settings import Settings, get_settings


def test_environment_sets_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROADFAST_KAFKA_BOOTSTRAP", "10.0.0.1:9092,10.0.0.2:9092")
    monkeypatch.setenv("BROADFAST_REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("BROADFAST_TOPIC_PREFIX", "ads")
    monkeypatch.setenv("BROADFAST_SERVE_PORT", "9001")
    s = Settings()
    assert s.kafka.kafka_bootstrap == "10.0.0.1:9092,10.0.0.2:9092"
    assert s.redis.redis_url == "redis://cache:6379/2"
    assert s.topic("scored") == "ads.scored"
    assert s.serving.serve_port == 9001


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROADFAST_SERVE_PORT", "9001")
    assert get_settings(serve_port=9100).serving.serve_port == 9100
    assert get_settings(serve_port=None, serve_host="0.0.0.0").serving.serve_port == 9001


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.serving.serve_port = 1  # type: ignore[misc]


def test_admin_token_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROADFAST_ADMIN_TOKEN", "hunter2-very-secret")
    s = Settings()
    assert s.serving.admin_token is not None and s.serving.admin_token.get_secret_value() == "hunter2-very-secret"
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.model_dump())
    assert "BROADFAST_ADMIN_TOKEN" not in s.public_env()


def test_bad_values_are_refused_with_the_field_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROADFAST_SERVE_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="serve_port"):
        Settings()
    monkeypatch.delenv("BROADFAST_SERVE_PORT")
    with pytest.raises(ValidationError, match="topic_prefix"):
        Settings(topic_prefix="bad prefix")


def test_paths_expand_home(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings(home="~/bf")
    assert s.home == tmp_path / "bf"
    assert s.registry_path == tmp_path / "bf" / "registry"
    assert Settings(home="~/bf", registry_root="/srv/models").registry_path.as_posix() == "/srv/models"
