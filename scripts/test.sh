#!/usr/bin/env bash
# The whole test suite (notebooks included), after the same set-up as scripts/run.sh.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k zero_tprune` or `-m slow`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec python -m pytest -m "not slow" "$@"
