"""Inference backends: each int8 model (OpenVINO static, ONNX Runtime dynamic) scores like PyTorch,
its conversion is cached per version, and a version whose conversion fails or disagrees is refused
while the old one serves."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from broadfast.core.settings import Settings
from broadfast.serving import backends, export, onnx_int8, openvino_int8
from broadfast.serving.backends import INT8, MAX_MEAN_SCORE_DIFF, MAX_SCORE_DIFF, META_FILE, MIN_SPEARMAN, RANK_SPREAD, load_backend, resolve_backend
from broadfast.serving.errors import BackendError, SwapRefused
from broadfast.serving.models import PROBE_PAIRS, load_folder
from broadfast.core.datasets import load_pairs
from tests.serving.conftest import ADMIN_TOKEN, running, score_body, variant
from broadfast.model.student import pair_texts
from broadfast.model.registry import Registry
from broadfast.model.student import StudentConfig, build_student, load_student, save_student

PROBE_Q, PROBE_T = [q for q, _ in PROBE_PAIRS], [t for _, t in PROBE_PAIRS]


def scores(probs: np.ndarray) -> np.ndarray:
    return probs[:, 2] + 0.5 * probs[:, 1]


@pytest.fixture(scope="module")
def ranking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny student whose probe scores spread widely enough that the Spearman gate applies."""
    torch.manual_seed(0)
    student = build_student(StudentConfig.tiny())
    with torch.no_grad():
        student.head[-1].weight.mul_(10.0)
        student.head[-1].bias.zero_()
    folder = save_student(student, tmp_path_factory.mktemp("ranking") / "model")
    spread = np.ptp(scores(load_student(folder).predict_proba(PROBE_Q, PROBE_T)))
    assert spread >= RANK_SPREAD, f"the fixture's probe scores spread only {spread:.3f}"
    return folder


@pytest.fixture
def folder(ranking_model: Path, tmp_path: Path) -> Path:
    """A fresh copy (no conversion cache yet)."""
    return Path(shutil.copytree(ranking_model, tmp_path / "model"))


def int8_ops(name: str, cache: Path) -> set[str]:
    """The graph's operation types that only an int8 model has."""
    if name == "onnx-int8":
        import onnx

        ops = {n.op_type for n in onnx.load(str(cache / onnx_int8.MODEL_FILE)).graph.node}
        return ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    import openvino as ov

    model = ov.Core().read_model(str(cache / openvino_int8.MODEL_FILE))
    return {op.get_type_name() for op in model.get_ops()} & {"FakeQuantize"} | {str(op.get_element_type()) for op in model.get_ops() if op.get_type_name() == "Constant"} & {"<Type: 'int8_t'>", "<Type: 'uint8_t'>"}


@pytest.mark.parametrize("name", list(INT8))
def test_int8_scores_agree_with_pytorch(name: str, folder: Path, shared_data: Path) -> None:
    kind = INT8[name]
    student = load_student(folder)
    backend = load_backend(student, folder, name, "cpu", threads=1)
    assert backend.name == name and backend.check["spearman"] is not None  # the rank gate was applied
    assert backend.check["max_score_diff"] <= MAX_SCORE_DIFF and backend.check["spearman"] >= MIN_SPEARMAN
    assert backend.check["mean_score_diff"] <= MAX_MEAN_SCORE_DIFF
    assert int8_ops(name, folder / kind.CACHE_DIR), "the served graph must hold int8 operations"
    # Beyond the probe: Home Depot pairs of many lengths, in runs as served and in padded runs of 64 (dynamic batch and sequence axes).
    queries, texts = pair_texts(load_pairs(shared_data / "homedepot" / "dev.parquet").iloc[:300])
    ref = student.predict_proba(queries, texts)
    batched = kind.BACKEND(student, folder / kind.CACHE_DIR / kind.MODEL_FILE, 1, backend.meta, rows_per_run=64)
    for scorer in (backend, batched):
        got = scorer.predict_proba(queries, texts)
        assert got.shape == (300, 3) and np.allclose(got.sum(1), 1.0, atol=1e-5)
        assert np.abs(scores(got) - scores(ref)).max() <= MAX_SCORE_DIFF and np.abs(scores(got) - scores(ref)).mean() <= MAX_MEAN_SCORE_DIFF
        assert spearmanr(scores(got), scores(ref)).statistic >= MIN_SPEARMAN
    # As served, a pair's score does not depend on what it is scored with (onnx-int8: one pair a run;
    # openvino-int8: fixed activation scales, so runs of several pairs are safe).
    alone = backend.predict_proba(queries[7:8], texts[7:8])
    np.testing.assert_allclose(backend.predict_proba(queries[:40], texts[:40])[7:8], alone, atol=1e-6)
    np.testing.assert_allclose(backend.predict_proba(queries[:5], texts[:5]), backend.predict_proba(queries, texts)[:5], atol=1e-6)
    assert backend.predict_proba([], []).shape == (0, 3)


