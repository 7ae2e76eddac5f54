#!/usr/bin/env bash
# Check that each extra of pyproject.toml installs into a fresh virtual environment from the
# repo's own files (a non-editable install of this checkout), and that its console script runs.
#   scripts/check_extras.sh [EXTRA ...]     (default: every extra but 'all' and 'test')
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
extras=("$@")
if [[ ${#extras[@]} -eq 0 ]]; then
  mapfile -t extras < <("$PYTHON" - <<'PY'
import tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(["core"] + [e for e in extras if e not in ("all", "test")]))
PY
)
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for extra in "${extras[@]}"; do
  venv="$work/$extra"
  spec="."
  [[ "$extra" != "core" ]] && spec=".[$extra]"
  start=$(date +%s)
  if "$PYTHON" -m venv "$venv" \
     && "$venv/bin/python" -m pip install --quiet --quiet --disable-pip-version-check "$spec" \
     && "$venv/bin/broadfast" --help >/dev/null \
     && "$venv/bin/python" -m pip check >/dev/null; then
    echo "extra $extra: installs and runs ($(( $(date +%s) - start )) s)"
  else
    echo "extra $extra: FAILED" >&2
    failed+=("$extra")
  fi
  rm -rf "$venv"
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "extras that failed: ${failed[*]}" >&2
  exit 1
fi
