"""The Feast repo on the real Redis: apply, materialize, a push from the stream code path
visible in the next online read; the repo's variables from settings, refused when unset."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pandas as pd
import pytest

from broadfast.core.errors import ConfigError
from broadfast.features import store as fs
from broadfast.features.definitions import AD_ATTRIBUTE_FEATURES, counter_features
from broadfast.features.errors import FeatureEnvError, FeatureStoreError
from broadfast.core.events import Click, encode


def test_redis_url_becomes_feast_connection_string() -> None:
    assert fs.redis_connection_string("redis://10.0.0.5:6390/3") == "10.0.0.5:6390,db=3"
    assert fs.redis_connection_string("redis://localhost") == "localhost:6379,db=0"
    with pytest.raises(ConfigError, match="redis://host:port/db"):
        fs.redis_connection_string("http://x:1/0")


def test_repo_config_reads_the_yaml_with_variables_from_settings(tmp_path, stack) -> None:
    settings = stack.model_copy(update={"feast_data": tmp_path / "d", "feast_project": "p_test"})
    before = os.environ.get("FEAST_PROJECT")
    config = fs.repo_config(settings)
    assert config.project == "p_test"
    assert config.online_store.connection_string == fs.redis_connection_string(stack.redis.redis_url)
    assert Path(config.registry.path) == tmp_path / "d" / "registry.db"
    assert os.environ.get("FEAST_PROJECT") == before  # set for the read only


def test_an_unset_variable_is_refused_clearly(tmp_path, stack, monkeypatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text((fs.PACKAGE_REPO / "feature_store.yaml").read_text() + "\nextra: ${BROADFAST_TEST_SURELY_UNSET}\n")
    settings = stack.model_copy(update={"feast_data": tmp_path / "d", "feast_repo": repo})
    for call in (fs.repo_config, fs.feature_store):
        with pytest.raises(FeatureEnvError, match="BROADFAST_TEST_SURELY_UNSET"):
            call(settings)
    with pytest.raises(ConfigError, match="no feature_store.yaml"):
        fs.repo_config(settings.model_copy(update={"feast_repo": tmp_path}))
    # the definitions refuse too when imported without FEAST_DATA_DIR (as a bare `feast apply` would)
    monkeypatch.delenv("FEAST_DATA_DIR", raising=False)
    with pytest.raises(FeatureEnvError, match="FEAST_DATA_DIR is not set"):
        importlib.reload(importlib.import_module("broadfast.features.feature_repo.broadfast_features"))


def test_the_repo_folder_is_a_plain_feast_repo() -> None:
    assert sorted(p.name for p in fs.PACKAGE_REPO.iterdir() if p.name != "__pycache__") == ["__init__.py", "broadfast_features.py", "feature_store.yaml"]


@pytest.mark.integration
def test_apply_materialize_and_a_stream_push_are_visible_online(bus_settings, shared_data, tmp_path) -> None:
    from broadfast.stream.app import StreamProcessor

    subset = pd.read_parquet(shared_data / "homedepot" / "dev.parquet").head(120)
    data = tmp_path / "pairs.parquet"
    subset.to_parquet(data)
    settings = bus_settings.model_copy(update={"feast_data": tmp_path / "feast", "data": data, "home": tmp_path})

    with pytest.raises(FeatureStoreError, match="features apply"):
        fs.OnlineFeatures(settings)
    with pytest.raises(FeatureStoreError, match="features apply"):
        fs.materialize(settings)
    summary = fs.apply(settings)
    assert summary["ads"] == subset["product_id"].nunique()
    fs.materialize(settings)

    ads = subset["product_id"].astype(str).drop_duplicates().tolist()[:3]
    reader = fs.OnlineFeatures(settings)
    assert set(reader.names) == set(AD_ATTRIBUTE_FEATURES) | set(counter_features("ad")) | set(counter_features("query"))
    rows = reader.read("some query", ads + ["not-an-ad"])
    for ad, row in zip(ads, rows):
        title = subset.loc[subset["product_id"].astype(str) == ad, "title"].iloc[0]
        assert row["ad_title_chars"] == len(title) and row["ad_title_words"] == len(title.split())
        assert row["ad_impressions"] == 0.0
    assert rows[-1]["ad_title_chars"] == 0.0

    # the stream's processor pushes its counters; the next read sees them
    processor = StreamProcessor(settings)
    try:
        clicks = [Click(request_id="r", ts=5.0, query="Some Query", ad_id=ads[0], position=0, clicked=c) for c in (True, False, False, True)]
        topic = settings.topic("clicks")
        processor.process("clicks", [(topic, 0, i, encode(c)) for i, c in enumerate(clicks)])
        row = reader.read("some   query", [ads[0]])[0]
        assert (row["ad_impressions"], row["ad_clicks"], row["ad_ctr"]) == (4.0, 2.0, 0.5)
        assert (row["query_impressions"], row["query_clicks"]) == (4.0, 2.0)
        assert row["ad_title_chars"] == rows[0]["ad_title_chars"]  # batch and pushed features in one call
        processor.process("clicks", [(topic, 0, 4, encode(clicks[0]))])
        assert reader.read("some query", [ads[0]])[0]["ad_impressions"] == 5.0
        # the PushSource itself (FeatureStore.push) reaches the same view
        from broadfast.stream.counters import CounterValues

        fs.push_counters(reader.store, {("query", "other query"): CounterValues(scored=7, impressions=2, clicks=1)}, {("query", "other query"): 3600}, via_push_source=True)
        row = reader.read("Other Query", [ads[1]])[0]
        assert (row["query_scored"], row["query_ctr"], row["query_window_start"]) == (7.0, 0.5, 3600.0)
    finally:
        processor.close()


@pytest.mark.integration
def test_features_cli_apply_materialize_env(bus_settings, shared_data, tmp_path, monkeypatch) -> None:
    import json

    from click.testing import CliRunner

    from broadfast.core import settings as settings_module
    from broadfast.cli.features import features

    subset = pd.read_parquet(shared_data / "crowdflower" / "dev.parquet").head(50)
    data = tmp_path / "pairs.parquet"
    subset.to_parquet(data)
    settings = bus_settings.model_copy(update={"feast_data": tmp_path / "feast", "home": tmp_path, "feast_project": "cli_test"})
    for key, value in settings.public_env().items():
        monkeypatch.setenv(key, value)
    settings_module._cached.cache_clear()
    try:
        runner = CliRunner()
        applied = runner.invoke(features, ["apply", "--data", str(data)], catch_exceptions=False)
        assert applied.exit_code == 0, applied.output
        assert json.loads(applied.output[applied.output.index("{") :])["ads"] == subset["product_id"].nunique()
        mat = runner.invoke(features, ["materialize"], catch_exceptions=False)
        assert mat.exit_code == 0, mat.output
        env = runner.invoke(features, ["env"], catch_exceptions=False).output
        assert "export FEAST_PROJECT=cli_test" in env and fs.redis_connection_string(settings.redis.redis_url) in env
        ad = str(subset["product_id"].iloc[0])
        row = fs.OnlineFeatures(settings).read("q", [ad])[0]
        assert row["ad_title_chars"] == len(subset["title"].iloc[0])
    finally:
        settings_module._cached.cache_clear()