@pytest.mark.parametrize("name", list(INT8))
def test_conversion_is_cached_and_rebuilt_when_stale(name: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = INT8[name]
    cache = folder / kind.CACHE_DIR
    student = load_student(folder)
    first = load_backend(student, folder, name, "cpu", threads=1)
    meta = json.loads((cache / META_FILE).read_text())
    runtime = "openvino" if name == "openvino-int8" else "onnxruntime"
    assert first.check["cached"] is False and meta["source_sha256"] and meta[runtime] and set(meta["files"]) == set(kind.FILES)
    expected = first.predict_proba(PROBE_Q, PROBE_T)

    def no_build(*_: object) -> None:
        raise AssertionError("converted again although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(backends, "build", no_build)
        again = load_backend(student, folder, name, "cpu", threads=1)
    assert again.check["cached"] is True
    np.testing.assert_array_equal(again.predict_proba(PROBE_Q, PROBE_T), expected)

    stale = [
        lambda: (cache / META_FILE).write_text(json.dumps(meta | {"source_sha256": "0" * 64})),  # other weights
        lambda: (cache / META_FILE).write_text(json.dumps(meta | {runtime: "0.0.1"})),  # another runtime
        lambda: (cache / META_FILE).write_text("{not json"),  # unreadable
        *[lambda file=file: (cache / file).write_bytes(b"tampered") for file in kind.FILES],  # a file changed under its meta
    ]
    for spoil in stale:
        spoil()
        rebuilt = load_backend(student, folder, name, "cpu", threads=1)
        assert rebuilt.check["cached"] is False
        assert json.loads((cache / META_FILE).read_text())["source_sha256"] == meta["source_sha256"]
        np.testing.assert_allclose(rebuilt.predict_proba(PROBE_Q, PROBE_T), expected, atol=1e-6)

    # New weights in the same folder: the old conversion is not theirs.
    nudged = load_student(folder)
    with torch.no_grad():
        nudged.head[-1].bias.copy_(torch.tensor([1.5, 0.0, -1.5]))
    save_student(nudged, folder)
    fresh = load_backend(nudged, folder, name, "cpu", threads=1)
    assert fresh.check["cached"] is False
    assert np.abs(scores(fresh.predict_proba(PROBE_Q, PROBE_T)) - scores(nudged.predict_proba(PROBE_Q, PROBE_T))).max() <= MAX_SCORE_DIFF


def test_backend_setting(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", "cpu") == "openvino-int8" and resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch" and resolve_backend("onnx-int8", "cpu") == "onnx-int8"
    with pytest.raises(BackendError):
        resolve_backend("tensorrt", "cpu")
    with monkeypatch.context() as m:  # auto takes the fastest one installed
        m.setattr(openvino_int8, "available", lambda: False)
        assert resolve_backend("auto", "cpu") == "onnx-int8"
        m.setattr(onnx_int8, "available", lambda: False)
        assert resolve_backend("auto", "cpu") == "torch"
        with pytest.raises(BackendError, match="not installed"):
            load_backend(load_student(folder), folder, "onnx-int8", "cpu", threads=1)

    monkeypatch.setenv("BROADFAST_SERVE_BACKEND", "torch")
    model = load_folder(folder, Settings(serve_device="cpu"))
    assert model.info()["backend"]["name"] == "torch" and not any((folder / k.CACHE_DIR).exists() for k in INT8.values())
    model = load_folder(folder, Settings(serve_device="cpu", serve_backend="auto"))
    info = model.info()["backend"]
    assert info["name"] == "openvino-int8" and info["check"]["max_score_diff"] <= MAX_SCORE_DIFF
    assert np.abs(scores(model.predict_proba(PROBE_Q, PROBE_T)) - scores(model.student.predict_proba(PROBE_Q, PROBE_T))).max() <= MAX_SCORE_DIFF


def test_predict_uses_the_backend(folder: Path, shared_data: Path, tmp_path: Path) -> None:
    from broadfast.serving.predict import predict_file

    data = tmp_path / "pairs.parquet"
    load_pairs(shared_data / "homedepot" / "dev.parquet").iloc[:40].to_parquet(data)
    torch_out = predict_file(folder, data, tmp_path / "torch.parquet", backend="torch")
    assert not any((folder / k.CACHE_DIR).exists() for k in INT8.values())
    for name, kind in INT8.items():
        int8_out = predict_file(folder, data, tmp_path / f"{name}.parquet", backend=name)
        assert (folder / kind.CACHE_DIR / kind.MODEL_FILE).exists()
        assert np.abs(int8_out["score"].to_numpy() - torch_out["score"].to_numpy()).max() <= MAX_SCORE_DIFF


def corrupting_quantize(original):  # type: ignore[no-untyped-def]
    """A quantizer that first pushes the head's last bias in the exported graph: a converter bug that makes the int8 model disagree."""

    def quantize(fp32: Path, out: Path, student: object) -> dict:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(fp32))
        for init in model.graph.initializer:
            if init.name.endswith("head.4.bias"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.array([4.0, 0.0, -4.0], dtype=np.float32), init.name))
        onnx.save(model, str(fp32))
        return original(fp32, out, student)

    return quantize


@pytest.mark.parametrize("name,fault", [(name, fault) for name in INT8 for fault in ("export fails", "int8 disagrees")])
def test_version_whose_conversion_fails_or_disagrees_is_refused(name: str, fault: str, ranking_model: Path, serve_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = INT8[name]
    settings = serve_settings.model_copy(update={"serve_backend": name, "serve_swap_on_publish": False})
    registry = Registry(settings)
    assert registry.publish(ranking_model, announce=False).version == "v0001"
    assert not backends.ISOLATE  # converted in this process, where the faults below are injected
    body = score_body("cordless drill", [t for _, t in PROBE_PAIRS[:6]])
    with running(settings) as (url, engine), httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        assert engine.champion_version == "v0001" and engine.routing.champion.backend_name == name
        before = client.post("/v1/score", json=body).json()
        v2 = registry.publish(variant(ranking_model, tmp_path / "nudged", noise=0.01), announce=False).version
        if fault == "export fails":

            def broken_export(*_: object) -> None:
                raise RuntimeError("the exporter met an operator it does not know")

            monkeypatch.setattr(export, "export_onnx", broken_export)
            stage, says = "convert", "the exporter met an operator"
        else:
            monkeypatch.setattr(kind, "quantize", corrupting_quantize(kind.quantize))
            stage, says = "backend", "disagrees with PyTorch"
        refused = client.post("/admin/models/load", json={"version": v2})
        assert refused.status_code == 409 and f"at the {stage} check" in refused.json()["detail"] and says in refused.json()["detail"]
        assert says in engine.refused[v2]
        assert not (registry.verify(v2) / kind.CACHE_DIR).exists(), "a failed conversion must not stay cached"
        with pytest.raises(SwapRefused) as direct:
            engine.offer(v2)
        assert direct.value.stage == stage
        after = client.post("/v1/score", json=body)
        info = client.get("/admin/models").json()
    assert after.status_code == 200 and after.json()["model_version"] == "v0001"
    assert [r["score"] for r in after.json()["results"]] == [r["score"] for r in before["results"]]  # the old one, unchanged
    assert info["champion"]["version"] == "v0001" and info["champion"]["backend"]["name"] == name and v2 in info["refused"]


def test_a_converter_process_converts_and_when_it_fails_that_is_a_clear_refusal(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Conversion can run in a child process; when it dies, the refusal says what it said, and nothing stays cached."""
    name = resolve_backend("auto", "cpu")
    cache = folder / INT8[name].CACHE_DIR
    monkeypatch.setattr(backends, "ISOLATE", True)
    student = load_student(folder)
    converted = load_backend(student, folder, name, "cpu", threads=1)  # a real child process converts it
    assert converted.check["cached"] is False and converted.check["max_score_diff"] <= MAX_SCORE_DIFF
    assert json.loads((cache / META_FILE).read_text())["quantization"].startswith("static int8")  # what the child reported
    shutil.rmtree(cache)
    crash = "import sys; print('onnx export: unsupported operator aten::frobnicate', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(backends, "child_command", lambda *_: [sys.executable, "-c", crash])
    with pytest.raises(BackendError) as err:
        load_backend(student, folder, name, "cpu", threads=1)
    assert err.value.stage == "convert" and "exited with 3" in str(err.value) and "aten::frobnicate" in str(err.value)
    assert not cache.exists()
