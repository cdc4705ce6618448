#!/usr/bin/env bash
# The interop layer (tests/interop): files from and to the home tools (diffusers, PEFT, LyCORIS), which are test-only
# dependencies and live in a venv of their own so that no host venv gets them. Called by .ci/run; runs alone too:
#   bash .ci/interop.sh [pytest args]
# The venv: $BLORA_INTEROP_VENV, default ~/.cache/blora-ci/venv-interop; made when missing or incomplete.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV="${BLORA_INTEROP_VENV:-$HOME/.cache/blora-ci/venv-interop}"
PY="$VENV/bin/python"
ready() { "$PY" -c "import torch, diffusers, peft, lycoris, pytest, hypothesis, safetensors, einops, kornia" 2>/dev/null; }

if ! ready; then
  echo "interop: setting up $VENV (torch 2.14.1 as the hosts use, then tests/interop/requirements.txt)"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" || exit 1
  pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
  pip_install torch==2.14.1 || exit 1
  pip_install -r requirements.txt -r tests/interop/requirements.txt pytest hypothesis || exit 1
  ready || { echo "interop: the venv still lacks a package"; exit 1; }
fi

OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider tests/interop "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "interop: pytest collected no tests: failing"
  exit 1
fi
exit "$status"
