#!/usr/bin/env bash
# The main job: runs a workflow JSON (UI or API format) headless through ComfyUI's real executor with this pack loaded.
# Usage: scripts/run.sh [WORKFLOW.json] [--image FILE] [--set NODE.INPUT=VALUE ...] [--out DIR]   (see --help)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
exec "$ATTNEDIT_PYTHON" "$ROOT/tools/run_workflow.py" "$@"
