#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine with no package registry (bench/gpu_check.py says what it runs).
#
#   bash bench/gpu_check.sh WHEELS [NANOGPT]    # on the GPU machine, from the repository root
#
# WHEELS is a folder of wheels (and DeepSpeed's sdist) for that machine's Python, carried beside the repository;
# only what is missing is installed from it, never from the network (--no-index). Make it where there is network,
# for the GPU machine's Python and platform (here for Python 3.12 on x86-64 Linux; torch is expected to be there):
#
#   pip download -d WHEELS --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 -c constraints.txt \
#       dvc dvclive pydantic ruamel.yaml matplotlib ninja safetensors tokenizers pytest hypothesis \
#       hjson py-cpuinfo psutil packaging msgpack nvidia-ml-py einops
#   pip download -d WHEELS --no-binary=:all: --no-deps "deepspeed==$(grep '^deepspeed==' constraints.txt | cut -d= -f3)"
#
# NANOGPT is a checkout of karpathy/nanoGPT at 3adf61e (git clone https://github.com/karpathy/nanoGPT), for its own
# 124M step beside gptpipe's. Everything is installed into the Python on PATH (a GPU image's), with --user when that
# Python's site-packages is not writable.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:?usage: bash bench/gpu_check.sh WHEELS [NANOGPT]}
NANOGPT=${2:-}
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check -q)
if ! "$PY" -c "import sysconfig, os, sys; sys.exit(not os.access(sysconfig.get_paths()['purelib'], os.W_OK))"; then
  PIP+=(--user)
fi

missing() {  # the modules of "$@" that do not import
  for m in "$@"; do "$PY" -c "import $m" 2>/dev/null || echo "$m"; done
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
need=$(missing dvc dvclive pydantic ruamel.yaml matplotlib ninja safetensors tokenizers pytest hypothesis transformers accelerate tiktoken typer rich)
if [ -n "$need" ]; then
  echo "gpu_check: installing from $WHEELS: $need"
  # shellcheck disable=SC2086
  "${PIP[@]}" $need
fi
if [ -n "$(missing deepspeed)" ]; then
  echo "gpu_check: building deepspeed from its sdist in $WHEELS (no prebuilt ops; they compile on first use)"
  "${PIP[@]}" hjson py-cpuinfo psutil packaging msgpack nvidia-ml-py einops
  DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation --no-deps "$WHEELS"/deepspeed-*.tar.gz
fi
if [ -n "$(missing pipeline)" ]; then
  "${PIP[@]}" --no-deps --no-build-isolation -e .
fi
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$(cd .. && pwd)/shared/data/tiktoken_cache} HF_HUB_OFFLINE=1
exec "$PY" bench/gpu_check.py ${NANOGPT:+--nanogpt "$NANOGPT"} "${@:3}"
