"""Hostile model folders (recipes in tests/hostile/models.json) are refused, and the good model keeps serving.

Each recipe mutates a copy of a tiny random student (no weights are committed). Its
``stage`` says where it must be refused: ``load`` (the checkpoint checks: ``Registry.publish``
and ``broadfast.serving.models.load_folder`` both refuse it), ``shapes`` (serving's config check) or
``probe`` (it loads, but the probe batch against the live model refuses it). Nothing is
ever unpickled: ``pickle`` and ``torch.load`` are made to fail for the whole test.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from broadfast.core.settings import Settings
from broadfast.serving.errors import SwapRefused
from broadfast.serving.models import LiveModel, load_folder, probe
from broadfast.model.errors import CheckpointError, RegistryError
from broadfast.model.registry import Registry
from broadfast.model.student import CONFIG_FILE, WEIGHTS_FILE, StudentConfig, build_student, save_student

pytestmark = pytest.mark.integration

RECIPES: list[dict[str, Any]] = json.loads((Path(__file__).resolve().parents[1] / "hostile" / "models.json").read_text())
PAIRS = (["cordless drill", "led light bulb"], ["20V MAX cordless drill driver kit", "Garden hose 50 ft heavy duty"])


# -- mutations: (folder, **args) → None ---------------------------------------------------
def delete_file(folder: Path, file: str) -> None:
    (folder / file).unlink()


def truncate_file(folder: Path, file: str, keep_fraction: float) -> None:
    data = (folder / file).read_bytes()
    assert 0 < int(len(data) * keep_fraction) < len(data), "the recipe must keep part of the file"
    (folder / file).write_bytes(data[: int(len(data) * keep_fraction)])


def write_file(folder: Path, file: str, payload: str, text: str = "", content: Any = None) -> None:
    make = {"pickle": lambda: pickle.dumps({"a": 1}), "text": text.encode, "json": lambda: json.dumps(content).encode()}
    (folder / file).write_bytes(make[payload]())


def edit_config(folder: Path, path: list[str], value: Any) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    node = config
    for key in path[:-1]:
        node = node[key]
    assert path[-1] in node, f"{path} is not in the config"
    node[path[-1]] = value
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _rewrite_weights(folder: Path, change: Any) -> None:
    state = load_file(str(folder / WEIGHTS_FILE))
    change(state)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "broadfast.student", "format_version": "1"})


def set_tensor(folder: Path, values: dict[str, Any], index: int | None = None) -> None:
    def change(state: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            tensor = state[key]
            if isinstance(value, list):
                tensor.copy_(torch.tensor(value, dtype=tensor.dtype))
            elif index is None:
                tensor.fill_(float(value))
            else:
                tensor.view(-1)[index] = float(value)

    _rewrite_weights(folder, change)


def drop_tensor(folder: Path, key: str) -> None:
    _rewrite_weights(folder, lambda state: state.pop(key))


def add_tensor(folder: Path, key: str, shape: list[int]) -> None:
    _rewrite_weights(folder, lambda state: state.__setitem__(key, torch.randn(shape)))


def empty_folder(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


MUTATIONS = {f.__name__: f for f in (delete_file, truncate_file, write_file, edit_config, set_tensor, drop_tensor, add_tensor, empty_folder)}


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_student(build_student(StudentConfig.tiny()), tmp_path_factory.mktemp("hostile") / "good")


@pytest.fixture(scope="module")
def live(good_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[LiveModel, np.ndarray]:
    """The good model as serving holds it, and its probabilities on PAIRS."""
    model = load_folder(good_folder, Settings(home=tmp_path_factory.mktemp("live-home")))
    return model, model.student.predict_proba(*PAIRS)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("something tried to unpickle a model file")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)


def test_corpus_is_complete() -> None:
    names = [r["name"] for r in RECIPES]
    assert len(RECIPES) >= 12 and len(set(names)) == len(names)
    for recipe in RECIPES:
        assert set(recipe) == {"name", "mutation", "args", "stage", "refused_by"}, recipe["name"]
        assert recipe["mutation"] in MUTATIONS and recipe["stage"] in ("load", "shapes", "probe") and recipe["refused_by"], recipe["name"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r["name"] for r in RECIPES])
def test_hostile_folder_is_refused(recipe: dict[str, Any], good_folder: Path, live: tuple[LiveModel, np.ndarray], bus_settings: Settings, tmp_path: Path, no_unpickling: None) -> None:
    live_model, before = live
    settings = bus_settings.model_copy(update={"home": tmp_path, "registry_root": tmp_path / "registry"})  # the real Redis holds the registry index
    folder = Path(shutil.copytree(good_folder, tmp_path / recipe["name"]))
    MUTATIONS[recipe["mutation"]](folder, **recipe["args"])

    if recipe["stage"] == "load":  # a checkpoint that does not load is never registered
        registry = Registry(settings)
        with pytest.raises((CheckpointError, RegistryError)) as refused:
            registry.publish(folder, announce=False)
        assert recipe["refused_by"] in str(refused.value)
        assert registry.manifests() == [] and registry.store.versions(registry.name) == []

    with pytest.raises(SwapRefused) as swap:
        probe(load_folder(folder, settings), live_model, floor=settings.serving.serve_probe_agreement_floor)
    assert swap.value.stage == recipe["stage"] and f"at the {recipe['stage']} check" in str(swap.value)
    assert recipe["refused_by"] in swap.value.reason

    after = live_model.student.predict_proba(*PAIRS)  # the good model still serves, unchanged
    assert np.isfinite(after).all()
    np.testing.assert_allclose(after, before, atol=1e-6)
