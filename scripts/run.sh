#!/usr/bin/env bash
# The main job on its embedded default: Zero-TPrune's tiny reproduction (CPU, offline, a few minutes).
# Creates or reuses .venv, installs what is needed, then runs `prunelab reproduce zero_tprune --preset tiny`.
# Extra arguments are passed on, e.g. `bash scripts/run.sh --n-eval 10000`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec prunelab reproduce zero_tprune --preset tiny "$@"
