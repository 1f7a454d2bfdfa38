#!/usr/bin/env bash
# Check the declared dependency floors: a fresh venv with the minimum versions pyproject.toml declares (">=" floors
# pinned with "=="), the core install only for the main job, then the test extras for the test suite.
#
#   bash scripts/check_floor.sh [VENV]      (default VENV: /tmp/guidance-floor; it is recreated)
#
# Torch is pinned to its floor too (2.13.0: the CPU wheel on a machine without CUDA); the other packages resolve
# freely within what the pins allow. Prints the installed versions, the main job's summary and pytest's result.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${1:-/tmp/guidance-floor}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

python3 - > "$WORK/floors.txt" <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*", dep)
    if match:
        print(f"{match[1]}=={match[2]}")
PY
echo "== floors (from pyproject.toml):"; cat "$WORK/floors.txt"

python3 -m venv --clear "$VENV"
PIP=("$VENV/bin/pip" install --quiet --constraint "$WORK/floors.txt")
"${PIP[@]}" "$(grep '^torch==' "$WORK/floors.txt")"
echo "== core install: pip install ."
"${PIP[@]}" "$REPO"
for heavy in scipy scikit-learn matplotlib; do
    if "$VENV/bin/pip" show --quiet "$heavy" 2>/dev/null; then
        echo "error: the core install pulled $heavy" >&2; exit 1
    fi
done
echo "core install holds none of scipy, scikit-learn, matplotlib"
"$VENV/bin/pip" list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|accelerate|huggingface.hub|tokenizers|safetensors|numpy|pillow|tqdm) '

echo "== main job (core install, from another folder): guidance-generate"
(cd "$WORK" && "$VENV/bin/guidance-generate" --out "$WORK/outputs")

echo "== test suite: pip install .[test], python -m pytest -x -q"
"${PIP[@]}" "$REPO[test]"
"$VENV/bin/python" -m pytest -x -q -p no:cacheprovider
