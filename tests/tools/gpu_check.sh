#!/usr/bin/env bash
# The one-GPU check (README, 'Benchmark'), as a single call on a machine that downloads nothing:
#   bash tests/tools/gpu_check.sh                # Mistral-7B-v0.3 shapes, random bf16 weights (< 10 min on an H100/H200)
#   bash tests/tools/gpu_check.sh --config tiny  # the same script on a CPU (tests/test_benchmark.py runs it)
# Wheels carried for the GPU machine (transformers >= 5.23 and what it needs, made with
# `pip download`, see README, 'Benchmark') are installed first, without dependencies, into a
# temporary folder put first on PYTHONPATH, so an older transformers there is shadowed, not replaced.
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".gl/wheels/*.whl" > /dev/null; then
    site="$(mktemp -d)"
    python3 -m pip install --quiet --no-deps --no-index --no-compile --target "$site" .gl/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 tests/tools/benchmark.py --config mistral-7b "$@"  # a later --config wins
