#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install prunelab with pinned deps.
# Sourced by scripts/run.sh and scripts/test.sh; safe to run again (it skips what is done).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PRUNELAB_PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
export PIP_CONSTRAINT="$ROOT/constraints.txt"   # every install sees the CPU torch pin
export PIP_DISABLE_PIP_VERSION_CHECK=1

LOCK="$ROOT/requirements.lock"   # the whole environment, name==version (regenerate: python scripts/lock.py)

stamp_of() { cat "$ROOT/pyproject.toml" "$LOCK" "$ROOT/constraints.txt" "$ROOT/scripts/setup.sh" \
  "$ROOT/scripts/torchvision_cpu_shim.py" | sha256sum | cut -c1-16; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
STAMP="$(stamp_of)"
if [ "$(cat "$VENV/.prunelab-stamp" 2>/dev/null)" != "$STAMP" ]; then
  echo "[setup] installing the locked environment and prunelab (first run: a few minutes)"
  LOG="$VENV/install.log"
  # Exactly the locked set: pip resolves nothing (--no-deps), and prunelab is built with the locked
  # setuptools (--no-build-isolation). Packages the lock no longer lists are removed.
  { "$VENV/bin/pip" install -q "$(grep -m1 '^pip==' "$LOCK")" \
    && "$VENV/bin/pip" install -q --no-deps -r "$LOCK" \
    && "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" \
    && "$VENV/bin/python" "$ROOT/scripts/lock.py" --prune; } \
    >"$LOG" 2>&1 || { grep -v "is ignored" "$LOG" | tail -40; echo "[setup] install failed; full log: $LOG"; exit 1; }
  # torchvision's wheel is a CUDA build; next to CPU torch its import fails. The shim registers the
  # two op schemas its Python import needs (see scripts/torchvision_cpu_shim.py); a .pth loads it.
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp "$ROOT/scripts/torchvision_cpu_shim.py" "$SITE/_prunelab_torchvision_cpu_shim.py"
  echo "import _prunelab_torchvision_cpu_shim" > "$SITE/_prunelab_torchvision_cpu_shim.pth"
  "$VENV/bin/python" -c "import torch, timm, transformers, torchvision" || { echo "[setup] imports failed"; exit 1; }
  echo "$STAMP" > "$VENV/.prunelab-stamp"
fi

# Fashion-MNIST for the tiny reproductions comes from Debian's dataset-fashion-mnist package.
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -d "$FMNIST" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) || \
   echo "[setup] could not install dataset-fashion-mnist; tiny reproductions will say how to get it"
fi
export PATH="$VENV/bin:$PATH"
