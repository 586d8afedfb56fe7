#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs sale-jax (editable, with the test extra) under the pins in
# constraints.txt. Safe to run again: an existing .venv with the right Python is reused.
#
# jax: the CPU build, or on a machine with an NVIDIA driver the CUDA build that driver runs (the cuda13 or cuda12
# extra of pyproject.toml, pinned to constraints.txt's jax). --cuda=13, --cuda=12 or --cpu choose instead.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/setup.sh [--cpu | --cuda=12 | --cuda=13]"
build=auto
for argument in "$@"; do
  case "$argument" in
    --cpu) build=cpu ;;
    --cuda=12|--cuda=13) build=cuda${argument#--cuda=} ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "setup: unknown argument '$argument'; $usage" >&2; exit 2 ;;
  esac
done

# The CUDA major version the NVIDIA driver supports ("CUDA Version: 13.0" in nvidia-smi's header), or nothing.
driver_cuda_major() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n 1 || true
}

if [ "$build" = auto ]; then
  major=$(driver_cuda_major)
  if [ -z "$major" ]; then
    build=cpu
  elif [ "$major" -ge 13 ]; then
    build=cuda13
  elif [ "$major" -ge 12 ]; then
    build=cuda12
  else
    echo "setup: the NVIDIA driver supports CUDA $major; jax needs CUDA 12 or newer: installing the CPU build" >&2
    build=cpu
  fi
fi

python_is_new_enough() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  local candidate
  for candidate in python3.12 python3.13 python3.14 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_is_new_enough "$candidate"; then
      command -v "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for candidate in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
      if [ -x "$candidate" ] && python_is_new_enough "$candidate"; then
        echo "$candidate"; return 0
      fi
    done
  fi
  return 1
}

if [ -x .venv/bin/python ] && python_is_new_enough .venv/bin/python; then
  venv_python=.venv/bin/python
else
  if ! base_python=$(find_python); then
    echo "setup: no Python >= 3.12 found (looked for python3.12, python3.13, python3.14, python3 and under" \
      "'pyenv root'/versions). Install Python 3.12 or newer (e.g. 'pyenv install 3.12') and run again." >&2
    exit 1
  fi
  echo "setup: creating .venv with $base_python ($("$base_python" --version 2>&1))"
  rm -rf .venv
  "$base_python" -m venv .venv
  venv_python=.venv/bin/python
fi

# The machine-wide pip constraint file (if any) caps torch, which this project does not use; ours replaces it.
export PIP_CONSTRAINT=
"$venv_python" -m pip install --quiet --disable-pip-version-check --upgrade pip
extras=test
[ "$build" = cpu ] || extras=test,$build
echo "setup: installing sale-jax[$extras]"
"$venv_python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$extras]"
echo "setup: ready ($("$venv_python" -c 'import jax; print("jax", jax.__version__, "on", jax.default_backend())'))"
