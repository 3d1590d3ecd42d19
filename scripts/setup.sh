#!/usr/bin/env bash
# Create .venv with everything gptpipe needs; safe to re-run (it skips what is already there).
# Order matters: torch is pinned first so nothing later pulls a CUDA build onto a CPU machine, and
# DeepSpeed (an sdist) is built against that torch without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-dev}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.gptpipe-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-$EXTRAS
if [ -f "$stamp" ]; then
  exit 0
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
# Every later install must keep this torch.
echo "torch==$torch_version" > .venv/constraints.txt

if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  echo "setup: building deepspeed (no prebuilt ops; they compile on first use)"
  "${PIP[@]}" install -c .venv/constraints.txt numpy ninja packaging psutil py-cpuinfo
  DS_BUILD_OPS=0 "${PIP[@]}" install -c .venv/constraints.txt --no-build-isolation deepspeed
fi

echo "setup: installing gptpipe[$EXTRAS]"
"${PIP[@]}" install -c .venv/constraints.txt -e ".[$EXTRAS]"
rm -f .venv/.gptpipe-*
touch "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1))"
