#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA device (run from the repository root):
#   1. the GPU-marked tests (tests/gpu): float32 logits within tolerance of the CPU's,
#      bfloat16 top-1 agreement on >= 99% of steps, int8/int4 chains, a CUDA and a CPU stage;
#   2. a 3-peer chain on CUDA against the CPU reference, on the real SmolLM2 weights;
#   3. a speed table: tokens/s of one process and of the 3-peer chain, per dtype and
#      quantization (tools/bench_quant.py --device cuda).
# Prints everything; exits non-zero if a check fails. Sets up .venv as ./dev does.
set -euo pipefail
cd "$(dirname "$0")/.."
./dev setup
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv || true
echo "== 1. GPU-marked tests"
$py -m pytest tests/gpu -m gpu -q -rs
echo "== 2. a 3-peer chain on CUDA against the CPU reference"
$py tools/bench_quant.py --device cuda --check --tokens 64
echo "== 3. speed"
$py tools/bench_quant.py --device cuda --tokens 128 --json docs/benchmarks/quant-cuda.json
