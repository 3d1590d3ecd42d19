#!/usr/bin/env bash
# Create .venv with everything gptpipe needs; safe to re-run (it skips what is already there).
# Order matters: torch is pinned first so nothing later pulls a CUDA build onto a CPU machine, and
# DeepSpeed (an sdist) is built against that torch without build isolation. Every install after torch is held to
# constraints.txt, the versions the test suite passed with, so a new release upstream can't change a fresh setup.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-dev}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [ ! -f constraints.txt ]; then
  echo "setup: constraints.txt is missing (bash scripts/refresh_constraints.sh writes it from a working .venv)" >&2
  exit 1
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# A changed lock reruns the installs too, so .venv follows constraints.txt.
stamp=.venv/.gptpipe-$(cat pyproject.toml scripts/setup.sh constraints.txt | sha1sum | cut -c1-12)-$EXTRAS
if [ -f "$stamp" ]; then
  exit 0
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
# Every later install must keep this torch and otherwise match the lock. The lock's own torch line gives way to the
# torch installed, so a TORCH_SPEC for another build (a CUDA wheel) still works.
grep -v '^torch==' constraints.txt > .venv/constraints.txt
echo "torch==$torch_version" >> .venv/constraints.txt

if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  echo "setup: building deepspeed $(grep '^deepspeed==' .venv/constraints.txt | cut -d= -f3) (no prebuilt ops; they compile on first use)"
  "${PIP[@]}" install -c .venv/constraints.txt numpy ninja packaging psutil py-cpuinfo
  DS_BUILD_OPS=0 "${PIP[@]}" install -c .venv/constraints.txt --no-build-isolation deepspeed
fi

echo "setup: installing gptpipe[$EXTRAS]"
"${PIP[@]}" install -c .venv/constraints.txt -e ".[$EXTRAS]"
rm -f .venv/.gptpipe-*
touch "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1))"
