#!/usr/bin/env bash
# Packs, here, what tools/device_check.sh needs on a lent GPU machine that reaches no package
# index: the wheels its image lacks (for its Python 3.12, at the versions .venv holds) and
# the embedded model's GGUF, cut in two so that each call's carried tree (this repository's
# 7 MiB with it) stays under the device tool's 64 MiB:
#   .device/a   the wheels, the model package's __init__.py and the GGUF's first part
#   .device/b   the GGUF's second part
# A first call carries .device/a and runs `tools/device_check.sh tests`; a second, at once
# (the machine stays warm 30 s), carries .device/b and runs `tools/device_check.sh model`.
set -euo pipefail
cd "$(dirname "$0")/.."
./dev setup
py=.venv/bin/python
# Missing from that image (its KINDS.md lists what it has); the rest of ours is there.
wanted=(zeroconf ifaddr cbor2 gguf torchao cryptography cffi pycparser pytest-asyncio)
rm -rf .device
mkdir -p .device/a/wheels .device/b
for name in "${wanted[@]}"; do
    version=$($py -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    $py -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device/a/wheels "$name==$version"
done
gguf=$($py -c "from meshshard.model.source import embedded_gguf; print(embedded_gguf())")
cp "$(dirname "$gguf")/__init__.py" .device/a/
half=$((42 * 1024 * 1024))  # the wheels (10 MiB) ride with the first part
head -c "$half" "$gguf" >.device/a/model.1
tail -c +"$((half + 1))" "$gguf" >.device/b/model.2
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") >.device/a/model.sha256
du -sh .device/a .device/b
